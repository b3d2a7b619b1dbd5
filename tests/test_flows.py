"""flows/: the Prefect flow runs DVC stages (DVC deciding what to skip) and the deployment's schedule."""

import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

import flows.pipeline
from flows.deploy import DEFAULT_CRON, load_schedule, nightly_deployment
from flows.pipeline import (
    PREPARE_POLICY,
    SUMMARY_ARTIFACT_KEY,
    PipelineLockedError,
    PipelineSummary,
    StageOutcome,
    StagePolicy,
    StageTimeoutError,
    _flatten,
    _logging_deferred_runs,
    _one_flow_at_a_time,
    _run_stages,
    check_scheduled_stages,
    load_schedule_config,
    pipeline,
    stage_order,
    stage_policy,
    where_results_are,
)

REPO = Path(__file__).resolve().parents[1]


def _write_params(root: Path, params: dict[str, Any]) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _one_stage_pipeline(root: Path, stage: str, code: str, out: str) -> None:
    """A ``dvc.yaml`` of one stage that runs the Python ``code`` and outputs ``out``."""
    (root / "dvc.yaml").write_text(
        textwrap.dedent(f"""
        stages:
          {stage}:
            cmd: {sys.executable} -c "{code}"
            outs: [{out}]
        """)
    )


def _outcomes(stages: tuple[StageOutcome, ...]) -> dict[str, str]:
    return {stage.stage: stage.outcome for stage in stages}


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _summary_artifact(flow_run_id: Any) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT_KEY]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
    )
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=artifact_filter)
    return str(artifact.data)


def test_stage_policy_defaults_retry_prepare_stages_and_params_override_them() -> None:
    schedule = {"stages": {"train": {"timeout_seconds": 60}, "prepare_mnist": {"retries": 3}}}
    assert stage_policy("train", schedule) == StagePolicy(timeout_seconds=60)
    assert stage_policy("prepare_mnist", schedule) == StagePolicy(
        retries=3, retry_delay_seconds=PREPARE_POLICY.retry_delay_seconds
    )
    assert stage_policy("prepare_toy", {}) == PREPARE_POLICY
    with pytest.raises(ValueError, match="unknown keys \\['retry'\\]"):
        stage_policy("train", {"stages": {"train": {"retry": 1}}})


def test_stage_order_puts_dependencies_first_and_targets_bring_their_upstream(
    tiny_pipeline: Path,
) -> None:
    assert stage_order(tiny_pipeline) == ["prepare", "train", "report"]
    assert stage_order(tiny_pipeline, ["train"]) == ["prepare", "train"]
    with pytest.raises(ValueError, match="unknown stages \\['evaluate'\\]"):
        stage_order(tiny_pipeline, ["evaluate"])


def test_schedule_comes_from_params_with_a_nightly_default(tmp_path: Path) -> None:
    assert load_schedule(tmp_path).cron == DEFAULT_CRON
    _write_params(tmp_path, {"schedule": {"cron": "30 4 * * 1", "timezone": "Europe/Paris"}})
    schedule = load_schedule(tmp_path)
    assert (schedule.cron, schedule.timezone) == ("30 4 * * 1", "Europe/Paris")
    _write_params(tmp_path, {"schedule": {"cron": "every night"}})
    with pytest.raises(ValueError, match="cron"):
        load_schedule(tmp_path)


def test_nightly_deployment_runs_one_pipeline_at_a_time_on_the_params_schedule(tmp_path: Path) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    _write_params(tmp_path, {"schedule": {"cron": "15 3 * * *"}})

    deployment = nightly_deployment(tmp_path)

    assert [entry.schedule for entry in deployment.schedules or []] == [CronSchedule(cron="15 3 * * *")]
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert deployment.parameters == {"project_root": str(tmp_path.resolve())}
    assert deployment.entrypoint == "flows/pipeline.py:pipeline"


@pytest.mark.parametrize("image", [None, "registry.local/ebm:1"])
def test_a_work_pool_deployment_keeps_the_schedule_the_limit_of_one_and_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image: str | None
) -> None:
    """``python -m flows.deploy --work-pool POOL [--image IMAGE]``: what reaches Prefect's deploy."""
    import flows.deploy

    _write_params(tmp_path, {"schedule": {"cron": "15 3 * * *"}})
    calls: list[dict[str, Any]] = []

    class Recorder:
        def from_source(self, source: str, entrypoint: str) -> "Recorder":
            calls.append({"source": source, "entrypoint": entrypoint})
            return self

        def deploy(self, **options: Any) -> None:
            calls.append(options)

    monkeypatch.setattr(flows.deploy, "pipeline", Recorder())
    flows.deploy.main(
        ["--project-root", str(tmp_path), "--work-pool", "pool", *(["--image", image] if image else [])]
    )

    options = calls[-1]
    assert options["work_pool_name"] == "pool" and options["name"] == "nightly"
    assert [schedule.cron for schedule in options["schedules"]] == ["15 3 * * *"]
    limit = options["concurrency_limit"]
    assert (limit.limit, limit.collision_strategy) == (1, "CANCEL_NEW")
    if image is None:  # from this checkout, run where it lies
        assert calls[0] == {"source": str(tmp_path.resolve()), "entrypoint": "flows/pipeline.py:pipeline"}
        assert options["parameters"] == {"project_root": str(tmp_path.resolve())}
    else:  # the image holds the project in its working directory
        assert (options["image"], options["build"], options["push"]) == (image, False, False)
        assert options["parameters"] == {"project_root": "."}


@pytest.mark.slow
def test_flow_runs_stages_through_dvc_then_skips_them_all(
    prefect_harness: None, tiny_pipeline: Path, mlflow_tracking_uri: str
) -> None:
    import mlflow
    from dvc.repo import Repo

    first = pipeline(project_root=str(tiny_pipeline), return_state=True)
    summary = first.result()
    assert _outcomes(summary.stages) == {"prepare": "ran", "train": "ran", "report": "ran"}
    assert (tiny_pipeline / "dvc.lock").exists()
    assert (tiny_pipeline / "report.txt").read_text() == "ENERGY\n"
    assert summary.metrics == {"metrics.json": {"loss": 0.5, "eval.nll": 1.25}}

    # The stage's MLflow run knows which flow run started it, and the summary links to it.
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    (train_run,) = client.search_runs([experiment.experiment_id])
    assert train_run.data.tags["prefect_flow_run_id"] == str(first.state_details.flow_run_id)
    assert train_run.data.tags["dvc_stage"] == "train"
    # Hashed while the stage ran, before DVC wrote dvc.lock: the same values it then wrote.
    lock = yaml.safe_load((tiny_pipeline / "dvc.lock").read_text())
    locked_deps = {dep["path"]: dep["md5"] for dep in lock["stages"]["train"]["deps"]}
    assert json.loads(train_run.data.tags["dvc_deps"]) == locked_deps
    markdown = _summary_artifact(first.state_details.flow_run_id)
    assert f"#/experiments/{train_run.info.experiment_id}/runs/{train_run.info.run_id}" in markdown
    assert "| train | ran |" in markdown
    assert "| metrics.json | eval.nll | 1.25 |" in markdown

    second = pipeline(project_root=str(tiny_pipeline), return_state=True)
    assert _outcomes(second.result().stages) == {
        "prepare": "skipped",
        "train": "skipped",
        "report": "skipped",
    }
    assert "| report | skipped |" in _summary_artifact(second.state_details.flow_run_id)
    with Repo(str(tiny_pipeline)) as repo:
        assert repo.status() == {}


@pytest.mark.slow
def test_flow_fails_clearly_and_without_retrying_while_another_run_holds_the_dvc_lock(
    prefect_harness: None, tiny_pipeline: Path
) -> None:
    from dvc.repo import Repo

    with Repo(str(tiny_pipeline)) as repo, repo.lock:
        state = pipeline(project_root=str(tiny_pipeline), return_state=True)
        lock_file = repo.lock.lockfile

    assert state.is_failed()
    with pytest.raises(PipelineLockedError, match="another pipeline run holds the DVC lock at") as raised:
        state.result()
    assert str(Path(lock_file).resolve()) in str(raised.value)
    # "prepare" would retry once after 10 s on other failures; a retry could only meet the same lock.
    (prepare_run,) = _task_runs(state.state_details.flow_run_id)
    assert prepare_run.run_count == 1
    assert "| prepare | failed |" in _summary_artifact(state.state_details.flow_run_id)


@pytest.mark.slow
def test_stage_past_its_timeout_is_stopped(prefect_harness: None, dvc_project: Path) -> None:
    _one_stage_pipeline(dvc_project, "sleepy", "import time; time.sleep(120)", "never.txt")
    _write_params(dvc_project, {"schedule": {"stages": {"sleepy": {"timeout_seconds": 1}}}})

    state = pipeline(project_root=str(dvc_project), return_state=True)

    with pytest.raises(StageTimeoutError, match="'sleepy' ran past its timeout of 1 s"):
        state.result()


@pytest.mark.slow
def test_flow_reports_outs_dvc_restored_from_its_run_cache(prefect_harness: None, dvc_project: Path) -> None:
    copy = "import shutil; shutil.copy('raw.txt', 'copy.txt')"
    (dvc_project / "dvc.yaml").write_text(
        textwrap.dedent(f"""
        stages:
          copy:
            cmd: {sys.executable} -c "{copy}"
            deps: [raw.txt]
            outs: [copy.txt]
        """)
    )
    outcomes: list[str] = []
    for content in ("first\n", "second\n", "first\n"):
        (dvc_project / "raw.txt").write_text(content)
        outcomes += _outcomes(pipeline(project_root=str(dvc_project)).stages).values()

    assert outcomes == ["ran", "ran", "restored"]
    assert (dvc_project / "copy.txt").read_text() == "first\n"


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"timeout_seconds": "7200"}, "timeout_seconds must be a number of seconds > 0 or null, got '7200'"),
        ({"timeout_seconds": 0}, "timeout_seconds must be a number of seconds > 0 or null, got 0"),
        ({"retries": -1}, "retries must be a whole number ≥ 0, got -1"),
        ({"retries": True}, "retries must be a whole number ≥ 0, got True"),
        (
            {"retry_delay_seconds": float("nan")},
            "retry_delay_seconds must be a number of seconds ≥ 0, got nan",
        ),
    ],
)
def test_a_stage_policy_of_the_wrong_type_is_an_error_naming_the_stage_and_key(
    override: dict[str, Any], complaint: str
) -> None:
    # a quoted timeout used to reach threading.Timer, whose thread died, and the stage ran with no timeout
    with pytest.raises(ValueError, match=f"^schedule.stages.train: {complaint}$"):
        stage_policy("train", {"stages": {"train": override}})


def test_the_default_params_give_every_long_stage_a_timeout_and_name_only_real_stages() -> None:
    schedule = load_schedule_config(REPO)
    check_scheduled_stages(schedule, stage_order(REPO))
    for stage in ("train_toy", "train_images", "train_rbm", "evaluate_images"):
        timeout = stage_policy(stage, schedule).timeout_seconds
        assert timeout is not None and timeout >= 3600, (stage, timeout)  # hung, not just slow


def test_scheduled_stages_must_be_stages_of_the_pipeline() -> None:
    check_scheduled_stages({"stages": {"train": {"retries": 1}}}, ["prepare", "train"])
    with pytest.raises(ValueError, match=r"schedule.stages names \['train_mnist'\], not stages of this"):
        check_scheduled_stages({"stages": {"train_mnist": {"retries": 1}}}, ["prepare", "train"])


@pytest.mark.parametrize(
    ("schedule", "complaint"),
    [
        ({"stages": {"train": 7200}}, "schedule.stages.train must be a mapping with keys \\['retries', "),
        ({"stages": {"train": "7200"}}, "schedule.stages.train must be a mapping with keys"),
        ({"stages": ["train"]}, "schedule.stages must be a mapping of stage name"),
        # falsy values were taken as "no policy" while 7200 was refused
        ({"stages": {"train": 0}}, "schedule.stages.train must be a mapping with keys"),
        ({"stages": {"train": []}}, "schedule.stages.train must be a mapping with keys"),
        ({"stages": 0}, "schedule.stages must be a mapping of stage name"),
    ],
)
def test_a_stage_policy_that_is_not_a_mapping_is_an_error_naming_the_key(
    schedule: dict[str, Any], complaint: str
) -> None:
    # used to be a raw TypeError, "dictionary update sequence" ValueError, or AttributeError
    with pytest.raises(ValueError, match=f"^{complaint}"):
        stage_policy("train", schedule)
    if not isinstance(schedule["stages"], dict):
        with pytest.raises(ValueError, match=f"^{complaint}"):
            check_scheduled_stages(schedule, ["train"])


@pytest.mark.parametrize(
    ("schedule", "complaint"),
    [
        (
            {"cron": "30 3 * * 1", "timzone": "Europe/Paris"},
            r"^schedule: unknown keys \['timzone'\]; valid keys: \['cron', 'stages', 'timezone'\]$",
        ),
        ({"crontab": "30 3 * * 1"}, r"^schedule: unknown keys \['crontab'\]; valid keys: \['cron', "),
        ("0 2 * * *", r"^schedule must be a mapping with keys \['cron', 'stages', 'timezone'\], got '0 2"),
        ({"stages": ["train"]}, "^schedule.stages must be a mapping of stage name"),
        ([], r"^schedule must be a mapping with keys"),  # was taken as no schedule at all
        (0, r"^schedule must be a mapping with keys"),
    ],
)
def test_a_misspelt_or_misshapen_schedule_is_an_error_naming_the_key(
    tmp_path: Path, schedule: Any, complaint: str
) -> None:
    # a misspelt key used to be ignored: the deployment ran at 02:00 UTC instead
    _write_params(tmp_path, {"schedule": schedule})
    with pytest.raises(ValueError, match=complaint):
        load_schedule_config(tmp_path)
    with pytest.raises(ValueError, match=complaint):
        load_schedule(tmp_path)


def _poisoned_deferred_run(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred run record MLflow will reject (a param key with parentheses)."""
    from ebm.tracking import DEFER_ENV, start_run

    monkeypatch.setenv(DEFER_ENV, "1")
    with start_run(project_root=root, experiment="toy2d", stage="train", params={"lr(init)": 0.5}):
        pass
    monkeypatch.delenv(DEFER_ENV)


def test_a_failure_to_log_deferred_runs_is_noted_on_the_stage_error_not_raised_in_its_place(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebm.tracking import PendingRunsError

    _poisoned_deferred_run(tmp_path, monkeypatch)
    with pytest.raises(StageTimeoutError, match="ran past its timeout") as raised:
        with _logging_deferred_runs(str(tmp_path)):
            raise StageTimeoutError("stage 'train' ran past its timeout of 1 s and was stopped")
    (note,) = raised.value.__notes__
    assert note.startswith("logging the stage's MLflow runs failed as well: 1 deferred MLflow run record")
    assert "lr(init)" in note

    _poisoned_deferred_run(tmp_path, monkeypatch)
    with pytest.raises(PendingRunsError, match="lr\\(init\\)"):  # the stage passed: the task fails
        with _logging_deferred_runs(str(tmp_path)):
            pass
    with _logging_deferred_runs(str(tmp_path)):  # set aside: later stages are not failed by it
        pass


def test_a_run_an_interrupted_flow_left_behind_is_logged_without_dep_hashes_that_may_have_changed(
    tiny_pipeline: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hashes are taken when the run is logged: right after its stage, they are the ones it ran with;
    a record a killed flow left is logged by a later stage, after edits it never saw."""
    import time

    import mlflow

    from ebm.tracking import DEFER_ENV, start_run

    monkeypatch.setenv(DEFER_ENV, "1")
    with start_run(project_root=tiny_pipeline, experiment="toy2d", stage="train", params={}):
        pass  # recorded, never logged: the flow that ran it was killed
    time.sleep(0.01)
    with _logging_deferred_runs(str(tiny_pipeline)):
        with start_run(project_root=tiny_pipeline, experiment="toy2d", stage="report", params={}):
            pass
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("toy2d").experiment_id])
    tags = {run.data.tags["dvc_stage"]: run.data.tags for run in runs}
    assert json.loads(tags["report"]["dvc_deps"])  # this stage's, just now
    assert "dvc_deps" not in tags["train"] and "may have changed" in tags["train"]["dvc_deps_note"]


def test_the_summary_links_only_runs_logged_during_this_flow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebm.tracking import read_run_links, record_run_link

    for stage in ("prepare", "train", "report"):
        record_run_link(tmp_path, stage, f"#/experiments/1/runs/old-{stage}")

    def reproduce(root: str, stage: str, **_: Any) -> StageOutcome:
        if stage == "train":
            raise RuntimeError("failed before opening its MLflow run")
        if stage == "report":
            record_run_link(Path(root), stage, "#/experiments/1/runs/new-report")
            return StageOutcome(stage, "ran", 1.0)
        return StageOutcome(stage, "skipped", 0.1)

    class FakeTask:
        def with_options(self, **_: Any) -> Any:
            return reproduce

    published: list[str] = []
    monkeypatch.setattr(flows.pipeline, "reproduce_stage", FakeTask())
    monkeypatch.setattr(
        flows.pipeline, "stage_order", lambda root, targets=None: ["prepare", "report", "train"]
    )
    monkeypatch.setattr(flows.pipeline, "collect_metrics", lambda root: {})
    monkeypatch.setattr(
        flows.pipeline, "create_markdown_artifact", lambda markdown, **_: published.append(markdown)
    )

    with pytest.raises(RuntimeError, match="failed before opening"):
        _run_stages(tmp_path, None, False)

    (markdown,) = published
    assert "old-train" not in markdown  # the link an earlier flow run left is not this run's
    assert "| train | failed |" in markdown
    assert "/#/experiments/1/runs/new-report) |" in markdown
    assert "/#/experiments/1/runs/old-prepare) (previous) |" in markdown
    assert read_run_links(tmp_path)["train"] == "#/experiments/1/runs/old-train"


def test_each_stage_task_gets_its_policy_s_retries_delay_and_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedule = {"stages": {"train": {"retries": 2, "retry_delay_seconds": 5.0, "timeout_seconds": 60.0}}}
    options: dict[str, dict[str, Any]] = {}
    timeouts: dict[str, float | None] = {}

    class RecordingTask:
        def with_options(self, **kwargs: Any) -> Any:
            stage = kwargs["name"].removeprefix("dvc-")
            options[stage] = kwargs

            def run(root: str, stage_name: str, **call: Any) -> StageOutcome:
                timeouts[stage_name] = call["timeout_seconds"]
                return StageOutcome(stage_name, "ran", 0.1)

            return run

    monkeypatch.setattr(flows.pipeline, "reproduce_stage", RecordingTask())
    monkeypatch.setattr(flows.pipeline, "load_schedule_config", lambda root: schedule)
    monkeypatch.setattr(flows.pipeline, "stage_order", lambda root, targets=None: ["prepare_toy", "train"])
    monkeypatch.setattr(flows.pipeline, "collect_metrics", lambda root: {})
    monkeypatch.setattr(flows.pipeline, "create_markdown_artifact", lambda markdown, **_: None)

    _run_stages(tmp_path, None, False)

    for stage in ("prepare_toy", "train"):
        policy = stage_policy(stage, schedule)
        assert (options[stage]["retries"], options[stage]["retry_delay_seconds"], timeouts[stage]) == (
            policy.retries,
            policy.retry_delay_seconds,
            policy.timeout_seconds,
        )
    assert (options["train"]["retries"], timeouts["train"]) == (2, 60.0)  # the schedule's, not a default
    assert options["prepare_toy"]["retries"] == PREPARE_POLICY.retries > 0


def test_the_closing_lines_name_each_stage_s_run_the_plots_and_the_registered_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(flows.pipeline.MLFLOW_UI_ENV, "http://127.0.0.1:5000")
    (tmp_path / "reports" / "toy").mkdir(parents=True)
    (tmp_path / "reports" / "toy" / "heatmaps.png").write_bytes(b"png")
    registration = {"model_name": "ebm-anomaly-detector", "champion_version": "3", "decision": "v3 won"}
    summary = PipelineSummary(
        stages=(StageOutcome("train_toy", "ran", 12.0), StageOutcome("register_anomaly", "skipped", 0.2)),
        metrics={"reports/anomaly/registration.json": {**registration, "version": "3"}},
        run_links={"train_toy": "#/experiments/1/runs/abc"},
        previous_run_links={"register_anomaly": "#/experiments/2/runs/def"},
    )
    text = where_results_are(tmp_path, summary)
    assert "http://127.0.0.1:5000/#/experiments/1/runs/abc" in text
    assert "http://127.0.0.1:5000/#/experiments/2/runs/def (previous)" in text
    assert "reports/toy/heatmaps.png" in text
    assert "models:/ebm-anomaly-detector@champion (version 3; this run: v3 won)" in text
    assert "model:" not in where_results_are(tmp_path, dataclasses.replace(summary, metrics={}))


@pytest.mark.slow
def test_a_second_flow_in_the_same_project_fails_at_once(prefect_harness: None, tiny_pipeline: Path) -> None:
    with _one_flow_at_a_time(tiny_pipeline):  # what a first flow holds for its whole run
        state = pipeline(project_root=str(tiny_pipeline), return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineLockedError, match="another pipeline flow is running in"):
        state.result()
    assert not (tiny_pipeline / "dvc.lock").exists()  # no stage ran
    with _one_flow_at_a_time(tiny_pipeline):  # and the failed flow let go of nothing it did not hold
        pass


def test_unreadable_metrics_never_hide_the_stage_error_and_the_summary_is_still_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # collect_metrics ran bare in the finally: its AttributeError replaced the stage's own error, and
    # no summary was published
    def reproduce(root: str, stage: str, **_: Any) -> StageOutcome:
        raise RuntimeError("the stage's own error")

    class FakeTask:
        def with_options(self, **_: Any) -> Any:
            return reproduce

    def unreadable(root: Path) -> dict[str, Any]:
        raise AttributeError("'float' object has no attribute 'items'")

    published: list[str] = []
    monkeypatch.setattr(flows.pipeline, "reproduce_stage", FakeTask())
    monkeypatch.setattr(flows.pipeline, "stage_order", lambda root, targets=None: ["train"])
    monkeypatch.setattr(flows.pipeline, "collect_metrics", unreadable)
    monkeypatch.setattr(
        flows.pipeline, "create_markdown_artifact", lambda markdown, **_: published.append(markdown)
    )
    with pytest.raises(RuntimeError, match="the stage's own error"):
        _run_stages(tmp_path, None, False)
    (markdown,) = published
    assert "| train | failed |" in markdown


def test_a_folder_that_is_not_a_dvc_project_root_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    # the lock's folder used to be created first: .dvc/ made any folder a DVC project, and a flow
    # pointed at a project's docs/ folder "succeeded" with no stages
    with pytest.raises(NotADirectoryError, match=r"is not a DVC project root: it has no \.dvc folder"):
        with _one_flow_at_a_time(tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_metrics_file_of_one_bare_value_is_shown_under_its_own_name() -> None:
    # DVC shows such a file; flattening it raised AttributeError and cost the flow its summary
    assert _flatten(0.5) == {"value": 0.5}
    assert _flatten({"eval": {"auroc": 0.9}, "n": 3}) == {"eval.auroc": 0.9, "n": 3}


HOLDER = """
import sys, time
from dvc.repo import Repo
with Repo(sys.argv[1]) as repo, repo.lock:  # DVC let go of it while the stage's command runs
    open(sys.argv[2], "w").close()
    time.sleep(8)
"""


@pytest.mark.slow
def test_a_stage_whose_command_ends_while_another_process_holds_the_lock_waits_and_is_recorded(
    prefect_harness: None, dvc_project: Path
) -> None:
    # DVC gives up the repository lock while a command runs and takes it back (~3 s of retries) to record
    # the result: a `dvc repro` planning meanwhile used to make the flow throw the finished stage away.
    (dvc_project / "holder.py").write_text(HOLDER)
    command = (
        "import subprocess, sys, time, pathlib; "
        "subprocess.Popen([sys.executable, 'holder.py', '.', 'held']); "
        "[time.sleep(0.1) for _ in range(100) if not pathlib.Path('held').exists()]; "
        "pathlib.Path('out.txt').write_text('done')"
    )
    _one_stage_pipeline(dvc_project, "work", command, "out.txt")

    summary = pipeline(project_root=str(dvc_project))

    assert _outcomes(summary.stages) == {"work": "ran"}
    assert "work" in yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]
