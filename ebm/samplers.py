"""MCMC samplers for energies, and the persistent replay buffer.

A sampler holds hyperparameters only. ``sampler.run(energy, x0, n_steps, generator=g)`` returns the
final chain state and a frozen :class:`SamplerStats`; nothing else changes. The energy's parameters
are frozen while it runs, so sampling never accumulates gradients into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ebm.energies import EnergyFn, energy_and_grad, frozen


@dataclass(frozen=True)
class SamplerStats:
    """Diagnostics of one sampler run (0-dim tensors, so reading them is the caller's host sync).

    Attributes:
        grad_norm: mean over steps and chains of the per-chain ‖∇ₓE‖ before clipping.
        acceptance_rate: fraction of accepted proposals (1 for unadjusted samplers).
        final_energy: mean energy of the returned states.
    """

    grad_norm: Tensor
    acceptance_rate: Tensor
    final_energy: Tensor


class Sampler(Protocol):
    @property
    def step_size(self) -> float: ...

    def run(
        self, energy: EnergyFn, x0: Tensor, n_steps: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]: ...


def _per_chain_norm(grad: Tensor) -> Tensor:
    return grad.flatten(1).norm(dim=1)  # (B,)


def _clip_scale(norm: Tensor, max_norm: float) -> Tensor:
    """Per-chain factors ``min(1, max_norm / ‖g‖)`` that clip gradients of norms ``norm`` (B,)."""
    return (max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)


@dataclass(frozen=True)
class Langevin:
    """Unadjusted Langevin dynamics.

    Each step updates every chain as

        x ← clamp(x − η · clip(∇ₓE(x)) + σ · ξ),   ξ ~ N(0, I),

    with step size ``η = step_size`` and noise scale ``σ = noise_scale``. With the default
    ``noise_scale=None`` the noise is the proper ``σ = √(2η)``, and for small η the chain samples
    p(x) ∝ exp(−E(x)). Practical EBM training often decouples σ from η (e.g. η = 10, σ = 0.005 on
    images, Du & Mordatch 2019, https://arxiv.org/abs/1903.08689); then the chain is an annealed
    optimiser, not a sampler of exp(−E), and the learned energy is scaled accordingly.

    The chains are updated in place, in ``x0``'s memory format (so ``torch.channels_last`` images stay
    so), with ∇ₓE from :func:`~ebm.energies.energy_and_grad` on frozen parameters.

    Attributes:
        step_size: η, the gradient step.
        noise_scale: σ, the standard deviation of the added noise; ``None`` means √(2η).
        grad_clip: clip each chain's gradient to this L2 norm (``None``: no clipping).
        clamp: ``(low, high)`` box the chains are kept in after each step (``None``: unbounded).
        compile: compute ∇ₓE with ``torch.compile`` (see :func:`~ebm.energies.energy_and_grad`); pays
            off only when a run is long enough to amortise the compilation.
        autocast_bf16: on CUDA, evaluate the energy and its gradient under bfloat16 autocast (the
            chains stay in their own dtype); ignored on other devices.
    """

    step_size: float = 0.01
    noise_scale: float | None = None
    grad_clip: float | None = None
    clamp: tuple[float, float] | None = None
    compile: bool = False
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        _check_positive("step_size", self.step_size)
        if self.noise_scale is not None and self.noise_scale < 0:
            raise ValueError(
                f"noise_scale must be ≥ 0 or None (meaning √(2·step_size)), got {self.noise_scale}"
            )
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip)
        _check_box(self.clamp)

    @property
    def sigma(self) -> float:
        return math.sqrt(2 * self.step_size) if self.noise_scale is None else self.noise_scale

    def run(
        self,
        energy: EnergyFn,
        x0: Tensor,
        n_steps: int,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, SamplerStats]:
        """Advance the chains ``x0`` by ``n_steps``; ``noise``, if given, is the pre-drawn ξ of every
        step, shape ``(n_steps, *x0.shape)`` (for exact comparisons; ``generator`` is then unused)."""
        if noise is not None and noise.shape != (n_steps, *x0.shape):
            raise ValueError(
                f"noise must have shape (n_steps, *x0.shape) = {(n_steps, *x0.shape)}, "
                f"got {tuple(noise.shape)}"
            )
        x = x0.detach().clone()  # keeps x0's memory format
        xi = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous: the same ξ as torch.randn
        per_chain_grad_norm_sum = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.autocast_bf16 and x.is_cuda)
        with frozen(energy):
            for step in range(n_steps):
                with autocast:
                    _, grad = energy_and_grad(energy, x, compile=self.compile)
                grad_norm = _per_chain_norm(grad)
                per_chain_grad_norm_sum += grad_norm
                if self.grad_clip is not None:
                    grad = grad * _clip_scale(grad_norm, self.grad_clip).view(-1, *([1] * (grad.ndim - 1)))
                x.add_(grad, alpha=-self.step_size)
                if noise is None:
                    xi.normal_(generator=generator)
                x.add_(xi if noise is None else noise[step], alpha=self.sigma)
                if self.clamp is not None:
                    x.clamp_(*self.clamp)
            final_energy = _mean_energy(energy, x)
        stats = SamplerStats(
            grad_norm=per_chain_grad_norm_sum.mean() / max(n_steps, 1),
            acceptance_rate=torch.ones((), device=x.device),
            final_energy=final_energy,
        )
        return x, stats


@dataclass(frozen=True)
class MALA:
    """Metropolis-adjusted Langevin algorithm (Roberts & Tweedie 1996).

    A Langevin proposal ``y = x − η ∇ₓE(x) + √(2η) ξ`` is accepted per chain with probability

        min(1, exp(E(x) − E(y) + log q(x | y) − log q(y | x))),
        log q(y | x) = −‖y − x + η ∇ₓE(x)‖² / (4η),

    so the chain leaves p(x) ∝ exp(−E(x)) exactly invariant for any step size; η then trades
    acceptance against move length (≈ 0.574 acceptance is optimal in high dimension).

    Attributes:
        step_size: η.
    """

    step_size: float = 0.01

    def __post_init__(self) -> None:
        _check_positive("step_size", self.step_size)

    def run(
        self, energy: EnergyFn, x0: Tensor, n_steps: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]:
        eta = self.step_size
        x = x0.detach().clone()
        accepted = torch.zeros((), device=x.device)
        grad_norm_sum = torch.zeros((), device=x.device)
        with frozen(energy):
            e_x, grad_x = energy_and_grad(energy, x)
            for _ in range(n_steps):
                grad_norm_sum += _per_chain_norm(grad_x).mean()
                y = x - eta * grad_x + math.sqrt(2 * eta) * _randn_like(x, generator)
                e_y, grad_y = energy_and_grad(energy, y)
                log_q_y_given_x = -(y - x + eta * grad_x).flatten(1).square().sum(1) / (4 * eta)
                log_q_x_given_y = -(x - y + eta * grad_y).flatten(1).square().sum(1) / (4 * eta)
                log_alpha = e_x - e_y + log_q_x_given_y - log_q_y_given_x
                uniform = torch.rand(log_alpha.shape, generator=generator, device=x.device, dtype=x.dtype)
                accept = torch.log(uniform) < log_alpha  # (B,); NaN proposals are rejected
                mask = accept.view(-1, *([1] * (x.ndim - 1)))
                x = torch.where(mask, y, x)
                grad_x = torch.where(mask, grad_y, grad_x)
                e_x = torch.where(accept, e_y, e_x)
                accepted += accept.float().mean()
        stats = SamplerStats(
            grad_norm=grad_norm_sum / max(n_steps, 1),
            acceptance_rate=accepted / max(n_steps, 1),
            final_energy=e_x.mean(),
        )
        return x, stats


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _mean_energy(energy: EnergyFn, x: Tensor) -> Tensor:
    with torch.inference_mode():
        mean = energy(x).mean()
    return mean.clone()  # a normal tensor again, usable in autograd-recorded code


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _check_box(box: tuple[float, float] | None) -> None:
    if box is not None and not box[0] < box[1]:
        raise ValueError(f"a box must be (low, high) with low < high, got {box}")


SAMPLERS: dict[str, type[Langevin] | type[MALA]] = {"langevin": Langevin, "mala": MALA}


def make_sampler(name: str, **hyperparameters: Any) -> Sampler:
    """Build a sampler from its config name, e.g. ``make_sampler("mala", step_size=0.05)``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](**hyperparameters)


# --- proposals and the persistent replay buffer ---------------------------------------------------


@dataclass(frozen=True)
class UniformBox:
    """Uniform noise over the box ``[low, high]^event_shape``: where fresh chains start."""

    event_shape: tuple[int, ...]
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        _check_box((self.low, self.high))

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        u = torch.rand((n, *self.event_shape), generator=generator, device=device, dtype=dtype)
        return u.mul_(self.high - self.low).add_(self.low)


class ReplayBuffer:
    """A persistent store of chain states for PCD (Tieleman 2008; Du & Mordatch 2019).

    The buffer is one preallocated tensor of shape ``(capacity, *event_shape)`` on the model's
    device, filled from ``proposal`` at construction. :meth:`sample` draws ``n`` stored states, of
    which a fraction ``reinit_prob`` (in expectation) is replaced by fresh proposal draws;
    :meth:`update` writes the advanced chains back to the same slots.
    """

    def __init__(
        self,
        capacity: int,
        proposal: UniformBox,
        *,
        reinit_prob: float = 0.05,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must lie in [0, 1], got {reinit_prob}")
        self.proposal = proposal
        self.reinit_prob = reinit_prob
        self.states = proposal.sample(capacity, generator=generator, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.states.shape[0]

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(x, slots)``: ``n`` chain states (a copy) and the buffer slots they came from."""
        device = self.states.device
        slots = torch.randint(self.capacity, (n,), generator=generator, device=device)
        x = self.states[slots].clone()
        fresh = torch.rand(n, generator=generator, device=device) < self.reinit_prob
        noise = self.proposal.sample(n, generator=generator, device=device, dtype=x.dtype)
        x = torch.where(fresh.view(-1, *([1] * (x.ndim - 1))), noise, x)
        return x, slots

    def update(self, slots: Tensor, x: Tensor) -> None:
        self.states[slots] = x.detach().to(self.states.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states.clone(), "reinit_prob": self.reinit_prob}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["states"]
        if states.shape[1:] != self.states.shape[1:]:
            raise ValueError(
                f"replay buffer holds states of shape {tuple(self.states.shape[1:])}, "
                f"the saved one {tuple(states.shape[1:])}"
            )
        self.states = states.to(self.states.device, self.states.dtype).clone()
        self.reinit_prob = float(state["reinit_prob"])


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler by name plus its hyperparameters, as ``params.yaml`` gives them.

    ``noise_scale``, ``grad_clip`` and ``clamp`` apply to ``langevin`` only; setting them for
    ``mala`` (which has no such knobs: it must keep exp(−E) invariant) is an error.
    """

    name: str = "langevin"
    step_size: float = 0.01
    noise_scale: float | None = None
    grad_clip: float | None = None
    clamp: tuple[float, float] | None = None

    def build(self) -> Sampler:
        if self.name == "langevin":
            return Langevin(self.step_size, self.noise_scale, self.grad_clip, self.clamp)
        extras = {
            k: v
            for k, v in (
                ("noise_scale", self.noise_scale),
                ("grad_clip", self.grad_clip),
                ("clamp", self.clamp),
            )
            if v is not None
        }
        if extras:
            raise ValueError(f"sampler {self.name!r} takes no {sorted(extras)}")
        return make_sampler(self.name, step_size=self.step_size)
