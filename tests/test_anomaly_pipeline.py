"""The anomaly stages end to end on tiny params, and the registry policy (hash reuse, champion alias)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    import pandas as pd

    from ebm.anomaly.registry import register_detector
    from ebm.stages.anomaly import AnomalyParams, AnomalyPaths, main

    root = tmp_path / "project"
    for stage in ("prepare", "train", "evaluate", "register"):
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
