"""A network guard for test subprocesses: connections and name lookups beyond loopback are refused, recorded.

Processes started with :class:`GuardedProcesses`'s environment load its ``sitecustomize`` (first on
``PYTHONPATH``, so the stage commands DVC starts load it too). They start without the offline switches and
without the CI markers under which the libraries stay quiet anyway: the switches must come from the entry
points or the tools' own config.
"""

import os
import subprocess
import textwrap
from pathlib import Path

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
