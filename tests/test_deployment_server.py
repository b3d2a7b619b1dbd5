"""The nightly deployment against a real Prefect server, through the commands ``flows/deploy.py`` documents.

The other flow tests talk to Prefect's test harness, which has no scheduler and serves no deployment. Here
``prefect server start --host 127.0.0.1``, ``python -m flows.deploy`` and ``prefect deployment run`` run as
the docstring tells users to run them, in subprocesses with the offline switches of ``ebm.offline``, on a
tiny DVC pipeline; the server's REST API then says what the deployment and its run became. Everything binds
to loopback, and every process runs under ``netguard``, which refuses and records any connection beyond it.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from netguard import GuardedProcesses

from ebm.offline import OFFLINE_ENV

CHECKOUT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEPLOYMENT = "ebm-pipeline/nightly"
STARTUP_TIMEOUT_SECONDS = 120.0
RUN_TIMEOUT_SECONDS = 120
STOP_GRACE_SECONDS = 90.0


@dataclass
class Background:
    """A command running in a process group of its own, stdout and stderr in one log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, name: str, command: Sequence[str], *, cwd: Path, env: dict[str, str], logs: Path
    ) -> "Background":
        log = logs / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        return cls(name, process, log)

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit code {self.process.poll()}), log tail ---\n{text[-chars:]}"

    def stop(self, first: signal.Signals, grace_seconds: float) -> None:
        """Send ``first`` to the process group, then SIGKILL whatever is left of it after the grace period."""
        for number, wait_seconds in ((first, grace_seconds), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, number)
            except ProcessLookupError:
                return  # the group is gone, leader and children alike
            try:
                self.process.wait(timeout=wait_seconds)
            except subprocess.TimeoutExpired:
                continue


def _default_sigint() -> None:
    """In the child, before exec: Ctrl-C's default action, whatever this process had.

    An ignored SIGINT is inherited through exec, and Python then installs no KeyboardInterrupt handler, so
    the served deployment would never see the test's Ctrl-C. DVC ignores SIGINT while it runs a stage in
    the main thread and restores the old handler only when that was truthy, so after an in-process
    ``dvc repro`` in a test worker whose handler was ``SIG_DFL`` (0), SIGINT stays ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _tails(processes: Sequence[Background]) -> str:
    return "\n".join(process.tail() for process in processes)


def _wait_until(ready: Callable[[], bool], what: str, processes: Sequence[Background]) -> None:
    """Wait for ``ready()``; fail with the processes' logs when one of them exits or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not ready():
        exited = [process.name for process in processes if process.process.poll() is not None]
        assert not exited, f"{exited} exited before {what}\n{_tails(processes)}"
        assert time.monotonic() < deadline, (
            f"no {what} within {STARTUP_TIMEOUT_SECONDS} s\n{_tails(processes)}"
        )
        time.sleep(0.25)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class LocalServer:
    """A ``prefect server`` on loopback, and the environment its clients run with."""

    api_url: str
    client_env: dict[str, str]
    process: Background
    guard: GuardedProcesses

    def wait_until_healthy(self) -> None:
        _wait_until(lambda: _answers(f"{self.api_url}/health"), "answer from /api/health", [self.process])

    def get(self, path: str) -> Any:
        import httpx

        response = httpx.get(f"{self.api_url}{path}", timeout=10)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[LocalServer]:
    """``prefect server start --host 127.0.0.1`` on a free port, with its own ``PREFECT_HOME``.

    Started, not yet answering: a test's other fixtures are set up while it boots (~10 s); call
    :meth:`LocalServer.wait_until_healthy` before using it.
    """
    port = _free_loopback_port()
    api_url = f"http://127.0.0.1:{port}/api"
    logs = tmp_path / "logs"
    logs.mkdir()
    guard = GuardedProcesses(tmp_path)  # no PREFECT_API_URL, PREFECT_HOME in tmp_path, the network guard
    env = guard.env | OFFLINE_ENV  # the switches flows/deploy.py's docstring tells users to export
    command = (PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port))
    server = Background.start("prefect-server", command, cwd=tmp_path, env=env, logs=logs)
    try:
        yield LocalServer(
            api_url=api_url, client_env=env | {"PREFECT_API_URL": api_url}, process=server, guard=guard
        )
    finally:
        server.stop(signal.SIGTERM, grace_seconds=15.0)


@pytest.mark.slow
def test_served_nightly_deployment_runs_the_pipeline_on_a_local_server_when_triggered(
    prefect_server: LocalServer, tiny_pipeline: Path, mlflow_tracking_uri: str
) -> None:
    schedule = {"cron": "15 3 * * 1", "timezone": "Europe/Paris"}
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump({"schedule": schedule}))
    prefect_server.wait_until_healthy()

    # The runner asks the server for due runs every 10 s by default; every second keeps the test short.
    serve_env = prefect_server.client_env | {
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri,
    }
    serve_command = (sys.executable, "-m", "flows.deploy", "--project-root", str(tiny_pipeline))
    logs = prefect_server.process.log.parent
    serving = Background.start("flows.deploy", serve_command, cwd=CHECKOUT, env=serve_env, logs=logs)
    processes = [prefect_server.process, serving]
    try:
        deployment_url = f"{prefect_server.api_url}/deployments/name/{DEPLOYMENT}"
        _wait_until(lambda: _answers(deployment_url), f"deployment {DEPLOYMENT} on the server", processes)

        # Waits for the run's final state, following the server's event stream.
        run_and_watch = (
            "deployment",
            "run",
            DEPLOYMENT,
            "--watch",
            "--watch-timeout",
            str(RUN_TIMEOUT_SECONDS),
        )
        trigger = subprocess.run(
            (PREFECT, *run_and_watch),
            cwd=tiny_pipeline.parent,
            env=prefect_server.client_env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_SECONDS + 60,
        )
        cli_output = f"--- prefect deployment run ---\n{trigger.stdout[-4000:]}{trigger.stderr[-4000:]}"
        created = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout)
        assert created, f"no flow run created\n{cli_output}\n{_tails(processes)}"
        flow_run = prefect_server.get(f"/flow_runs/{created.group(1)}")
        state = flow_run["state"]
        assert state["type"] == "COMPLETED", (
            f"{state['name']}: {state['message']}\n{cli_output}\n{_tails(processes)}"
        )
        assert trigger.returncode == 0, cli_output
    finally:
        # Ctrl-C, as the docstring says; pausing the schedule on the way out took over 15 s once, on a
        # machine busy with a pipeline run and a niced test suite
        serving.stop(signal.SIGINT, grace_seconds=STOP_GRACE_SECONDS)

    deployment = prefect_server.get(f"/deployments/name/{DEPLOYMENT}")
    served = [
        {key: entry["schedule"][key] for key in ("cron", "timezone")} for entry in deployment["schedules"]
    ]
    assert served == [schedule]
    limit, options = deployment["global_concurrency_limit"], deployment["concurrency_options"]
    assert (limit["limit"], options["collision_strategy"]) == (1, "CANCEL_NEW"), f"{limit}, {options}"
    assert serving.process.returncode is not None and serving.process.returncode != -signal.SIGKILL, (
        f"python -m flows.deploy did not stop within {STOP_GRACE_SECONDS} s of Ctrl-C\n{_tails(processes)}"
    )
    assert deployment["paused"], (
        f"python -m flows.deploy stopped without pausing the schedule\n{_tails(processes)}"
    )
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["parameters"] == {"project_root": str(tiny_pipeline.resolve())}
    # What the flow run did in the project: every stage's outs, and DVC's record of them.
    for out in ("prepared.txt", "model.txt", "metrics.json", "dvc.lock"):
        assert (tiny_pipeline / out).exists(), f"{out} missing\n{_tails(processes)}"
    assert (tiny_pipeline / "report.txt").read_text() == "ENERGY\n"
    # The stage's MLflow run, logged by the served flow, names the flow run that started it.
    import mlflow

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None, f"no MLflow experiment 'tiny'\n{_tails(processes)}"
    (train_run,) = client.search_runs([experiment.experiment_id])
    assert train_run.data.tags["prefect_flow_run_id"] == flow_run["id"]
    # The server, the serving process, the CLI, DVC and the stage: all guarded, nothing went beyond loopback.
    assert prefect_server.guard.refused == []
    assert prefect_server.guard.guarded_processes >= 5
