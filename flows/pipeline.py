"""Run the DVC pipeline from Prefect: one task per stage, DVC deciding what runs.

Each task calls ``Repo(root).reproduce(targets=[stage], single_item=True)``, exactly what
``dvc repro --single-item <stage>`` does, so DVC compares deps and params with ``dvc.lock``, skips unchanged
stages, restores known results from its run cache and rewrites ``dvc.lock``; a ``dvc repro`` after a flow run
is a no-op. The flow never calls the library itself.

Prefect adds what DVC lacks: schedules (``flows/deploy.py``), retries, timeouts, run history, and a markdown
summary of each run (per stage: ran, skipped or restored from the run cache, and seconds; the metrics files
``dvc.yaml`` names; the MLflow runs the stages logged).

Per-stage policy comes from the optional ``schedule.stages`` section of ``params.yaml``
(keys: ``retries``, ``retry_delay_seconds``, ``timeout_seconds``)::

    schedule:
      stages:
        prepare_images: {retries: 2, retry_delay_seconds: 30}
        train_images: {timeout_seconds: 7200}

Stages whose name starts with ``prepare`` retry once after 10 s by default (downloads flake); a stage
has no timeout unless the params give it one (the project's ``params.yaml`` does for its long stages: at
least four times their time on 2 cores, and at least an hour). A timeout is enforced here rather than by
Prefect's ``timeout_seconds``, which cannot interrupt a sync task blocked on a subprocess: past its deadline
the stage's command (found by the ``DVC_STAGE`` variable DVC gives it) is terminated, DVC records the stage
as failed and the task raises :class:`StageTimeoutError`.

Usage::

    python -m flows.pipeline                         # whole pipeline, project in the current folder
    python -m flows.pipeline --stages train_toy      # that stage and everything upstream of it
    python -m flows.pipeline --force                 # rerun even unchanged stages
"""

# Prefect starts its analytics thread during ``import prefect``: the switches go first.
import os

from ebm.offline import apply_offline_env

apply_offline_env()
# Prefect gives its temporary API 20 s to come up, which a busy 2-core machine (a training stage in
# another process, say) overruns; the flow would then fail before its first stage.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from contextlib import chdir, contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Literal  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import yaml  # noqa: E402
from prefect import Task, flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import State  # noqa: E402

from ebm.tracking import (  # noqa: E402
    DEFER_ENV,
    FLOW_RUN_ID_ENV,
    log_pending_runs,
    read_run_links,
    tracking_uri,
)

if TYPE_CHECKING:
    from dvc.repo import Repo

SUMMARY_ARTIFACT_KEY = "ebm-pipeline-summary"
MLFLOW_UI_ENV = "EBM_MLFLOW_UI_URL"
"""Base URL of the MLflow UI for summary links; defaults to the tracking server or ``mlflow ui``'s address."""

Outcome = Literal["ran", "skipped", "restored", "failed"]


class PipelineLockedError(RuntimeError):
    """Another ``dvc repro`` (or pipeline flow) holds the DVC repository lock."""


class StageTimeoutError(RuntimeError):
    """A stage ran past its timeout and its command was terminated."""


@dataclass(frozen=True)
class StagePolicy:
    """How Prefect treats one stage's task."""

    retries: int = 0
    retry_delay_seconds: float = 0.0
    timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        # Checked here: a quoted "7200" would reach threading.Timer, whose thread would die with a
        # TypeError printed to stderr, and the stage would run with no timeout at all.
        def number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        retries, delay, timeout = self.retries, self.retry_delay_seconds, self.timeout_seconds
        if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
            raise ValueError(f"retries must be a whole number ≥ 0, got {retries!r}")
        if not (number(delay) and delay >= 0):
            raise ValueError(f"retry_delay_seconds must be a number of seconds ≥ 0, got {delay!r}")
        if timeout is not None and not (number(timeout) and timeout > 0):
            raise ValueError(f"timeout_seconds must be a number of seconds > 0 or null, got {timeout!r}")


PREPARE_POLICY = StagePolicy(retries=1, retry_delay_seconds=10.0)


@dataclass(frozen=True)
class StageOutcome:
    """What DVC did with one stage in one flow run."""

    stage: str
    outcome: Outcome
    seconds: float


@dataclass(frozen=True)
class PipelineSummary:
    """One flow run: the stages in order, the metrics files' values, and the MLflow run links.

    ``run_links`` holds only runs the stages logged during this flow run: a stage that failed before opening
    its run has none (the link left by an earlier run would pass for this one's). ``previous_run_links``
    holds, for stages DVC skipped, the run that last produced their outputs, shown marked "(previous)".
    """

    stages: tuple[StageOutcome, ...]
    metrics: dict[str, dict[str, Any]]
    run_links: dict[str, str]
    previous_run_links: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_markdown(self, mlflow_ui: str) -> str:
        """Render the summary; ``mlflow_ui`` is the UI base the relative run links hang off."""
        lines = ["# ebm pipeline", "", "| stage | DVC | seconds | MLflow run |", "|---|---|---:|---|"]
        for stage in self.stages:
            link, previous = self.run_links.get(stage.stage), self.previous_run_links.get(stage.stage)
            if link:
                run = f"[run]({mlflow_ui.rstrip('/')}/{link})"
            elif previous:
                run = f"[run]({mlflow_ui.rstrip('/')}/{previous}) (previous)"
            else:
                run = ""
            lines.append(f"| {stage.stage} | {stage.outcome} | {stage.seconds:.1f} | {run} |")
        if self.metrics:
            lines += ["", "## Metrics", "", "| file | metric | value |", "|---|---|---:|"]
            for path, values in self.metrics.items():
                lines += [f"| {path} | {name} | {value} |" for name, value in values.items()]
        return "\n".join(lines) + "\n"


@contextmanager
def _dvc_repo(project_root: Path | str, *, wait_for_lock: bool = False) -> Iterator["Repo"]:
    """The DVC repo, used from its root as ``dvc repro`` would be.

    DVC resolves stage addresses against the working directory and hands them to commands as
    ``DVC_STAGE``; from the root they read ``train``, the name ``ebm.tracking`` tags runs with. The working
    directory is process-wide: run one pipeline flow per process (the deployment allows one at a time).
    ``wait_for_lock``: wait for the repository lock as ``dvc --wait-for-lock`` does, instead of giving up
    after ~3 s.
    """
    from dvc.repo import Repo

    with chdir(project_root), Repo(".", _wait_for_lock=wait_for_lock) as repo:
        yield repo


SCHEDULE_KEYS = ("cron", "stages", "timezone")
"""The keys of ``schedule`` in ``params.yaml``: the deployment's ``cron`` and ``timezone``, stage policy."""


def load_schedule_config(project_root: Path) -> dict[str, Any]:
    """The ``schedule`` section of ``<root>/params.yaml``; empty when either is missing.

    Raises:
        ValueError: ``schedule`` is not a mapping, has a key not in :data:`SCHEDULE_KEYS` (a misspelt
            ``timezone`` would leave the deployment on UTC without a word), or ``schedule.stages`` is not
            a mapping.
    """
    params_file = Path(project_root) / "params.yaml"
    if not params_file.exists():
        return {}
    params = yaml.safe_load(params_file.read_text()) or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{params_file} must be a mapping of sections, got {type(params).__name__}")
    schedule = {} if params.get("schedule") is None else params["schedule"]
    if not isinstance(schedule, Mapping):
        raise ValueError(
            f"schedule must be a mapping with keys {list(SCHEDULE_KEYS)}, got {schedule!r} in {params_file}"
        )
    if unknown := sorted(set(schedule) - set(SCHEDULE_KEYS)):
        raise ValueError(f"schedule: unknown keys {unknown}; valid keys: {list(SCHEDULE_KEYS)}")
    _scheduled_stages(schedule)
    return dict(schedule)


def _scheduled_stages(schedule: Mapping[str, Any]) -> Mapping[str, Any]:
    """``schedule.stages`` (empty when absent).

    Raises:
        ValueError: It is not a mapping of stage name → policy.
    """
    stages = {} if schedule.get("stages") is None else schedule["stages"]
    if not isinstance(stages, Mapping):
        raise ValueError(
            f"schedule.stages must be a mapping of stage name → {{retries, retry_delay_seconds, "
            f"timeout_seconds}}, got {stages!r}"
        )
    return stages


def stage_policy(stage: str, schedule: Mapping[str, Any]) -> StagePolicy:
    """The policy for ``stage``: the default for its kind, overridden by ``schedule.stages.<stage>``.

    Raises:
        ValueError: ``schedule.stages`` or its entry for ``stage`` is not a mapping, or the entry names a
            key :class:`StagePolicy` does not have or gives one a bad value.
    """
    default = PREPARE_POLICY if stage.startswith("prepare") else StagePolicy()
    entry = _scheduled_stages(schedule).get(stage)
    entry = {} if entry is None else entry
    known = {field.name for field in dataclasses.fields(StagePolicy)}
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"schedule.stages.{stage} must be a mapping with keys {sorted(known)}, got {entry!r}"
        )
    overrides = dict(entry)
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"schedule.stages.{stage}: unknown keys {unknown}; valid keys: {sorted(known)}")
    try:
        return dataclasses.replace(default, **overrides)
    except ValueError as err:
        raise ValueError(f"schedule.stages.{stage}: {err}") from None


def check_scheduled_stages(schedule: Mapping[str, Any], stages: list[str]) -> None:
    """``schedule.stages`` names only stages of the pipeline: a misspelt one would be ignored silently.

    Raises:
        ValueError: ``schedule.stages`` is not a mapping, or a key of it is not one of ``stages``.
    """
    if unknown := sorted(set(_scheduled_stages(schedule)) - set(stages)):
        raise ValueError(f"schedule.stages names {unknown}, not stages of this pipeline; stages: {stages}")


def stage_order(project_root: Path, targets: list[str] | None = None) -> list[str]:
    """The pipeline stages DVC knows, dependencies first (ties in ``dvc.yaml`` order).

    Args:
        project_root: The DVC project root.
        targets: Stage addresses to run together with everything upstream of them (as ``dvc repro
            <targets>`` does); all stages when ``None``.

    Returns:
        Stage addresses (``train``, ``train@toy``); data sources (``.dvc`` files) are left to DVC.

    Raises:
        ValueError: A target is not a stage of the pipeline.
    """
    import networkx as nx

    with _dvc_repo(project_root) as repo:
        graph = repo.index.graph  # edge: stage → stage it depends on
        position = {stage: index for index, stage in enumerate(repo.index.stages)}
        by_address = {stage.addressing: stage for stage in graph if stage.cmd}
        if targets is None:
            selected = set(graph)
        else:
            if unknown := [target for target in targets if target not in by_address]:
                raise ValueError(f"unknown stages {unknown}; stages: {sorted(by_address)}")
            selected = set()
            for target in targets:
                selected |= {by_address[target], *nx.descendants(graph, by_address[target])}
        upstream_first = graph.reverse(copy=False).subgraph(selected)
        ordered = nx.lexicographical_topological_sort(upstream_first, key=lambda stage: position[stage])
        return [stage.addressing for stage in ordered if stage.cmd]


def collect_metrics(project_root: Path) -> dict[str, dict[str, Any]]:
    """The workspace values of every metrics file ``dvc.yaml`` names, flattened to dotted keys."""
    with _dvc_repo(project_root) as repo:
        shown = repo.metrics.show()
    files = shown.get("", {}).get("data", {})
    return {path: _flatten(entry["data"]) for path, entry in sorted(files.items()) if "data" in entry}


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; a file that holds one bare value (DVC shows those) keeps it as
    ``value``."""
    if not isinstance(values, Mapping):
        return {prefix.rstrip(".") or "value": values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _mlflow_ui_base(project_root: Path) -> str:
    if explicit := os.environ.get(MLFLOW_UI_ENV):
        return explicit
    uri = tracking_uri(project_root)
    return uri if urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"


INTERRUPT_GRACE_SECONDS = 5.0
"""How long a stage past its timeout has to wind up after SIGINT before SIGTERM (then SIGKILL)."""


def _terminate_stage_processes(address: str) -> None:
    """Terminate this process's descendants that DVC started for ``address`` (then kill stragglers)."""
    import psutil

    stage_processes = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.environ().get("DVC_STAGE") == address:
                stage_processes.append(child)
        except psutil.Error:
            continue
    # SIGINT first: Python turns it into KeyboardInterrupt, so a stage's ``finally`` blocks run and a
    # live MLflow run ends as KILLED (SIGTERM's default action skips them and leaves it RUNNING).
    for process in stage_processes:
        _signal(process, signal.SIGINT)
    _, alive = psutil.wait_procs(stage_processes, timeout=INTERRUPT_GRACE_SECONDS)
    for process in alive:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(alive, timeout=10)
    for process in alive:
        _signal(process, signal.SIGKILL)


def _signal(process: Any, number: int) -> None:
    import psutil

    try:
        process.send_signal(number)
    except psutil.NoSuchProcess:
        pass


@contextmanager
def _deadline(address: str, seconds: float | None) -> Iterator[threading.Event]:
    """Terminate the stage's command after ``seconds``; the yielded event tells whether that happened."""
    expired = threading.Event()
    if seconds is None:
        yield expired
        return

    def expire() -> None:
        expired.set()
        _terminate_stage_processes(address)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


class _RunCacheRestores(logging.Handler):
    """Notices DVC restoring a stage's outs from its run cache instead of running the command."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen |= str(record.msg).startswith("Stage '%s' is cached")


@contextmanager
def _watch_run_cache() -> Iterator[_RunCacheRestores]:
    dvc_cache_logger = logging.getLogger("dvc.stage.cache")
    handler = _RunCacheRestores()
    previous_level = dvc_cache_logger.level
    dvc_cache_logger.setLevel(logging.INFO)
    dvc_cache_logger.addHandler(handler)
    try:
        yield handler
    finally:
        dvc_cache_logger.removeHandler(handler)
        dvc_cache_logger.setLevel(previous_level)


def _logger() -> "logging.Logger | logging.LoggerAdapter[logging.Logger]":
    """Prefect's run logger inside a flow or task run (its messages reach the UI), else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextmanager
def _logging_deferred_runs(project_root: str) -> Iterator[None]:
    """Log the MLflow runs the stage recorded (see ``ebm.tracking.DEFER_ENV``), whether it passed or not.

    When the stage failed, its own exception is the one raised: a failure to log the runs is attached to it
    as a note (and logged), never put in its place. When the stage passed, that failure fails the task.
    """
    began_ms = int(time.time() * 1000)  # a run recorded earlier is an interrupted flow's leftover
    try:
        yield
    except BaseException as stage_error:
        try:
            links = log_pending_runs(Path(project_root), recorded_since_ms=began_ms)
        except Exception as logging_error:
            _logger().error("logging the stage's MLflow runs failed as well: %s", logging_error)
            stage_error.add_note(f"logging the stage's MLflow runs failed as well: {logging_error}")
            links = []
        for link in links:
            _logger().info("MLflow run logged: %s", link)
        raise
    for link in log_pending_runs(Path(project_root), recorded_since_ms=began_ms):
        _logger().info("MLflow run logged: %s", link)


def _retry_unless_locked(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a failed stage, except when the repository is locked: a retry would hit the same lock."""
    return not isinstance(state.result(raise_on_failure=False), PipelineLockedError)


@task(cache_policy=NO_CACHE)
def reproduce_stage(
    project_root: str,
    stage: str,
    *,
    force: bool = False,
    timeout_seconds: float | None = None,
    flow_run_id: str | None = None,
) -> StageOutcome:
    """``dvc repro --single-item <stage>``, in process; reports whether DVC ran, skipped or restored it.

    Raises:
        PipelineLockedError: Another DVC process holds the repository lock.
        StageTimeoutError: The stage ran past ``timeout_seconds``.
        dvc.exceptions.ReproductionError: The stage's command failed.
    """
    from dvc.exceptions import ReproductionError
    from dvc.lock import LockError

    # The stage records its MLflow run instead of importing MLflow itself (seconds per process); this
    # process, which has MLflow imported already after the first stage, logs it when the stage ends.
    run_env = {DEFER_ENV: "1"} | ({FLOW_RUN_ID_ENV: flow_run_id} if flow_run_id else {})
    started = time.perf_counter()
    # Fail fast if another run holds the repository lock now. Once the stage starts, wait for it instead:
    # DVC lets go of the lock while the stage's command runs and takes it back to record the result, and
    # giving up then (after ~3 s) would throw away a finished stage because another run was planning.
    with _dvc_repo(project_root) as probe:
        try:
            with probe.lock:
                pass
        except LockError as exc:
            lock_file = Path(probe.lock.lockfile).resolve()
            raise PipelineLockedError(
                f"another pipeline run holds the DVC lock at {lock_file}; wait for it to finish "
                f"(or stop it) and run again. A `dvc repro` or `python -m flows.pipeline` in {project_root} "
                "is the usual holder."
            ) from exc
    with (
        _logging_deferred_runs(project_root),
        _dvc_repo(project_root, wait_for_lock=True) as repo,
        _watch_run_cache() as run_cache,
        _deadline(stage, timeout_seconds) as expired,
    ):
        try:
            reproduced = repo.reproduce(targets=[stage], single_item=True, force=force, run_env=run_env)
        except ReproductionError as exc:
            if expired.is_set():
                raise StageTimeoutError(
                    f"stage {stage!r} ran past its timeout of {timeout_seconds} s and was stopped"
                ) from exc
            if isinstance(exc.__cause__, LockError):
                # while another run's stage command runs, DVC guards that stage's outs with a
                # read/write lock rather than the repository lock: the same situation for the user
                raise PipelineLockedError(
                    f"stage {stage!r} is being run by another pipeline run in {project_root}: "
                    f"{exc.__cause__}; wait for it to finish (or stop it) and run again"
                ) from exc
            raise
    outcome: Outcome = ("restored" if run_cache.seen else "ran") if reproduced else "skipped"
    result = StageOutcome(stage=stage, outcome=outcome, seconds=time.perf_counter() - started)
    get_run_logger().info("stage %s: %s in %.1f s", stage, outcome, result.seconds)
    return result


@flow(name="ebm-pipeline")
def pipeline(
    project_root: str = ".", stages: list[str] | None = None, force: bool = False
) -> PipelineSummary:
    """Run the DVC pipeline stage by stage and publish a markdown summary as a Prefect artifact.

    Args:
        project_root: The DVC project root.
        stages: Stages to run with everything upstream of them; all stages when omitted.
        force: Rerun stages even when DVC finds them unchanged.

    Returns:
        The summary also published as the ``ebm-pipeline-summary`` artifact.

    Raises:
        PipelineLockedError: Another DVC process holds the repository lock.
        StageTimeoutError: A stage ran past its timeout.
        dvc.exceptions.ReproductionError: A stage's command failed. The summary is published anyway,
            with that stage marked failed.
    """
    root = Path(project_root).resolve()
    with _one_flow_at_a_time(root):
        return _run_stages(root, stages, force)


FLOW_LOCK = Path(".dvc") / "tmp" / "ebm-pipeline.lock"
"""Held by a pipeline flow for its whole run (relative to the project root)."""


@contextmanager
def _one_flow_at_a_time(root: Path) -> Iterator[None]:
    """Hold :data:`FLOW_LOCK` for the flow's whole run; a second flow in the same project fails at once.

    DVC's repository lock guards one stage at a time, so two flows would interleave their stages, and
    each would log (and clean up) the other's deferred MLflow runs.

    Raises:
        PipelineLockedError: Another pipeline flow holds the lock.
    """
    import zc.lockfile

    if not (root / ".dvc").is_dir():  # else the lock's folder would make ``root`` a DVC project
        raise NotADirectoryError(f"{root} is not a DVC project root: it has no .dvc folder")
    path = root / FLOW_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = zc.lockfile.LockFile(str(path))
    except zc.lockfile.LockError as exc:
        holder = path.read_text().strip() if path.exists() else "?"
        raise PipelineLockedError(
            f"another pipeline flow is running in {root} (process {holder}, lock {path}); wait for it to "
            "finish (or stop it) and run again"
        ) from exc
    try:
        yield
    finally:
        lock.close()


def _run_stages(root: Path, stages: list[str] | None, force: bool) -> PipelineSummary:
    schedule = load_schedule_config(root)
    if schedule.get("stages"):
        check_scheduled_stages(schedule, stage_order(root))
    planned = [(stage, stage_policy(stage, schedule)) for stage in stage_order(root, stages)]
    outcomes: list[StageOutcome] = []
    links: dict[str, str] = {}
    previous_links: dict[str, str] = {}
    try:
        for stage, policy in planned:
            link_before = read_run_links(root).get(stage)
            run_stage = reproduce_stage.with_options(
                name=f"dvc-{stage}",
                retries=policy.retries,
                retry_delay_seconds=policy.retry_delay_seconds,
                retry_condition_fn=_retry_unless_locked,
            )
            started = time.perf_counter()
            try:
                outcome = run_stage(
                    str(root),
                    stage,
                    force=force,
                    timeout_seconds=policy.timeout_seconds,
                    flow_run_id=flow_run.id,
                )
                # The flow's clock, as for a failed stage: every attempt and retry delay, not the last alone.
                outcomes.append(dataclasses.replace(outcome, seconds=time.perf_counter() - started))
            except Exception:
                outcomes.append(StageOutcome(stage, "failed", time.perf_counter() - started))
                raise
            finally:
                # Run ids are unique: a link that changed is one this stage logged now.
                link_after = read_run_links(root).get(stage)
                if link_after and link_after != link_before:
                    links[stage] = link_after
                elif (
                    link_after
                    and outcomes
                    and (outcomes[-1].stage, outcomes[-1].outcome) == (stage, "skipped")
                ):
                    previous_links[stage] = link_after
    finally:
        try:
            metrics = collect_metrics(root)
        except Exception as exc:  # never let the summary hide the stage's own error
            _logger().warning("could not read the pipeline's metrics for the summary: %r", exc)
            metrics = {}
        summary = PipelineSummary(
            stages=tuple(outcomes),
            metrics=metrics,
            run_links=links,
            previous_run_links=previous_links,
        )
        create_markdown_artifact(
            markdown=summary.to_markdown(_mlflow_ui_base(root)),
            key=SUMMARY_ARTIFACT_KEY,
            description="DVC stages run or skipped, metrics and MLflow runs of this pipeline run",
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m flows.pipeline [--project-root DIR] [--stages S ...] [--force]``."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-root", default=".", help="DVC project root (default: current folder)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="run these and everything upstream")
    parser.add_argument("--force", action="store_true", help="rerun stages DVC finds unchanged")
    args = parser.parse_args(argv)
    try:
        summary = pipeline(project_root=args.project_root, stages=args.stages, force=args.force)
    except (PipelineLockedError, NotADirectoryError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(where_results_are(Path(args.project_root).resolve(), summary))


def where_results_are(root: Path, summary: PipelineSummary) -> str:
    """The closing lines of a run: each stage's outcome, then where its results live."""
    ui = _mlflow_ui_base(root).rstrip("/")
    lines = ["", "ebm pipeline finished:"]
    for stage in summary.stages:
        link, previous = summary.run_links.get(stage.stage), summary.previous_run_links.get(stage.stage)
        run = f"{ui}/{link}" if link else f"{ui}/{previous} (previous)" if previous else ""
        lines.append(f"  {stage.stage:<22} {stage.outcome:<8} {stage.seconds:7.1f} s  {run}")
    plots = (
        sorted(p.relative_to(root) for p in (root / "reports").rglob("*.png"))
        if (root / "reports").is_dir()
        else []
    )
    lines += [
        f"  metrics:  dvc metrics show   ({', '.join(summary.metrics) or 'none yet'})",
        f"  plots:    {', '.join(map(str, plots[:6])) or 'none yet'}{' …' if len(plots) > 6 else ''}",
        f"  MLflow:   {tracking_uri(root)}  (browse: mlflow ui --backend-store-uri {tracking_uri(root)})",
    ]
    lines += [f"  model:    {line}" for line in registered_models(summary.metrics)]
    return "\n".join(lines)


def registered_models(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A line per model a registration stage's metrics file names (``model_name``, ``champion_version``,
    ``decision``: :class:`ebm.anomaly.registry.RegistrationOutcome`): the URI that serves it."""
    from ebm.anomaly.registry import CHAMPION

    return [
        f"models:/{values['model_name']}@{CHAMPION} (version {values['champion_version']}; "
        f"this run: {values['decision']})  [{path}]"
        for path, values in metrics.items()
        if {"model_name", "champion_version", "decision"} <= set(values)
    ]


if __name__ == "__main__":
    main()
