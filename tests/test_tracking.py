"""ebm.tracking: one MLflow run per stage run, tagged with its commit, DVC stage, dep hashes and flow run."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebm.tracking import (
    FLOW_RUN_ID_ENV,
    RUN_LINKS_FILE,
    flatten_params,
    read_run_links,
    start_run,
    tracking_uri,
)


def _head(root: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_flatten_params_joins_nested_keys_with_dots() -> None:
    assert flatten_params({"train": {"lr": 0.1, "sampler": {"steps": 20}}, "seed": 0}) == {
        "train.lr": "0.1",
        "train.sampler.steps": "20",
        "seed": "0",
    }


def test_tracking_uri_is_an_absolute_sqlite_store_in_the_project_unless_the_environment_names_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(Path(".")) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(Path(".")) == "http://127.0.0.1:5000"


def test_importing_tracking_imports_neither_mlflow_nor_dvc() -> None:
    probe = "import sys, ebm.tracking; print(sorted({'mlflow', 'dvc'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_stage_run_logs_params_metrics_artifacts_and_provenance_tags(
    tiny_pipeline: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv(FLOW_RUN_ID_ENV, "flow-run-123")
    (tiny_pipeline / "prepared.txt").write_text("prepared\n")
    params = {"train": {"lr": 0.01, "sampler": {"name": "langevin"}}}

    with start_run(
        project_root=tiny_pipeline, experiment="toy2d", stage="train", params=params, run_name="smoke"
    ) as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 - 0.1 * step}, step=step)
        run.log_artifact(tiny_pipeline / "raw.txt", artifact_path="inputs")
        run.set_tags({"family": "toy"})

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "smoke"
    assert logged.data.params == {"train.lr": "0.01", "train.sampler.name": "langevin"}
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == pytest.approx([1.0, 0.9, 0.8])

    tags = logged.data.tags
    assert tags["git_commit"] == _head(tiny_pipeline)
    assert tags["dvc_stage"] == "train"
    assert tags["prefect_flow_run_id"] == "flow-run-123"
    assert tags["family"] == "toy"
    # The hashes DVC will record in dvc.lock for this run: md5 of each file dep's bytes.
    assert json.loads(tags["dvc_deps"]) == {
        path: hashlib.md5((tiny_pipeline / path).read_bytes()).hexdigest()
        for path in ("prepared.txt", "train.py")
    }

    experiment = client.get_experiment(run.experiment_id)
    assert experiment.name == "toy2d"
    assert experiment.artifact_location == (tiny_pipeline / "mlruns" / "toy2d").as_uri()
    assert (tiny_pipeline / "mlruns" / "toy2d" / run.run_id / "artifacts" / "inputs" / "raw.txt").exists()
    assert run.url == f"#/experiments/{run.experiment_id}/runs/{run.run_id}"
    assert read_run_links(tiny_pipeline) == {"train": run.url}


def test_failing_stage_marks_its_run_failed(tmp_path: Path, mlflow_tracking_uri: str) -> None:
    import mlflow

    with (
        pytest.raises(ValueError, match="diverged"),
        start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={}) as run,
    ):
        raise ValueError("loss diverged")

    logged = mlflow.MlflowClient(mlflow_tracking_uri).get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert read_run_links(tmp_path) == {"train": run.url}


def test_outside_git_and_dvc_the_default_store_lives_in_the_project(
    tmp_path: Path, mlflow_template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(FLOW_RUN_ID_ENV, raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    shutil.copyfile(mlflow_template_db, tmp_path / "mlflow.db")

    with start_run(project_root=tmp_path, experiment="mnist", stage="evaluate", params={"k": 1}) as run:
        run.log_metrics({"fid": 3.0})

    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.run_id)
    assert logged.data.tags["git_commit"] == "unknown"
    assert logged.data.tags["dvc_deps"] == "{}"
    assert "prefect_flow_run_id" not in logged.data.tags
    assert logged.data.metrics == {"fid": 3.0}
    assert (tmp_path / RUN_LINKS_FILE).exists()
