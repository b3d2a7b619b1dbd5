"""Shared fixtures.

The offline switches are applied first, before any test module imports prefect, mlflow or dvc (Prefect
starts its analytics while being imported). Heavy tools are imported inside fixtures, so unit tests that
use none of them stay fast.
"""

from ebm.offline import apply_offline_env

apply_offline_env()

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread per test process: `make test` runs two workers on two cores, and tiny
    tensors on a busy core make multi-threaded ops wait milliseconds for a thread that isn't running."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The system temporary folder, for this session and the processes it starts, is a folder of its own.

    MLflow leaves a lock file named after each SQLite store it migrates in the temporary folder
    (``db_init_lock-<hash>``); every test store is a new one, so each run left dozens in ``/tmp``.
    """
    folder = tmp_path_factory.mktemp("tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(folder))
    patch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect API for the session, heartbeats off. Request it only in flow tests."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with (
        temporary_settings(updates={PREFECT_HOME: home, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        prefect_test_harness(server_startup_timeout=60),
    ):
        yield


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store migrated once per session (seconds); copy it, never write to it.

    Its Default experiment keeps artifacts in a temporary folder: MLflow's own default is ``./mlruns``
    relative to the working directory, so a test logging a model outside a project experiment (the
    registry called without an active run) wrote into the checkout.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("mlflow-template")
    path = folder / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", (folder / "artifacts").as_uri()).search_experiments()
    return path


@pytest.fixture
def mlflow_tracking_uri(mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, already migrated MLflow store for this test, exported as ``MLFLOW_TRACKING_URI``."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _git(root: Path, *args: str) -> None:
    identity = ("-c", "user.name=ebm-tests", "-c", "user.email=ebm-tests@localhost")
    subprocess.run(["git", *identity, *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """An empty git + DVC project (analytics and update checks off) at ``tmp_path/project``."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    root.mkdir()
    _git(root, "init", "-q")
    with Repo.init(str(root)) as repo, repo.config.edit() as config:
        config["core"]["analytics"] = False
        config["core"]["check_update"] = False
    return root


TINY_TRAIN_SCRIPT = """
    import json
    from pathlib import Path

    from ebm.tracking import start_run

    params = {"train": {"lr": 0.1, "steps": 2}}
    with start_run(project_root=Path.cwd(), experiment="tiny", stage="train", params=params) as run:
        for step in range(2):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    Path("model.txt").write_text(Path("prepared.txt").read_text().upper())
    Path("metrics.json").write_text(json.dumps({"loss": 0.5, "eval": {"nll": 1.25}}))
"""


@pytest.fixture
def tiny_pipeline(dvc_project: Path) -> Path:
    """A committed three-stage DVC pipeline of plain Python commands; ``train`` logs to MLflow.

    ``prepare`` → ``train`` (writes ``metrics.json``, a DVC metric) → ``report``. Stages are named for the
    address DVC gives them; run them with ``MLFLOW_TRACKING_URI`` set (see ``mlflow_tracking_uri``).
    """
    python = sys.executable
    (dvc_project / "raw.txt").write_text("energy\n")
    (dvc_project / "train.py").write_text(textwrap.dedent(TINY_TRAIN_SCRIPT))
    copy = "import shutil; shutil.copy('raw.txt', 'prepared.txt')"
    report = "from pathlib import Path; Path('report.txt').write_text(Path('model.txt').read_text())"
    (dvc_project / "dvc.yaml").write_text(
        textwrap.dedent(f"""
        stages:
          prepare:
            cmd: {python} -c "{copy}"
            deps: [raw.txt]
            outs: [prepared.txt]
          train:
            cmd: {python} train.py
            deps: [prepared.txt, train.py]
            outs: [model.txt]
            metrics:
              - metrics.json:
                  cache: false
          report:
            cmd: {python} -c "{report}"
            deps: [model.txt]
            outs: [report.txt]
        """)
    )
    (dvc_project / ".gitignore").write_text("mlflow.db\nmlruns/\nreports/\n")
    _git(dvc_project, "add", "-A")
    _git(dvc_project, "commit", "-q", "-m", "tiny pipeline")
    return dvc_project
