"""What every stage entry point shares: its command line and where its family's files live."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ebm.config import ConfigError, section
from ebm.distributed import init_from_env


@dataclass(frozen=True)
class StagePaths:
    """A model family's folders in the project: ``<root>/{data,models,checkpoints,reports}/<family>``.

    Subclasses name the family; ``dvc.yaml`` declares the same folders as the stages' deps and outs.
    """

    root: Path
    family: ClassVar[str]

    @property
    def data(self) -> Path:
        return self.root / "data" / self.family

    @property
    def models(self) -> Path:
        return self.root / "models" / self.family

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints" / self.family

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.family


def stage_arguments(module: str, description: str | None, stages: Iterable[str]) -> argparse.ArgumentParser:
    """The parser of ``python -m <module> <stage> [--params FILE] [--root DIR]``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=list(stages))
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (default: %(default)s)")
    return parser


def refuse_torchrun(parser: argparse.ArgumentParser, family: str, *, stage: str | None = None) -> None:
    """Stop with a usage error when started by ``torchrun`` with more than one process: these stages (or
    this ``stage`` of the family) join no process group, so each process would run the whole stage, write
    the same outs and log its own run. Called before the process group would be joined or anything read.
    """
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.isdigit() and int(world_size) > 1:
        what = f"the {family} stages run" if stage is None else f"the {family} {stage} stage runs"
        parser.error(
            f"{what} as one process, not under torchrun ({world_size} processes); only the training "
            "stages `python -m ebm.stages.toy train` and `python -m ebm.stages.images train` train "
            "data-parallel"
        )


def run_on_ranks(
    device: str, on_rank_zero: Callable[[], object], on_other_ranks: Callable[[], object]
) -> None:
    """Join ``torchrun``'s process group if there is one (:func:`~ebm.distributed.init_from_env`), run, leave.

    Rank 0 (or the one process) runs ``on_rank_zero``: the stage inside its MLflow run, writing the outs.
    The other ranks run ``on_other_ranks``: the same training, which writes and logs nothing.
    """
    context = init_from_env(device)
    try:
        if context.is_main:
            on_rank_zero()
        else:
            on_other_ranks()
    finally:
        context.destroy()


def read_seed(params: Mapping[str, Any]) -> int:
    """The global ``seed`` of ``params.yaml``: a whole number (``1.5`` or ``true`` is an error, not 1).

    Raises:
        ConfigError: The key is missing or not a whole number.
    """
    seed = section(params, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")
    return seed


def read_mapping(params: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The section at dotted ``key``, copied; one that is not a mapping (``rbm: null``) is an error naming it.

    Raises:
        ConfigError: The key is missing or its value is not a mapping.
    """
    value = section(params, key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return dict(value)


def check_count(key: str, value: Any, *, null: str | None = None, minimum: int = 1) -> None:
    """A count read from the params is a whole number ≥ ``minimum`` (``True`` is not one); with ``null``
    (what the stage does without a value, e.g. "all images") ``None`` is allowed too. Slicing with a cap of
    -3 would drop the last three rows, and one of 0 all of them, silently.

    Raises:
        ValueError: ``value`` is not such a number; the message names ``key``.
    """
    if value is None and null is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f" or null ({null})" if null is not None else ""
        raise ValueError(f"{key} must be a whole number ≥ {minimum}{allowed}, got {value!r}")
