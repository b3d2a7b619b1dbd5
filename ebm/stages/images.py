"""Pipeline stages for image EBMs: prepare → train → evaluate → render.

Each stage is a function with explicit paths that writes exactly the outs ``dvc.yaml`` declares, plus a
thin entry point::

    python -m ebm.stages.images prepare|train|evaluate|render [--params params.yaml] [--root .]
    torchrun --standalone --nproc-per-node 2 -m ebm.stages.images train    # data-parallel training

Stages read the ``seed`` and ``images`` sections of ``params.yaml`` and log to the MLflow experiment
``images`` through :mod:`ebm.tracking` (imported lazily, at the boundary).

- **prepare**: the originals (local copy or torchvision download) → ``data/images/`` (seeded splits).
- **train**: the JEM energy and, for the Fréchet distance's feature space, a plain classifier of the
  same architecture → ``models/images/``; the replay buffer → ``models/images/buffer.pt``; curves and
  buffer sample grids → ``reports/images/``. It also runs data-parallel under ``torchrun`` (gloo on CPU,
  NCCL with a GPU per rank): rank 0 writes the outs and logs; the other stages refuse ``torchrun``.
- **evaluate**: accuracy, OOD AUROC per score and OOD set, FD of samples (from the buffer and from noise)
  next to the real-image floor, AIS log Z, restoration PSNR → ``reports/images/metrics.json`` and the
  samples and restoration panels in ``reports/images/samples/``; the ROC curves of the headline OOD score
  (``evaluation.ood_score``) against each OOD set → ``reports/images/ood_roc/<ood_set>.csv``
  (``ood_set,fpr,tpr``, thinned).
- **render**: PNG grids of samples, inpainting and denoising, the training curves and the OOD ROC curves.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ebm.checkpoint import atomic_write, load_model, run_fingerprint, save_model, torch_save, write_json
from ebm.config import ConfigError, from_dict, load_params, to_dict
from ebm.data.images import ImageDataConfig, image_dataset, load_image_split, prepare_image_data
from ebm.distributed import process_group_context
from ebm.evaluation.curves import read_curve_csv, write_curve_folder
from ebm.evaluation.images import (
    OOD_SCORES,
    AISConfig,
    accuracy,
    ais_log_partition,
    bits_per_dim,
    frechet_distance,
    ood_scores,
    ood_sets,
    penultimate_features,
)
from ebm.image_energies import ImageEnergy
from ebm.images import (
    ImageEnergySpec,
    ImageRecipe,
    buffer_grid_callback,
    buffer_proposal,
    buffer_states,
    generate,
    rank_share,
    restore_images,
    save_image_grid,
    train_image_energy,
    uniform_images,
)
from ebm.jem import JEMConfig, dequantise
from ebm.stages.common import (
    StagePaths,
    check_count,
    read_mapping,
    read_seed,
    refuse_torchrun,
    run_on_ranks,
    stage_arguments,
)
from ebm.trainer import resolve_device

EXPERIMENT = "images"


@dataclass(frozen=True)
class ImagePaths(StagePaths):
    """Where the image stages read and write, relative to the project root."""

    family: ClassVar[str] = "images"


@dataclass(frozen=True)
class ClassifierConfig:
    """The plain classifier whose penultimate features define the Fréchet distance (``images.classifier``).

    Checked when the params are read: the classifier trains after the JEM run, and a bad value found
    only then would throw that run's minutes away.
    """

    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_count("steps", self.steps)
        check_count("batch_size", self.batch_size)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite learning rate, got {self.lr!r}")


@dataclass(frozen=True)
class ImageEvaluationConfig:
    """What the evaluate stage measures (``images.evaluation``).

    Attributes:
        max_test: evaluate on at most this many test images (``None``: all).
        n_buffer_samples: samples for the FD drawn from the replay buffer (plus ``sampling.buffer_steps``).
        n_noise_samples: samples for the FD run for ``sampling.n_steps`` from uniform noise, and as many
            from the replay buffer's proposal (``buffer_init``), whose own draws are scored too.
        ood_score: the headline OOD score (all of :data:`~ebm.evaluation.images.OOD_SCORES` are reported).
        n_restore: test images inpainted and denoised.
        ais: the AIS settings for log Z.
    """

    max_test: int | None = None
    n_buffer_samples: int = 10000
    n_noise_samples: int = 1000
    ood_score: str = "energy"
    n_restore: int = 64
    ais: AISConfig = dataclasses.field(default_factory=AISConfig)

    def __post_init__(self) -> None:
        if self.ood_score not in OOD_SCORES:
            raise ValueError(f"unknown OOD score {self.ood_score!r}; choose one of {list(OOD_SCORES)}")
        # -2 would drop the last two test images; the Fréchet distances need two samples on either side
        check_count("max_test", self.max_test, null="all test images", minimum=2)
        # n_buffer_samples -2 sliced off the last two buffer states and put -2 in metrics.json.
        for name in ("n_buffer_samples", "n_noise_samples"):
            check_count(name, getattr(self, name), minimum=2)
        check_count("n_restore", self.n_restore)


@dataclass(frozen=True)
class ImagesParams:
    """The ``images`` section of ``params.yaml`` plus the global seed."""

    seed: int
    data: ImageDataConfig
    recipe: ImageRecipe
    classifier: ClassifierConfig
    evaluation: ImageEvaluationConfig
    threads: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ImagesParams:
        images = read_mapping(params, "images")
        data = from_dict(ImageDataConfig, images.pop("data", None), "images.data")
        # the evaluate stage's typicality scores and Fréchet-distance floors need two images on each side
        for key, value in (("n_validation", data.n_validation), ("max_test", data.max_test)):
            if value is not None and value < 2:
                raise ConfigError(f"images.data.{key} must be ≥ 2 for the evaluate stage, got {value}")
        classifier = from_dict(ClassifierConfig, images.pop("classifier", None), "images.classifier")
        evaluation = from_dict(ImageEvaluationConfig, images.pop("evaluation", None), "images.evaluation")
        threads = images.pop("threads", None)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"images.threads must be a positive integer or null, got {threads!r}")
        recipe = from_dict(ImageRecipe, images, "images")
        if recipe.jem.generative_weight == 0:
            raise ConfigError(
                "images.jem.generative_weight: 0 trains a plain classifier with no replay buffer, and the "
                "evaluate stage scores the buffer's samples; give it a weight > 0 (the pipeline's "
                "classifier baseline is images.classifier)"
            )
        parsed = cls(read_seed(params), data, recipe, classifier, evaluation, threads)
        try:  # built now, not after the JEM run: its train config merges both sections
            parsed.classifier_recipe()
        except ValueError as err:
            raise ConfigError(f"images.classifier (with images.train): {err}") from err
        return parsed

    def logged(self) -> dict[str, Any]:
        """The ``images`` section as the stages use it, defaults filled in, in ``params.yaml``'s layout."""
        return {
            "threads": self.threads,
            "data": to_dict(self.data),
            "classifier": to_dict(self.classifier),
            "evaluation": to_dict(self.evaluation),
            **to_dict(self.recipe),
        }

    def spec(self) -> ImageEnergySpec:
        dataset = image_dataset(self.data.dataset)
        return ImageEnergySpec(self.recipe.model, dataset.image_shape, dataset.n_classes)

    def classifier_recipe(self) -> ImageRecipe:
        """The plain classifier: the same network, cross-entropy only, its own optimiser settings.

        No lag guard (``max_lag``): the classifier runs no chains, and the gap it reports, E(data) −
        E(uniform noise), turns negative as soon as it learns, so the JEM run's guard would roll it back
        and finally stop it.
        """
        train = dataclasses.replace(
            self.recipe.train,
            steps=self.classifier.steps,
            batch_size=self.classifier.batch_size,
            lr=self.classifier.lr,
            betas=(0.9, 0.999),
            ema_decay=None,
            max_lag=None,
            seed=self.recipe.train.seed + 7,
        )
        return dataclasses.replace(self.recipe, jem=JEMConfig(generative_weight=0.0), train=train)


# --- stages ---------------------------------------------------------------------------------------


def prepare(params: ImagesParams, paths: ImagePaths) -> dict[str, Any]:
    """Read the originals and write the seeded splits to ``data/images/<dataset>/``."""
    return prepare_image_data(
        params.data, paths.data / params.data.dataset, seed=params.seed, project_root=paths.root
    )


def train(params: ImagesParams, paths: ImagePaths, run: Any | None = None) -> dict[str, float]:
    """Train the JEM energy and the plain classifier into ``models/images/``; return train metrics.

    In a data-parallel run every rank calls this alike and they train both models together (the
    classifier data-parallel too, so no rank waits idle through it); rank 0 alone writes the files and
    logs to ``run`` (``None`` elsewhere). The buffer file holds the whole replay buffer, every rank's
    shard gathered to rank 0 in rank order, what the evaluate stage starts its chains from; the grids
    during training show rank 0's shard. Every collective (training steps, checkpoints, the gather)
    is reached by all ranks in the same order; rank 0's writes sit between them.

    Raises:
        ValueError: a batch or buffer that does not divide evenly over the ranks, before any training.
    """
    context = process_group_context()
    _check_rank_shares(params, context.world_size)
    data_dir = paths.data / params.data.dataset
    split = load_image_split(data_dir, "train")
    spec = params.spec()
    recipe = params.recipe

    def log(_trainer: Any, step: int, values: dict[str, float]) -> None:
        if run is not None:
            run.log_metrics({k: v for k, v in values.items() if k != "step"}, step=step)

    if context.is_main:  # the grids are rank 0's (the trainer runs callbacks there only)
        shutil.rmtree(paths.reports / "grids", ignore_errors=True)  # no stale grids from an earlier run
    grids = buffer_grid_callback(paths.reports / "grids", recipe.grid_every)
    fingerprint = run_fingerprint(to_dict(recipe), (data_dir / "train.pt").read_bytes())
    checkpoint = paths.checkpoints / f"jem-{fingerprint}.ckpt"
    start = time.perf_counter()
    energy, trainer, result = train_image_energy(
        split.images, split.labels, spec, recipe, checkpoint_path=checkpoint, callbacks=[log, grids]
    )
    seconds = time.perf_counter() - start
    states = buffer_states(trainer)
    shards = context.gather(
        (states if states is not None else torch.empty(0, *spec.image_shape)).detach().cpu()
    )
    if shards is not None:  # rank 0
        metadata = {"dataset": params.data.dataset, "steps": result.steps, "objective": "jem"}
        save_model(paths.models / "energy.pt", energy, kind="image_energy", config=spec, metadata=metadata)
        quantised = (torch.cat(shards).clamp(0, 1) * 255).round().to(torch.uint8)
        torch_save({"states": quantised}, paths.models / "buffer.pt")
        _write_curves(paths.reports / "curves.csv", result.history)
        checkpoint.unlink(missing_ok=True)

    classifier_start = time.perf_counter()
    classifier, _, _ = train_image_energy(split.images, split.labels, spec, params.classifier_recipe())
    classifier_seconds = time.perf_counter() - classifier_start
    if context.is_main:
        save_model(
            paths.models / "classifier.pt",
            classifier,
            kind="image_energy",
            config=spec,
            metadata={"dataset": params.data.dataset, "objective": "cross-entropy (FD feature space)"},
        )
    metrics = {
        "train_seconds": seconds,
        "classifier_seconds": classifier_seconds,
        "steps": float(result.steps),
        "recoveries": float(result.recoveries),
    }
    if result.history:  # none when the run logged no step (log_every above the steps left)
        final = result.history[-1]
        metrics |= {
            key: final[name]
            for key, name in (("final_gap", "gap"), ("final_train_accuracy", "accuracy"))
            if name in final
        }
    if context.is_main:
        write_json(paths.reports / "train.json", metrics)
    return metrics


def _check_rank_shares(params: ImagesParams, world_size: int) -> None:
    """Refuse, before any training, a batch or buffer the data-parallel ranks cannot share out evenly:
    the classifier's batch would otherwise be refused only after the JEM run."""
    for key, count in (
        ("images.train.batch_size", params.recipe.train.batch_size),
        ("images.classifier.batch_size", params.classifier.batch_size),
    ):
        if count % world_size:
            raise ValueError(
                f"{key} {count} must be divisible by the {world_size} data-parallel processes: each draws "
                "batch_size / world_size images a step"
            )
    rank_share(params.recipe, world_size)  # the buffer and the chains per step


def evaluate(params: ImagesParams, paths: ImagePaths) -> dict[str, Any]:
    """Accuracy, OOD AUROCs, FD of samples and its floor, AIS log Z and restoration PSNR."""
    config = params.evaluation
    data_dir = paths.data / params.data.dataset
    device = resolve_device(params.recipe.train.device)
    energy = _load_image_model(paths.models / "energy.pt", device)
    classifier = _load_image_model(paths.models / "classifier.pt", device)
    test, validation = load_image_split(data_dir, "test"), load_image_split(data_dir, "validation")
    n_test = test.images.shape[0] if config.max_test is None else min(config.max_test, test.images.shape[0])
    x_test, y_test = test.unit()[:n_test], test.labels[:n_test]
    generator = torch.Generator().manual_seed(params.seed)
    device_generator = torch.Generator(device).manual_seed(params.seed)
    spec = params.spec()
    sampling = params.recipe.sampling
    sampler = params.recipe.sampler.build()

    out_sets = ood_sets(x_test, generator=generator)
    scores = ood_scores(energy, x_test, out_sets, reference_images=validation.unit())
    aurocs = scores.aurocs()
    _write_ood_roc(paths.reports / "ood_roc", scores.roc_curves(config.ood_score))
    digits = out_sets["sklearn_digits"]

    # bits/dim scores the test pixels as training saw them, dequantised to (k + u) / 256; its own seeded
    # stream, so the other metrics draw what they drew before
    dequantised = dequantise(test.images[:n_test], generator=torch.Generator().manual_seed(params.seed + 1))
    with torch.no_grad():
        mean_test_energy = float(torch.cat([energy(c.to(device)).cpu() for c in x_test.split(500)]).mean())
        mean_digits_energy = float(torch.cat([energy(c.to(device)).cpu() for c in digits.split(500)]).mean())
        mean_dequantised_energy = float(
            torch.cat([energy(c.to(device)).cpu() for c in dequantised.split(500)]).mean()
        )

    def run_chains(start: torch.Tensor, n_steps: int) -> torch.Tensor:
        return generate(
            energy,
            start,
            sampler=sampler,
            n_steps=n_steps,
            generator=device_generator,
            batch_size=sampling.batch_size,
        )

    buffer_states = torch.load(paths.models / "buffer.pt", weights_only=True)["states"]
    n_buffer = min(config.n_buffer_samples, buffer_states.shape[0])
    from_buffer = run_chains(buffer_states[:n_buffer].float().div(255).to(device), sampling.buffer_steps)
    noise_start = uniform_images(
        config.n_noise_samples, spec.image_shape, generator=device_generator, device=device
    )
    from_noise = run_chains(noise_start, sampling.n_steps)
    # Fresh chains from the buffer's own proposal, and the proposal's draws themselves: with a proposal
    # fitted to the data (class Gaussians), the EBM must beat what it starts from, or it added nothing.
    if params.recipe.buffer_init == "uniform":
        proposal_start, from_proposal = noise_start, from_noise  # the proposal is the uniform noise
    else:
        train_split = load_image_split(data_dir, "train")
        proposal = buffer_proposal(params.recipe, spec.image_shape, train_split.images, train_split.labels)
        proposal_start = proposal.sample(config.n_noise_samples, generator=device_generator, device=device)
        from_proposal = run_chains(proposal_start, sampling.n_steps)
    features_test = penultimate_features(classifier, x_test)

    def fd_to_test(images: torch.Tensor) -> float:
        return frechet_distance(penultimate_features(classifier, images), features_test)

    def fd_of_first(features: torch.Tensor, n: int) -> float:  # features of n images, computed once
        return frechet_distance(features[:n], features_test)

    # An FD estimate is biased upwards by about 1/n (in the classifier's 128 features: ~1.3 from 1,000
    # images of the very distribution, ~0.35 from 5,000), so each sample set is compared with real
    # held-out images of its own size: the buffer's samples (as many as there are validation images)
    # with the floor, the 1,000-image sets with a 1,000-image floor.
    features_buffer = penultimate_features(classifier, from_buffer)
    features_real = penultimate_features(classifier, validation.unit())
    n_matched = min(n_buffer, features_real.shape[0])
    n_small = min(config.n_noise_samples, features_real.shape[0])
    fd = {
        "fd_buffer_samples": fd_of_first(features_buffer, n_buffer),
        "fd_buffer_samples_matched": fd_of_first(features_buffer, n_matched),
        "fd_noise_samples": fd_to_test(from_noise),
        "fd_proposal_samples": fd_to_test(from_proposal),
        "fd_proposal_draws": fd_to_test(proposal_start),
        "fd_real_floor": fd_of_first(features_real, n_matched),
        "fd_real_floor_small": fd_of_first(features_real, n_small),
    }
    sample_labels = {
        "buffer_samples_classifier_confidence": _mean_confidence(classifier, from_buffer),
        "test_classifier_confidence": _mean_confidence(classifier, x_test),
    }

    ais = ais_log_partition(energy, spec.image_shape, config.ais, generator=device_generator)
    n_dims = int(torch.tensor(spec.image_shape).prod())
    restoration, panels = restore_images(
        energy, x_test[: config.n_restore].to(device), params.recipe, generator=device_generator
    )
    metrics: dict[str, Any] = {
        "dataset": params.data.dataset,
        "n_test": n_test,
        "accuracy": accuracy(energy, x_test, y_test),
        "classifier_accuracy": accuracy(classifier, x_test, y_test),
        "ood_score": config.ood_score,
        "ood_auroc": aurocs[config.ood_score],
        "ood_auroc_by_score": aurocs,
        "energy_trap": {
            "mean_energy_test": mean_test_energy,
            "mean_energy_sklearn_digits": mean_digits_energy,
            "digits_lower_than_test": mean_digits_energy < mean_test_energy,
        },
        **fd,
        "n_buffer_samples": n_buffer,
        "n_noise_samples": config.n_noise_samples,
        "n_fd_matched": n_matched,
        "n_fd_small": n_small,
        **sample_labels,
        "ais": dataclasses.asdict(ais),
        "mean_energy_test_dequantised": mean_dequantised_energy,
        "test_bits_per_dim_ais": bits_per_dim(mean_dequantised_energy, ais.log_partition, n_dims),
        "restoration": dataclasses.asdict(restoration),
    }
    samples = paths.reports / "samples"
    _save_tensors(
        samples / "generated.pt",
        buffer=from_buffer,
        noise=from_noise,
        proposal=from_proposal,
        start=proposal_start,
    )
    _save_tensors(samples / "restoration.pt", **panels)
    write_json(paths.reports / "metrics.json", metrics)
    return metrics


def render(params: ImagesParams, paths: ImagePaths) -> list[Path]:
    """8×8 PNG grids of samples (from the buffer, from noise), inpainting and denoising; curves PNG."""
    samples = paths.reports / "samples"
    figures = paths.reports / "figures"
    generated = torch.load(samples / "generated.pt", weights_only=True)
    panels = torch.load(samples / "restoration.pt", weights_only=True)
    written = [
        save_image_grid(generated["buffer"][:64], figures / "samples_buffer.png"),
        save_image_grid(generated["noise"][:64], figures / "samples_noise.png"),
        save_image_grid(generated["proposal"][:64], figures / "samples_proposal.png"),
        save_image_grid(generated["start"][:64], figures / "proposal_draws.png"),
    ]
    for task, rows in (
        ("inpainting", ("original", "masked", "inpainted")),
        ("denoising", ("original", "noisy", "denoised")),
    ):
        stacked = torch.cat([panels[row][:8] for row in rows])  # (3·8, C, H, W): one row per panel
        written.append(save_image_grid(stacked, figures / f"{task}.png"))
    written.append(_plot_curves(paths.reports / "curves.csv", figures / "curves.png"))
    written.append(
        _plot_ood_roc(paths.reports / "ood_roc", paths.reports / "metrics.json", figures / "ood_roc.png")
    )
    return written


# --- helpers --------------------------------------------------------------------------------------


def _load_image_model(path: Path, device: torch.device) -> ImageEnergy:
    model = load_model(path, map_location=device)
    if not isinstance(model, ImageEnergy):
        raise TypeError(f"{path} holds a {type(model).__name__}, not an image energy")
    return model


@torch.no_grad()
def _mean_confidence(classifier: ImageEnergy, images: torch.Tensor) -> float:
    device = next(classifier.parameters()).device
    probs = torch.cat(
        [classifier.logits(c.to(device)).softmax(1).max(1).values.cpu() for c in images.split(500)]
    )
    return float(probs.mean())


def _save_tensors(path: Path, **tensors: torch.Tensor) -> None:
    payload = {name: t.detach().cpu() for name, t in tensors.items()}
    torch_save(payload, path)


CURVE_COLUMNS = (
    "step",
    "energy_pos",
    "energy_neg",
    "gap",
    "energy_noise",
    "sampler_grad_norm",
    "sampler_steps",
    "cross_entropy",
    "accuracy",
    "lr",
)


def _write_curves(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def _write_ood_roc(folder: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """One ``<ood_set>.csv`` (``ood_set,fpr,tpr``) per OOD set; CSV files of other sets are removed."""
    write_curve_folder(
        folder, {name: {"ood_set": name, "fpr": fpr, "tpr": tpr} for name, (fpr, tpr) in curves.items()}
    )


def _plot_ood_roc(folder: Path, metrics_path: Path, out: Path) -> Path:
    """The OOD ROC curves the evaluate stage wrote, one line per set, AUROCs from its metrics."""
    from ebm.plots import plot_roc_curves, save_figure

    metrics = json.loads(metrics_path.read_text())
    score = metrics["ood_score"]
    curves = {path.stem: read_curve_csv(path, "fpr", "tpr") for path in sorted(folder.glob("*.csv"))}
    if not curves:
        raise ValueError(f"{folder}: no OOD ROC curves (*.csv); rerun the evaluate stage")
    figure = plot_roc_curves(
        curves,
        metrics["ood_auroc_by_score"][score],
        title=f"OOD detection by the {score!r} score (positive: test images)",
    )
    return save_figure(figure, out)


def _plot_curves(csv_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ebm.plots import save_figure

    with open(csv_path, newline="") as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    figure, (energies, classification) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [row["step"] for row in rows]
    for key, label in (
        ("energy_pos", "E⁺ (data)"),
        ("energy_neg", "E⁻ (buffer)"),
        ("energy_noise", "E(uniform noise)"),
    ):
        energies.plot(steps, [row[key] for row in rows], label=label)
    energies.set(xlabel="step", ylabel="energy", title="energies during training")
    energies.legend()
    classification.plot(steps, [row["accuracy"] for row in rows], label="batch accuracy")
    classification.plot(steps, [row["cross_entropy"] for row in rows], label="cross-entropy")
    classification.set(xlabel="step", title="classification")
    classification.legend()
    return save_figure(figure, out)


# --- entry point ----------------------------------------------------------------------------------

STAGES = ("prepare", "train", "evaluate", "render")


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_arguments("ebm.stages.images", __doc__, STAGES)
    args = parser.parse_args(argv)
    if args.stage != "train":
        refuse_torchrun(parser, "images", stage=args.stage)
    params = ImagesParams.from_params(load_params(args.params))
    paths = ImagePaths(args.root.resolve())
    if params.threads is not None:
        torch.set_num_threads(params.threads)  # the entry point owns the process: a CLI-boundary setting
    run_on_ranks(
        params.recipe.train.device,
        lambda: _run_tracked(args.stage, params, paths),
        lambda: train(params, paths),  # the same training as rank 0, which alone logs and writes
    )


def _run_tracked(stage_name: str, params: ImagesParams, paths: ImagePaths) -> None:
    """Run one stage inside its MLflow run."""
    from ebm.tracking import start_run

    stage = f"{stage_name}_images"
    with start_run(
        project_root=paths.root,
        experiment=EXPERIMENT,
        stage=stage,
        params={"seed": params.seed, "images": params.logged()},
        run_name=stage,
    ) as run:
        if stage_name == "prepare":
            manifest = prepare(params, paths)
            run.log_metrics({f"{name}_count": float(s["count"]) for name, s in manifest["splits"].items()})
        elif stage_name == "train":
            run.log_metrics(train(params, paths, run))
            run.log_artifact(paths.reports / "curves.csv")
            for model in ("energy.pt", "classifier.pt"):  # as `ebm.load_model` reads them
                run.log_artifact(paths.models / model, "models")
            if (paths.reports / "grids").is_dir():
                run.log_artifact(paths.reports / "grids", "grids")
        elif stage_name == "evaluate":
            run.log_metrics(_flat(evaluate(params, paths)))
            run.log_artifact(paths.reports / "ood_roc")  # a folder lands under its own name: ood_roc/
        else:
            for figure in render(params, paths):
                run.log_artifact(figure, "figures")
    print(f"{stage}: done; MLflow run {run.url}", flush=True)


def _flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as ``a/b`` keys (booleans as 0/1; strings dropped)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{name}/"))
        elif isinstance(value, bool | int | float) and float(value) == float(value):
            flat[name] = float(value)
    return flat


if __name__ == "__main__":
    main()
