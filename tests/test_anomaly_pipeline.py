"""The anomaly stages end to end on tiny params, the registry policy (hash reuse, champion alias), and the
render stage's curves from a scored test file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stage_sources import assert_declared, executed_sources

from ebm.config import load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "configs" / "quick.yaml", path)
    return path


@pytest.mark.slow
def test_stages_write_their_outs_and_register_once(
    tmp_path: Path, quick_params: Path, mlflow_tracking_uri: str
) -> None:
    import mlflow

    from ebm.anomaly.registry import register_detector
    from ebm.stages.anomaly import AnomalyParams, AnomalyPaths, main

    root = tmp_path / "project"
    for stage in ("prepare", "train", "evaluate", "render", "register"):
        with executed_sources() as executed:
            main([stage, "--params", str(quick_params), "--root", str(root)])
        assert_declared(f"{stage}_anomaly", executed)
    paths = AnomalyPaths(root)
    assert sorted(p.name for p in paths.data.iterdir()) == [
        "test.parquet",
        "train.parquet",
        "transactions.csv",
        "transactions.parquet",
    ]
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert set(metrics) == {"ebm", *AnomalyParams.from_params(load_params(quick_params)).evaluate.baselines}
    assert metrics["ebm"]["auroc"] > 0.8
    assert (paths.reports / "energy_histogram.png").stat().st_size > 5_000
    models = ["ebm", *AnomalyParams.from_params(load_params(quick_params)).evaluate.baselines]
    assert sorted(p.name for p in (paths.reports / "roc").iterdir()) == sorted(f"{m}.csv" for m in models)
    roc = pd.read_csv(paths.reports / "roc" / "ebm.csv")
    assert abs(np.trapezoid(roc["tpr"], roc["fpr"]) - metrics["ebm"]["auroc"]) < 1e-3
    assert (paths.reports / "curves.png").stat().st_size > 5_000
    render_run = mlflow.MlflowClient(mlflow_tracking_uri).search_runs(
        [mlflow.get_experiment_by_name("anomaly").experiment_id], "tags.dvc_stage = 'render_anomaly'"
    )[0]
    logged = {
        a.path
        for a in mlflow.MlflowClient(mlflow_tracking_uri).list_artifacts(render_run.info.run_id, "curves/roc")
    }
    assert logged == {f"curves/roc/{m}.csv" for m in models}
    train_run = mlflow.MlflowClient(mlflow_tracking_uri).search_runs(
        [mlflow.get_experiment_by_name("anomaly").experiment_id], "tags.dvc_stage = 'train_anomaly'"
    )[0]
    logged_model = mlflow.MlflowClient(mlflow_tracking_uri).download_artifacts(
        train_run.info.run_id, f"models/{paths.model.name}", str(tmp_path / "logged")
    )
    assert Path(logged_model).read_bytes() == paths.model.read_bytes()
    first = json.loads((paths.reports / "registration.json").read_text())
    assert first["version"] == "1" and first["alias_moved"] and not first["reused"]

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    example = pd.read_parquet(paths.data / "test.parquet").head(3)
    again = register_detector(paths.model, example, metric_name="auprc", metric_value=0.0)
    assert again.reused and again.version == "1" and not again.alias_moved
    assert len(client.search_model_versions("name = 'ebm-anomaly-detector'")) == 1

    from ebm.anomaly.detector import EnergyAnomalyDetector

    worse = EnergyAnomalyDetector.load(paths.model)
    worse.threshold_ += 1.0  # a different model (another hash)
    worse_path = worse.save(tmp_path / "worse.pt")
    kept = register_detector(
        worse_path, example, metric_name="auprc", metric_value=first["metric_value"] - 0.1
    )
    assert kept.version == "2" and not kept.alias_moved and "kept champion v1" in kept.decision
    assert client.get_model_version("ebm-anomaly-detector", "2").tags["champion_decision"] == kept.decision
    better = register_detector(
        worse_path, example, metric_name="auprc", metric_value=first["metric_value"] + 0.1
    )
    assert better.reused and better.version == "2"  # its stored metric decides, not the caller's claim
    assert str(client.get_model_version_by_alias("ebm-anomaly-detector", "champion").version) == "1"

    model = mlflow.pyfunc.load_model("models:/ebm-anomaly-detector@champion")
    features = EnergyAnomalyDetector.load(paths.model).feature_names_in_
    scored = model.predict(example[features])
    assert list(scored.columns[:2]) == ["anomaly_score", "is_anomaly"] and len(scored) == 3
    with pytest.raises(mlflow.exceptions.MlflowException):
        model.predict(example[features].assign(amount="lots"))


def test_a_detector_without_residual_members_reports_no_nan_training_metrics(
    tmp_path: Path, quick_params: Path
) -> None:
    # before: final_gap and acceptance_rate were written as bare NaN tokens, which strict JSON refuses
    import yaml

    from ebm.stages.anomaly import AnomalyPaths, main

    params = yaml.safe_load(quick_params.read_text())
    params["anomaly"]["detector"]["n_members"] = 0
    quick_params.write_text(yaml.safe_dump(params))
    root = tmp_path / "project"
    for stage in ("prepare", "train"):
        main([stage, "--params", str(quick_params), "--root", str(root)])

    text = (AnomalyPaths(root).reports / "train.json").read_text()
    metrics = json.loads(text, parse_constant=lambda token: pytest.fail(f"train.json holds {token}"))
    assert "final_gap" not in metrics and "acceptance_rate" not in metrics and metrics["train_rows"] > 0


def write_scored_test(path: Path, n: int = 4000, seed: int = 0) -> pd.DataFrame:
    """A scored test file as the evaluate stage writes it: labels, the EBM's and the baselines' scores."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < 0.15).astype(np.int64)
    scored = pd.DataFrame(
        {
            "transaction_id": np.arange(n),
            "is_fraud": labels,
            "anomaly_score": rng.normal(size=n) + 2.0 * labels,
            "iforest_score": rng.normal(size=n) + 1.0 * labels,
            "ecod_score": rng.normal(size=n) + 1.5 * labels,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(path)
    return scored


def test_render_writes_roc_and_pr_curves_of_every_model_and_one_figure(tmp_path: Path) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from ebm.stages.anomaly import AnomalyParams, AnomalyPaths, render

    params = AnomalyParams()  # the EBM, IsolationForest and ECOD
    paths = AnomalyPaths(tmp_path)
    scored = write_scored_test(paths.scored_test)
    (paths.reports / "roc").mkdir()
    (paths.reports / "roc" / "lof.csv").write_text("model,fpr,tpr\n")  # a baseline no longer evaluated

    curves = render(params, paths)

    models = ["ebm", *params.evaluate.baselines]
    assert list(curves) == models
    for folder, columns in (("roc", ["model", "fpr", "tpr"]), ("pr", ["model", "recall", "precision"])):
        assert sorted(p.name for p in (paths.reports / folder).iterdir()) == sorted(
            f"{m}.csv" for m in models
        )
        for model in models:
            table = pd.read_csv(paths.reports / folder / f"{model}.csv")
            assert list(table.columns) == columns and set(table["model"]) == {model}
    roc = pd.read_csv(paths.reports / "roc" / "ebm.csv")
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert (roc["fpr"].iloc[0], roc["tpr"].iloc[0], roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (0, 0, 1, 1)
    assert (
        abs(np.trapezoid(roc["tpr"], roc["fpr"]) - roc_auc_score(scored["is_fraud"], scored["anomaly_score"]))
        < 1e-3
    )
    pr = pd.read_csv(paths.reports / "pr" / "iforest.csv")
    assert pr["recall"].is_monotonic_increasing and len(pr) <= 1000
    assert pr["precision"].iloc[-1] == pytest.approx(scored["is_fraud"].mean())
    assert curves["ecod"].auprc == pytest.approx(
        average_precision_score(scored["is_fraud"], scored["ecod_score"])
    )
    assert (paths.reports / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda frame: frame.assign(is_fraud=0), r"scored_test\.parquet: column 'is_fraud' must hold both"),
        (
            lambda frame: frame.assign(iforest_score=frame["iforest_score"].where(frame.index != 7)),
            r"scored_test\.parquet: column 'iforest_score': 1 of 4000 scores are NaN",
        ),
        (lambda frame: frame.drop(columns="ecod_score"), r"scored_test\.parquet: no column \['ecod_score'\]"),
    ],
    ids=["one-class", "nan-score", "missing-column"],
)
def test_render_names_the_file_and_the_column_it_cannot_draw(
    tmp_path: Path, spoil: Callable[[pd.DataFrame], pd.DataFrame], message: str
) -> None:
    from ebm.stages.anomaly import AnomalyParams, AnomalyPaths, render

    paths = AnomalyPaths(tmp_path)
    spoil(write_scored_test(paths.scored_test)).to_parquet(paths.scored_test)
    with pytest.raises(ValueError, match=message):
        render(AnomalyParams(), paths)
    assert not (paths.reports / "curves.png").exists() and not (paths.reports / "roc").exists()
