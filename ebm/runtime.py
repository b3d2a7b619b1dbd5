"""Process-level settings chosen from the machine before the OpenMP runtime starts.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it. Its default lets a thread that reaches a
barrier first spin for its partners, which is the fastest choice when every intra-op thread has a core
to itself (28×28 CNN Langevin step, batch 128, 2 threads on an idle 2-core machine: 12.3 ms against
15.9 ms with ``PASSIVE``, ``benchmarks/sampling.py``) and a disaster when another process holds one of
those cores: the spinning thread waits a whole scheduler slice for a partner that is not running (up
to 80× slower per step). :func:`choose_omp_wait_policy` looks at how many other tasks are runnable
right now and picks ``PASSIVE`` only when the machine is busy.

The entry points call :func:`configure_openmp` before anything imports torch: ``ebm/stages/__init__.py``
(every ``python -m ebm.stages.*`` process DVC starts) and ``ebm/cli.py`` (the ``ebm`` command). Plain
``import ebm`` does nothing of the kind. A value set by the user always wins, and nothing changes once
torch is loaded (it would have no effect).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def runnable_tasks(loadavg: Path = Path("/proc/loadavg")) -> int | None:
    """Tasks runnable at this instant (the fourth field of ``/proc/loadavg``, ``running/total``),
    including the caller; ``None`` where the file is missing or unreadable (not Linux)."""
    try:
        fields = loadavg.read_text().split()
        return int(fields[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def typical_runnable_tasks(samples: int = 9, interval_s: float = 0.002) -> int | None:
    """The median of ``samples`` readings of :func:`runnable_tasks`, ``interval_s`` apart (~20 ms).

    One reading is a snapshot: on an idle machine a kernel thread or the parent process waking up
    makes it read 2 about one time in ten, while a process that computes is runnable at nearly every
    reading. The median keeps the second and ignores the first.
    """
    readings = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        reading = runnable_tasks()
        if reading is None:
            return None
        readings.append(reading)
    return sorted(readings)[len(readings) // 2]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_omp_wait_policy(
    *, runnable: int | None = None, cores: int | None = None, threads: int | None = None
) -> str | None:
    """``"PASSIVE"`` when other runnable tasks would leave an intra-op thread without a core, else
    ``None`` (keep OpenMP's default). ``threads`` defaults to ``OMP_NUM_THREADS`` or the core count."""
    runnable = typical_runnable_tasks() if runnable is None else runnable
    if runnable is None:
        return None
    cores = available_cores() if cores is None else cores
    if threads is None:
        requested = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(requested) if requested.isdigit() and int(requested) > 0 else cores
    if threads <= 1:
        return None  # a single thread never waits at a barrier
    others = max(runnable - 1, 0)  # the caller is one of the runnable tasks
    return "PASSIVE" if others + threads > cores else None


def wait_policy_in_force() -> str:
    """The wait policy this process's OpenMP runtime reads (``"default"``: OpenMP's own, spinning a
    while before sleeping), for the record: each stage's MLflow run carries it as a tag, since the same
    training can be 20–30 % slower under ``PASSIVE``."""
    return os.environ.get(WAIT_POLICY_ENV) or "default"


def configure_openmp() -> str | None:
    """Set ``OMP_WAIT_POLICY`` from :func:`choose_omp_wait_policy` unless the user set it or torch is
    already loaded; return the value in force for this process (``None``: OpenMP's default)."""
    if WAIT_POLICY_ENV in os.environ or "torch" in sys.modules:
        return os.environ.get(WAIT_POLICY_ENV)
    policy = choose_omp_wait_policy()
    if policy is not None:
        os.environ[WAIT_POLICY_ENV] = policy
    return policy
