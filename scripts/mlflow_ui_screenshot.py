"""Screenshot the MLflow UI of a project: an experiment's run list and one of its runs, in headless Chromium.

    python scripts/mlflow_ui_screenshot.py --out reports/mlflow/toy2d.png
    python scripts/mlflow_ui_screenshot.py --project-root /tmp/scratch --experiment toy2d --stage train_toy \\
        --out toy2d.png --run-out toy2d-train.png

Starts ``mlflow server`` (the process ``mlflow ui`` runs) on 127.0.0.1, on a free port, with one worker,
against the project's store (``MLFLOW_TRACKING_URI`` when set, else ``<project root>/mlflow.db``, as
``ebm.tracking`` logs); waits until it answers ``/health``; finds the experiment and the latest run of the
stage through the REST API; has Chromium (Debian package ``chromium``) load each page, with virtual time
so the single-page app renders before the capture, and write a PNG; then stops the server.

Nothing leaves the machine: the server listens on loopback only, and Chromium runs with a fresh profile,
its background networking, component updates, sync and QUIC off.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ebm.offline import apply_offline_env
from ebm.tracking import tracking_uri

BIN = Path(sys.executable).parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1600, 1000)
RUN_WINDOW = (1600, 2100)  # tall enough for the run's tags, metrics and parameters tables
VIRTUAL_TIME_BUDGET_MS = 15_000


class ServerError(RuntimeError):
    """``mlflow server`` exited or did not answer in time."""


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on ``PATH``, or ``None``."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def mlflow_server(backend_store_uri: str, *, startup_timeout: float = 120.0) -> Iterator[str]:
    """Serve ``backend_store_uri`` with ``mlflow server`` on loopback; yield its base URL, then stop it.

    Raises:
        ServerError: The server exited, or did not answer ``/health`` within ``startup_timeout``
            seconds; the message ends with its log.
    """
    apply_offline_env()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as workdir:
        log_path = Path(workdir) / "server.log"
        command = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_store_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        with open(log_path, "wb") as log:
            # Its own session, so stopping it stops its uvicorn worker too. The temporary working
            # directory takes the ./mlartifacts folder the server would otherwise create here.
            server = subprocess.Popen(
                command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + startup_timeout
            while not _answers(f"{base}/health"):
                if server.poll() is not None or time.monotonic() > deadline:
                    state = f"exited with {server.returncode}" if server.poll() is not None else "no answer"
                    raise ServerError(
                        f"mlflow server on {base} ({state} after {startup_timeout:.0f} s at most):\n"
                        + log_path.read_text(errors="replace")[-4000:]
                    )
                time.sleep(0.25)
            yield base
        finally:
            _stop(server)


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # stragglers in its session
    except ProcessLookupError:
        return
    server.wait(timeout=15)


def api(base: str, endpoint: str, payload: Mapping[str, Any] | None = None, **query: Any) -> dict[str, Any]:
    """Call the MLflow REST API: ``GET /api/2.0/mlflow/<endpoint>?<query>``, or POST ``payload`` as JSON."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


def latest_run(base: str, experiment_id: str, stage: str | None) -> dict[str, Any] | None:
    """The experiment's most recent run, of ``stage`` (its ``dvc_stage`` tag) when given."""
    search: dict[str, Any] = {
        "experiment_ids": [experiment_id],
        "max_results": 1,
        "order_by": ["attributes.start_time DESC"],
    }
    if stage is not None:
        search["filter"] = f"tags.dvc_stage = '{stage}'"
    runs = api(base, "runs/search", search).get("runs", [])
    return runs[0] if runs else None


def _headless(
    url: str, action: str, *, window: tuple[int, int], virtual_time_budget_ms: int, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``url`` with ``action`` (``--screenshot=…`` or ``--dump-dom``), after the
    page's scripts have had ``virtual_time_budget_ms`` of virtual time; the finished process."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH; install it with `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={virtual_time_budget_ms}",
            action,
            url,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def screenshot(
    url: str,
    out: Path,
    *,
    window: tuple[int, int] = WINDOW,
    virtual_time_budget_ms: int = VIRTUAL_TIME_BUDGET_MS,
    timeout: float = 120.0,
) -> Path:
    """Load ``url`` in headless Chromium and write what it renders to ``out`` (PNG).

    Raises:
        FileNotFoundError: No Chromium on ``PATH`` (Debian: ``apt-get install chromium``).
        RuntimeError: Chromium failed or wrote no image.
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    result = _headless(
        url,
        f"--screenshot={out}",
        window=window,
        virtual_time_budget_ms=virtual_time_budget_ms,
        timeout=timeout,
    )
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"chromium wrote no screenshot of {url} (exit {result.returncode}):\n{result.stderr}"
        )
    return out


def rendered_text(
    url: str,
    *,
    window: tuple[int, int] = WINDOW,
    virtual_time_budget_ms: int = VIRTUAL_TIME_BUDGET_MS,
    timeout: float = 120.0,
) -> str:
    """The text a reader sees on ``url`` once its scripts have run: the rendered DOM, tags stripped.

    What the screenshot shows as pixels, as words a test can look for (the UI is a single-page app: the
    HTML the server sends holds none of it).

    Raises:
        FileNotFoundError: No Chromium on ``PATH``.
        RuntimeError: Chromium failed or printed no page.
    """
    result = _headless(
        url, "--dump-dom", window=window, virtual_time_budget_ms=virtual_time_budget_ms, timeout=timeout
    )
    if result.returncode != 0 or "<body" not in result.stdout:
        raise RuntimeError(f"chromium printed no page for {url} (exit {result.returncode}):\n{result.stderr}")
    text = re.sub(r"<script\b.*?</script>|<style\b.*?</style>", " ", result.stdout, flags=re.DOTALL)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def capture(
    base: str,
    experiment: str,
    stage: str | None,
    out: Path,
    run_out: Path,
    *,
    window: tuple[int, int] = WINDOW,
    run_window: tuple[int, int] = RUN_WINDOW,
) -> dict[str, Any]:
    """Screenshot the experiment's run list into ``out`` and its latest (``stage``) run into ``run_out``.

    Returns:
        What was captured: the experiment id, the run id, and the two PNG paths.

    Raises:
        LookupError: The store has no such experiment, or no run in it (of that stage).
    """
    try:
        found = api(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    except urllib.error.HTTPError as exc:
        raise LookupError(f"no experiment {experiment!r} in the store served at {base}") from exc
    experiment_id = found["experiment_id"]
    run = latest_run(base, experiment_id, stage)
    if run is None:
        raise LookupError(f"experiment {experiment!r} has no run{f' of stage {stage!r}' if stage else ''}")
    run_id = run["info"]["run_id"]
    # The UI opens on its GenAI (traces) view unless told otherwise: ask for the model-training one.
    view = "?workflowType=machine_learning"
    screenshot(f"{base}/#/experiments/{experiment_id}{view}", out, window=window)
    screenshot(f"{base}/#/experiments/{experiment_id}/runs/{run_id}{view}", run_out, window=run_window)
    return {"experiment_id": experiment_id, "run_id": run_id, "experiment_png": out, "run_png": run_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG of the experiment's run list")
    parser.add_argument("--run-out", type=Path, help="PNG of the run (default: <out stem>-run.png)")
    parser.add_argument("--project-root", type=Path, default=Path("."), help="default: current folder")
    parser.add_argument("--tracking-uri", help="store to serve (default: the project's, as ebm.tracking)")
    parser.add_argument("--experiment", default="toy2d", help="default: %(default)s")
    parser.add_argument("--stage", default="train_toy", help="run to show: the latest of this DVC stage")
    parser.add_argument("--any-stage", action="store_true", help="show the latest run, whatever its stage")
    parser.add_argument("--height", type=int, default=WINDOW[1], help="experiment page height (px)")
    parser.add_argument("--run-height", type=int, default=RUN_WINDOW[1], help="run page height (px)")
    args = parser.parse_args(argv)

    if find_chromium() is None:
        print("error: no chromium on PATH; install it with `apt-get install -y chromium`", file=sys.stderr)
        return 2
    store = args.tracking_uri or tracking_uri(args.project_root.resolve())
    run_out = args.run_out or args.out.with_name(f"{args.out.stem}-run{args.out.suffix}")
    stage = None if args.any_stage else args.stage
    with mlflow_server(store) as base:
        try:
            shot = capture(
                base,
                args.experiment,
                stage,
                args.out,
                run_out,
                window=(WINDOW[0], args.height),
                run_window=(RUN_WINDOW[0], args.run_height),
            )
        except LookupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(f"MLflow UI of {store}:")
    print(f"  experiment {args.experiment!r} (id {shot['experiment_id']}): {shot['experiment_png']}")
    print(f"  run {shot['run_id']}: {shot['run_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
