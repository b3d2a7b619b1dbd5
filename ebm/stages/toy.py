"""Pipeline stages for the 2D density models: prepare → train → evaluate → render.

Each stage is a function with explicit paths that writes exactly the outs ``dvc.yaml`` declares, plus
a thin entry point::

    python -m ebm.stages.toy prepare|train|evaluate|render [--params params.yaml] [--root .]

The train stage also runs data-parallel under ``torchrun`` from the same entry point, one process per
GPU (NCCL) or, without CUDA, per CPU process (gloo); ``toy.train.batch_size`` stays the global batch::

    torchrun --standalone --nproc_per_node 2 -m ebm.stages.toy train [--params params.yaml] [--root .]

Every rank trains; rank 0 alone writes the models, reports and checkpoints and logs to MLflow.

Stages read the ``seed`` and ``toy`` sections of ``params.yaml`` and log to the MLflow experiment
``toy2d`` through :mod:`ebm.tracking` (the only tracking import, done lazily at the boundary).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ebm.checkpoint import atomic_write, load_model, run_fingerprint, save_model, write_json
from ebm.config import from_dict, load_params, section, to_dict
from ebm.data.toy2d import TOY_DATASETS, make_toy_dataset
from ebm.distributed import process_group_context
from ebm.stages.common import (
    StagePaths,
    check_count,
    read_mapping,
    read_seed,
    refuse_torchrun,
    run_on_ranks,
    stage_arguments,
)
from ebm.toy import Toy2DConfig, evaluate_energy, polish_checkpoint, train_energy

EXPERIMENT = "toy2d"


@dataclass(frozen=True)
class ToyPaths(StagePaths):
    """Where the 2D stages read and write, relative to the project root."""

    family: ClassVar[str] = "toy"


@dataclass(frozen=True)
class ToyDataParams:
    """``toy.datasets``, ``toy.n_train`` and ``toy.n_test``: which datasets, and how many points of each.

    Attributes:
        datasets: names of registered toy datasets (:data:`~ebm.data.toy2d.TOY_DATASETS`), each once.
        n_train: training points drawn per dataset (≥ 1).
        n_test: test points drawn per dataset (≥ 1).
    """

    datasets: tuple[str, ...]
    n_train: int
    n_test: int

    KEYS: ClassVar[tuple[str, ...]] = ("datasets", "n_train", "n_test")

    def __post_init__(self) -> None:
        if not isinstance(self.datasets, tuple) or not self.datasets:
            raise ValueError(f"datasets must be a non-empty list of toy dataset names, got {self.datasets!r}")
        for name in self.datasets:
            if name not in TOY_DATASETS:
                raise ValueError(
                    f"datasets: unknown toy dataset {name!r}; valid names: {', '.join(TOY_DATASETS)}"
                )
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets names a dataset twice: {list(self.datasets)}")
        check_count("n_train", self.n_train)
        check_count("n_test", self.n_test)


@dataclass(frozen=True)
class ToyParams:
    """The ``toy`` section of ``params.yaml`` plus the global seed."""

    seed: int
    datasets: tuple[str, ...]
    n_train: int
    n_test: int
    recipe: Toy2DConfig

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ToyParams:
        toy = read_mapping(params, "toy")
        for key in ToyDataParams.KEYS:
            section(params, f"toy.{key}")  # a missing key is an error naming it, not a bare KeyError
        recipe = {k: v for k, v in toy.items() if k not in ToyDataParams.KEYS}
        data = from_dict(ToyDataParams, {k: toy[k] for k in ToyDataParams.KEYS}, "toy")
        return cls(
            read_seed(params),
            data.datasets,
            data.n_train,
            data.n_test,
            from_dict(Toy2DConfig, recipe, "toy"),
        )

    def logged(self) -> dict[str, Any]:
        """The ``toy`` section as the stages use it, defaults filled in, in ``params.yaml``'s layout: what
        MLflow records (the section as written would leave out every key a user left at its default)."""
        data = {"datasets": list(self.datasets), "n_train": self.n_train, "n_test": self.n_test}
        return {**data, **to_dict(self.recipe)}


# --- stages ---------------------------------------------------------------------------------------


def prepare(params: ToyParams, paths: ToyPaths) -> None:
    """Draw the seeded train and test sets of every dataset into ``data/toy/<name>.npz``."""
    for index, name in enumerate(params.datasets):
        dataset = make_toy_dataset(name)
        generator = torch.Generator().manual_seed(params.seed * 1000 + index)
        x_train = dataset.sample(params.n_train, generator=generator)
        x_test = dataset.sample(params.n_test, generator=generator)
        _save_npz(paths.data / f"{name}.npz", train=x_train.numpy(), test=x_test.numpy())


def train(params: ToyParams, paths: ToyPaths, run: Any | None = None) -> dict[str, dict[str, float]]:
    """Train one energy per dataset into ``models/toy/<name>.pt``; return per-dataset train metrics.

    In a data-parallel run every rank calls this alike and they train together; rank 0 alone writes the
    files, once every rank has finished the same training, and logs to ``run`` (``None`` elsewhere).
    """
    context = process_group_context()
    metrics: dict[str, dict[str, float]] = {}
    for name in params.datasets:
        x_train, _ = _load_split(paths, name)
        recipe = params.recipe
        fingerprint = run_fingerprint(to_dict(recipe), (paths.data / f"{name}.npz").read_bytes())
        checkpoint = paths.checkpoints / f"{name}-{fingerprint}.ckpt"

        def log(_trainer: Any, step: int, values: dict[str, float], dataset: str = name) -> None:
            if run is not None:
                run.log_metrics({f"{dataset}/{k}": v for k, v in values.items() if k != "step"}, step=step)

        start = time.perf_counter()
        energy, result = train_energy(
            x_train, recipe, bounds=make_toy_dataset(name).bounds, checkpoint_path=checkpoint, callbacks=[log]
        )
        seconds = time.perf_counter() - start
        context.barrier()
        if context.is_main:
            save_model(
                paths.models / f"{name}.pt",
                energy,
                kind="mlp_energy",
                config=recipe.model,
                metadata={"dataset": name, "steps": result.steps},
            )
            _write_curves(paths.reports / "curves" / f"{name}.csv", result.history)
            checkpoint.unlink(missing_ok=True)
            polish_checkpoint(checkpoint).unlink(missing_ok=True)
        metrics[name] = {
            "train_seconds": seconds,
            "steps": float(result.steps),
            "recoveries": float(result.recoveries),
            "polish_steps": float(result.polish.steps if result.polish is not None else 0),
        }
        if result.history:  # none when the run logged no step (log_every above the steps left)
            metrics[name]["final_gap"] = result.history[-1]["gap"]
    if context.is_main:
        write_json(paths.reports / "train.json", metrics)
    return metrics


def evaluate(params: ToyParams, paths: ToyPaths) -> dict[str, dict[str, float]]:
    """Exact-grid NLL, gap to the entropy floor, MMD and the CV-KDE baseline for every dataset."""
    metrics: dict[str, dict[str, float]] = {}
    for name in params.datasets:
        dataset = make_toy_dataset(name)
        x_train, x_test = _load_split(paths, name)
        energy = load_model(paths.models / f"{name}.pt")
        report, samples = evaluate_energy(
            energy, dataset, params.recipe, x_train=x_train, x_test=x_test, seed=params.seed
        )
        _save_npz(paths.reports / "samples" / f"{name}.npz", samples=samples.numpy())
        metrics[name] = {key: float(value) for key, value in dataclasses.asdict(report).items()}
    write_json(paths.reports / "metrics.json", metrics)
    return metrics


def render(params: ToyParams, paths: ToyPaths) -> list[Path]:
    """The multi-panel heatmap of all datasets plus one energy/density figure per dataset."""
    from ebm.plots import DensityPanel, plot_density_grid, plot_energy_and_density, save_figure

    metrics = json.loads((paths.reports / "metrics.json").read_text())
    panels, written = [], []
    for name in params.datasets:
        dataset = make_toy_dataset(name)
        x_train, _ = _load_split(paths, name)
        energy = load_model(paths.models / f"{name}.pt")
        with np.load(paths.reports / "samples" / f"{name}.npz") as samples_file:
            samples = torch.from_numpy(samples_file["samples"])
        panels.append(
            DensityPanel(
                name=name,
                energy=energy,
                bounds=dataset.bounds,
                true_log_prob=dataset.log_prob,
                data=x_train,
                samples=samples,
                nll=metrics[name]["nll"],
                gap=metrics[name]["gap"],
            )
        )
        figure = plot_energy_and_density(energy, dataset.bounds, data=x_train, samples=samples, title=name)
        written.append(save_figure(figure, paths.reports / "figures" / f"{name}.png"))
    written.append(save_figure(plot_density_grid(panels), paths.reports / "heatmaps.png"))
    return written


# --- helpers --------------------------------------------------------------------------------------


def _load_split(paths: ToyPaths, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = paths.data / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data for {name!r} at {path}; run the prepare_toy stage first")
    with np.load(path) as arrays:
        return torch.from_numpy(arrays["train"]), torch.from_numpy(arrays["test"])


def _save_npz(path: Path, **arrays: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _write_curves(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    columns = [
        "step",
        "energy_pos",
        "energy_neg",
        "gap",
        "sampler_grad_norm",
        "acceptance_rate",
        "sampler_steps",
        "lr",
    ]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


# --- entry point ----------------------------------------------------------------------------------

STAGES = ("prepare", "train", "evaluate", "render")


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_arguments("ebm.stages.toy", __doc__, STAGES)
    args = parser.parse_args(argv)
    if args.stage != "train":
        refuse_torchrun(parser, "toy", stage=args.stage)
    params = ToyParams.from_params(load_params(args.params))
    paths = ToyPaths(args.root.resolve())
    run_on_ranks(
        params.recipe.train.device,
        lambda: _run_tracked(args.stage, params, paths),
        lambda: train(params, paths),  # the same training as rank 0, which alone logs and writes
    )


def _run_tracked(stage_name: str, params: ToyParams, paths: ToyPaths) -> None:
    """Run one stage inside its MLflow run."""
    from ebm.tracking import start_run

    stage = f"{stage_name}_toy"
    with start_run(
        project_root=paths.root,
        experiment=EXPERIMENT,
        stage=stage,
        params={"seed": params.seed, "toy": params.logged()},
        run_name=stage,
    ) as run:
        if stage_name == "prepare":
            prepare(params, paths)
        elif stage_name == "train":
            run.log_metrics(_flat(train(params, paths, run)))
            for curve in sorted((paths.reports / "curves").glob("*.csv")):
                run.log_artifact(curve, "curves")
            for name in params.datasets:  # the trained energies, as `ebm.checkpoint.load_model` reads them
                run.log_artifact(paths.models / f"{name}.pt", "models")
        elif stage_name == "evaluate":
            run.log_metrics(_flat(evaluate(params, paths)))
        else:
            for figure in render(params, paths):
                run.log_artifact(figure, "figures")
    print(f"{stage}: done; MLflow run {run.url}", flush=True)


def _flat(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {
        f"{name}/{key}": value
        for name, values in metrics.items()
        for key, value in values.items()
        if np.isfinite(value)
    }


if __name__ == "__main__":
    main()
