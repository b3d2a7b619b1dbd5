"""Test doubles of a contrastive-divergence objective, shared by the trainer and distributed tests."""

from __future__ import annotations

from typing import Any

from ebm.losses import ContrastiveDivergence


class WrappedObjective:
    """A contrastive-divergence objective as the trainer sees it, with ``__call__`` left to a subclass."""

    def __init__(self, inner: ContrastiveDivergence) -> None:
        self.inner = inner

    @property
    def step_size(self) -> float:
        return self.inner.sampler.step_size

    def with_step_size(self, factor: float) -> None:
        self.inner.with_step_size(factor)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
