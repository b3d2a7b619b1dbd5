"""The repository's params files as the stage tests read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def quick_params() -> dict[str, Any]:
    """A fresh copy of ``configs/quick.yaml`` (callers may mutate it)."""
    return yaml.safe_load((REPO / "configs" / "quick.yaml").read_text())


def dotted_keys(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key of a nested mapping as DVC names params: ``images.train.steps``, and each parent too."""
    keys = set()
    for key, value in mapping.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys
