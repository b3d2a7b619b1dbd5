"""Atomic, code-free checkpoints and model files.

Everything written here holds tensors and plain Python data only and is read back with
``torch.load(..., weights_only=True)``: opening a checkpoint or a model file never runs code. Every
write goes to a temporary file in the destination folder and is renamed over the target, so a killed
process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebm.config import from_dict
from ebm.energies import MLPEnergy, MLPEnergyConfig

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or model file could not be written or read; the message says which and why."""


FILE_MODE = 0o644
"""The mode of every file written atomically: ``mkstemp`` makes its temporary file owner-only (0600), but
models, data and reports are for everyone who reads the repository (as ``save_figure`` and
``atomic_table_write`` also set)."""


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[str], object], *, suffix: str = ".tmp"
) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file onto ``path`` once it is complete.

    The temporary file lies in ``path``'s folder, ends in ``suffix`` (``".tmp.png"`` for a writer that
    picks the format from the name) and is removed if ``write`` raises; the file written has mode
    :data:`FILE_MODE`, not ``mkstemp``'s 0600. The file's bytes reach the disk before the rename, and the
    rename before this returns (``fsync`` of the file, then of the folder), so a crash or power cut, not
    only a killed process, leaves the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        _fsync(path.parent, os.O_DIRECTORY)
    return path


def _fsync(path: str | os.PathLike[str], flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, and byte for byte the same for the same ``obj``.

    Given a file name, ``torch.save`` names the zip archive's root folder after it, so saving to a
    fresh temporary name gave different bytes on every run, and DVC reran every stage downstream of an
    unchanged output. Written through an open file the root folder is always ``archive``.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:
            torch.save(obj, file)

    return atomic_write(path, write)


def assert_finite_state(state_dict: Mapping[str, Any], what: str) -> None:
    """Raise :class:`CheckpointError` if any floating tensor in ``state_dict`` is NaN or infinite."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"refusing to write {what}: tensor {name!r} holds NaN or infinite values")


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write a training checkpoint (nested dicts of tensors and plain data) atomically."""
    payload = {"format_version": FORMAT_VERSION, **state}
    return torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path} is not a readable ebm checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an ebm checkpoint of format version {FORMAT_VERSION}")
    return state


# --- model files: architecture spec + weights, rebuilt through an explicit registry ---------------


def _image_energy(config: dict[str, Any]) -> nn.Module:
    from ebm.images import ImageEnergySpec, build_image_energy  # the recipe imports this module

    return build_image_energy(from_dict(ImageEnergySpec, config))


def _rbm(config: dict[str, Any]) -> nn.Module:
    from ebm.boltzmann.rbm import BernoulliRBM, RBMConfig

    return BernoulliRBM(from_dict(RBMConfig, config))


def _grid_crf(config: dict[str, Any]) -> nn.Module:
    from ebm.boltzmann.structured import GridCRFConfig, GridCRFEnergy

    return GridCRFEnergy(from_dict(GridCRFConfig, config))


MODEL_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "mlp_energy": lambda config: MLPEnergy(from_dict(MLPEnergyConfig, config)),
    "image_energy": _image_energy,
    "rbm": _rbm,
    "grid_crf": _grid_crf,
}


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    kind: str,
    config: Any,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model``'s weights with the spec that rebuilds it (``kind`` + its config dataclass)."""
    if kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_BUILDERS)}")
    state_dict = model.state_dict()
    assert_finite_state(state_dict, f"model file {path}")
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    config_dict = dataclasses.asdict(config) if is_instance else dict(config)
    payload = {
        "kind": kind,
        "config": _plain(config_dict),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "metadata": _plain(dict(metadata or {})),
    }
    return save_checkpoint(path, payload)


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in eval mode."""
    payload = load_checkpoint(path, map_location)
    kind = payload.get("kind")
    if kind not in MODEL_BUILDERS:
        raise CheckpointError(
            f"{path} holds a model of unknown kind {kind!r}; known: {sorted(MODEL_BUILDERS)}"
        )
    model = MODEL_BUILDERS[kind](payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def _plain(value: Any) -> Any:
    """Tuples → lists, recursively, so configs survive ``weights_only`` loading unchanged in meaning."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
