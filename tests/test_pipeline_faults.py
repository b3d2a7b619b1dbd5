"""Concurrency and faults: two pipeline runs at once, and a stage killed halfway.

What DVC guarantees, and these tests hold it to: a run takes the repository lock (``.dvc/tmp/lock``) while
it plans and records, and releases it while a stage's command runs; the stage's outs are then guarded by
DVC's read/write lock (``.dvc/tmp/rwlock``). So a second run fails, either with "Unable to acquire lock"
(the first is planning or recording) or, far more often, with "'<out>' is busy, it is being blocked by:
(PID n): <command>" (the first is running a stage the second needs). ``dvc.lock`` and the cache only ever
receive a stage whose command finished. A killed command leaves its partial out in the workspace (DVC
deletes it before the stage's next run), never in ``dvc.lock`` or the cache.

The pipelines here are a few ``python stage.py`` commands in a scratch git + DVC project: each stage writes
the first half of its out, then waits while ``control/<stage>.hold`` exists (so a test can run something
alongside it, or kill it), then writes the rest.
"""

import contextvars
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import chdir
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.pipeline import PipelineLockedError, StageOutcome, pipeline

DVC = str(Path(sys.executable).parent / "dvc")

STAGE_SCRIPT = """
    import os
    import sys
    import time
    from contextlib import nullcontext
    from pathlib import Path

    name, source = sys.argv[1], Path(sys.argv[2])
    control = Path("control")
    if "--track" in sys.argv:
        from ebm.tracking import start_run

        tracking = start_run(project_root=Path.cwd(), experiment="faults", stage=name, params={"stage": name})
    else:
        tracking = nullcontext()
    with tracking, open(f"{name}.txt", "w") as out:
        out.write("first half\\n")
        out.flush()
        (control / f"{name}.pid").write_text(str(os.getpid()))
        while (control / f"{name}.hold").exists():
            time.sleep(0.05)
        out.write(source.read_text().upper())
"""

FIRST_HALF = "first half\n"


def _write_pipeline(root: Path, stages: dict[str, tuple[str, bool]]) -> None:
    """``stages``: name → (input file, tracked in MLflow); each stage writes ``<name>.txt``."""
    (root / "stage.py").write_text(textwrap.dedent(STAGE_SCRIPT))
    (root / "raw.txt").write_text("energy\n")
    (root / "control").mkdir()
    (root / ".gitignore").write_text("/control/\nmlflow.db\nmlruns/\nreports/\n")
    definitions = {
        name: {
            "cmd": f"{sys.executable} stage.py {name} {source}" + (" --track" if tracked else ""),
            "deps": ["stage.py", source],
            "outs": [f"{name}.txt"],
        }
        for name, (source, tracked) in stages.items()
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": definitions}, sort_keys=False))
    identity = ["-c", "user.name=ebm-tests", "-c", "user.email=ebm-tests@localhost"]
    for args in (["add", "-A"], ["commit", "-q", "-m", "fault pipeline"]):
        subprocess.run(["git", *identity, *args], cwd=root, check=True, capture_output=True)


def _hold(root: Path, *stages: str) -> None:
    for stage in stages:
        (root / "control" / f"{stage}.hold").touch()


def _release(root: Path, *stages: str) -> None:
    for stage in stages:
        (root / "control" / f"{stage}.hold").unlink()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (each in its own session); whatever still runs at the end is killed."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start_dvc(started: list[subprocess.Popen[str]], root: Path, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [DVC, *args],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    started.append(process)
    return process


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True, timeout=300)


def _stage_pid(root: Path, stage: str, runner: subprocess.Popen[str] | None = None) -> int:
    """The pid the stage's command announces once it has written the first half of its out."""
    pid_file = root / "control" / f"{stage}.pid"
    deadline = time.monotonic() + 240
    while not pid_file.exists():
        if runner is not None and runner.poll() is not None:
            pytest.fail(f"the run ended before stage {stage!r} started:\n{runner.communicate()[0]}")
        assert time.monotonic() < deadline, f"stage {stage!r} never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def _assert_lock_matches_workspace(root: Path, stages: list[str]) -> None:
    """``dvc.lock`` parses, records exactly ``stages``, and each recorded out is the file on disk."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(stages)
    for entry in lock["stages"].values():
        for out in entry["outs"]:
            assert hashlib.md5((root / out["path"]).read_bytes()).hexdigest() == out["md5"]


def _status(root: Path) -> dict[str, Any]:
    """``dvc status``: stages whose deps or outs differ from ``dvc.lock``, addressed from the root."""
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        return dict(repo.status())


def _runs(tracking_uri: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("faults")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _outcomes(stages: tuple[StageOutcome, ...]) -> dict[str, str]:
    return {stage.stage: stage.outcome for stage in stages}


def _cause_chain(exc: BaseException | None) -> str:
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__
    return "\n".join(messages)


@pytest.mark.slow
def test_runs_started_while_a_stage_runs_fail_naming_it_and_the_first_run_completes(
    prefect_harness: None,
    dvc_project: Path,
    mlflow_tracking_uri: str,
    started: list[subprocess.Popen[str]],
) -> None:
    root = dvc_project
    _write_pipeline(root, {"copy": ("raw.txt", True), "shout": ("copy.txt", False)})
    _hold(root, "copy")
    first = _start_dvc(started, root, "repro")
    _stage_pid(root, "copy", first)

    second = _dvc(root, "repro")
    flow = pipeline(project_root=str(root), return_state=True)

    assert second.returncode != 0
    assert "failed to reproduce 'copy'" in second.stderr
    assert f"is busy, it is being blocked by:\n  (PID {first.pid})" in second.stderr
    assert flow.is_failed()
    with pytest.raises(Exception) as raised:
        flow.result()
    assert f"(PID {first.pid})" in _cause_chain(raised.value)

    _release(root, "copy")
    returncode, output = _finish(first)
    assert returncode == 0, output
    _assert_lock_matches_workspace(root, ["copy", "shout"])
    assert (root / "shout.txt").read_text() == FIRST_HALF + (FIRST_HALF + "ENERGY\n").upper()
    assert _status(root) == {}
    assert [run.info.status for run in _runs(mlflow_tracking_uri)] == ["FINISHED"]


@pytest.mark.slow
def test_flow_started_while_a_dvc_repro_stage_runs_raises_pipeline_locked_error(
    prefect_harness: None, dvc_project: Path, started: list[subprocess.Popen[str]]
) -> None:
    root = dvc_project
    _write_pipeline(root, {"gate": ("raw.txt", False)})
    _hold(root, "gate")
    first = _start_dvc(started, root, "repro")
    _stage_pid(root, "gate", first)

    state = pipeline(project_root=str(root), return_state=True)
    _release(root, "gate")
    assert _finish(first)[0] == 0

    raised = state.result(raise_on_failure=False)
    assert isinstance(raised, PipelineLockedError), f"{type(raised).__name__}: {raised}"


@pytest.mark.slow
def test_dvc_repro_started_while_the_flow_runs_a_stage_fails_naming_it(
    prefect_harness: None, dvc_project: Path, mlflow_tracking_uri: str
) -> None:
    root = dvc_project
    _write_pipeline(root, {"copy": ("raw.txt", True), "shout": ("copy.txt", False)})
    _hold(root, "copy")
    states: list[Any] = []
    # The thread runs in a copy of this context: Prefect's test settings live in context variables.
    in_this_context = contextvars.copy_context()
    flow = threading.Thread(
        target=in_this_context.run,
        args=(lambda: states.append(pipeline(project_root=str(root), return_state=True)),),
        daemon=True,
    )
    flow.start()
    try:
        _stage_pid(root, "copy")
        second = _dvc(root, "repro")
    finally:
        _release(root, "copy")
        flow.join(timeout=300)

    assert second.returncode != 0
    assert "failed to reproduce 'copy'" in second.stderr
    assert f"is busy, it is being blocked by:\n  (PID {os.getpid()})" in second.stderr
    (state,) = states
    assert _outcomes(state.result().stages) == {"copy": "ran", "shout": "ran"}
    _assert_lock_matches_workspace(root, ["copy", "shout"])
    assert _status(root) == {}
    assert [run.info.status for run in _runs(mlflow_tracking_uri)] == ["FINISHED"]


@pytest.mark.slow
def test_independent_stages_run_at_once_both_land_in_dvc_lock_and_mlflow(
    dvc_project: Path, mlflow_tracking_uri: str, started: list[subprocess.Popen[str]]
) -> None:
    root = dvc_project
    _write_pipeline(root, {"left": ("raw.txt", True), "right": ("raw.txt", True)})
    _hold(root, "left", "right")
    # --wait-for-lock: each run holds the repository lock while it plans, which may take more than the
    # 3 s DVC retries for by default on a busy machine; the stages themselves do not overlap.
    runs = [
        _start_dvc(started, root, "--wait-for-lock", "repro", "--single-item", stage)
        for stage in ("left", "right")
    ]
    for stage, runner in zip(("left", "right"), runs, strict=True):
        _stage_pid(root, stage, runner)  # both commands are running now, each logging to the one store

    _release(root, "left", "right")
    for runner in runs:
        returncode, output = _finish(runner)
        assert returncode == 0, output

    _assert_lock_matches_workspace(root, ["left", "right"])
    assert _status(root) == {}
    runs_logged = _runs(mlflow_tracking_uri)
    assert sorted(run.data.tags["dvc_stage"] for run in runs_logged) == ["left", "right"]
    assert {run.info.status for run in runs_logged} == {"FINISHED"}


@pytest.mark.slow
def test_stage_killed_halfway_leaves_nothing_recorded_and_the_next_run_redoes_just_it(
    prefect_harness: None,
    dvc_project: Path,
    mlflow_tracking_uri: str,
    started: list[subprocess.Popen[str]],
) -> None:
    root = dvc_project
    _write_pipeline(root, {"copy": ("raw.txt", False), "train": ("copy.txt", True)})
    _hold(root, "train")
    run = _start_dvc(started, root, "repro")
    os.kill(_stage_pid(root, "train", run), signal.SIGKILL)
    returncode, output = _finish(run)

    assert returncode != 0
    assert "failed to reproduce 'train'" in output
    # The partial out is still in the workspace, but neither dvc.lock nor the cache took it.
    assert (root / "train.txt").read_text() == FIRST_HALF
    _assert_lock_matches_workspace(root, ["copy"])
    partial_md5 = hashlib.md5(FIRST_HALF.encode()).hexdigest()
    cache = root / ".dvc" / "cache"
    assert not (cache / "files" / "md5" / partial_md5[:2] / partial_md5[2:]).exists()
    assert not any(partial_md5 in entry.read_text() for entry in cache.rglob("runs/**/*") if entry.is_file())
    assert set(_status(root)) == {"train"}
    (killed,) = _runs(mlflow_tracking_uri)
    assert killed.info.status == "RUNNING"  # nothing is left to end the run of a SIGKILLed command

    _release(root, "train")
    summary = pipeline(project_root=str(root))

    assert _outcomes(summary.stages) == {"copy": "skipped", "train": "ran"}
    assert (root / "train.txt").read_text() == FIRST_HALF + (FIRST_HALF + "ENERGY\n").upper()
    _assert_lock_matches_workspace(root, ["copy", "train"])
    assert _status(root) == {}
    statuses = sorted(run.info.status for run in _runs(mlflow_tracking_uri))
    assert statuses == ["FINISHED", "RUNNING"]
