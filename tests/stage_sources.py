"""Which of the package's source files a stage runs, checked against the deps ``dvc.yaml`` declares.

A file a stage's code runs but its ``deps`` leave out is a stage DVC will not rerun when that file changes:
its outs go stale while ``dvc status`` says everything is up to date. The stage tests run each stage in
their own process under :func:`executed_sources` and hand the result to :func:`assert_declared`.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

PLUMBING = frozenset(
    {
        "ebm/__init__.py",
        "ebm/checkpoint.py",
        "ebm/config.py",
        "ebm/distributed.py",
        "ebm/offline.py",
        "ebm/runtime.py",
        "ebm/stages/common.py",
        "ebm/tracking.py",
    }
)
"""Modules that read params, write files and log runs for every stage, and compute nothing the outs hold:
``dvc.yaml`` leaves them out of the deps (its header says why), so editing them reruns no stage."""


@contextmanager
def executed_sources() -> Iterator[dict[str, set[str]]]:
    """Collect, relative to the repository, the ``ebm/`` files whose functions run inside the block, each
    with the names of those functions.

    Not counted: module and class bodies (what importing a module runs: a stage module imports more than
    each of its stages uses), and whatever parsing params (``ebm/config.py``) or constructing a dataclass
    runs, its default factories and ``__post_init__`` checks (every stage of a family parses the whole
    params section, so the configs of models it never builds validate their values).
    """
    package, parsing = str(REPO / "ebm") + "/", str(REPO / "ebm" / "config.py")
    files: dict[str, set[str]] = {}
    counted: set[CodeType] = set()

    def configuring(frame: FrameType | None) -> bool:
        while frame is not None:
            code = frame.f_code
            if code.co_name == "__post_init__" or code.co_filename == parsing:
                return True
            if code.co_name == "__init__" and code.co_filename == "<string>":
                return True  # dataclasses generate __init__ from source text named "<string>"
            frame = frame.f_back
        return False

    def trace(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if code in counted or not code.co_filename.startswith(package):
            return None  # no line events
        if code.co_flags & inspect.CO_NEWLOCALS and not configuring(frame):
            counted.add(code)
            files.setdefault(code.co_filename[len(str(REPO)) + 1 :], set()).add(code.co_qualname)
        return None

    before = sys.gettrace()
    sys.settrace(trace)
    threading.settrace(trace)
    try:
        yield files
    finally:
        sys.settrace(before)
        threading.settrace(None)  # type: ignore[arg-type]


def declared_deps(stage: str) -> list[str]:
    """The ``deps`` of ``stage`` in the repository's ``dvc.yaml``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [str(dep) for dep in stages[stage].get("deps", [])]


def assert_declared(stage: str, executed: dict[str, set[str]]) -> None:
    """Every file in ``executed`` is a dep of ``stage`` (or under a dep folder), or plumbing."""
    deps = declared_deps(stage)
    missing = {
        path: sorted(functions)[:5]
        for path, functions in sorted(executed.items())
        if path not in PLUMBING
        and not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)
    }
    assert not missing, f"dvc.yaml: stage {stage} runs code its deps leave out: {missing}"
