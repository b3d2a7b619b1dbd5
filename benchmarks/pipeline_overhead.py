"""Pipeline overhead: what DVC, Prefect and MLflow cost on top of the stages' own work.

Everything runs in scratch git + DVC copies of the project (its tracked and untracked-not-ignored files,
as the end-to-end test copies them) with their own MLflow store and Prefect home; the checkout is never
touched::

    python benchmarks/pipeline_overhead.py --json reports/bench/pipeline_overhead.json
    python benchmarks/pipeline_overhead.py --json reports/bench/pipeline_overhead.json --full   # hours

What is measured (median of ``--repeats`` runs, default 5, with min and max; "with" and "without"
runs are interleaved so that a change in machine load hits both):

1. **No-op ``dvc repro``**: the ``dvc`` command, after the quick pipeline has run once. Bar: < 1.5 s.
2. **Prefect overhead per stage**: a pipeline of three stages whose commands write one small file each,
   rerun with force (a) by DVC in this process (``Repo.reproduce(force=True)``) and (b) by the pipeline
   flow in this process, Prefect's temporary API already up (``pipeline(force=True)``); the overhead per
   stage is (b − a) / 3. Also shown: the same pair as commands (``dvc repro --force`` vs
   ``python -m flows.pipeline --force``), whose difference adds what every flow run pays once: importing
   Prefect and starting its temporary API (gone when a Prefect server runs, ``PREFECT_API_URL``).
3. **MLflow overhead per stage**: ``dvc repro --force --single-item`` of a stage whose command writes its
   out, vs one whose command also opens ``ebm.tracking.start_run`` (params + one metric) around it: the
   difference is importing MLflow, opening the SQLite store (a schema check per process), the git and
   DVC tags and the run itself. Measured again with ``MLFLOW_TRACKING_URI`` pointing at an ``mlflow
   server`` on the same store, as a team would run it. Bar: Prefect + MLflow per stage < 3 s.
4. **Wall time per stage** of the quick pipeline (``configs/quick.yaml``), each stage once with
   ``dvc repro --single-item`` in pipeline order; with ``--full``, of ``params.yaml``'s too.

The machine is shared: every figure is printed with the load average at the moment it was taken.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import chdir
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from ebm.checkpoint import write_report_json
from ebm.config import whole_number
from ebm.offline import apply_offline_env
from ebm.tracking import DEFER_ENV, log_pending_runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NOOP_BAR_SECONDS = 1.5
PER_STAGE_BAR_SECONDS = 3.0
TRIVIAL_STAGES = ("step1", "step2", "step3")

PLAIN_STAGE = """
    import sys
    from pathlib import Path

    Path(sys.argv[1]).write_text("done\\n")
"""

TRACKED_STAGE = """
    import sys
    from pathlib import Path

    from ebm.tracking import start_run

    params = {"train": {"lr": 0.003, "steps": 100}, "seed": 0}
    with start_run(project_root=Path.cwd(), experiment="overhead", stage="tracked", params=params) as run:
        run.log_metrics({"loss": 0.5})
        Path(sys.argv[1]).write_text("done\\n")
"""


@dataclass(frozen=True)
class Timing:
    """Repeated runs of one measurement: wall-clock and CPU seconds, and the load average when it began.

    CPU seconds count this process and the children it waited for (``dvc``, a stage command); for work
    done in this process, also its live children (Prefect's temporary API). On a shared machine they move
    far less with the load than wall-clock seconds do.
    """

    wall: tuple[float, ...]
    cpu: tuple[float, ...]
    load: float

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": min(self.wall),
            "max": max(self.wall),
            "samples": list(self.wall),
            "cpu_median": self.cpu_median,
            "cpu_samples": list(self.cpu),
            "load_1min": self.load,
        }

    def cell(self) -> str:
        spread = f"[{min(self.wall):6.2f}, {max(self.wall):6.2f}]"
        return f"{self.median:7.2f} s {spread}  cpu {self.cpu_median:6.2f} s  load {self.load:5.2f}"


def _load() -> float:
    return os.getloadavg()[0]


def _cpu_seconds(live_children: bool) -> float:
    """CPU seconds used so far by this process and its reaped children, and its live descendants."""
    import psutil

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for child in psutil.Process().children(recursive=True) if live_children else []:
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _timed(action: Callable[[], object], live_children: bool = False) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``action()``; see :class:`Timing` for what the CPU counts."""
    wall, cpu = time.perf_counter(), _cpu_seconds(live_children)
    action()
    return time.perf_counter() - wall, _cpu_seconds(live_children) - cpu


def interleaved(
    repeats: int, *, live_children: bool = False, **actions: Callable[[], object]
) -> dict[str, Timing]:
    """Time each action ``repeats`` times, taking turns (a, b, a, b, ...) so drifting load hits all."""
    load = _load()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            samples[name].append(_timed(action, live_children))
    return {
        name: Timing(tuple(wall for wall, _ in pairs), tuple(cpu for _, cpu in pairs), load)
        for name, pairs in samples.items()
    }


def run_command(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, fail with its output if it fails, return its output."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed in {cwd}:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def git_commit_all(root: Path, message: str) -> None:
    identity = ["-c", "user.name=ebm-bench", "-c", "user.email=ebm-bench@localhost"]
    for args in (["add", "-A"], ["commit", "-q", "--allow-empty", "-m", message]):
        run_command(["git", *identity, *args], root)


def scratch_copy(destination: Path, params: Path) -> Path:
    """The project's tracked and untracked-not-ignored files, ``params`` as params.yaml, committed anew."""
    listed = run_command(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO)
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    shutil.copyfile(params, destination / "params.yaml")
    run_command(["git", "init", "-q"], destination)
    git_commit_all(destination, "scratch copy")
    return destination


def migrate_mlflow_store(root: Path) -> float:
    """Create ``<root>/mlflow.db`` at the current schema (a one-off per store); return the seconds."""
    import mlflow

    wall, _ = _timed(lambda: mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments())
    return wall


def trivial_project(destination: Path) -> Path:
    """A git + DVC project: three chained stages that write one file each, and a plain/tracked pair."""
    from dvc.repo import Repo

    destination.mkdir(parents=True)
    run_command(["git", "init", "-q"], destination)
    with Repo.init(str(destination)) as repo, repo.config.edit() as config:
        config["core"]["analytics"] = False
        config["core"]["check_update"] = False
    (destination / "plain_stage.py").write_text(textwrap.dedent(PLAIN_STAGE))
    (destination / "tracked_stage.py").write_text(textwrap.dedent(TRACKED_STAGE))
    python = sys.executable
    stages: dict[str, Any] = {}
    previous: str | None = None
    for name in TRIVIAL_STAGES:
        deps = ["plain_stage.py"] + ([f"{previous}.txt"] if previous else [])
        stages[name] = {"cmd": f"{python} plain_stage.py {name}.txt", "deps": deps, "outs": [f"{name}.txt"]}
        previous = name
    stages["tracked"] = {
        "cmd": f"{python} tracked_stage.py tracked.txt",
        "deps": ["tracked_stage.py"],
        "outs": ["tracked.txt"],
    }
    (destination / "dvc.yaml").write_text(json.dumps({"stages": stages}, indent=2))
    (destination / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/reports/\n/.prefect/\n")
    git_commit_all(destination, "trivial pipeline")
    return destination


# --- measurements ---------------------------------------------------------------------------------


def stage_wall_times(root: Path) -> list[dict[str, Any]]:
    """Run every stage once, in pipeline order, with ``dvc repro --single-item``; print and return times."""
    from flows.pipeline import stage_order

    rows = []
    for stage in stage_order(root):
        load = _load()
        seconds, cpu = _timed(partial(run_command, [str(BIN / "dvc"), "repro", "--single-item", stage], root))
        rows.append({"stage": stage, "seconds": seconds, "cpu_seconds": cpu, "load_1min": load})
        print(f"  {stage:<22} {seconds:8.1f} s  cpu {cpu:7.1f} s  load {load:5.2f}", flush=True)
    return rows


def noop_repro(root: Path, repeats: int) -> Timing:
    """``dvc repro`` with every stage up to date; checks that it really did nothing."""
    output = run_command([str(BIN / "dvc"), "repro"], root)
    if "Running stage" in output:
        raise RuntimeError(f"`dvc repro` was expected to be a no-op in {root}:\n{output}")
    return interleaved(repeats, noop=lambda: run_command([str(BIN / "dvc"), "repro"], root))["noop"]


def prefect_overhead(root: Path, repeats: int) -> dict[str, Any]:
    """Forced reruns of the trivial stages: DVC alone vs the pipeline flow, in process and as commands."""
    from dvc.repo import Repo

    from flows.pipeline import pipeline

    last = TRIVIAL_STAGES[-1]

    def dvc_in_process() -> None:
        with chdir(root), Repo(".") as repo:
            repo.reproduce(targets=[last], force=True)

    def flow_in_process() -> None:
        pipeline(project_root=str(root), stages=[last], force=True)

    first_flow, _ = _timed(flow_in_process)  # starts Prefect's temporary API for this process
    in_process = interleaved(repeats, live_children=True, dvc=dvc_in_process, flow=flow_in_process)
    dvc_cli = [str(BIN / "dvc"), "repro", "--force", last]
    flow_cli = [sys.executable, "-m", "flows.pipeline", "--stages", last, "--force"]
    # The commands get a Prefect home of their own: this process's temporary API holds the other one.
    command_env = os.environ | {"PREFECT_HOME": str(root.parent / "prefect-home-commands")}
    run_command(flow_cli, root, command_env)  # creates that home's database
    commands = interleaved(
        repeats,
        dvc=lambda: run_command(dvc_cli, root),
        flow=lambda: run_command(flow_cli, root, command_env),
    )
    stages = len(TRIVIAL_STAGES)
    per_stage = (in_process["flow"].median - in_process["dvc"].median) / stages
    per_stage_cpu = (in_process["flow"].cpu_median - in_process["dvc"].cpu_median) / stages
    per_run = commands["flow"].median - commands["dvc"].median
    per_run_cpu = commands["flow"].cpu_median - commands["dvc"].cpu_median
    return {
        "stages": len(TRIVIAL_STAGES),
        "first_flow_run_in_process_seconds": first_flow,
        "dvc_in_process": in_process["dvc"],
        "flow_in_process": in_process["flow"],
        "dvc_command": commands["dvc"],
        "flow_command": commands["flow"],
        "per_stage_seconds": per_stage,
        "per_stage_cpu_seconds": per_stage_cpu,
        "per_flow_run_command_seconds": per_run,
        "per_flow_run_command_cpu_seconds": per_run_cpu,
    }


def _mlflow_server_script() -> ModuleType:
    """``scripts/mlflow_ui_screenshot.py``, for its ``mlflow_server`` (``scripts/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "mlflow_ui_screenshot", REPO / "scripts" / "mlflow_ui_screenshot.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mlflow_overhead(root: Path, repeats: int) -> dict[str, Any]:
    """A forced trivial stage without an MLflow run, with one on the SQLite store, and with one logged
    through ``mlflow server`` on that same store (the server's own CPU is not counted)."""
    store = f"sqlite:///{root / 'mlflow.db'}"

    def stage(name: str, env: dict[str, str] | None = None) -> Callable[[], str]:
        return lambda: run_command([str(BIN / "dvc"), "repro", "--force", "--single-item", name], root, env)

    stage("tracked")()  # the first run creates the experiment
    deferred_env = os.environ | {DEFER_ENV: "1"}

    def tracked_deferred() -> None:
        stage("tracked", deferred_env)()
        if len(log_pending_runs(root)) != 1:
            raise RuntimeError("the deferred stage left no MLflow run to log")

    tracked_deferred()  # this process's first MLflow calls
    started = time.perf_counter()
    with _mlflow_server_script().mlflow_server(store) as server:
        server_start = time.perf_counter() - started
        via_server = os.environ | {"MLFLOW_TRACKING_URI": server}
        stage("tracked", via_server)()  # the server's first requests
        timings = interleaved(
            repeats,
            plain=stage(TRIVIAL_STAGES[0]),
            tracked=stage("tracked"),
            tracked_via_server=stage("tracked", via_server),
            tracked_deferred=tracked_deferred,
        )
    plain, tracked, via = timings["plain"], timings["tracked"], timings["tracked_via_server"]
    deferred = timings["tracked_deferred"]
    return {
        "plain": plain,
        "tracked": tracked,
        "tracked_via_server": via,
        "tracked_deferred": deferred,
        "per_stage_deferred_seconds": deferred.median - plain.median,
        "per_stage_deferred_cpu_seconds": deferred.cpu_median - plain.cpu_median,
        "server_start_seconds": server_start,
        "per_stage_seconds": tracked.median - plain.median,
        "per_stage_cpu_seconds": tracked.cpu_median - plain.cpu_median,
        "per_stage_via_server_seconds": via.median - plain.median,
        "per_stage_via_server_cpu_seconds": via.cpu_median - plain.cpu_median,
    }


# --- report ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def verdict(bar: dict[str, Any]) -> str:
    """What the report prints for one entry of :func:`bars`."""
    return f"{'PASS' if bar['passed'] else 'FAIL'} (bar < {bar['bar_seconds']} s)"


MLFLOW_PATHS = (
    ("the flow: MLflow run deferred", "per_stage_deferred"),
    ("MLflow in the stage (SQLite store)", "per_stage"),
    ("MLflow in the stage (server)", "per_stage_via_server"),
)


def bars(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each bar's measured wall-clock seconds, its limit and whether it passed: what the report prints."""
    measured = {"noop_dvc_repro": (results["noop_dvc_repro"].median, NOOP_BAR_SECONDS)}
    prefect_wall = results["prefect"]["per_stage_seconds"]
    for _, key in MLFLOW_PATHS:
        total = prefect_wall + results["mlflow"][f"{key}_seconds"]
        measured[f"prefect_plus_mlflow_{key}"] = (total, PER_STAGE_BAR_SECONDS)
    return {
        name: {"seconds": seconds, "bar_seconds": bar, "passed": seconds < bar}
        for name, (seconds, bar) in measured.items()
    }


def print_report(results: dict[str, Any]) -> None:
    """The timings, then each bar as :func:`bars` judged it (``results["bars"]``)."""
    noop: Timing = results["noop_dvc_repro"]
    prefect, mlflow = results["prefect"], results["mlflow"]
    print(f"\nwall-clock median of {results['repeats']} [min, max], CPU median, 1-minute load average")
    rows = [
        ("no-op `dvc repro`", noop),
        ("3 stages, DVC in process", prefect["dvc_in_process"]),
        ("3 stages, flow in process", prefect["flow_in_process"]),
        ("3 stages, `dvc repro --force`", prefect["dvc_command"]),
        ("3 stages, `python -m flows.pipeline`", prefect["flow_command"]),
        ("1 stage, plain", mlflow["plain"]),
        ("1 stage, with an MLflow run (SQLite)", mlflow["tracked"]),
        ("1 stage, with an MLflow run (server)", mlflow["tracked_via_server"]),
        ("1 stage, MLflow run deferred (flow)", mlflow["tracked_deferred"]),
    ]
    for label, timing in rows:
        print(f"  {label:<38}{timing.cell()}")

    print(f"\n{'':<40}{'wall s':>8}{'cpu s':>8}  bar (on wall-clock medians)")
    noop_verdict = verdict(results["bars"]["noop_dvc_repro"])
    print(f"  {'no-op `dvc repro`':<38}{noop.median:8.2f}{noop.cpu_median:8.2f}  {noop_verdict}")
    prefect_wall, prefect_cpu = prefect["per_stage_seconds"], prefect["per_stage_cpu_seconds"]
    print(f"  {'Prefect per stage (in process)':<38}{prefect_wall:8.2f}{prefect_cpu:8.2f}")
    for label, key in MLFLOW_PATHS:
        wall, cpu = mlflow[f"{key}_seconds"], mlflow[f"{key}_cpu_seconds"]
        print(f"  {'MLflow per stage, ' + label:<38}{wall:8.2f}{cpu:8.2f}")
        bar = results["bars"][f"prefect_plus_mlflow_{key}"]
        print(
            f"  {'  Prefect + MLflow per stage':<38}{bar['seconds']:8.2f}{prefect_cpu + cpu:8.2f}  "
            f"{verdict(bar)}"
        )
    print(f"  (the MLflow server came up in {mlflow['server_start_seconds']:.0f} s)")
    print(
        f"  {'once per flow run, as a command':<38}{prefect['per_flow_run_command_seconds']:8.2f}"
        f"{prefect['per_flow_run_command_cpu_seconds']:8.2f}  (Prefect's import and temporary API; "
        f"first flow run in a process: {prefect['first_flow_run_in_process_seconds']:.1f} s)"
    )
    for key, title in (("stages_quick", "quick pipeline"), ("stages_full", "full pipeline (params.yaml)")):
        if key in results:
            stages = results[key]
            print(f"\n{title}: {sum(row['seconds'] for row in stages):.1f} s in all")
            for row in stages:
                print(
                    f"  {row['stage']:<22}{row['seconds']:8.1f} s  cpu {row['cpu_seconds']:7.1f} s"
                    f"  load {row['load_1min']:5.2f}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, required=True, help="write the results as JSON here")
    parser.add_argument("--full", action="store_true", help="also time params.yaml's pipeline (long)")
    parser.add_argument(
        "--repeats", type=whole_number(1), default=5, help="runs per timed measurement (default: 5)"
    )
    parser.add_argument(
        "--keep", type=Path, help="build the scratch projects in this new folder and keep them"
    )
    args = parser.parse_args(argv)

    apply_offline_env()
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # stage commands call `python`
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each scratch project uses its own store
    # Prefect gives its temporary API 20 s to start by default: too little on a busy shared machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        workdir = args.keep.resolve()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="ebm-overhead-"))
    os.environ["PREFECT_HOME"] = str(workdir / "prefect-home")  # read when Prefect is first imported

    started = time.time()
    results: dict[str, Any] = {
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg(),
        "bars_seconds": {
            "noop_dvc_repro": NOOP_BAR_SECONDS,
            "prefect_plus_mlflow_per_stage": PER_STAGE_BAR_SECONDS,
        },
    }
    try:
        quick = scratch_copy(workdir / "quick", REPO / "configs" / "quick.yaml")
        results["mlflow_store_migration_seconds"] = migrate_mlflow_store(quick)
        print(f"quick pipeline in {quick}, stage by stage:", flush=True)
        results["stages_quick"] = stage_wall_times(quick)
        results["noop_dvc_repro"] = noop_repro(quick, args.repeats)
        print(f"no-op dvc repro: {results['noop_dvc_repro'].cell()}", flush=True)

        trivial = trivial_project(workdir / "trivial")
        migrate_mlflow_store(trivial)
        results["prefect"] = prefect_overhead(trivial, args.repeats)
        results["mlflow"] = mlflow_overhead(trivial, args.repeats)

        if args.full:
            full = scratch_copy(workdir / "full", REPO / "params.yaml")
            migrate_mlflow_store(full)
            print(f"full pipeline in {full}, stage by stage:", flush=True)
            results["stages_full"] = stage_wall_times(full)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    results["load_at_end"] = os.getloadavg()
    results["benchmark_seconds"] = time.time() - started
    results["bars"] = bars(results)
    print_report(results)
    write_report_json(args.json, _jsonable(results))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
