"""Nothing leaves loopback: Prefect, MLflow and DVC run the pipeline with every outside connection refused.

Each scenario runs in fresh processes under ``netguard``'s ``sitecustomize``, which refuses and records any
connection or name lookup for a host that is not loopback. The processes start without the offline switches
and without the CI markers under which the libraries stay quiet anyway: the switches must come from the
entry points. (The end-to-end test runs the real stages by hand under the same guard.)

The flow talks to the session's test Prefect API, started from this process with the switches set. A
short-lived Prefect server never reached out in a trial even with its analytics switched on (its telemetry
service fires later), so guarding one here would cost ~15 s and show nothing more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netguard import GuardedProcesses

from ebm.offline import OFFLINE_ENV


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
