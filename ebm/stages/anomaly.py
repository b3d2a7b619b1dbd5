"""Pipeline stages for the transaction anomaly detector: prepare → train → evaluate → render, register.

Each stage is a function with explicit paths that writes exactly the outs ``dvc.yaml`` declares, plus
a thin entry point::

    python -m ebm.stages.anomaly prepare|train|evaluate|render|register [--params params.yaml] [--root .]

- ``prepare``: the synthetic transactions (``data/anomaly/transactions.{parquet,csv}``) and their split by
  time (``train.parquet``: earlier 60 %, ``test.parquet``: later 40 %).
- ``train``: :class:`~ebm.anomaly.detector.EnergyAnomalyDetector` fitted on the training rows without
  their labels → ``models/anomaly/detector.pt``; ``reports/anomaly/train.json``.
- ``evaluate``: the detector and the baselines on the test rows → ``reports/anomaly/metrics.json``
  (AUROC, AUPRC, recall at 1 % FPR, precision@k), the scored test file with reasons and each baseline's
  score (``<baseline>_score``), and the energy histogram of normal vs flagged rows
  (``reports/anomaly/energy_histogram.png``).
- ``render``: ROC and precision–recall curves of the detector and the baselines from the scored test
  file → ``reports/anomaly/roc/<model>.csv`` (``model,fpr,tpr``), ``reports/anomaly/pr/<model>.csv``
  (``model,recall,precision``), at most :data:`~ebm.evaluation.curves.MAX_CURVE_POINTS` points each,
  and both in one figure, ``reports/anomaly/curves.png``.
- ``register``: the detector as an MLflow pyfunc, registered as ``ebm-anomaly-detector``; the alias
  ``champion`` moves only to a better model (see :mod:`ebm.anomaly.registry`) →
  ``reports/anomaly/registration.json``.

Stages read the ``seed`` and ``anomaly`` sections of ``params.yaml`` and log to the MLflow experiment
``anomaly`` through :mod:`ebm.tracking`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ebm.anomaly.baselines import BASELINES
from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector
from ebm.anomaly.transactions import (
    FEATURES,
    LABEL,
    TransactionsConfig,
    generate_transactions,
    split_by_time,
    write_table,
)
from ebm.checkpoint import write_json
from ebm.config import from_dict, load_params, to_dict
from ebm.evaluation.curves import DetectionCurves
from ebm.stages.common import StagePaths, read_mapping, read_seed, refuse_torchrun, stage_arguments

EXPERIMENT = "anomaly"

METRIC_NAMES = ("auroc", "auprc", "recall_at_1pct_fpr", "precision_at_k")
"""The detection metrics the evaluate stage writes for every detector (``DetectionMetrics``' fields)."""

EBM_SCORE = "anomaly_score"
"""The detector's column in the scored test file; each baseline's is ``<baseline>_score``."""


@dataclass(frozen=True)
class AnomalyPaths(StagePaths):
    """Where the anomaly stages read and write, relative to the project root."""

    family: ClassVar[str] = "anomaly"

    @property
    def model(self) -> Path:
        return self.models / "detector.pt"

    @property
    def scored_test(self) -> Path:
        return self.reports / "scored_test.parquet"


@dataclass(frozen=True)
class DataParams:
    n_customers: int = 3000
    days: int = 30
    warmup_days: int = 30
    n_regions: int = 12
    fraud_rate: float = 0.15
    train_fraction: float = 0.6

    def __post_init__(self) -> None:
        # 1.0 left no test rows and the stage "succeeded"; 0.0 trained on one row
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {self.train_fraction}")
        TransactionsConfig(  # the generator's own checks, run now rather than in the prepare stage
            n_customers=self.n_customers,
            days=self.days,
            warmup_days=self.warmup_days,
            n_regions=self.n_regions,
            fraud_rate=self.fraud_rate,
        )


@dataclass(frozen=True)
class EvaluateParams:
    """``anomaly.evaluate``: the baselines scored beside the EBM (names in ``ebm.anomaly.baselines``)."""

    baselines: tuple[str, ...] = ("iforest", "ecod")

    def __post_init__(self) -> None:
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise ValueError(f"baselines: unknown baseline(s) {unknown}; choose from {list(BASELINES)}")


@dataclass(frozen=True)
class RegisterParams:
    """``anomaly.register``: the registered model's name and the test metric that decides the champion
    (a field of :class:`~ebm.anomaly.metrics.DetectionMetrics`, as the evaluate stage writes them)."""

    model_name: str = "ebm-anomaly-detector"
    metric: str = "auprc"

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"metric must be one of {list(METRIC_NAMES)}, got {self.metric!r}")


@dataclass(frozen=True)
class AnomalyParams:
    """The ``anomaly`` section of ``params.yaml`` plus the global seed."""

    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AnomalyParams:
        anomaly = read_mapping(params, "anomaly")
        return from_dict(cls, {"seed": read_seed(params), **anomaly}, "anomaly")

    def logged(self) -> dict[str, Any]:
        """The ``anomaly`` section as the stages use it, defaults filled in, in ``params.yaml``'s layout."""
        return {key: value for key, value in to_dict(self).items() if key != "seed"}


# --- stages ---------------------------------------------------------------------------------------


def prepare(params: AnomalyParams, paths: AnomalyPaths) -> dict[str, float]:
    """Generate the transactions and split them by time into ``data/anomaly``."""
    data = params.data
    config = TransactionsConfig(
        n_customers=data.n_customers,
        days=data.days,
        warmup_days=data.warmup_days,
        n_regions=data.n_regions,
        fraud_rate=data.fraud_rate,
        seed=params.seed,
    )
    table = generate_transactions(config)
    train, test = split_by_time(table, data.train_fraction)
    write_table(table, paths.data / "transactions.parquet")
    write_table(table, paths.data / "transactions.csv")
    write_table(train, paths.data / "train.parquet")
    write_table(test, paths.data / "test.parquet")
    return {"rows": float(len(table)), "fraud_share": float(table[LABEL].mean())}


def train(params: AnomalyParams, paths: AnomalyPaths) -> dict[str, float]:
    """Fit the detector on the training rows (labels unused) and save it."""
    frame = pd.read_parquet(paths.data / "train.parquet")
    start = time.perf_counter()
    detector = EnergyAnomalyDetector(params.detector).fit(frame[FEATURES])
    seconds = time.perf_counter() - start
    detector.save(paths.model, metadata={"rows": len(frame), "features": FEATURES})
    finals = [history[-1] for history in detector.history_ if history]
    metrics = {
        "fit_seconds": seconds,
        "train_rows": float(len(frame)),
        "threshold": float(detector.threshold_),
        "flagged_share": float(detector.labels_.mean()),
    }
    if finals:  # no residual members (n_members: 0): no contrastive training to report on
        metrics["final_gap"] = float(np.mean([h["gap"] for h in finals]))
        metrics["acceptance_rate"] = float(np.mean([h["acceptance_rate"] for h in finals]))
    if detector.energy is not None and detector.energy.copula is not None:
        metrics["copula_shrinkage"] = float(detector.energy.copula.shrinkage)  # picked by cross-validation
    write_json(paths.reports / "train.json", metrics)
    return metrics


def evaluate(params: AnomalyParams, paths: AnomalyPaths) -> dict[str, dict[str, float]]:
    """Detector and baselines on the test rows: metrics, scored file with reasons, energy histogram."""
    from ebm.anomaly.baselines import fit_score
    from ebm.anomaly.explain import plot_score_histogram
    from ebm.anomaly.metrics import detection_metrics
    from ebm.anomaly.scoring import score_frame

    train_frame = pd.read_parquet(paths.data / "train.parquet")
    test_frame = pd.read_parquet(paths.data / "test.parquet")
    detector = EnergyAnomalyDetector.load(paths.model)
    labels = test_frame[LABEL].to_numpy()
    scored = score_frame(detector, detector.validate(test_frame[FEATURES]), reasons="all")
    metrics = {"ebm": detection_metrics(labels, scored[EBM_SCORE]).as_dict()}
    metrics["ebm"]["flagged_share"] = float(scored["is_anomaly"].mean())
    baseline_scores = {}
    for name in params.evaluate.baselines:
        scores = fit_score(name, train_frame[FEATURES], test_frame[FEATURES], seed=params.seed)
        metrics[name] = detection_metrics(labels, scores).as_dict()
        baseline_scores[f"{name}_score"] = scores  # kept for the render stage's curves
    ids = test_frame[["transaction_id", LABEL, "fraud_type"]].reset_index(drop=True)
    write_table(
        pd.concat([ids, scored.reset_index(drop=True), pd.DataFrame(baseline_scores)], axis=1),
        paths.scored_test,
    )
    plot_score_histogram(
        scored[EBM_SCORE].to_numpy(),
        scored["is_anomaly"].to_numpy(),
        detector.threshold_,
        paths.reports / "energy_histogram.png",
        labels=labels,
        title="Synthetic transactions, test period",
    )
    write_json(paths.reports / "metrics.json", metrics)
    return metrics


def render(params: AnomalyParams, paths: AnomalyPaths) -> dict[str, DetectionCurves]:
    """ROC and precision–recall curves of the detector and the baselines on the test rows, as CSV and PNG.

    Reads the scored test file the evaluate stage wrote; writes one ``roc/<model>.csv`` and one
    ``pr/<model>.csv`` per model (CSV files of models no longer evaluated are removed) and
    ``curves.png``. Returns each model's curves.

    Raises:
        ValueError: the scored test file lacks a column, its labels hold one class only, or a score is
            NaN or infinite; the message names the file and the column.
    """
    from ebm.evaluation.curves import detection_curves, write_curve_folder
    from ebm.plots import plot_detection_curves, save_figure

    columns = {"ebm": EBM_SCORE, **{name: f"{name}_score" for name in params.evaluate.baselines}}
    scored = pd.read_parquet(paths.scored_test)
    if missing := [column for column in (LABEL, *columns.values()) if column not in scored]:
        raise ValueError(
            f"{paths.scored_test}: no column {missing} (rerun the evaluate stage); it holds {list(scored)}"
        )
    labels = scored[LABEL].to_numpy()
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError(
            f"{paths.scored_test}: column {LABEL!r} must hold both 0 (normal) and 1 (fraud) to draw "
            f"curves, got the values {np.unique(labels)[:5].tolist()}"
        )
    curves = {}
    for model, column in columns.items():
        try:
            curves[model] = detection_curves(labels, scored[column].to_numpy())
        except ValueError as err:
            raise ValueError(f"{paths.scored_test}: column {column!r}: {err}") from None
    write_curve_folder(
        paths.reports / "roc", {m: {"model": m, "fpr": c.fpr, "tpr": c.tpr} for m, c in curves.items()}
    )
    write_curve_folder(
        paths.reports / "pr",
        {m: {"model": m, "recall": c.recall, "precision": c.precision} for m, c in curves.items()},
    )
    figure = plot_detection_curves(curves, title="Synthetic transactions, test period")
    save_figure(figure, paths.reports / "curves.png")
    return curves


def register(params: AnomalyParams, paths: AnomalyPaths, run_id: str) -> dict[str, Any]:
    """Register the detector in MLflow; ``champion`` moves only on improvement (``ebm.anomaly.registry``)."""
    from ebm.anomaly.registry import register_detector

    metrics = json.loads((paths.reports / "metrics.json").read_text())
    example = pd.read_parquet(paths.data / "test.parquet").head(5)[FEATURES]
    outcome = register_detector(
        paths.model,
        example,
        metric_name=params.register.metric,
        metric_value=float(metrics["ebm"][params.register.metric]),
        model_name=params.register.model_name,
        run_id=run_id,
    )
    write_json(paths.reports / "registration.json", outcome.as_dict())
    return outcome.as_dict()


# --- helpers and entry point ----------------------------------------------------------------------


def _flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            flat[f"{prefix}{key}"] = float(value)
    return flat


STAGES = ("prepare", "train", "evaluate", "render", "register")


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_arguments("ebm.stages.anomaly", __doc__, STAGES)
    args = parser.parse_args(argv)
    refuse_torchrun(parser, "anomaly")
    params = AnomalyParams.from_params(load_params(args.params))
    paths = AnomalyPaths(args.root.resolve())
    stage = f"{args.stage}_anomaly"

    from ebm.tracking import MlflowRun, start_run

    with start_run(
        project_root=paths.root,
        experiment=EXPERIMENT,
        stage=stage,
        params={"seed": params.seed, "anomaly": params.logged()},
        run_name=stage,
        deferrable=args.stage != "register",  # registration logs the model into this very run
    ) as run:
        if args.stage == "prepare":
            run.log_metrics(prepare(params, paths))
        elif args.stage == "train":
            run.log_metrics(train(params, paths))
            run.log_artifact(paths.model, "models")  # the file; register_anomaly logs the served pyfunc
        elif args.stage == "evaluate":
            run.log_metrics(_flat(evaluate(params, paths)))
            run.log_artifact(paths.reports / "energy_histogram.png", "figures")
        elif args.stage == "render":
            render(params, paths)  # the areas under the curves are evaluate's metrics, logged there
            run.log_artifact(paths.reports / "curves.png", "figures")
            run.log_artifact(paths.reports / "roc", "curves")  # a folder lands under its own name
            run.log_artifact(paths.reports / "pr", "curves")
        else:
            assert isinstance(run, MlflowRun)  # not deferrable, so live
            outcome = register(params, paths, run.run_id)
            run.set_tags({"registration": outcome["decision"]})
    print(f"{stage}: done; MLflow run {run.url}", flush=True)


if __name__ == "__main__":
    main()
