"""Nothing leaves loopback: Prefect, MLflow and DVC run the pipeline with every outside connection refused.

Each scenario runs in fresh processes whose ``sitecustomize`` (put first on ``PYTHONPATH``, so the stage
commands DVC starts load it too) refuses and records any connection or name lookup for a host that is not
loopback. The processes start without the offline switches and without the CI markers under which the
libraries stay quiet anyway: the switches must come from the entry points.

The flow talks to the session's test Prefect API, started from this process with the switches set. A
short-lived Prefect server never reached out in a trial even with its analytics switched on (its telemetry
service fires later), so guarding one here would cost ~15 s and show nothing more.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ebm.offline import OFFLINE_ENV

NETWORK_GUARD = """
    import ipaddress
    import os
    import socket
    import sys

    _LOG = os.environ.get("NET_GUARD_LOG")


    def _record(attempt):
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {' '.join(sys.argv[:3])}: {attempt}\\n")


    def _is_local(host):
        if isinstance(host, bytes):
            host = host.decode()
        if host in (None, "", "localhost") or str(host).endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(str(host).split("%")[0])
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified


    def _refuse_remote(address):
        if isinstance(address, tuple) and not _is_local(address[0]):
            _record(f"connect {address[0]}:{address[1]}")
            raise ConnectionRefusedError(f"offline test: refused connection to {address[0]}")


    if _LOG:
        with open(os.environ["NET_GUARD_PIDS"], "a") as pids:
            pids.write(f"{os.getpid()}\\n")
        _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
        _getaddrinfo = socket.getaddrinfo

        def connect(self, address):
            _refuse_remote(address)
            return _connect(self, address)

        def connect_ex(self, address):
            _refuse_remote(address)
            return _connect_ex(self, address)

        def getaddrinfo(host, *args, **kwargs):
            if not _is_local(host):
                _record(f"resolve {host}")
                raise socket.gaierror(socket.EAI_NONAME, f"offline test: refused to resolve {host}")
            return _getaddrinfo(host, *args, **kwargs)

        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""

# Variables under which Prefect or MLflow assume CI or a test run and keep telemetry off by themselves.
QUIETING_MARKERS = {
    "PYTEST_CURRENT_TEST", "CI", "CI_NAME", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
    "CIRCLECI", "BUILDKITE", "TF_BUILD", "CODEBUILD_BUILD_ID", "CODEBUILD_BUILD_ARN", "BITBUCKET_COMMIT",
    "BITBUCKET_BUILD_NUMBER", "TEAMCITY_VERSION", "DRONE", "SEMAPHORE", "APPVEYOR", "BUDDY",
    "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "DVC_TEST",
}  # fmt: skip


class GuardedProcesses:
    """Environment and records of processes started under the network guard."""

    def __init__(self, folder: Path) -> None:
        guard_dir = folder / "guard"
        guard_dir.mkdir()
        (guard_dir / "sitecustomize.py").write_text(textwrap.dedent(NETWORK_GUARD))
        self.attempts_file = folder / "refused.log"
        self.pids_file = folder / "guarded.pids"
        hidden = QUIETING_MARKERS | set(OFFLINE_ENV) | {"PREFECT_API_URL"}
        self.env = {name: value for name, value in os.environ.items() if name not in hidden}
        self.env |= {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(guard_dir), os.environ.get("PYTHONPATH")])),
            "NET_GUARD_LOG": str(self.attempts_file),
            "NET_GUARD_PIDS": str(self.pids_file),
            "PREFECT_HOME": str(folder / "prefect-home"),
        }

    def run(self, *command: str, cwd: Path, extra_env: dict[str, str] | None = None) -> str:
        """Run ``command`` to success under the guard; returns its stdout."""
        result = subprocess.run(
            command, cwd=cwd, env=self.env | (extra_env or {}), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    @property
    def refused(self) -> list[str]:
        return self.attempts_file.read_text().splitlines() if self.attempts_file.exists() else []

    @property
    def guarded_processes(self) -> int:
        return len(self.pids_file.read_text().split())


def test_guard_catches_what_the_switches_prevent(tmp_path: Path, mlflow_tracking_uri: str) -> None:
    guarded = GuardedProcesses(tmp_path)
    plain_mlflow_run = "import mlflow\nwith mlflow.start_run():\n    mlflow.log_param('lr', 0.1)\n"

    guarded.run(sys.executable, "-c", plain_mlflow_run, cwd=tmp_path)

    assert any("mlflow-telemetry" in attempt for attempt in guarded.refused), guarded.refused


@pytest.mark.slow
def test_pipeline_flow_mlflow_and_dvc_stay_on_loopback(
    prefect_harness: None, tiny_pipeline: Path, mlflow_tracking_uri: str
) -> None:
    from prefect.settings import PREFECT_API_URL

    guarded = GuardedProcesses(tiny_pipeline.parent)
    # The session's test API stands in for a local `prefect server` (a temporary one would cost ~15 s more).
    prefect_api = {"PREFECT_API_URL": str(PREFECT_API_URL.value())}

    # The flow process, DVC and the stage commands, `train` logging to MLflow.
    flow_command = (sys.executable, "-m", "flows.pipeline", "--project-root", ".")
    guarded.run(*flow_command, cwd=tiny_pipeline, extra_env=prefect_api)
    # By hand afterwards (users export the switches, as flows/deploy.py says): nothing left to do.
    dvc = str(Path(sys.executable).with_name("dvc"))
    by_hand = guarded.run(dvc, "repro", cwd=tiny_pipeline, extra_env=OFFLINE_ENV)

    assert guarded.refused == []
    assert (tiny_pipeline / "report.txt").exists()
    assert "Data and pipelines are up to date" in by_hand
    # The flow process, the three stage commands and `dvc` all ran under the guard.
    assert guarded.guarded_processes >= 5


_READ_SWITCHES = """
import json, os, sys
if sys.argv[1] == "apply":
    from ebm.offline import apply_offline_env
    apply_offline_env()
from dvc import analytics
from mlflow.telemetry.utils import is_telemetry_disabled
from prefect.settings import get_current_settings
server = get_current_settings().server
print(json.dumps({
    "mlflow_telemetry": not is_telemetry_disabled(),
    "prefect_analytics": server.analytics_enabled,
    "prefect_promotions": server.ui.show_promotional_content,
    "dvc_analytics": analytics.is_enabled(),
    "do_not_track": os.environ.get("DO_NOT_TRACK"),
}))
"""


def test_each_tool_reads_its_own_switch_as_off(tmp_path: Path) -> None:
    """What each library itself decides, in a fresh process: the loopback guard cannot see a switch go
    missing where another covers it, or where a short run happens not to phone home."""

    def read(mode: str) -> dict[str, object]:
        keep = ("PATH", "HOME", "PYTHONPATH")  # none of the switches: each must come from apply_offline_env
        env = {name: os.environ[name] for name in keep if name in os.environ}
        result = subprocess.run(
            [sys.executable, "-c", _READ_SWITCHES, mode],
            env=env,
            cwd=tmp_path,  # not the checkout, whose ebm/ would come first on sys.path
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])

    default = read("plain")
    assert default["mlflow_telemetry"] and default["prefect_analytics"]  # on by default: the test can fail
    assert read("apply") == {
        "mlflow_telemetry": False,
        "prefect_analytics": False,
        "prefect_promotions": False,
        "dvc_analytics": False,
        "do_not_track": "true",
    }
