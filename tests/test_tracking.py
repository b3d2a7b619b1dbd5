"""ebm.tracking: one MLflow run per stage run, tagged with its commit, DVC stage, dep hashes and flow run."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebm.tracking import (
    DEFER_ENV,
    FAILED_RUNS_DIR,
    FLOW_RUN_ID_ENV,
    PENDING_RUNS_DIR,
    RUN_LINKS_FILE,
    PendingRunsError,
    flatten_params,
    log_pending_runs,
    pending_runs,
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


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:///{root}/mlflow.db"),
        ("sqlite:///stores/team.db", "sqlite:///{root}/stores/team.db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("mlruns", "{root}/mlruns"),
        ("/abs/mlruns", "/abs/mlruns"),
        ("file:mlruns", "file://{root}/mlruns"),
        ("file:///abs/mlruns", "file:///abs/mlruns"),
        ("https://mlflow.example.org/", "https://mlflow.example.org/"),
    ],
)
def test_a_relative_local_store_from_the_environment_is_anchored_at_the_project_root(
    given: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flow logs deferred runs from its own working folder: sqlite:///mlflow.db put a project's runs
    # in whatever folder the flow was started from, its artifacts still under the project.
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
    assert tracking_uri(Path("project")) == expected.format(root=project.resolve())


def test_importing_tracking_imports_neither_mlflow_nor_dvc() -> None:
    probe = "import sys, ebm.tracking; print(sorted({'mlflow', 'dvc'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_stage_run_logs_params_metrics_artifacts_and_provenance_tags(
    tiny_pipeline: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv(FLOW_RUN_ID_ENV, "flow-run-123")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
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
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 1.0), (1, 0.9), (2, 0.8)]

    tags = logged.data.tags
    assert tags["git_commit"] == _head(tiny_pipeline)
    assert tags["dvc_stage"] == "train"
    assert tags["prefect_flow_run_id"] == "flow-run-123"
    assert tags["omp_wait_policy"] == "PASSIVE"
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
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    shutil.copyfile(mlflow_template_db, tmp_path / "mlflow.db")

    with start_run(project_root=tmp_path, experiment="mnist", stage="evaluate", params={"k": 1}) as run:
        run.log_metrics({"fid": 3.0})

    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.run_id)
    assert logged.data.tags["git_commit"] == "unknown"
    assert logged.data.tags["dvc_deps"] == "{}"
    assert logged.data.tags["omp_wait_policy"] == "default"
    assert "prefect_flow_run_id" not in logged.data.tags
    assert logged.data.metrics == {"fid": 3.0}
    assert (tmp_path / RUN_LINKS_FILE).exists()


def test_a_deferred_run_is_recorded_without_mlflow_and_logged_later_as_the_same_run(
    tiny_pipeline: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    monkeypatch.setenv(DEFER_ENV, "1")
    monkeypatch.setenv(FLOW_RUN_ID_ENV, "flow-run-456")
    (tiny_pipeline / "prepared.txt").write_text("prepared\n")
    grids = tiny_pipeline / "grids"
    (grids / "sub").mkdir(parents=True)
    (grids / "step-1.png").write_bytes(b"\x89PNG one")
    (grids / "sub" / "step-2.png").write_bytes(b"\x89PNG two")
    figure = plt.figure()
    with start_run(
        project_root=tiny_pipeline, experiment="toy2d", stage="train", params={"train": {"lr": 0.5}}
    ) as run:
        for step in range(3):
            run.log_metrics({"loss": 2.0 - step}, step=step)
        run.log_artifact(tiny_pipeline / "raw.txt", artifact_path="inputs")
        run.log_artifact(grids, artifact_path="grids")  # a folder, as the image stages log theirs
        run.log_figure(figure, "figures/energy.png")
        run.set_tags({"family": "toy"})
        assert not hasattr(run, "run_id")
    plt.close(figure)

    assert len(pending_runs(tiny_pipeline)) == 1
    assert not (tiny_pipeline / RUN_LINKS_FILE).exists()  # no link before MLflow has the run
    (link,) = log_pending_runs(tiny_pipeline)
    assert pending_runs(tiny_pipeline) == []
    assert not any((tiny_pipeline / PENDING_RUNS_DIR).iterdir())

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("toy2d")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert link == f"#/experiments/{experiment.experiment_id}/runs/{logged.info.run_id}"
    assert read_run_links(tiny_pipeline) == {"train": link}
    assert logged.info.status == "FINISHED"
    assert logged.info.start_time <= logged.info.end_time
    assert logged.data.params == {"train.lr": "0.5"}
    history = client.get_metric_history(logged.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    tags = logged.data.tags
    assert (tags["git_commit"], tags["dvc_stage"], tags["family"]) == (_head(tiny_pipeline), "train", "toy")
    assert tags["prefect_flow_run_id"] == "flow-run-456"
    assert json.loads(tags["dvc_deps"]) == {
        path: hashlib.md5((tiny_pipeline / path).read_bytes()).hexdigest()
        for path in ("prepared.txt", "train.py")
    }
    artifacts = tiny_pipeline / "mlruns" / "toy2d" / logged.info.run_id / "artifacts"
    assert (artifacts / "inputs" / "raw.txt").read_text() == (tiny_pipeline / "raw.txt").read_text()
    assert (artifacts / "figures" / "energy.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.relative_to(artifacts).as_posix() for p in (artifacts / "grids").rglob("*.png")) == [
        "grids/grids/step-1.png",  # a folder lands under its own name, as MlflowClient.log_artifact puts it
        "grids/grids/sub/step-2.png",
    ]


def test_a_deferred_run_that_fails_is_logged_failed(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv(DEFER_ENV, "1")
    with (
        pytest.raises(ValueError, match="diverged"),
        start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={}),
    ):
        raise ValueError("loss diverged")
    log_pending_runs(tmp_path)
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("toy2d").experiment_id])
    assert logged.info.status == "FAILED"


def test_a_killed_stage_is_logged_killed_and_a_running_one_is_left_alone(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose process died mid-stage still reaches MLflow (KILLED, with what it logged);
    one whose process is alive is another stage still running, and waits."""
    import mlflow

    monkeypatch.setenv(DEFER_ENV, "1")
    script = (
        "import os, sys; from pathlib import Path; from ebm.tracking import start_run\n"
        f"with start_run(project_root=Path({str(tmp_path)!r}), experiment='toy2d', stage='train', "
        "params={'k': 1}) as run:\n"
        "    run.log_metrics({'loss': 3.0}, step=7)\n"
        "    os._exit(9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], check=False)
    assert killed.returncode == 9
    context = start_run(project_root=tmp_path, experiment="toy2d", stage="evaluate", params={})
    context.__enter__()  # this process is alive: its record is not ready
    try:
        assert len(pending_runs(tmp_path)) == 1
        log_pending_runs(tmp_path)
    finally:
        context.__exit__(None, None, None)
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    experiment_id = client.get_experiment_by_name("toy2d").experiment_id
    (logged,) = client.search_runs([experiment_id])
    assert logged.info.status == "KILLED"
    assert [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "loss")] == [(7, 3.0)]
    log_pending_runs(tmp_path)
    assert {run.info.status for run in client.search_runs([experiment_id])} == {"KILLED", "FINISHED"}


def test_a_param_mlflow_rejects_ends_the_live_run_failed_and_leaves_no_active_run(
    tmp_path: Path, mlflow_tracking_uri: str
) -> None:
    # params used to be logged outside the finishing context: the run stayed RUNNING and active, and the
    # process's next start_run failed with "Run ... is already active"
    import mlflow
    from mlflow.exceptions import MlflowException

    with (
        pytest.raises(MlflowException, match="lr\\(init\\)"),
        start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={"lr(init)": 0.5}),
    ):
        pass
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    experiment_id = client.get_experiment_by_name("toy2d").experiment_id
    assert [run.info.status for run in client.search_runs([experiment_id])] == ["FAILED"]
    with start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={"lr": 0.5}):
        pass
    assert sorted(run.info.status for run in client.search_runs([experiment_id])) == ["FAILED", "FINISHED"]


def test_a_deferred_run_mlflow_rejects_is_set_aside_and_does_not_hold_up_the_others(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv(DEFER_ENV, "1")
    with start_run(project_root=tmp_path, experiment="toy2d", stage="bad", params={"lr(init)": 0.5}) as run:
        run.log_metrics({"loss": 1.0}, step=1)
    with start_run(project_root=tmp_path, experiment="toy2d", stage="good", params={"lr": 0.1}) as run:
        run.log_metrics({"loss": 0.5}, step=1)
    (bad_record, _) = pending_runs(tmp_path)

    with pytest.raises(PendingRunsError, match="lr\\(init\\)") as raised:
        log_pending_runs(tmp_path)

    set_aside = tmp_path / FAILED_RUNS_DIR / bad_record.name
    assert list(raised.value.failures) == [set_aside]
    assert str(set_aside) in str(raised.value)
    assert "lr(init)" in (set_aside / "error.txt").read_text()
    assert (set_aside / "run.json").is_file()
    assert pending_runs(tmp_path) == []
    assert log_pending_runs(tmp_path) == []  # not retried, and failing again, at every later call
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    experiment_id = client.get_experiment_by_name("toy2d").experiment_id
    runs = client.search_runs([experiment_id], run_view_type=3)  # deleted ones too
    assert sorted((r.data.tags["dvc_stage"], r.info.status) for r in runs) == [
        ("bad", "FAILED"),
        ("good", "FINISHED"),
    ]
    assert set(read_run_links(tmp_path)) == {"good"}


def test_a_stage_killed_in_the_middle_of_a_metric_line_is_still_logged_killed(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv(DEFER_ENV, "1")
    script = (
        "import os; from pathlib import Path; from ebm.tracking import start_run\n"
        f"with start_run(project_root=Path({str(tmp_path)!r}), experiment='toy2d', stage='train', "
        "params={}) as run:\n"
        "    run.log_metrics({'loss': 3.0}, step=7)\n"
        "    open(run.folder / 'metrics.jsonl', 'a').write('{\"key\": \"loss\", \"val')\n"
        "    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9

    (link,) = log_pending_runs(tmp_path)

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    run_id = link.rpartition("/")[2]
    assert client.get_run(run_id).info.status == "KILLED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(7, 3.0)]


def test_a_bad_metric_line_before_the_last_is_an_error_naming_the_file_and_line(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEFER_ENV, "1")
    with start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={}) as run:
        run.log_metrics({"loss": 1.0}, step=0)
    metrics = run.folder / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())

    with pytest.raises(PendingRunsError, match=r"metrics\.jsonl, line 1: not JSON"):
        log_pending_runs(tmp_path)
    assert (tmp_path / FAILED_RUNS_DIR / run.folder.name / "metrics.jsonl").exists()


def test_a_deferred_run_has_the_user_and_source_of_a_live_one(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import getpass

    import mlflow

    monkeypatch.setenv(DEFER_ENV, "1")
    monkeypatch.setattr(sys, "argv", ["ebm/stages/toy2d.py", "--stage", "train"])
    with start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={}):
        pass
    monkeypatch.setattr(sys, "argv", ["flows/pipeline.py"])  # the process logging it is another one
    (link,) = log_pending_runs(tmp_path)

    logged = mlflow.MlflowClient(mlflow_tracking_uri).get_run(link.rpartition("/")[2])
    assert logged.info.user_id == getpass.getuser()
    tags = logged.data.tags
    assert (tags["mlflow.user"], tags["mlflow.source.name"], tags["mlflow.source.type"]) == (
        getpass.getuser(),
        "ebm/stages/toy2d.py",
        "LOCAL",
    )


@pytest.mark.parametrize("deferred", [False, True])
def test_an_experiment_deleted_in_the_ui_is_restored_with_a_warning(
    deferred: bool,
    tmp_path: Path,
    mlflow_tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlflow

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    client.delete_experiment(client.create_experiment("toy2d"))
    if deferred:
        monkeypatch.setenv(DEFER_ENV, "1")

    with caplog.at_level("WARNING", logger="ebm.tracking"):
        with start_run(project_root=tmp_path, experiment="toy2d", stage="train", params={}):
            pass
        log_pending_runs(tmp_path)

    experiment = client.get_experiment_by_name("toy2d")
    assert experiment.lifecycle_stage == "active"
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FINISHED"]
    assert "MLflow experiment 'toy2d'" in caplog.text
    assert "was deleted; restored it" in caplog.text


RECORDER = """
import sys
from pathlib import Path
from ebm.tracking import record_run_link
for i in range(40):
    record_run_link(Path(sys.argv[1]), f"{sys.argv[2]}-{i}", f"#/runs/{sys.argv[2]}-{i}")
"""


def test_stages_recording_their_run_links_at_once_lose_none(tmp_path: Path) -> None:
    # two `dvc repro` of independent stages finish together: each read-update-write of the links file
    # must see the other's, or one link is lost
    writers = [
        subprocess.Popen([sys.executable, "-c", RECORDER, str(tmp_path), name]) for name in ("left", "right")
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    links = read_run_links(tmp_path)
    assert sorted(links) == sorted(f"{name}-{i}" for name in ("left", "right") for i in range(40))


def test_replacing_an_earlier_attempt_s_run_that_mlflow_gc_purged_goes_on() -> None:
    # the record went back to failed/ and failed again at every later log: "Run ... not found"
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from ebm.tracking import _delete_run_if_present

    class Client:
        def __init__(self, code: int) -> None:
            self.code, self.calls = code, 0

        def delete_run(self, run_id: str) -> None:
            self.calls += 1
            raise MlflowException(f"Run with id={run_id} not found", error_code=self.code)

    purged = Client(RESOURCE_DOES_NOT_EXIST)
    _delete_run_if_present(purged, "abc")  # type: ignore[arg-type]
    assert purged.calls == 1
    with pytest.raises(MlflowException):
        _delete_run_if_present(Client(INTERNAL_ERROR), "abc")  # type: ignore[arg-type]
