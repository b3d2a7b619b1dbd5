"""The one override path: ``params.yaml`` sections → frozen config dataclasses.

:func:`from_dict` builds a (nested) frozen dataclass from a mapping, and rejects unknown keys and
values of the wrong type with the dotted path of the offending key, so a typo in ``params.yaml``
is an error that says where, never a silently ignored setting.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def load_params(path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """Read a params file; raise :class:`ConfigError` naming the file for a missing or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(params).__name__}")
    return params


def section(params: Mapping[str, Any], dotted: str) -> Any:
    """``section(params, "toy.train")`` → ``params["toy"]["train"]``, with an error naming the key."""
    value: Any = params
    walked = []
    for key in dotted.split("."):
        walked.append(key)
        if not isinstance(value, Mapping) or key not in value:
            raise ConfigError(f"params has no key {'.'.join(walked)!r}")
        value = value[key]
    return value


def from_dict(cls: type[T], values: Mapping[str, Any] | None, where: str = "", *, base: T | None = None) -> T:
    """Build the frozen dataclass ``cls`` from ``values``; missing keys keep their defaults.

    The defaults are ``base``'s values when it is given, else the class's. A nested section given in
    part keeps the *parent's* default for it, not its own class's: ``toy: {train: {steps: 2000}}`` changes
    the 2D recipe's step count and keeps the recipe's learning rate, schedule and EMA, where a fresh
    ``TrainConfig()`` would have swapped in generic ones without a word.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[_join(where, k) for k in unknown]}; valid keys: {sorted(fields)}"
        )
    kwargs = {
        name: _coerce(
            hints[name],
            values[name],
            _join(where, name),
            getattr(base, name) if base is not None else _default(fields[name]),
        )
        for name in values
    }
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)  # type: ignore[type-var]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _default(field: dataclasses.Field[Any]) -> Any:
    """A field's default value (its factory called), or None when it has none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str, default: Any = None) -> Any:
    """Check ``value`` against the type hint, converting lists to tuples and ints to floats.

    A mapping for a dataclass field is applied on top of ``default``, the field's default value, when
    that is an instance of the same class (see :func:`from_dict`).
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, default)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value, where, base=default if type(default) is hint else None)
    if origin in (tuple, list, collections.abc.Sequence) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where} must have {len(args)} entries, got {len(value)}")
            return tuple(
                _coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain nested data (tuples as lists), ready for YAML, JSON or MLflow."""
    return _lists(dataclasses.asdict(config))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for counts: a whole number ≥ ``minimum`` (``--max-test -1`` would drop the last
    image, ``--top-k -2`` would read as 0, ``--repeats 0`` would time nothing)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {value}")
        return value

    return parse
