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

from ebm.distributed import process_group_context
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
    sampler_steps: Tensor  # the chain length of this step's negatives (see ``max_steps``)

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
            landscape. Each adapted run is still an exact MALA chain. ``None``: fixed η. Only for a
            sampler with ``metropolis_adjusted = True`` (:class:`~ebm.samplers.MALA`); with any other it
            is a ``ValueError``.
        max_steps: let the chain length grow from ``n_steps`` up to this many steps while the chains
            lag behind the energy. As training sharpens the energy, a fixed number of sampler steps per
            visit to a buffer state can stop keeping up: the negatives then sit above the data in energy
            (E⁺ − E⁻ < 0, where short-run chains that keep up sit a little below it) and every update
            pushes them further up, the collapse that ends many PCD runs. The loss keeps an exponential
            average of E⁺ − E⁻ (``lag_decay``); one more step per training step while it is below
            −``lag_threshold``, one fewer (never below ``n_steps``) while it is above +``lag_threshold``.
            ``None``: a fixed ``n_steps``.
        lag_threshold: the dead band of that controller, in energy units.
        lag_decay: decay of the average of E⁺ − E⁻ per training step.
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
        max_steps: int | None = None,
        lag_threshold: float = 0.05,
        lag_decay: float = 0.95,
    ) -> None:
        _check_cd_settings(n_steps, alpha, offset_weight, target_acceptance, max_steps, lag_threshold)
        if not 0.0 <= lag_decay < 1.0:
            raise ValueError(f"lag_decay must lie in [0, 1), got {lag_decay}")
        self.sampler = sampler
        self.n_steps = n_steps
        self.base_steps = n_steps
        self.max_steps = max_steps
        self.lag_threshold = lag_threshold
        self.lag_decay = lag_decay
        self.gap_average = 0.0
        self.alpha = alpha
        self.offset_weight = offset_weight
        self.buffer = buffer
        if target_acceptance is not None and not getattr(sampler, "metropolis_adjusted", False):
            # An unadjusted sampler accepts every move: the rate would read 1 forever and η grow to 10 η₀.
            raise ValueError(
                f"target_acceptance needs a Metropolis-adjusted sampler (mala), whose acceptance rate it "
                f"steers; {type(sampler).__name__} accepts every move. Use mala, or set "
                "target_acceptance to null"
            )
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

    def _adapt_n_steps(self, gap: Tensor, *, finite: bool) -> None:
        """The chain-length controller of ``max_steps`` (a host sync: one float per training step).

        In a data-parallel run every rank averages the ranks' gaps (one all-reduce of two numbers), so
        all ranks keep the same average and run chains of the same length, as one process would. Every
        rank runs that all-reduce whether or not its own loss is ``finite``, and before a rank with a
        non-finite loss raises: a rank that skipped it would meet the others in the trainer's
        divergence vote, a different collective, and the process group would abort. If the loss is
        non-finite on any rank, the step is thrown away (rolled back) and the average is left as it was.
        """
        assert self.max_steps is not None
        means = process_group_context().mean(
            {"gap": float(gap) if finite else 0.0, "non_finite": 0.0 if finite else 1.0}
        )
        if means["non_finite"] > 0:
            return
        self.gap_average = self.lag_decay * self.gap_average + (1.0 - self.lag_decay) * means["gap"]
        if self.gap_average < -self.lag_threshold:
            self.n_steps = min(self.n_steps + 1, self.max_steps)
        elif self.gap_average > self.lag_threshold:
            self.n_steps = max(self.n_steps - 1, self.base_steps)

    def __call__(
        self,
        energy: EnergyFn,
        x_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, CDStats]:
        n_steps = self.n_steps
        x_neg, sampler_stats = self.negatives(energy, x_pos, generator=generator)
        energies = check_energy_output(energy(torch.cat([x_pos, x_neg])), torch.cat([x_pos, x_neg]))
        e_pos, e_neg = energies.split([x_pos.shape[0], x_neg.shape[0]])
        regularisation = self.alpha * (e_pos.square().mean() + e_neg.square().mean())
        if self.offset_weight:
            regularisation = (
                regularisation + self.offset_weight * (0.5 * (e_pos.mean() + e_neg.mean())).square()
            )
        loss = e_pos.mean() - e_neg.mean() + regularisation
        finite = bool(torch.isfinite(loss))
        if self.max_steps is not None:  # before the raise below: every rank runs its all-reduce
            self._adapt_n_steps(e_pos.detach().mean() - e_neg.detach().mean(), finite=finite)
        if not finite:
            raise NonFiniteLossError(step, "contrastive-divergence loss")
        stats = CDStats(
            loss=loss.detach(),
            energy_pos=e_pos.detach().mean(),
            energy_neg=e_neg.detach().mean(),
            gap=(e_pos.detach().mean() - e_neg.detach().mean()),
            regularisation=regularisation.detach(),
            sampler_grad_norm=sampler_stats.grad_norm,
            acceptance_rate=sampler_stats.acceptance_rate,
            sampler_steps=torch.tensor(float(n_steps)),
        )
        return loss, stats

    def with_step_size(self, factor: float) -> None:
        """Scale the sampler's step size (the divergence guard's remedy)."""
        self.sampler = dataclasses.replace(self.sampler, step_size=self.sampler.step_size * factor)  # type: ignore[type-var]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step_size": float(self.sampler.step_size),
            "n_steps": self.n_steps,
            "gap_average": self.gap_average,
        }
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler = dataclasses.replace(self.sampler, step_size=state["step_size"])  # type: ignore[type-var]
        self.n_steps = int(state.get("n_steps", self.base_steps))
        self.gap_average = float(state.get("gap_average", 0.0))
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])


def _check_cd_settings(
    n_steps: int,
    alpha: float,
    offset_weight: float,
    target_acceptance: float | None,
    max_steps: int | None,
    lag_threshold: float,
) -> None:
    """The checks :class:`ContrastiveDivergence` and :class:`CDConfig` share (``ValueError`` by name)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be ≥ 1, got {n_steps}")
    if max_steps is not None and max_steps < n_steps:
        raise ValueError(f"max_steps must be ≥ n_steps ({n_steps}) or None, got {max_steps}")
    if not (lag_threshold >= 0 and math.isfinite(lag_threshold)):
        raise ValueError(f"lag_threshold must be a finite number ≥ 0, got {lag_threshold}")
    for name, value in (("alpha", alpha), ("offset_weight", offset_weight)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    if target_acceptance is not None and not 0.0 < target_acceptance < 1.0:
        raise ValueError(f"target_acceptance must lie in (0, 1) or be None, got {target_acceptance}")


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
        reinit_prob: fraction of buffer draws replaced by fresh draws from the buffer's proposal (uniform
            noise over the box, or the class Gaussians of the image recipe's ``buffer_init``).
        max_steps: let the chain length grow up to this while the chains lag (see
            :class:`ContrastiveDivergence`); ``None``: fixed ``n_steps``.
        lag_threshold: dead band of that controller on the average E⁺ − E⁻, in energy units.
    """

    n_steps: int = 10
    alpha: float = 0.0
    offset_weight: float = 0.0
    target_acceptance: float | None = None
    persistent: bool = True
    buffer_size: int = 10000
    reinit_prob: float = 0.05
    max_steps: int | None = None
    lag_threshold: float = 0.05

    def __post_init__(self) -> None:
        _check_cd_settings(
            self.n_steps,
            self.alpha,
            self.offset_weight,
            self.target_acceptance,
            self.max_steps,
            self.lag_threshold,
        )
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be ≥ 1, got {self.buffer_size}")
        if not 0.0 <= self.reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must lie in [0, 1], got {self.reinit_prob}")

    def build(self, sampler: Sampler, *, buffer: ReplayBuffer | None = None) -> ContrastiveDivergence:
        """The loss these settings describe, negatives from ``sampler`` and ``buffer`` (``None``: CD-k)."""
        return ContrastiveDivergence(
            sampler,
            n_steps=self.n_steps,
            alpha=self.alpha,
            offset_weight=self.offset_weight,
            buffer=buffer,
            target_acceptance=self.target_acceptance,
            max_steps=self.max_steps,
            lag_threshold=self.lag_threshold,
        )
