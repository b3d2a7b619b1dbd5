"""Block Gibbs sampling, annealed Gibbs and ICM for models with discrete, block-conditional variables.

A model whose variables split into blocks that are conditionally independent given the others (an RBM's
visible and hidden layers; the two colours of a checkerboard on a 4-neighbour grid) redraws a whole block at
once from its exact conditional. The model knows its blocks, the sampler only the temperature schedule: a
model offers :class:`BlockConditionals`, and :class:`Gibbs` runs sweeps of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from ebm.energies import EnergyFn, check_energy_output, frozen
from ebm.samplers import SamplerStats


@runtime_checkable
class BlockConditionals(Protocol):
    """A model that can redraw its chain state block by block from p_β(s) ∝ exp(−β E(s)).

    ``gibbs_context(state)`` computes once per chain run whatever stays fixed while the chain moves (the
    unary potentials of a clamped input, for example; ``None`` if nothing does), and
    ``gibbs_sweep(state, context, beta, generator=)`` returns the state after one sweep over every block.
    ``beta = math.inf`` sets every unit to the mode of its conditional instead (ICM).
    """

    def gibbs_context(self, state: Tensor) -> Any: ...

    def gibbs_sweep(
        self, state: Tensor, context: Any, beta: float, *, generator: torch.Generator | None = None
    ) -> Tensor: ...

    def __call__(self, state: Tensor) -> Tensor: ...


def inverse_temperatures(beta_start: float, beta_end: float, n_sweeps: int) -> list[float]:
    """β of each sweep: geometric from ``beta_start`` to ``beta_end`` (all ``inf`` for ICM)."""
    if n_sweeps <= 0:
        return []
    if math.isinf(beta_start):
        return [math.inf] * n_sweeps
    if n_sweeps == 1:
        return [beta_end]
    ratio = beta_end / beta_start
    return [beta_start * ratio ** (t / (n_sweeps - 1)) for t in range(n_sweeps)]


@dataclass(frozen=True)
class Gibbs:
    """Block Gibbs sampling at inverse temperature β, optionally annealed.

    Sweep t redraws every block b of the state s from its exact conditional

        s_b ~ p_{β_t}(s_b | s_{−b}) ∝ exp(−β_t E(s)),

    with β_t geometric from ``beta_start`` to ``beta_end`` over the run. ``beta_start = beta_end = 1``
    samples exp(−E) (every Gibbs move is accepted: it is Metropolis–Hastings with acceptance 1); a schedule
    rising past 1 anneals towards a low-energy state (simulated annealing, Geman & Geman 1984);
    ``beta_start = beta_end = inf`` is iterated conditional modes (Besag 1986): each unit set to its
    conditional mode, a descent to a local minimum of E.

    Attributes:
        beta_start: β of the first sweep (> 0, or ``inf`` with ``beta_end = inf`` for ICM).
        beta_end: β of the last sweep.
        step_size: not used by Gibbs (a Gibbs move has no length). It is here because the
            contrastive-divergence loss can shrink or adapt a gradient sampler's step and reads and writes
            this field; for Gibbs those adjustments change nothing.
    """

    uses_step_size: ClassVar[bool] = False  # the trainer's rollbacks shrink the lr alone

    beta_start: float = 1.0
    beta_end: float = 1.0
    step_size: float = 1.0

    def __post_init__(self) -> None:
        start, end = self.beta_start, self.beta_end
        if math.isinf(start) or math.isinf(end):
            if not (start == math.inf and end == math.inf):
                raise ValueError(f"ICM needs beta_start = beta_end = inf, got ({start}, {end})")
        elif not (start > 0 and end > 0):
            raise ValueError(f"inverse temperatures must be positive, got ({start}, {end})")

    def run(
        self, energy: EnergyFn, x0: Tensor, n_steps: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]:
        """Run ``n_steps`` sweeps from ``x0``; returns the final state and diagnostics.

        ``grad_norm`` is 0 (Gibbs takes no gradient) and ``acceptance_rate`` 1.

        Raises:
            TypeError: ``energy`` cannot be sampled block by block (it lacks :class:`BlockConditionals`).
        """
        if not isinstance(energy, BlockConditionals):
            raise TypeError(
                f"Gibbs sampling needs a model with gibbs_context and gibbs_sweep (an RBM, a grid CRF), "
                f"got {type(energy).__name__}"
            )
        if n_steps < 0:
            raise ValueError(f"n_steps must be ≥ 0, got {n_steps}")
        state = x0.detach().clone()
        with frozen(energy), torch.no_grad():
            context = energy.gibbs_context(state)
            for beta in inverse_temperatures(self.beta_start, self.beta_end, n_steps):
                state = energy.gibbs_sweep(state, context, beta, generator=generator)
            final_energy = check_energy_output(energy(state), state).mean()
        zero = torch.zeros((), device=state.device)
        return state, SamplerStats(grad_norm=zero, acceptance_rate=zero + 1, final_energy=final_energy)


def bernoulli_from_logits(logits: Tensor, beta: float, *, generator: torch.Generator | None) -> Tensor:
    """Draw units with P(1) = σ(β · logits); at β = ∞ take the mode, 1[logits > 0] (ICM)."""
    if math.isinf(beta):
        return (logits > 0).to(logits.dtype)
    probabilities = torch.sigmoid(beta * logits)
    uniform = torch.rand(probabilities.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return (uniform < probabilities).to(logits.dtype)
