"""Atomic, code-free checkpoints and model files.

Everything written here holds tensors and plain Python data only and is read back with
``torch.load(..., weights_only=True)``: opening a checkpoint or a model file never runs code. Every
write goes to a temporary file in the destination folder and is renamed over the target, so a killed
process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ebm.config import from_dict
from ebm.energies import MLPEnergy, MLPEnergyConfig

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or model file could not be written or read; the message says which and why."""


MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None
"""What ``torch.load`` accepts as ``map_location``."""


FILE_MODE = 0o644
"""The mode of every file written atomically: ``mkstemp`` makes its temporary file owner-only (0600), but
models, data, tables and figures are for everyone who reads the repository."""


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


def run_fingerprint(settings: Mapping[str, Any], *payloads: bytes) -> str:
    """12 hex digits of SHA-256 over ``settings`` (as sorted JSON) and then each payload's bytes.

    Checkpoints are named by it, so that only the run they belong to (the same settings, the same data)
    resumes them.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for payload in payloads:
        digest.update(payload)
    return digest.hexdigest()[:12]


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """``value`` as indented JSON with sorted keys and a final newline, written by :func:`atomic_write`.

    Raises:
        ValueError: ``value`` holds a NaN or infinite float, which JSON cannot express (Python would write
            a bare ``NaN`` token that strict readers refuse); nothing is written then.
    """
    try:
        text = json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as err:
        raise ValueError(f"{path}: {err}; a metric that failed must not be written as a number") from err
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_report_json(path: str | os.PathLike[str], value: Any, *, default: Any = None) -> list[str]:
    """A benchmark's report as indented JSON, written by :func:`atomic_write` (folders made as needed).

    A NaN or infinite float (a measurement that failed) is written as ``null``: Python's bare ``NaN``
    token is not JSON, and strict readers refuse the whole file. Returns the paths of those values
    (``rows[2].ms``), which a warning names too. ``default`` converts other objects, as in ``json.dumps``.
    """
    missing: list[str] = []

    def clean(item: Any, where: str) -> Any:
        if type(item).__module__ == "numpy" and getattr(item, "ndim", None) == 0:
            item = item.item()  # a numpy scalar, float32 included (not a float subclass)
        if isinstance(item, float) and not math.isfinite(item):
            missing.append(where or "(the report)")
            return None
        if isinstance(item, dict):
            return {key: clean(v, f"{where}.{key}" if where else str(key)) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(item)]
        return item

    text = json.dumps(clean(value, ""), indent=2, default=default, allow_nan=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    if missing:
        warnings.warn(f"{path}: no finite value for {', '.join(missing)}; written as null", stacklevel=2)
    return missing


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


def assert_finite_state(state_dict: Mapping[str, Any], what: str, *, action: str = "write") -> None:
    """Raise :class:`CheckpointError` if any floating tensor in ``state_dict`` is NaN or infinite.

    The message reads "refusing to ``action`` ``what``": ``"write"`` before saving, ``"load"`` when a file
    read back holds a model that must not be used.
    """
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"refusing to {action} {what}: tensor {name!r} holds NaN or infinite values"
            )


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write a training checkpoint (nested dicts of tensors and plain data) atomically.

    ``state`` is first checked by :func:`loadable_state`: NumPy scalars are stored as the Python values
    they equal, and anything a ``weights_only`` load would refuse (a ``Path``, an array, an object)
    raises ``TypeError`` naming its key path and type before anything is written, so a file already at
    ``path`` is left as it was.
    """
    payload = {"format_version": FORMAT_VERSION, **loadable_state(state, "state")}
    return torch_save(payload, path)


_PLAIN_LEAVES = (type(None), bool, int, float, str)
"""The leaf types of metadata and configs (exactly these, not subclasses: ``np.float64`` is a float)."""

_STATE_LEAVES = (*_PLAIN_LEAVES, complex, bytes, torch.Size, torch.dtype, torch.device)
"""Besides tensors, the leaf types a ``weights_only`` load accepts in a checkpoint (exactly these)."""

_NUMPY_SCALARS = (np.bool_, np.integer, np.floating, np.str_)
"""The NumPy scalars stored as the Python values they equal."""


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def plain_data(value: Any, where: str) -> Any:
    """``value`` as plain JSON-like data that a ``weights_only`` load accepts: ``None``, bools, ints,
    floats, strings, and lists and str-keyed dicts of those.

    NumPy bool, integer, float and string scalars (a metric computed with NumPy) become the Python values
    they equal, tuples become lists. Anything else (a ``Path``, an array, a tensor, a non-str key, a
    container that holds itself) raises ``TypeError`` naming its key path, which starts with ``where``
    (``metadata['runs'][2]``), and its type.
    """
    return _plain_tree(value, where, set())


def plain_metadata(metadata: Mapping[str, Any] | None, where: str = "metadata") -> dict[str, Any]:
    """``metadata`` (``None``: none) as a dict of :func:`plain_data`, for a model or detector file.

    Raises:
        TypeError: ``metadata`` is no mapping, or holds what a ``weights_only`` load would refuse; the
            message names the key path and the type.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{where} must be a dict of plain values, not a {_type_name(metadata)}")
    return cast(dict[str, Any], plain_data(metadata, where))


def _plain_tree(value: Any, where: str, open_containers: set[int]) -> Any:
    if type(value) in _PLAIN_LEAVES:
        return value
    if isinstance(value, _NUMPY_SCALARS):
        return value.item()
    if not isinstance(value, Mapping | list | tuple):
        raise TypeError(
            f"{where} is a {_type_name(value)}; only None, bool, int, float, str, and lists and str-keyed "
            "dicts of those can be stored (convert it, e.g. str(path) or array.tolist())"
        )
    if id(value) in open_containers:
        raise TypeError(f"{where} is a list or dict that holds itself; only a tree can be stored")
    open_containers.add(id(value))
    if isinstance(value, Mapping):
        plain: Any = {}
        for key, item in value.items():
            if isinstance(key, np.str_):
                key = key.item()
            if type(key) is not str:
                raise TypeError(f"{where} has the key {key!r} of type {_type_name(key)}; keys must be str")
            plain[key] = _plain_tree(item, f"{where}[{key!r}]", open_containers)
    else:
        plain = [_plain_tree(item, f"{where}[{i}]", open_containers) for i, item in enumerate(value)]
    open_containers.discard(id(value))
    return plain


def loadable_state(state: Mapping[str, Any], where: str = "state") -> dict[str, Any]:
    """``state`` as a checkpoint may hold it: what a ``weights_only`` load accepts.

    Leaves may be tensors, ``None``, bools, ints, floats, complex numbers, strings, bytes,
    ``torch.Size``, dtypes and devices; containers dicts (``OrderedDict`` too), lists, tuples and sets.
    NumPy scalars become the Python values they equal; containers that need no change are kept as they
    are (the same objects: a module's ``state_dict`` keeps its ``_metadata``).

    Raises:
        TypeError: anything else (a ``Path``, an array, an object), named by its key path from ``where``
            (``state['config']['data']``) and its type; nothing is written then.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{where} must be a dict, not a {_type_name(state)}")
    return cast(dict[str, Any], _state_tree(dict(state), where, set()))


def _state_tree(value: Any, where: str, open_containers: set[int]) -> Any:
    if type(value) in _STATE_LEAVES or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, _NUMPY_SCALARS):  # before the containers: np.str_ is a str, np.float64 a float
        return value.item()
    if type(value) not in (dict, OrderedDict, list, tuple, set):
        raise TypeError(
            f"{where} is a {_type_name(value)}; a checkpoint may hold only tensors, None, bool, int, float, "
            "str, and lists, tuples and dicts of those (convert it, e.g. str(path) or array.tolist())"
        )
    if id(value) in open_containers:
        raise TypeError(f"{where} is a container that holds itself; a checkpoint must hold a tree")
    open_containers.add(id(value))
    original, changed = value, False
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            new_key = _state_tree(key, f"{where} key {key!r}", open_containers)
            new_item = _state_tree(item, f"{where}[{key!r}]", open_containers)
            changed = changed or new_key is not key or new_item is not item
            items.append((new_key, new_item))
        if changed:
            copied = copy.copy(value)  # the same type, and an OrderedDict keeps its attributes
            copied.clear()
            copied.update(items)
            value = copied
    else:
        elements = [_state_tree(item, f"{where}[{i}]", open_containers) for i, item in enumerate(value)]
        if any(new is not old for new, old in zip(elements, value, strict=True)):
            value = type(value)(elements)
    open_containers.discard(id(original))
    return value


def load_checkpoint(path: str | os.PathLike[str], map_location: MapLocation = "cpu") -> dict[str, Any]:
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


def _image_energy(config: dict[str, Any], where: str) -> nn.Module:
    from ebm.images import ImageEnergySpec, build_image_energy  # the recipe imports this module

    return build_image_energy(from_dict(ImageEnergySpec, config, where))


def _rbm(config: dict[str, Any], where: str) -> nn.Module:
    from ebm.boltzmann.rbm import BernoulliRBM, RBMConfig

    return BernoulliRBM(from_dict(RBMConfig, config, where))


def _grid_crf(config: dict[str, Any], where: str) -> nn.Module:
    from ebm.boltzmann.structured import GridCRFConfig, GridCRFEnergy

    return GridCRFEnergy(from_dict(GridCRFConfig, config, where))


MODEL_BUILDERS: dict[str, Callable[[dict[str, Any], str], nn.Module]] = {
    "mlp_energy": lambda config, where: MLPEnergy(from_dict(MLPEnergyConfig, config, where)),
    "image_energy": _image_energy,
    "rbm": _rbm,
    "grid_crf": _grid_crf,
}
"""Model kind → ``builder(config, where)``; ``where`` names the config in error messages."""


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    kind: str,
    config: Any,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model``'s weights with the spec that rebuilds it (``kind`` + its config dataclass).

    ``config`` and ``metadata`` are stored as :func:`plain_data`: NumPy scalars as the Python values they
    equal, tuples as lists.

    Raises:
        ValueError: an unknown ``kind``.
        TypeError: ``config`` or ``metadata`` holds what :func:`load_model` could not read back (a
            ``Path``, an array, an object); the message names the key path and the type.
        CheckpointError: NaN or infinite weights.

    Nothing is written when it raises: a file already at ``path`` is left as it was.
    """
    if not isinstance(kind, str) or kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_BUILDERS)}")
    state_dict = model.state_dict()
    assert_finite_state(state_dict, f"model file {path}")
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    config_dict = dataclasses.asdict(config) if is_instance else dict(config)
    payload = {
        "kind": kind,
        "config": plain_data(config_dict, "config"),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "metadata": plain_metadata(metadata),
    }
    return save_checkpoint(path, payload)


def load_model(path: str | os.PathLike[str], map_location: MapLocation = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in eval mode, on the device ``map_location`` names.

    ``map_location`` is passed to ``torch.load``; a ``str`` or ``torch.device`` also moves the rebuilt
    model (its parameters and buffers) to that device. ``None`` leaves the model where the builder puts
    it (the CPU), and so does a dict or a callable: those remap storages only, they name no one device.

    Raises :class:`CheckpointError`, naming ``path``, for an unreadable or foreign file, a missing or
    malformed ``config`` or ``state_dict``, a config the model's builder rejects (the message names the
    key, as ``config.<key>``), weights that do not fit the model, and NaN or infinite weights: a file
    written by :func:`save_model` never holds those, so one that does is not silently used.
    """
    path = Path(path)
    return model_from_payload(load_checkpoint(path, map_location), path, map_location)


def model_from_payload(payload: dict[str, Any], path: Path, map_location: MapLocation = "cpu") -> nn.Module:
    """The model in ``payload``, what :func:`load_checkpoint` read from the model file ``path``: what
    :func:`load_model` does after reading, for a caller that also needs the file's ``metadata`` from
    the same read. Raises as :func:`load_model` does, naming ``path``."""
    kind = payload.get("kind")
    if not isinstance(kind, str) or kind not in MODEL_BUILDERS:
        raise CheckpointError(
            f"{path} holds a model of unknown kind {kind!r}; known: {sorted(MODEL_BUILDERS)}"
        )
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: model file has no {key!r} entry")
        if not isinstance(payload[key], dict):
            raise CheckpointError(
                f"{path}: {key!r} must be a dict, got {type(payload[key]).__name__}: {payload[key]!r:.200}"
            )
    state_dict: dict[Any, Any] = payload["state_dict"]
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise CheckpointError(
                f"{path}: state_dict key {name!r} must be a str (a parameter or buffer name), "
                f"got {type(name).__name__}"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state_dict entry {name!r} must be a tensor, got {type(value).__name__}"
            )
    assert_finite_state(state_dict, f"model file {path}", action="load")
    try:
        model = MODEL_BUILDERS[kind](payload["config"], "config")
    except Exception as err:  # ConfigError from from_dict, or whatever a model's constructor raises
        raise CheckpointError(f"{path}: cannot rebuild the {kind!r} model: {err}") from err
    if isinstance(map_location, str | torch.device):
        model = model.to(torch.device(map_location))
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the weights do not fit the {kind!r} model: {err}") from err
    return model.eval()
