"""The OpenMP wait policy chosen from the machine's load (ebm.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebm.runtime import choose_omp_wait_policy, runnable_tasks, typical_runnable_tasks


def test_runnable_tasks_reads_the_instantaneous_field_of_loadavg(tmp_path: Path) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.35 1.41 1.54 3/85 23456\n")
    assert runnable_tasks(loadavg) == 3
    loadavg.write_text("garbage\n")
    assert runnable_tasks(loadavg) is None
    assert runnable_tasks(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("runnable", "cores", "threads", "expected"),
    [
        (1, 2, 2, None),  # only the caller: every thread has a core, spinning is fastest
        (2, 2, 2, "PASSIVE"),  # another task holds a core: a spinning thread would wait for its partner
        (2, 4, 2, None),  # a spare core for the other task
        (5, 2, 1, None),  # one thread never waits at a barrier
        (None, 2, 2, None),  # no /proc/loadavg: keep OpenMP's default
    ],
)
def test_passive_only_when_other_tasks_would_take_an_intra_op_threads_core(
    runnable: int | None, cores: int, threads: int, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if runnable is None:
        monkeypatch.setattr("ebm.runtime.runnable_tasks", lambda: None)
        assert choose_omp_wait_policy(cores=cores, threads=threads) is None
    assert choose_omp_wait_policy(runnable=runnable, cores=cores, threads=threads) == expected


def test_a_momentary_wake_up_is_not_load_but_a_busy_process_is(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([1, 2, 1, 1, 1, 1, 1, 1, 1])  # the caller, and once a kernel thread waking up
    monkeypatch.setattr("ebm.runtime.runnable_tasks", lambda: next(readings))
    assert typical_runnable_tasks(interval_s=0.0) == 1
    readings = iter([2, 2, 1, 2, 2, 2, 2, 2, 2])  # another process computing all along
    monkeypatch.setattr("ebm.runtime.runnable_tasks", lambda: next(readings))
    assert typical_runnable_tasks(interval_s=0.0) == 2


def test_omp_num_threads_sets_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_omp_wait_policy(runnable=8, cores=2) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_omp_wait_policy(runnable=8, cores=2) == "PASSIVE"


def _policy_after_import(env: dict[str, str]) -> str:
    code = "import os, ebm.stages, torch; print(repr(os.environ.get('OMP_WAIT_POLICY')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_stage_process_never_overrides_the_users_setting() -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    assert _policy_after_import(env) == "'ACTIVE'"


def test_a_stage_process_sets_the_policy_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "1"  # one thread: the default policy is always right
    assert _policy_after_import(env) == "None"
    code = (
        "import ebm.runtime as r; r.typical_runnable_tasks = lambda: 64; "
        "import os, sys, ebm.stages; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env["OMP_NUM_THREADS"] = "2"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["PASSIVE", "False"]


def test_importing_the_library_reads_nothing_and_sets_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (
        "import ebm.runtime as r; r.typical_runnable_tasks = lambda: 64; "
        "import os, ebm, ebm.samplers; print(repr(os.environ.get('OMP_WAIT_POLICY')))"
    )
    env["OMP_NUM_THREADS"] = "2"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "None"  # a busy machine, yet plain imports left OpenMP alone
