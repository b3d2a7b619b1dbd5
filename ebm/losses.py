"""Contrastive divergence with Langevin negatives.

The maximum-likelihood gradient of an EBM is

    ∇θ NLL = E_data[∇θ E(x)] − E_model[∇θ E(x)],

and contrastive divergence estimates the second expectation with MCMC samples ("negatives"): from
short chains started at the data (CD-k, Hinton 2002) or from a persistent replay buffer (PCD,
Tieleman 2008). The surrogate loss whose gradient is that estimate, plus the energy regulariser of
Du & Mordatch 2019 (https://arxiv.org/abs/1903.08689), is

    L = mean E(x⁺) − mean E(x⁻) + α · mean(E(x⁺)² + E(x⁻)²).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ebm.energies import EnergyFn, check_energy_output
from ebm.samplers import ReplayBuffer, Sampler, SamplerStats


class NonFiniteLossError(FloatingPointError):
    """A loss or energy became NaN or infinite; ``step`` says at which training step."""

    def __init__(self, step: int | None, what: str) -> None:
        where = f"at step {step}" if step is not None else "outside training"
        super().__init__(f"non-finite {what} {where}")
        self.step = step


@dataclass(frozen=True)
class CDStats:
    """Diagnostics of one contrastive-divergence loss evaluation (0-dim tensors)."""

    loss: Tensor
    energy_pos: Tensor
    energy_neg: Tensor
    gap: Tensor  # E⁺ − E⁻: negative while the model still tells data from its own samples
    regularisation: Tensor
    sampler_grad_norm: Tensor
    acceptance_rate: Tensor

    def as_floats(self) -> dict[str, float]:
        """All fields as Python floats: a host sync, so call it only when logging."""
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


class ContrastiveDivergence:
    """The CD / PCD loss for an energy, with negatives from ``sampler``.

    Args:
        sampler: any sampler with ``run(energy, x0, n_steps, generator=)``.
        n_steps: k, the MCMC steps per loss evaluation.
        alpha: weight of the energy-magnitude regulariser α · (E⁺² + E⁻²).
        offset_weight: weight β of β · m², m = ½(mean E⁺ + mean E⁻). The CD gradient is blind to
            the additive constant of E, which then drifts; this pins it at m = 0. The output bias alone
            can zero m and the CD term never moves that bias, so at the optimum the anchor's gradient
            vanishes and, unlike α, it does not bias the learned density.
        buffer: a :class:`ReplayBuffer` for PCD; ``None`` gives CD-k, chains started at the data.
        target_acceptance: for Metropolis-adjusted samplers, adapt the step size between training
            steps towards this acceptance rate: η ← η · exp(0.05 · (rate − target)), kept within
            [η₀/100, 10 η₀]. As the energy sharpens during training a fixed η stops mixing, stuck
            chains get pushed up without bound and training diverges; the adapted η follows the
            landscape. Each adapted run is still an exact MALA chain. ``None``: fixed η.
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        n_steps: int,
        alpha: float = 0.0,
        offset_weight: float = 0.0,
        buffer: ReplayBuffer | None = None,
        target_acceptance: float | None = None,
    ) -> None:
        if n_steps < 1:
            raise ValueError(f"n_steps must be ≥ 1, got {n_steps}")
        for name, value in (("alpha", alpha), ("offset_weight", offset_weight)):
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
        self.sampler = sampler
        self.n_steps = n_steps
        self.alpha = alpha
        self.offset_weight = offset_weight
        self.buffer = buffer
        if target_acceptance is not None and not 0.0 < target_acceptance < 1.0:
            raise ValueError(f"target_acceptance must lie in (0, 1) or be None, got {target_acceptance}")
        self.target_acceptance = target_acceptance
        self._step_bounds = (sampler.step_size / 100, sampler.step_size * 10)

    def negatives(
        self, energy: EnergyFn, x_pos: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]:
        """Draw one batch of negatives, as many as there are positives.

        Under data parallelism the chains run on the bare module inside the
        :class:`~torch.nn.parallel.DistributedDataParallel` wrapper: they need ∇ₓE on this rank's own
        chains and no parameter gradient, so there is nothing to synchronise, while every forward through
        the wrapper would run its pre-forward: the reducer's bookkeeping for a parameter backward that
        sampling never runs, and a broadcast of the module's buffers, a collective per MCMC step (with
        spectral norm's buffers, 2.3× the time per training step of two CPU ranks). Doing it
        here, the one place every CD-style objective draws its chains, keeps the objective interface at
        one energy argument: the loss's own forward goes through the wrapper, sampling never does.
        """
        if isinstance(energy, DistributedDataParallel):
            energy = energy.module
        if self.buffer is None:
            x_neg, stats = self.sampler.run(energy, x_pos, self.n_steps, generator=generator)
        else:
            x0, slots = self.buffer.sample(x_pos.shape[0], generator=generator)
            x_neg, stats = self.sampler.run(energy, x0, self.n_steps, generator=generator)
            self.buffer.update(slots, x_neg)
        if self.target_acceptance is not None:
            self._adapt_step_size(float(stats.acceptance_rate))
        return x_neg, stats

    def _adapt_step_size(self, acceptance_rate: float) -> None:
        assert self.target_acceptance is not None
        low, high = self._step_bounds
        adapted = self.sampler.step_size * math.exp(0.05 * (acceptance_rate - self.target_acceptance))
        self.sampler = dataclasses.replace(self.sampler, step_size=min(max(adapted, low), high))  # type: ignore[type-var]

    def __call__(
        self,
        energy: EnergyFn,
        x_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, CDStats]:
        x_neg, sampler_stats = self.negatives(energy, x_pos, generator=generator)
        energies = check_energy_output(energy(torch.cat([x_pos, x_neg])), torch.cat([x_pos, x_neg]))
        e_pos, e_neg = energies.split([x_pos.shape[0], x_neg.shape[0]])
        regularisation = self.alpha * (e_pos.square().mean() + e_neg.square().mean())
        if self.offset_weight:
            regularisation = (
                regularisation + self.offset_weight * (0.5 * (e_pos.mean() + e_neg.mean())).square()
            )
        loss = e_pos.mean() - e_neg.mean() + regularisation
        if not torch.isfinite(loss):
            raise NonFiniteLossError(step, "contrastive-divergence loss")
        stats = CDStats(
            loss=loss.detach(),
            energy_pos=e_pos.detach().mean(),
            energy_neg=e_neg.detach().mean(),
            gap=(e_pos.detach().mean() - e_neg.detach().mean()),
            regularisation=regularisation.detach(),
            sampler_grad_norm=sampler_stats.grad_norm,
            acceptance_rate=sampler_stats.acceptance_rate,
        )
        return loss, stats

    def with_step_size(self, factor: float) -> None:
        """Scale the sampler's step size (the divergence guard's remedy)."""
        self.sampler = dataclasses.replace(self.sampler, step_size=self.sampler.step_size * factor)  # type: ignore[type-var]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step_size": float(self.sampler.step_size)}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler = dataclasses.replace(self.sampler, step_size=state["step_size"])  # type: ignore[type-var]
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])


@dataclass(frozen=True)
class CDConfig:
    """Contrastive-divergence settings as ``params.yaml`` gives them.

    Attributes:
        n_steps: MCMC steps per training step (the k of CD-k).
        alpha: energy regularisation weight.
        offset_weight: weight of the anchor on the energy's free additive constant.
        target_acceptance: adapt a Metropolis-adjusted sampler's step size towards this rate.
        persistent: negatives from a replay buffer (PCD) instead of chains started at the data (CD-k).
        buffer_size: replay-buffer capacity.
        reinit_prob: fraction of buffer draws replaced by fresh uniform noise.
    """

    n_steps: int = 10
    alpha: float = 0.0
    offset_weight: float = 0.0
    target_acceptance: float | None = None
    persistent: bool = True
    buffer_size: int = 10000
    reinit_prob: float = 0.05
