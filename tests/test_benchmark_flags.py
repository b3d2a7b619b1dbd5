"""The benchmark scripts refuse counts they cannot use before any work, and report what they print."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:  # the scripts import each other as run from their folder
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CASES = [
    # before: each was accepted, then failed after minutes of work (or, for sampling.py, fell back to
    # the default without a word)
    ("anomaly", ["--json", "x.json", "--seeds", "0"], "--seeds"),
    ("anomaly", ["--json", "x.json", "--requests", "0"], "--requests"),
    ("anomaly", ["--json", "x.json", "--clients", "0"], "--clients"),
    ("pipeline_overhead", ["--json", "x.json", "--repeats", "0"], "--repeats"),
    ("toy_density", ["--n-test", "0"], "--n-test"),
    ("sampling", ["--threads", "0"], "--threads"),
    ("sampling", ["--steps", "0"], "--steps"),
    ("training", ["--threads", "0"], "--threads"),
    ("images", ["--max-test", "1"], "--max-test"),
    ("images", ["--reuse", "--steps", "600"], "--steps"),
]

RUN_CASES = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import importlib.util
outcomes = []
for script, argv, _ in json.loads(sys.argv[2]):
    spec = importlib.util.spec_from_file_location("benchmark_" + script, sys.argv[1] + "/" + script + ".py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            module.main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
    outcomes.append([code, err.getvalue()])
print(json.dumps(outcomes))
"""


def test_a_count_it_cannot_use_is_a_usage_error_naming_the_flag(tmp_path: Path) -> None:
    # in a process of its own with a time limit: a script that accepted a value would start its work
    done = subprocess.run(
        [sys.executable, "-c", RUN_CASES, str(BENCHMARKS), json.dumps(CASES)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for (script, argv, named), (code, err) in zip(CASES, json.loads(done.stdout), strict=True):
        assert code == 2 and named in err, (script, argv, code, err[-500:])
    assert list(tmp_path.iterdir()) == []


def test_the_overhead_report_records_each_bar_it_prints_with_its_verdict() -> None:
    # before: the JSON held the limits and the parts, not the totals and verdicts the report printed
    overhead = load("pipeline_overhead")
    results = {
        "noop_dvc_repro": SimpleNamespace(median=0.9),
        "prefect": {"per_stage_seconds": 0.3},
        "mlflow": {
            "per_stage_deferred_seconds": 0.1,
            "per_stage_seconds": 2.9,
            "per_stage_via_server_seconds": 1.0,
        },
    }
    bars = overhead.bars(results)
    assert bars["noop_dvc_repro"] == {
        "seconds": 0.9,
        "bar_seconds": overhead.NOOP_BAR_SECONDS,
        "passed": True,
    }
    assert bars["prefect_plus_mlflow_per_stage"]["seconds"] == pytest.approx(3.2)
    assert not bars["prefect_plus_mlflow_per_stage"]["passed"]
    assert bars["prefect_plus_mlflow_per_stage_deferred"]["passed"]
    for bar in bars.values():  # the report prints each bar as judged here, not by a second comparison
        assert overhead.verdict(bar).startswith("PASS" if bar["passed"] else "FAIL")
