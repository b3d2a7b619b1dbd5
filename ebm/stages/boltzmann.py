"""Pipeline stages for Boltzmann machines and structured prediction on the prepared image data.

Each stage is a function with explicit paths that writes exactly the outs ``dvc.yaml`` declares, plus a thin
entry point::

    python -m ebm.stages.boltzmann train_rbm|evaluate_rbm|train_structured|evaluate_structured \
        [--params params.yaml] [--root .]

They read the ``boltzmann`` section of ``params.yaml`` (and ``images.data.dataset``, whose prepared splits
in ``data/images/<dataset>/`` they use) and log to the MLflow experiment ``boltzmann`` through
:mod:`ebm.tracking` (imported lazily, at the boundary).

- **train_rbm**: one RBM per entry of ``boltzmann.rbm.variants`` (CD-k or PCD) on the binarised training
  images → ``models/boltzmann/rbm/<variant>.pt``; curves → ``reports/boltzmann/rbm_curves/<variant>.csv``.
- **evaluate_rbm**: AIS log Z and the test log-likelihood with its standard error (and the exact values
  when the smaller layer can be enumerated), reconstruction error, sample grids and reconstructions →
  ``reports/boltzmann/rbm_metrics.json``, ``reports/boltzmann/rbm_figures/``.
- **train_structured**: the grid CRF by conditional CD on (noisy image, foreground mask) pairs →
  ``models/boltzmann/structured.pt``; curves → ``reports/boltzmann/structured_curves.csv``.
- **evaluate_structured**: Gibbs, annealed Gibbs/ICM and Langevin inference side by side →
  ``reports/boltzmann/structured_metrics.json`` and ``reports/boltzmann/structured_figures/``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ebm.boltzmann.ais import RBMAISConfig, ais_log_partition, mean_log_likelihood
from ebm.boltzmann.rbm import MAX_ENUMERATED_UNITS, BernoulliRBM, exact_log_partition
from ebm.boltzmann.structured import (
    DenoisingTaskConfig,
    GridCRFConfig,
    GridCRFEnergy,
    InferenceConfig,
    StructuredRecipe,
    compare_inference,
    make_denoising_states,
    train_grid_crf,
)
from ebm.boltzmann.training import (
    BinarizeConfig,
    RBMRecipe,
    RBMTrainingConfig,
    binarize,
    reconstruction_error,
    sample_rbm,
    train_rbm,
)
from ebm.checkpoint import atomic_write, load_model, run_fingerprint, save_model, write_json
from ebm.config import ConfigError, from_dict, load_params, section, to_dict
from ebm.data.images import ImageSplit, load_image_split
from ebm.stages.common import (
    StagePaths,
    check_count,
    read_mapping,
    read_seed,
    refuse_torchrun,
    stage_arguments,
)
from ebm.trainer import MetricsCallback, TrainConfig, Trainer

EXPERIMENT = "boltzmann"


@dataclass(frozen=True)
class BoltzmannPaths(StagePaths):
    """Where the Boltzmann stages read and write, relative to the project root."""

    family: ClassVar[str] = "boltzmann"

    def image_data(self, dataset: str) -> Path:
        """The image data stage's prepared split of ``dataset`` (the RBM's and the CRF's input)."""
        return self.root / "data" / "images" / dataset

    @property
    def rbm_models(self) -> Path:
        return self.models / "rbm"

    @property
    def structured_model(self) -> Path:
        return self.models / "structured.pt"


@dataclass(frozen=True)
class RBMEvaluationConfig:
    """What evaluate_rbm measures (``boltzmann.rbm.evaluation``).

    Attributes:
        max_test: score at most this many test images (``None``: all).
        ais: AIS settings.
        exact_max_units: also compute log Z exactly when the smaller layer has at most this many units.
        n_samples: Gibbs chains run for the sample grid.
        sample_steps: Gibbs steps of those chains.
    """

    max_test: int | None = None
    ais: RBMAISConfig = field(default_factory=RBMAISConfig)
    exact_max_units: int = 20
    n_samples: int = 64
    sample_steps: int = 1000

    def __post_init__(self) -> None:
        _check_limit("max_test", self.max_test)
        if not 0 <= self.exact_max_units <= MAX_ENUMERATED_UNITS:
            # found only after the whole AIS run otherwise, by exact_log_partition
            raise ValueError(
                f"exact_max_units must lie in [0, {MAX_ENUMERATED_UNITS}] (2^units terms), "
                f"got {self.exact_max_units}"
            )
        if self.n_samples < 1 or self.sample_steps < 0:
            raise ValueError(
                f"n_samples must be ≥ 1 and sample_steps ≥ 0, got {self.n_samples} and {self.sample_steps}"
            )


@dataclass(frozen=True)
class RBMParams:
    """``boltzmann.rbm``: the shared recipe, its variants (name → CD-k or PCD) and the evaluation."""

    n_hidden: int
    weight_std: float
    variants: dict[str, RBMTrainingConfig]
    train: TrainConfig
    evaluation: RBMEvaluationConfig

    def recipe(self, variant: str) -> RBMRecipe:
        return RBMRecipe(self.n_hidden, self.weight_std, self.variants[variant], self.train)


@dataclass(frozen=True)
class StructuredParams:
    """``boltzmann.structured``: the task, the training subset sizes, the recipe and the inference."""

    task: DenoisingTaskConfig
    max_train: int | None
    max_test: int | None
    recipe: StructuredRecipe
    inference: InferenceConfig


@dataclass(frozen=True)
class BoltzmannParams:
    """The ``boltzmann`` section of ``params.yaml`` plus the global seed (of AIS, sample chains and
    inference) and the dataset the image stage prepared."""

    seed: int
    dataset: str
    binarize: BinarizeConfig
    rbm: RBMParams
    structured: StructuredParams
    threads: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BoltzmannParams:
        raw = read_mapping(params, "boltzmann")
        known = {"threads", "binarize", "rbm", "structured"}
        if unknown := sorted(set(raw) - known):
            raise ConfigError(
                f"unknown key(s) {[f'boltzmann.{k}' for k in unknown]}; valid keys: {sorted(known)}"
            )
        threads = raw.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"boltzmann.threads must be a positive integer or null, got {threads!r}")
        return cls(
            seed=read_seed(params),
            dataset=str(section(params, "images.data.dataset")),
            binarize=from_dict(BinarizeConfig, raw.get("binarize"), "boltzmann.binarize"),
            rbm=_rbm_params(read_mapping(params, "boltzmann.rbm")),
            structured=_structured_params(read_mapping(params, "boltzmann.structured")),
            threads=threads,
        )

    def logged(self) -> dict[str, Any]:
        """The ``boltzmann`` section as the stages use it, defaults filled in, in ``params.yaml``'s layout."""
        rbm, structured = self.rbm, self.structured
        return {
            "threads": self.threads,
            "binarize": to_dict(self.binarize),
            "rbm": {
                "n_hidden": rbm.n_hidden,
                "weight_std": rbm.weight_std,
                "variants": {name: to_dict(variant) for name, variant in rbm.variants.items()},
                "train": to_dict(rbm.train),
                "evaluation": to_dict(rbm.evaluation),
            },
            "structured": {
                "max_train": structured.max_train,
                "max_test": structured.max_test,
                "n_steps": structured.recipe.n_steps,
                "task": to_dict(structured.task),
                "model": to_dict(structured.recipe.model),
                "train": to_dict(structured.recipe.train),
                "inference": to_dict(structured.inference),
            },
        }


def _rbm_params(raw: dict[str, Any]) -> RBMParams:
    where = "boltzmann.rbm"
    variants_raw = raw.pop("variants", None)
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise ConfigError(f"{where}.variants must map variant names to CD settings, got {variants_raw!r}")
    variants = {
        str(name): from_dict(RBMTrainingConfig, values, f"{where}.variants.{name}")
        for name, values in variants_raw.items()
    }
    train = _train_config(RBMRecipe().train, raw.pop("train", None), f"{where}.train")
    evaluation = from_dict(RBMEvaluationConfig, raw.pop("evaluation", None), f"{where}.evaluation")
    shape = from_dict(_RBMShape, raw, where)
    rbm = RBMParams(shape.n_hidden, shape.weight_std, variants, train, evaluation)
    for name in variants:  # a recipe's own checks (PCD's chains against the batch), before any stage runs
        try:
            rbm.recipe(name)
        except ValueError as error:
            raise ConfigError(f"{where}.variants.{name}: {error}") from None
    return rbm


@dataclass(frozen=True)
class _RBMShape:
    n_hidden: int = 500
    weight_std: float = 0.01

    def __post_init__(self) -> None:
        # checked here, before train_rbms clears models/boltzmann/rbm, not by torch at the first draw
        if self.n_hidden < 1:
            raise ValueError(f"n_hidden must be ≥ 1, got {self.n_hidden}")
        if not (math.isfinite(self.weight_std) and self.weight_std > 0):
            raise ValueError(f"weight_std must be a finite standard deviation > 0, got {self.weight_std}")


@dataclass(frozen=True)
class _StructuredSizes:
    max_train: int | None = 10000
    max_test: int | None = 1000
    n_steps: int = 1

    def __post_init__(self) -> None:
        _check_limit("max_train", self.max_train)
        _check_limit("max_test", self.max_test)


def _check_limit(key: str, value: int | None) -> None:
    """A cap on the images used: ``None`` for all of them, else a whole number ≥ 1."""
    check_count(key, value, null="all images")


def _structured_params(raw: dict[str, Any]) -> StructuredParams:
    where = "boltzmann.structured"
    task = from_dict(DenoisingTaskConfig, raw.pop("task", None), f"{where}.task")
    model = from_dict(GridCRFConfig, raw.pop("model", None), f"{where}.model")
    train = _train_config(StructuredRecipe().train, raw.pop("train", None), f"{where}.train")
    inference = from_dict(InferenceConfig, raw.pop("inference", None), f"{where}.inference")
    sizes = from_dict(_StructuredSizes, raw, where)
    recipe = StructuredRecipe(model, sizes.n_steps, train)
    return StructuredParams(task, sizes.max_train, sizes.max_test, recipe, inference)


def _train_config(default: TrainConfig, values: Mapping[str, Any] | None, where: str) -> TrainConfig:
    """A :class:`TrainConfig` whose unset keys keep this model's defaults (not the image models')."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    return from_dict(TrainConfig, {**to_dict(default), **(values or {})}, where)


# --- data -----------------------------------------------------------------------------------------


def _split(params: BoltzmannParams, paths: BoltzmannPaths, name: str) -> ImageSplit:
    split = load_image_split(paths.image_data(params.dataset), name)
    if split.images.shape[1] != 1:
        raise ValueError(
            f"the Boltzmann stages model greyscale images; {params.dataset} has {split.images.shape[1]} "
            "channels (set images.data.dataset to mnist or fashion_mnist)"
        )
    return split


def binary_images(params: BoltzmannParams, paths: BoltzmannPaths, name: str) -> torch.Tensor:
    """A prepared split binarised as ``boltzmann.binarize`` says (a fixed draw per split)."""
    offsets = {"train": 0, "validation": 1, "test": 2}
    return binarize(_split(params, paths, name).images, params.binarize, offset=offsets[name])


def _first(tensor: torch.Tensor, n: int | None) -> torch.Tensor:
    return tensor if n is None else tensor[:n]


# --- RBM stages -----------------------------------------------------------------------------------


def train_rbms(params: BoltzmannParams, paths: BoltzmannPaths, run: Any | None = None) -> dict[str, Any]:
    """Train every RBM variant into ``models/boltzmann/rbm/``; return per-variant training metrics."""
    data = binary_images(params, paths, "train")
    probe = data[:1000]  # reconstruction error is tracked on a fixed subset
    shutil.rmtree(paths.rbm_models, ignore_errors=True)  # no stale variants from an earlier params file
    shutil.rmtree(paths.reports / "rbm_curves", ignore_errors=True)
    metrics: dict[str, Any] = {}
    for variant in params.rbm.variants:
        recipe = params.rbm.recipe(variant)
        reconstruction: list[dict[str, float]] = []
        callbacks: list[MetricsCallback] = [_reconstruction_callback(probe, reconstruction)]
        if run is not None:
            callbacks.append(_mlflow_callback(run, variant, reconstruction))
        fingerprint = run_fingerprint(to_dict(recipe), data.contiguous().numpy().tobytes())
        checkpoint = paths.checkpoints / f"rbm-{variant}-{fingerprint}.ckpt"
        start = time.perf_counter()
        rbm, result = train_rbm(data, recipe, checkpoint_path=checkpoint, callbacks=callbacks)
        seconds = time.perf_counter() - start
        save_model(
            paths.rbm_models / f"{variant}.pt",
            rbm,
            kind="rbm",
            config=rbm.config,
            metadata={
                "dataset": params.dataset,
                "binarize": to_dict(params.binarize),  # `ebm rbm loglik` scores test images the same way
                "variant": variant,
                "steps": result.steps,
                **to_dict(recipe.cd),
            },
        )
        # Matched by step: the callback ran at this process's log steps only (a resumed run's history starts
        # earlier), and a rollback discards logged steps that are then logged again (the last value wins).
        by_step = {int(entry["step"]): entry["reconstruction_error"] for entry in reconstruction}
        history = [
            row | ({"reconstruction_error": by_step[int(row["step"])]} if int(row["step"]) in by_step else {})
            for row in result.history
        ]
        _write_curves(paths.reports / "rbm_curves" / f"{variant}.csv", history, RBM_CURVE_COLUMNS)
        checkpoint.unlink(missing_ok=True)
        metrics[variant] = {
            "train_seconds": seconds,
            "steps": result.steps,
            "recoveries": result.recoveries,
            "reconstruction_error_train": reconstruction_error(rbm, probe),
            "k": recipe.cd.n_steps,
            "persistent": recipe.cd.persistent,
        }
    write_json(paths.reports / "rbm_train.json", metrics)
    return metrics


def _reconstruction_callback(probe: torch.Tensor, rows: list[dict[str, float]]) -> MetricsCallback:
    def record(trainer: Trainer, step: int, _metrics: dict[str, float]) -> None:
        model = trainer.energy
        assert isinstance(model, BernoulliRBM)
        error = reconstruction_error(model, probe.to(model.weight.device))
        rows.append({"step": float(step), "reconstruction_error": error})

    return record


def _mlflow_callback(run: Any, prefix: str, extra: list[dict[str, float]]) -> MetricsCallback:
    def log(_trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        latest = {k: v for k, v in extra[-1].items() if k != "step"} if extra else {}
        values = {k: v for k, v in metrics.items() if k != "step"} | latest
        run.log_metrics({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    return log


def evaluate_rbms(params: BoltzmannParams, paths: BoltzmannPaths) -> dict[str, Any]:
    """AIS (and, where feasible, exact) log Z and test log-likelihood of every trained RBM; figures."""
    config = params.rbm.evaluation
    train_data = binary_images(params, paths, "train")
    test_data = _first(binary_images(params, paths, "test"), config.max_test)
    figures = paths.reports / "rbm_figures"
    shutil.rmtree(figures, ignore_errors=True)
    metrics: dict[str, Any] = {"dataset": params.dataset, "n_test": int(test_data.shape[0])}
    for variant in params.rbm.variants:
        rbm = _load(paths.rbm_models / f"{variant}.pt", BernoulliRBM)
        generator = torch.Generator().manual_seed(params.seed)
        start = time.perf_counter()
        ais = ais_log_partition(rbm, train_data, config.ais, generator=generator)
        ais_seconds = time.perf_counter() - start
        likelihood = mean_log_likelihood(rbm, test_data, ais.log_partition, ais.standard_error)
        result: dict[str, Any] = {
            "test_log_likelihood": likelihood.mean,
            "test_log_likelihood_se": likelihood.standard_error,
            "train_log_likelihood": mean_log_likelihood(
                rbm, train_data[: test_data.shape[0]], ais.log_partition
            ).mean,
            # Ẑ − 3σ̂ ≤ 0 (uneven weights, few chains) leaves log of it unbounded below: null, not −inf
            "ais": {k: v if math.isfinite(v) else None for k, v in dataclasses.asdict(ais).items()},
            "ais_seconds": ais_seconds,
            "reconstruction_error_test": reconstruction_error(rbm, test_data),
        }
        if min(rbm.n_hidden, rbm.n_visible) <= config.exact_max_units:
            exact = exact_log_partition(rbm)
            result["exact_log_partition"] = exact
            result["ais_minus_exact"] = ais.log_partition - exact
            result["test_log_likelihood_exact"] = mean_log_likelihood(rbm, test_data, exact).mean
        metrics[variant] = result
        _, means = sample_rbm(rbm, config.n_samples, config.sample_steps, generator=generator)
        _save_grid(means, figures / f"{variant}_samples.png")
        originals = test_data[:32]
        _save_grid(
            torch.cat([originals, rbm.reconstruct(originals)]), figures / f"{variant}_reconstructions.png"
        )
    write_json(paths.reports / "rbm_metrics.json", metrics)
    return metrics


# --- structured-prediction stages -----------------------------------------------------------------


def structured_states(params: BoltzmannParams, paths: BoltzmannPaths, name: str) -> torch.Tensor:
    """(noisy image, foreground mask) states of a prepared split, capped at ``max_train``/``max_test``."""
    structured = params.structured
    limit = structured.max_train if name == "train" else structured.max_test
    images = _first(_split(params, paths, name).images, limit)
    return make_denoising_states(
        images, structured.task, offset={"train": 0, "validation": 1, "test": 2}[name]
    )


def train_structured(
    params: BoltzmannParams, paths: BoltzmannPaths, run: Any | None = None
) -> dict[str, Any]:
    """Train the grid CRF by conditional CD into ``models/boltzmann/structured.pt``."""
    states = structured_states(params, paths, "train")
    recipe = params.structured.recipe
    callbacks: list[MetricsCallback] = [] if run is None else [_mlflow_callback(run, "structured", [])]
    fingerprint = run_fingerprint(to_dict(recipe), states.contiguous().numpy().tobytes())
    checkpoint = paths.checkpoints / f"structured-{fingerprint}.ckpt"
    start = time.perf_counter()
    model, result = train_grid_crf(states, recipe, checkpoint_path=checkpoint, callbacks=callbacks)
    seconds = time.perf_counter() - start
    save_model(
        paths.structured_model,
        model,
        kind="grid_crf",
        config=recipe.model,
        metadata={"dataset": params.dataset, "steps": result.steps, "task": to_dict(params.structured.task)},
    )
    _write_curves(paths.reports / "structured_curves.csv", result.history, STRUCTURED_CURVE_COLUMNS)
    checkpoint.unlink(missing_ok=True)
    compatibility = model.compatibility.detach()
    metrics = {
        "train_seconds": seconds,
        "steps": result.steps,
        "recoveries": result.recoveries,
        "n_train": int(states.shape[0]),
        # φ[1,1] + φ[0,0] − φ[0,1] − φ[1,0] < 0: the model rewards neighbours that agree
        "coupling_right": float(compatibility[0].trace() - compatibility[0].fliplr().trace()),
        "coupling_down": float(compatibility[1].trace() - compatibility[1].fliplr().trace()),
    }
    write_json(paths.reports / "structured_train.json", metrics)
    return metrics


def evaluate_structured(params: BoltzmannParams, paths: BoltzmannPaths) -> dict[str, Any]:
    """Every inference method on the test states; the table as JSON and as a figure, example panels."""
    from ebm.boltzmann.figures import plot_inference_table, structured_examples
    from ebm.plots import save_figure

    states = structured_states(params, paths, "test")
    model = _load(paths.structured_model, GridCRFEnergy)
    rows, labels = compare_inference(
        model,
        states,
        params.structured.inference,
        generator=torch.Generator().manual_seed(params.seed),
        threshold=params.structured.task.mask_threshold,
    )
    figures = paths.reports / "structured_figures"
    shutil.rmtree(figures, ignore_errors=True)
    title = f"{params.dataset}: foreground from noisy images (σ = {params.structured.task.noise_std:g})"
    save_figure(plot_inference_table(rows, title=title), figures / "inference_table.png")
    _save_grid(structured_examples(states, labels), figures / "examples.png")
    metrics = {
        "dataset": params.dataset,
        "n_test": int(states.shape[0]),
        "methods": {row.key: dataclasses.asdict(row) for row in rows},
        "table_order": [row.key for row in rows],
        "panel_rows": ["noisy input", "true mask", *labels],
    }
    write_json(paths.reports / "structured_metrics.json", metrics)
    return metrics


# --- helpers --------------------------------------------------------------------------------------


def _load(path: Path, kind: type[torch.nn.Module]) -> Any:
    model = load_model(path)
    if not isinstance(model, kind):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a {kind.__name__}")
    return model


def _save_grid(images: torch.Tensor, path: Path) -> Path:
    from ebm.images import save_image_grid  # atomic: a unique temporary file, removed if the write fails

    return save_image_grid(images, path)


RBM_CURVE_COLUMNS = (
    "step",
    "energy_pos",
    "energy_neg",
    "gap",
    "param_grad_norm",
    "reconstruction_error",
    "lr",
)
STRUCTURED_CURVE_COLUMNS = ("step", "energy_pos", "energy_neg", "gap", "param_grad_norm", "lr")


def _write_curves(path: Path, history: Sequence[Mapping[str, float]], columns: Sequence[str]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def _flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of nested metrics as ``a/b`` keys (booleans as 0/1; strings dropped)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{name}/"))
        elif isinstance(value, bool | int | float) and abs(float(value)) < float("inf"):
            flat[name] = float(value)
    return flat


# --- entry point ----------------------------------------------------------------------------------

STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "train_rbm": train_rbms,
    "evaluate_rbm": evaluate_rbms,
    "train_structured": train_structured,
    "evaluate_structured": evaluate_structured,
}


STAGE_ARTIFACTS = {
    "train_rbm": ("rbm_curves",),
    "evaluate_rbm": ("rbm_figures",),
    "train_structured": ("structured_curves.csv",),
    "evaluate_structured": ("structured_figures",),
}

# the models each training stage writes, logged to its MLflow run as well (a folder under its own name)
STAGE_MODELS: dict[str, Callable[[BoltzmannPaths], Path]] = {
    "train_rbm": lambda paths: paths.rbm_models,
    "train_structured": lambda paths: paths.structured_model,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_arguments("ebm.stages.boltzmann", __doc__, STAGES)
    args = parser.parse_args(argv)
    refuse_torchrun(parser, "boltzmann")
    params = BoltzmannParams.from_params(load_params(args.params))
    paths = BoltzmannPaths(args.root.resolve())
    if params.threads is not None:
        torch.set_num_threads(params.threads)  # the entry point owns the process: a CLI-boundary setting

    from ebm.tracking import start_run

    logged = {"seed": params.seed, "images.data.dataset": params.dataset, "boltzmann": params.logged()}
    with start_run(
        project_root=paths.root, experiment=EXPERIMENT, stage=args.stage, params=logged, run_name=args.stage
    ) as run:
        if args.stage in ("train_rbm", "train_structured"):
            metrics = STAGES[args.stage](params, paths, run)
        else:
            metrics = STAGES[args.stage](params, paths)
        run.log_metrics(_flat(metrics))
        for artifact in STAGE_ARTIFACTS[args.stage]:
            run.log_artifact(paths.reports / artifact)  # a folder arrives as <name>/ in the run's artifacts
        if args.stage in STAGE_MODELS:
            run.log_artifact(STAGE_MODELS[args.stage](paths))  # as `ebm.checkpoint.load_model` reads them
    print(f"{args.stage}: done; MLflow run {run.url}", flush=True)


if __name__ == "__main__":
    main()
