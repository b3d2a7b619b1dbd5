"""MLflow at the pipeline boundary: one tracked run per DVC stage run.

This is the one module (with model registration and serving) that talks to MLflow, and it imports mlflow
only inside functions: ``import ebm.tracking`` stays cheap and tool-free.

A stage entry point wraps its work in :func:`start_run`::

    with start_run(project_root=root, experiment="toy2d", stage="train_toy", params=params) as run:
        for step, metrics in trainer:
            run.log_metrics(metrics, step=step)
        run.log_figure(fig, "energy.png")

Every run is tagged so the MLflow UI says where it came from:

- ``git_commit``: ``git rev-parse HEAD`` in the project root (``"unknown"`` outside git or before the
  first commit).
- ``dvc_stage``: the address DVC ran (``DVC_STAGE``, which ``dvc repro`` sets for the command), else the
  ``stage`` argument.
- ``dvc_deps``: JSON ``{path: hash}`` of the stage's file deps. ``dvc.lock`` is written after the command
  exits, so during the run it still holds the previous run's entry. Instead the hashes are computed now with
  DVC's own code (``Dependency.get_hash``, served from DVC's state cache, so cheap right after DVC checked
  the stage): they are the values this run's ``dvc.lock`` entry will record. Param deps are left out (the
  params themselves are logged), and so are non-local deps (URLs, imports), whose hashing would need the
  network. Empty when the project has no ``dvc.yaml`` or DVC does not know the stage.
- ``prefect_flow_run_id``: when a Prefect flow started the stage. ``flows/pipeline.py`` passes
  :data:`FLOW_RUN_ID_ENV` to the stage command through DVC's ``run_env``; a deployment's process has
  ``PREFECT__FLOW_RUN_ID`` as well, used as a fallback.
- ``omp_wait_policy``: the OpenMP wait policy the stage process runs under (:mod:`ebm.runtime` picks it
  from the load when the process starts; ``"default"``: OpenMP's own). A training that ran slower than
  usual under ``PASSIVE`` says so here.

Each run, when it ends, records its UI link in ``reports/mlflow_runs.json`` (stage address → link) so the
flow's summary can point at it.

**Deferred runs.** Importing MLflow and opening its SQLite store costs a few seconds per process (the
import, SQLAlchemy's mapper set-up, Alembic's schema check), more than most stages' own bookkeeping. A
caller that runs many stages — the Prefect flow — sets :data:`DEFER_ENV` for the stage commands: the stage
then records its run (params, tags, every metric with its step and time, artifacts, status) in a folder
under ``.ebm/mlflow-pending/`` without importing MLflow, and the caller logs it with
:func:`log_pending_runs` in its own process, where MLflow is imported once. The run keeps its real start
and end times, so the UI shows the same run as a live one would; it appears when the stage ends rather
than while it runs. A record left by a stage that was killed is logged as KILLED, never dropped (a metrics
line its writer was cut off in the middle of is left out). A record MLflow rejects (a param key it does not
allow, say) is moved to ``.ebm/mlflow-pending/failed/`` with the reason in ``error.txt``, and its half-made
run ends FAILED: it neither blocks the records after it nor is retried at every stage.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from ebm.offline import apply_offline_env
from ebm.runtime import wait_policy_in_force

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

FLOW_RUN_ID_ENV = "EBM_PREFECT_FLOW_RUN_ID"
"""Environment variable carrying the Prefect flow-run id into stage commands."""

RUN_LINKS_FILE = Path("reports") / "mlflow_runs.json"
"""Where, relative to the project root, each stage's latest MLflow run link is recorded."""

DEFER_ENV = "EBM_MLFLOW_DEFER"
"""Set (to ``1``) in a stage's environment to record its run for the caller instead of logging it live."""

PENDING_RUNS_DIR = Path(".ebm") / "mlflow-pending"
"""Where, relative to the project root, deferred runs wait to be logged."""

RUN_LINKS_LOCK = Path(".ebm") / "mlflow_runs.lock"
"""The lock file that serialises updates of :data:`RUN_LINKS_FILE` (relative to the project root)."""

FAILED_RUNS_DIR = PENDING_RUNS_DIR / "failed"
"""Where, relative to the project root, deferred runs MLflow would not take are set aside (see
:func:`log_pending_runs`)."""

_PARTIAL = ".partial"

_log = logging.getLogger(__name__)

_LOCAL_STORE_SCHEMES = ("sqlite", "file", "")


def tracking_uri(project_root: Path) -> str:
    """The MLflow tracking URI for a project.

    Args:
        project_root: The DVC/git project root.

    Returns:
        ``MLFLOW_TRACKING_URI`` when the environment sets it (a team's tracking server, a test's store),
        else an absolute SQLite URI for ``<project_root>/mlflow.db``.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return _anchored(from_env, Path(project_root))
    return f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


def _anchored(uri: str, project_root: Path) -> str:
    """A local store given by a relative path (``sqlite:///mlflow.db``, ``file:mlruns``, ``mlruns``) made
    absolute against the project root, where ``dvc repro`` runs the stages: the flow logs from its own
    working folder, which need not be the project's. Servers and absolute paths pass unchanged."""
    root = project_root.resolve()
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{root / path}"
        return uri
    scheme = urlparse(uri).scheme
    if scheme == "file" and not uri.startswith("file:/"):
        return (root / uri.removeprefix("file:")).as_uri()
    if not scheme and not Path(uri).is_absolute():
        return str(root / uri)
    return uri


def artifact_location(project_root: Path, uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``<root>/mlruns/<experiment>`` for a local store.

    A tracking server (http, databricks, ...) decides its own artifact store, so this returns ``None``.
    """
    if urlparse(uri).scheme not in _LOCAL_STORE_SCHEMES:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment)
    return (Path(project_root).resolve() / "mlruns" / folder).as_uri()


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params to dotted keys: ``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit(project_root: Path) -> str:
    """``git rev-parse HEAD`` in ``project_root``, or ``"unknown"`` outside git or before a first commit."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def dvc_dep_hashes(project_root: Path, stage: str) -> dict[str, str]:
    """Hashes of a stage's local file deps as DVC computes them now (what ``dvc.lock`` will record).

    Args:
        project_root: The DVC project root.
        stage: A stage address relative to the project root (``train``, ``train@toy``,
            ``sub/dvc.yaml:train``).

    Returns:
        ``{dep path as written in dvc.yaml: hash}``; a dep that does not exist maps to ``""``. Empty when
        the stage's ``dvc.yaml`` does not exist or DVC does not know the stage.
    """
    # DVC resolves addresses against the working directory; anchor this one at the project root.
    dvcfile_name, _, name = stage.rpartition(":")
    dvcfile = Path(project_root).resolve() / (dvcfile_name or "dvc.yaml")
    if not dvcfile.exists():
        return {}
    from dvc.dependency import Dependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    target = f"{dvcfile}:{name}"
    try:
        with Repo(os.fspath(project_root)) as repo:
            dvc_stages = repo.stage.collect(target)
            if len(dvc_stages) != 1:
                return {}
            return {
                dep.def_path: (dep.get_hash().value or "") if dep.exists else ""
                for dep in dvc_stages[0].deps
                if type(dep) is Dependency and dep.protocol == "local"
            }
    except DvcException:
        return {}


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run that started this process, if one did."""
    return os.environ.get(FLOW_RUN_ID_ENV) or os.environ.get("PREFECT__FLOW_RUN_ID") or None


def read_run_links(project_root: Path) -> dict[str, str]:
    """The stage → MLflow run link mapping stages recorded; empty when there is none or it is unreadable."""
    path = Path(project_root) / RUN_LINKS_FILE
    try:
        links = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(stage): str(link) for stage, link in links.items()} if isinstance(links, dict) else {}


def record_run_link(project_root: Path, stage: str, link: str) -> None:
    """Add or replace ``stage``'s link in ``reports/mlflow_runs.json`` (written atomically).

    Read, update and write happen under an exclusive lock (``.ebm/mlflow_runs.lock``): two stages that
    finish at once (two ``dvc repro`` of independent stages) would otherwise each write the file as they
    read it, and one link would be lost.
    """
    import fcntl

    path = Path(project_root) / RUN_LINKS_FILE
    lock = Path(project_root) / RUN_LINKS_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes
        links = read_run_links(project_root) | {stage: link}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(links, indent=2, sort_keys=True) + "\n")
        os.replace(partial, path)


class StageRun(Protocol):
    """What a stage logs through, live (:class:`MlflowRun`) or deferred (:class:`RecordedRun`)."""

    @property
    def url(self) -> str: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...

    def log_figure(self, figure: Figure, artifact_file: str) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class MlflowRun:
    """Handle on the live MLflow run of one stage; every call goes to this run, active or not."""

    run_id: str
    experiment_id: str
    client: MlflowClient

    @property
    def url(self) -> str:
        """Link relative to the MLflow UI root (``mlflow ui`` serves it at ``http://127.0.0.1:5000/``)."""
        return run_url(self.experiment_id, self.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (numpy and torch scalars are converted) at ``step`` (0 when omitted)."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp_ms, step or 0) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts, under ``artifact_path`` if given."""
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact (``"plots/energy.png"``)."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def run_url(experiment_id: str, run_id: str) -> str:
    """A run's link relative to the MLflow UI root."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


class RecordedRun:
    """A deferred stage run: everything logged goes to files in ``folder`` (see :data:`DEFER_ENV`).

    ``run.json`` holds the run's description (experiment, name, params, tags, status, times),
    ``metrics.jsonl`` one line per metric value, ``artifacts/`` the files in their artifact paths.
    """

    def __init__(self, folder: Path, record: dict[str, Any]) -> None:
        self.folder = folder
        self.record = record
        (folder / "artifacts").mkdir(parents=True, exist_ok=True)
        self._write_record()

    @property
    def url(self) -> str:
        return "(deferred: logged to MLflow when the stage ends)"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp_ms = int(time.time() * 1000)
        lines = "".join(
            json.dumps({"key": key, "value": float(value), "step": step or 0, "timestamp": timestamp_ms})
            + "\n"
            for key, value in metrics.items()
        )
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(lines)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        source = Path(path)
        target = self._artifact_dir(artifact_path) / source.name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        target = self.folder / "artifacts" / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.record["tags"].update({key: str(value) for key, value in tags.items()})
        self._write_record()

    def finish(self, status: str) -> Path:
        """Record the end (``FINISHED``, ``FAILED`` or ``KILLED``) and hand the record over; returns its
        final folder."""
        self.record["status"] = status
        self.record["end_time"] = int(time.time() * 1000)
        self._write_record()
        done = self.folder.with_name(self.folder.name.removesuffix(_PARTIAL))
        os.replace(self.folder, done)
        self.folder = done
        return done

    def _artifact_dir(self, artifact_path: str | None) -> Path:
        folder = self.folder / "artifacts" / (artifact_path or "")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _write_record(self) -> None:
        partial = self.folder / f".run.json.{os.getpid()}"
        partial.write_text(json.dumps(self.record, indent=2, sort_keys=True))
        os.replace(partial, self.folder / "run.json")


def _get_or_create_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            # Deleted in the UI (a soft delete: the name stays taken), and MLflow refuses runs in it. The
            # stage's run belongs in this experiment, so bring it back rather than fail every stage.
            try:
                client.restore_experiment(existing.experiment_id)
            except MlflowException:
                # Another stage process restored it first.
                if client.get_experiment(existing.experiment_id).lifecycle_stage != "active":
                    raise
            _log.warning(
                "MLflow experiment %r (id %s) was deleted; restored it to log this run",
                name,
                existing.experiment_id,
            )
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another stage process created it between our lookup and create.
        created = client.get_experiment_by_name(name)
        if created is None:
            raise
        return created.experiment_id


@contextmanager
def start_run(
    *,
    project_root: Path,
    experiment: str,
    stage: str,
    params: Mapping[str, Any],
    run_name: str | None = None,
    deferrable: bool = True,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage run.

    Args:
        project_root: The DVC/git project root; the default store and artifacts live under it.
        experiment: The experiment, one per model family (``"toy2d"``, ``"mnist"``); created if missing.
        stage: The DVC stage name (``DVC_STAGE``, when DVC set it, wins for the tag).
        params: The stage's params, logged flattened (``train.lr``).
        run_name: Shown in the UI; MLflow picks one when omitted.
        deferrable: Whether the run may be recorded for the caller (:data:`DEFER_ENV`). A stage that needs
            the live run (its id, the fluent ``mlflow.*`` API, e.g. to register a model) passes ``False``.

    Yields:
        The run to log through. A live run (:class:`MlflowRun`) is the active MLflow run.

    Raises:
        Whatever the body raises; the run is then marked FAILED (KILLED on ``KeyboardInterrupt``).
    """
    root = Path(project_root).resolve()
    dvc_stage = os.environ.get("DVC_STAGE") or stage
    tags = {"git_commit": git_commit(root), "dvc_stage": dvc_stage, "omp_wait_policy": wait_policy_in_force()}
    flow_run_id = prefect_flow_run_id()
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    if deferrable and os.environ.get(DEFER_ENV):
        folder = root / PENDING_RUNS_DIR / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}{_PARTIAL}"
        recorded = RecordedRun(
            folder,
            {
                "experiment": experiment,
                "run_name": run_name,
                "dvc_stage": dvc_stage,
                "params": flatten_params(params),
                # What MLflow's default context gives a live run; only the stage's own process knows them.
                "tags": tags | _source_tags(),
                "pid": os.getpid(),
                "start_time": int(time.time() * 1000),
                "status": "RUNNING",
            },
        )
        with _finishing(recorded.finish):
            yield recorded
        return

    apply_offline_env()
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = _get_or_create_experiment(client, experiment, artifact_location(root, uri, experiment))
    tags["dvc_deps"] = json.dumps(dvc_dep_hashes(root, dvc_stage), sort_keys=True)
    active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    stage_run = MlflowRun(run_id=active.info.run_id, experiment_id=experiment_id, client=client)
    try:
        # Params inside: a key MLflow rejects must end the run FAILED, not leave it RUNNING and active.
        with _finishing(lambda status: mlflow.end_run(status=status)):
            mlflow.log_params(flatten_params(params))
            yield stage_run
    finally:
        record_run_link(root, dvc_stage, stage_run.url)


def _source_tags() -> dict[str, str]:
    """The user and source tags MLflow sets on a live run (``mlflow.user``, ``mlflow.source.*``)."""
    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):  # no login name and no passwd entry (some containers)
        user = "unknown"
    source = sys.argv[0] if sys.argv and sys.argv[0] else "<console>"
    return {"mlflow.user": user, "mlflow.source.name": source, "mlflow.source.type": "LOCAL"}


@contextmanager
def _finishing(finish: Any) -> Iterator[None]:
    """Call ``finish(status)`` with the run's outcome: FINISHED, FAILED, or KILLED on Ctrl-C."""
    try:
        yield
    except KeyboardInterrupt:
        finish("KILLED")
        raise
    except BaseException:
        finish("FAILED")
        raise
    finish("FINISHED")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending_runs(project_root: Path) -> list[Path]:
    """Deferred run records ready to log, oldest first: finished ones, and unfinished ones whose
    process is gone (killed stages)."""
    folder = Path(project_root) / PENDING_RUNS_DIR
    if not folder.is_dir():
        return []
    ready = []
    for record in sorted(folder.iterdir()):
        if not (record / "run.json").is_file():
            continue
        if record.name.endswith(_PARTIAL):
            pid = json.loads((record / "run.json").read_text()).get("pid")
            if isinstance(pid, int) and _pid_alive(pid):
                continue
        ready.append(record)
    return ready


class PendingRunsError(ValueError):
    """Deferred run records that could not be logged; each was moved to :data:`FAILED_RUNS_DIR`.

    Attributes:
        failures: The set-aside record folder → what went wrong with it.
    """

    def __init__(self, failures: Mapping[Path, str]) -> None:
        self.failures = dict(failures)
        lines = [f"  {folder}: {error}" for folder, error in self.failures.items()]
        super().__init__(
            f"{len(lines)} deferred MLflow run record(s) could not be logged and were set aside "
            "(the reason is also in each folder's error.txt):\n" + "\n".join(lines)
        )


def log_pending_runs(project_root: Path, *, recorded_since_ms: int | None = None) -> list[str]:
    """Log every deferred run of ``project_root`` to MLflow (see :data:`DEFER_ENV`), then delete its record.

    Each record is logged on its own: one that fails (unreadable, or MLflow rejects what it holds) has its
    half-made run ended FAILED and is moved to :data:`FAILED_RUNS_DIR`, so it neither stops the others
    nor is retried, and failing again, at every later call.

    The ``dvc_deps`` tag holds the stage's dep hashes as they are when the run is logged, which are the
    ones the stage ran with when it is logged right after the stage. ``recorded_since_ms`` (epoch ms: when
    the caller's stage began) tells such runs from ones an earlier, interrupted flow left behind: a run
    that started before it gets no ``dvc_deps`` (its deps may have changed since) but a ``dvc_deps_note``
    saying why. ``None``: every run counts as just recorded.

    Returns:
        The logged runs' links, relative to the MLflow UI root.

    Raises:
        PendingRunsError: Some records could not be logged; the message names each set-aside folder and
            its error. The other records were logged all the same.
    """
    records = pending_runs(project_root)
    if not records:
        return []
    apply_offline_env()
    import mlflow

    root = Path(project_root).resolve()
    client = mlflow.MlflowClient(tracking_uri(root))
    links = []
    failures: dict[Path, str] = {}
    for folder in records:
        try:
            links.append(_log_pending_run(client, root, folder, recorded_since_ms))
        except Exception as err:
            failures[_set_aside(root, folder, err)] = f"{type(err).__name__}: {err}"
    if failures:
        raise PendingRunsError(failures)
    return links


def _read_metric_rows(metrics_file: Path) -> list[dict[str, Any]]:
    """The rows of a record's ``metrics.jsonl``, less a last line its writer was killed in the middle of.

    Raises:
        ValueError: A line other than the last is not JSON (file and line number in the message).
    """
    if not metrics_file.exists():
        return []
    lines = metrics_file.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if number == len(lines):  # a stage killed while appending: the values before it still count
                _log.warning("%s: left out line %d, cut off when its stage was killed", metrics_file, number)
                continue
            raise ValueError(f"{metrics_file}, line {number}: not JSON ({err})") from err
    return rows


def _delete_run_if_present(client: MlflowClient, run_id: str) -> None:
    """Delete an earlier attempt's run; one already purged (``mlflow gc``) is gone, which is the aim."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.delete_run(run_id)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise


def _log_pending_run(client: MlflowClient, root: Path, folder: Path, recorded_since_ms: int | None) -> str:
    """Log one deferred run record, delete it and return the run's link (see :func:`log_pending_runs`).

    A run this creates and cannot complete is ended FAILED before the error propagates.
    """
    from mlflow.entities import Metric, Param, RunTag

    try:
        record = json.loads((folder / "run.json").read_text())
        metric_rows = _read_metric_rows(folder / "metrics.jsonl")
        experiment, stage = str(record["experiment"]), str(record["dvc_stage"])
        start_time = int(record["start_time"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable deferred MLflow run record: {err}") from err
    stale = folder / "mlflow_run_id"
    if stale.exists():  # an earlier attempt died half-way: replace its run
        _delete_run_if_present(client, stale.read_text().strip())
    uri = tracking_uri(root)
    experiment_id = _get_or_create_experiment(client, experiment, artifact_location(root, uri, experiment))
    status = "KILLED" if record.get("status", "RUNNING") == "RUNNING" else str(record["status"])
    tags = dict(record.get("tags", {}))
    if recorded_since_ms is None or start_time >= recorded_since_ms:
        tags["dvc_deps"] = json.dumps(dvc_dep_hashes(root, stage), sort_keys=True)
    else:
        tags["dvc_deps_note"] = (
            "logged by a later stage than the one that recorded it; its deps may have changed since it "
            "ran, so their hashes are not recorded"
        )
    # MlflowClient.create_run takes the run's user from the ``mlflow.user`` tag (the record has it).
    run = client.create_run(
        experiment_id,
        start_time=start_time,
        tags={key: str(value) for key, value in tags.items()},
        run_name=record.get("run_name"),
    )
    run_id = run.info.run_id
    try:
        stale.write_text(run_id)
        client.log_batch(
            run_id,
            params=[Param(key, str(value)) for key, value in record.get("params", {}).items()],
            metrics=[
                Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"]))
                for row in metric_rows
            ],
            tags=[RunTag("ebm_logging", "deferred")],
        )
        artifacts = folder / "artifacts"
        if artifacts.is_dir() and any(artifacts.iterdir()):
            client.log_artifacts(run_id, os.fspath(artifacts))
        end_time = record.get("end_time") or int(
            max((row["timestamp"] for row in metric_rows), default=start_time)
        )
        client.set_terminated(run_id, status=status, end_time=int(end_time))
    except Exception:
        # Not left RUNNING: the UI would show it as still going, forever.
        try:
            client.set_terminated(run_id, status="FAILED")
        except Exception as end_err:  # the store itself is failing; the first error says more
            _log.warning("could not end the half-logged MLflow run %s as FAILED: %s", run_id, end_err)
        raise
    link = run_url(experiment_id, run_id)
    record_run_link(root, stage, link)
    shutil.rmtree(folder)
    return link


def _set_aside(root: Path, folder: Path, err: BaseException) -> Path:
    """Move a record that failed to :data:`FAILED_RUNS_DIR`, its error in ``error.txt``; returns where.

    A run it made keeps its id in ``mlflow_run_id``: moved back into the pending folder once fixed, the
    record replaces that FAILED run instead of adding a second one.
    """
    target = root / FAILED_RUNS_DIR / folder.name
    if target.exists():  # set aside before, moved back by hand, failed again
        target = target.with_name(f"{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)
    except OSError as move_err:
        # Left where it is (and retried next time) rather than losing the other records' outcome.
        _log.warning("could not set aside the deferred MLflow run record %s: %s", folder, move_err)
        return folder
    (target / "error.txt").write_text(f"{type(err).__name__}: {err}\n")
    return target
