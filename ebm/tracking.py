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

Each run, when it ends, records its UI link in ``reports/mlflow_runs.json`` (stage address → link) so the
flow's summary can point at it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ebm.offline import apply_offline_env

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

FLOW_RUN_ID_ENV = "EBM_PREFECT_FLOW_RUN_ID"
"""Environment variable carrying the Prefect flow-run id into stage commands."""

RUN_LINKS_FILE = Path("reports") / "mlflow_runs.json"
"""Where, relative to the project root, each stage's latest MLflow run link is recorded."""

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
        return from_env
    return f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


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
    """Add or replace ``stage``'s link in ``reports/mlflow_runs.json`` (written atomically)."""
    path = Path(project_root) / RUN_LINKS_FILE
    links = read_run_links(project_root) | {stage: link}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(links, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


@dataclass(frozen=True)
class StageRun:
    """Handle on the MLflow run of one stage; every call goes to this run, active or not."""

    run_id: str
    experiment_id: str
    client: MlflowClient

    @property
    def url(self) -> str:
        """Link relative to the MLflow UI root (``mlflow ui`` serves it at ``http://127.0.0.1:5000/``)."""
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"

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


def _get_or_create_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    existing = client.get_experiment_by_name(name)
    if existing is not None:
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
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage run; the run is active (fluent ``mlflow.*`` calls land in it).

    Args:
        project_root: The DVC/git project root; the default store and artifacts live under it.
        experiment: The experiment, one per model family (``"toy2d"``, ``"mnist"``); created if missing.
        stage: The DVC stage name (``DVC_STAGE``, when DVC set it, wins for the tag).
        params: The stage's params, logged flattened (``train.lr``).
        run_name: Shown in the UI; MLflow picks one when omitted.

    Yields:
        The :class:`StageRun` to log through.

    Raises:
        Whatever the body raises; the run is then marked FAILED (KILLED on ``KeyboardInterrupt``).
    """
    apply_offline_env()
    import mlflow

    root = Path(project_root).resolve()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = _get_or_create_experiment(client, experiment, artifact_location(root, uri, experiment))

    dvc_stage = os.environ.get("DVC_STAGE") or stage
    tags = {
        "git_commit": git_commit(root),
        "dvc_stage": dvc_stage,
        "dvc_deps": json.dumps(dvc_dep_hashes(root, dvc_stage), sort_keys=True),
    }
    flow_run_id = prefect_flow_run_id()
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id

    active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    stage_run = StageRun(run_id=active.info.run_id, experiment_id=experiment_id, client=client)
    try:
        mlflow.log_params(flatten_params(params))
        yield stage_run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run()
    finally:
        record_run_link(root, dvc_stage, stage_run.url)
