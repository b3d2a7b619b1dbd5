"""MCMC samplers for energies, and the persistent replay buffer.

A sampler holds hyperparameters only. ``sampler.run(energy, x0, n_steps, generator=g)`` returns the
final chain state and a frozen :class:`SamplerStats`; nothing else changes. The energy's parameters
are frozen while it runs, so sampling never accumulates gradients into them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

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
        jump_acceptance_rate: fraction of accepted independence moves (``None`` when there were none).
    """

    grad_norm: Tensor
    acceptance_rate: Tensor
    final_energy: Tensor
    jump_acceptance_rate: Tensor | None = None


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

    # Every move is accepted: no acceptance rate to steer a step size by (``target_acceptance``).
    metropolis_adjusted: ClassVar[bool] = False

    step_size: float = 0.01
    noise_scale: float | None = None
    grad_clip: float | None = None
    clamp: tuple[float, float] | None = None
    compile: bool = False
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        _check_positive("step_size", self.step_size)
        if self.noise_scale is not None and not (self.noise_scale >= 0 and math.isfinite(self.noise_scale)):
            raise ValueError(
                f"noise_scale must be a finite number ≥ 0 or None (meaning √(2·step_size)), "
                f"got {self.noise_scale}"
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


class JumpProposal(Protocol):
    """An independence proposal for :class:`MALA`'s mode-jumping moves: draws, and their exact density."""

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class MALA:
    """Metropolis-adjusted Langevin algorithm (Roberts & Tweedie 1996).

    A Langevin proposal ``y = x − η ∇ₓE(x) + √(2η) ξ`` is accepted per chain with probability

        min(1, exp(E(x) − E(y) + log q(x | y) − log q(y | x))),
        log q(y | x) = −‖y − x + η ∇ₓE(x)‖² / (4η),

    so the chain leaves p(x) ∝ exp(−E(x)) exactly invariant for any step size; η then trades
    acceptance against move length (≈ 0.574 acceptance is optimal in high dimension).

    Langevin moves are local: a chain crosses a low-density region between two modes only by a rare
    run of uphill steps, so chains keep whatever split between modes they started with, and a PCD
    model trained on them puts the wrong mass on each mode. With ``jump`` set, every ``jump_every``
    steps each chain also tries an independence Metropolis–Hastings move: ``y ~ q`` is accepted with
    probability ``min(1, exp(E(x) − E(y) + log q(x) − log q(y)))``. That kernel leaves exp(−E)
    invariant for any proposal q, so the chain stays exact; a q that overlaps the model's modes (a
    kernel density of the training data, :class:`KernelProposal`, or that density tabulated on a
    grid, :class:`GridProposal`) makes the jumps between them likely.

    Attributes:
        step_size: η.
        jump: the independence proposal, or ``None`` for plain MALA.
        jump_every: steps between independence moves (the first comes before the first MALA step).
    """

    metropolis_adjusted: ClassVar[bool] = True

    step_size: float = 0.01
    jump: JumpProposal | None = None
    jump_every: int = 10

    def __post_init__(self) -> None:
        _check_positive("step_size", self.step_size)
        if self.jump_every < 1:
            raise ValueError(f"jump_every must be ≥ 1, got {self.jump_every}")

    def run(
        self, energy: EnergyFn, x0: Tensor, n_steps: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]:
        eta = self.step_size
        x = x0.detach().clone()
        accepted = torch.zeros((), device=x.device)
        jumps_accepted = torch.zeros((), device=x.device)
        n_jumps = 0
        grad_norm_sum = torch.zeros((), device=x.device)
        with frozen(energy):
            e_x, grad_x = energy_and_grad(energy, x)
            for step in range(n_steps):
                if self.jump is not None and step % self.jump_every == 0:
                    x, e_x, grad_x, rate = self._jump(self.jump, energy, x, e_x, grad_x, generator)
                    jumps_accepted += rate
                    n_jumps += 1
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
            jump_acceptance_rate=jumps_accepted / n_jumps if n_jumps else None,
        )
        return x, stats

    @staticmethod
    def _jump(
        proposal: JumpProposal,
        energy: EnergyFn,
        x: Tensor,
        e_x: Tensor,
        grad_x: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One independence Metropolis–Hastings move of every chain; returns the new state and rate."""
        y = proposal.sample(x.shape[0], generator=generator).to(x.dtype)
        e_y, grad_y = energy_and_grad(energy, y)
        log_alpha = e_x - e_y + proposal.log_prob(x) - proposal.log_prob(y)
        uniform = torch.rand(log_alpha.shape, generator=generator, device=x.device, dtype=x.dtype)
        accept = torch.log(uniform) < log_alpha
        mask = accept.view(-1, *([1] * (x.ndim - 1)))
        return (
            torch.where(mask, y, x),
            torch.where(accept, e_y, e_x),
            torch.where(mask, grad_y, grad_x),
            accept.float().mean(),
        )


class KernelProposal:
    """A Gaussian kernel density over ``centres`` mixed with uniform noise over a box.

    ``q(x) = (1 − w) · (1/M) Σₘ N(x; cₘ, h² I) + w · U(x; box)``: an independence proposal for
    :class:`MALA`'s mode-jumping moves. Built from training data it proposes where the data's modes
    are, in the data's proportions; the uniform part (weight ``w``) keeps q positive over the whole box,
    so the chains can also reach, and the loss then push up, spurious modes far from any data.

    Args:
        centres: ``(M, *event)`` kernel centres (e.g. a subset of the training set).
        bandwidth: the kernel's standard deviation h.
        box: ``(low, high)`` of the uniform component, per coordinate.
        uniform_weight: w in [0, 1).
    """

    def __init__(
        self, centres: Tensor, bandwidth: float, box: tuple[float, float], *, uniform_weight: float = 0.1
    ) -> None:
        if centres.ndim < 2 or centres.shape[0] < 1:
            raise ValueError(f"centres must have shape (M, *event) with M ≥ 1, got {tuple(centres.shape)}")
        if not bool(torch.isfinite(centres).all()):
            raise ValueError("centres contain NaN or infinite values")
        _check_positive("bandwidth", bandwidth)
        _check_box(box)
        if not 0.0 <= uniform_weight < 1.0:
            raise ValueError(f"uniform_weight must lie in [0, 1), got {uniform_weight}")
        self.centres = centres.detach()
        self.bandwidth = float(bandwidth)
        self.box = box
        self.uniform_weight = float(uniform_weight)
        self._uniform = UniformBox(tuple(centres.shape[1:]), *box)
        dim = centres[0].numel()
        self._log_uniform = -dim * math.log(box[1] - box[0])
        self._log_kernel_norm = -0.5 * dim * math.log(2 * math.pi * self.bandwidth**2)
        self._kernel_terms: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_data(
        cls,
        x: Tensor,
        box: tuple[float, float],
        *,
        max_centres: int = 2048,
        uniform_weight: float = 0.1,
        bandwidth: float | None = None,
        generator: torch.Generator | None = None,
    ) -> KernelProposal:
        """Centres: up to ``max_centres`` rows of ``x`` drawn without replacement; ``bandwidth``
        ``None`` means Scott's rule, h = σ̄ · M^(−1/(d+4)) with σ̄ the mean per-coordinate std."""
        if x.shape[0] > max_centres:
            x = x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:max_centres]]
        if bandwidth is None:
            if x.shape[0] < 2:
                raise ValueError("Scott's bandwidth needs at least 2 centres; give bandwidth explicitly")
            dim = x[0].numel()
            bandwidth = float(x.flatten(1).std(0).mean()) * x.shape[0] ** (-1.0 / (dim + 4))
        return cls(x, bandwidth, box, uniform_weight=uniform_weight)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        device, dtype = self.centres.device, self.centres.dtype
        picks = torch.randint(self.centres.shape[0], (n,), generator=generator, device=device)
        kernel = self.centres[picks] + self.bandwidth * torch.randn(
            (n, *self.centres.shape[1:]), generator=generator, device=device, dtype=dtype
        )
        uniform = self._uniform.sample(n, generator=generator, device=device, dtype=dtype)
        use_uniform = torch.rand(n, generator=generator, device=device) < self.uniform_weight
        return torch.where(use_uniform.view(-1, *([1] * (kernel.ndim - 1))), uniform, kernel)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)`` per row, shape ``(B,)``."""
        flat = x.flatten(1)
        # −‖x − c‖²/2h² = x·c/h² − ‖c‖²/2h² − ‖x‖²/2h²: one (B, M) GEMM with the bias folded in, the
        # row's own ‖x‖² term outside the logsumexp (a third of the time of cdist, square and divide,
        # the mode-jumping moves' main cost in 2D).
        if flat.dtype not in self._kernel_terms:
            centres = self.centres.flatten(1).to(flat.dtype)
            self._kernel_terms[flat.dtype] = (
                centres.square().sum(1).div_(-2 * self.bandwidth**2),  # (M,)
                (centres / self.bandwidth**2).T.contiguous(),  # (D, M)
            )
        bias, centres_over_h2 = self._kernel_terms[flat.dtype]
        cross = torch.addmm(bias, flat, centres_over_h2)
        log_kernel = (
            torch.logsumexp(cross, dim=1)
            - flat.square().sum(1) / (2 * self.bandwidth**2)
            - math.log(self.centres.shape[0])
            + self._log_kernel_norm
        )
        low, high = self.box
        inside = ((x >= low) & (x <= high)).flatten(1).all(1)
        log_uniform = torch.where(
            inside, torch.full_like(log_kernel, self._log_uniform), torch.full_like(log_kernel, -math.inf)
        )
        if self.uniform_weight == 0.0:
            return log_kernel
        return torch.logaddexp(
            log_kernel + math.log1p(-self.uniform_weight), log_uniform + math.log(self.uniform_weight)
        )


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _mean_energy(energy: EnergyFn, x: Tensor) -> Tensor:
    with torch.inference_mode():
        mean = energy(x).mean()
    return mean.clone()  # a normal tensor again, usable in autograd-recorded code


class GridProposal:
    """A piecewise-constant density on a regular grid over a box, mixed with uniform noise over the box.

    ``q(x) = (1 − w) · pₖ / v + w / V`` for ``x`` in cell ``k`` (cell probability ``pₖ``, cell volume
    ``v``, box volume ``V``) and 0 outside the box: an independence proposal for :class:`MALA`'s
    mode-jumping moves whose density costs one table lookup per chain. Build it from data (a
    histogram) or by tabulating another proposal's density at the cells' centres: a
    :class:`KernelProposal` tabulated this way keeps its shape and stops costing a sum over its
    centres at every move (the 2D recipe trains 1.7× faster). ``bins`` cells per coordinate make
    ``bins``^D cells, so it is for low dimensions.

    Args:
        weights: non-negative cell weights, shape ``(bins,) * D`` with D the event's number of
            elements, not all zero (normalised here).
        box: ``(low, high)`` per coordinate, the cells' and the uniform part's extent.
        event_shape: the shape of one draw (default ``(D,)``).
        uniform_weight: w in [0, 1).
    """

    MAX_CELLS = 1 << 22  # 4M cells: 32 MiB of float64 log-densities

    def __init__(
        self,
        weights: Tensor,
        box: tuple[float, float],
        *,
        event_shape: tuple[int, ...] | None = None,
        uniform_weight: float = 0.1,
    ) -> None:
        _check_box(box)
        if weights.ndim < 1 or len(set(weights.shape)) != 1:
            raise ValueError(f"weights must have shape (bins,) * D, got {tuple(weights.shape)}")
        _check_cells(weights.shape[0], weights.ndim)
        total = weights.double().sum()
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool(total > 0):
            raise ValueError("weights must be finite and non-negative, and not all zero")
        if not 0.0 <= uniform_weight < 1.0:
            raise ValueError(f"uniform_weight must lie in [0, 1), got {uniform_weight}")
        dim, bins = weights.ndim, weights.shape[0]
        self.event_shape = event_shape if event_shape is not None else (dim,)
        if math.prod(self.event_shape) != dim:
            raise ValueError(f"event_shape {self.event_shape} does not have the weights' {dim} dimensions")
        self.bins, self.box, self.uniform_weight = bins, box, float(uniform_weight)
        self.width = (box[1] - box[0]) / bins
        self.cell_probs = weights.flatten().double() / total
        self._strides = _grid_strides(bins, dim, weights.device)
        self._uniform = UniformBox(self.event_shape, *box)
        box_volume = (box[1] - box[0]) ** dim
        density = (
            1 - self.uniform_weight
        ) * self.cell_probs / self.width**dim + self.uniform_weight / box_volume
        self._log_density = density.log()  # float64; −inf for empty cells when w = 0
        self._tables: dict[torch.dtype, Tensor] = {}

    @classmethod
    def from_data(
        cls, x: Tensor, box: tuple[float, float], *, bins: int = 64, uniform_weight: float = 0.1
    ) -> GridProposal:
        """The histogram of the rows of ``x`` (``(N, *event)``); rows outside the box count in the
        nearest edge cell."""
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (N, *event) with N ≥ 1, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        _check_box(box)
        dim = x[0].numel()
        _check_cells(bins, dim)
        cells = _cell_index(x.flatten(1), box, bins)
        counts = torch.bincount((cells * _grid_strides(bins, dim, x.device)).sum(1), minlength=bins**dim)
        return cls(
            counts.view((bins,) * dim), box, event_shape=tuple(x.shape[1:]), uniform_weight=uniform_weight
        )

    @classmethod
    def from_density(
        cls,
        log_prob: Callable[[Tensor], Tensor],
        box: tuple[float, float],
        *,
        bins: int,
        event_shape: tuple[int, ...],
        uniform_weight: float = 0.0,
        device: torch.device | str = "cpu",
    ) -> GridProposal:
        """``log_prob`` (e.g. a :class:`KernelProposal`'s) tabulated at the cells' centres, in float64.

        A proposal that already mixes in uniform noise keeps it; ``uniform_weight`` adds more."""
        _check_box(box)
        dim = math.prod(event_shape)
        _check_cells(bins, dim)
        width = (box[1] - box[0]) / bins
        axis = box[0] + (torch.arange(bins, dtype=torch.float64, device=device) + 0.5) * width
        centres = torch.cartesian_prod(*[axis] * dim).view(-1, dim) if dim > 1 else axis[:, None]
        log_weights = torch.cat(
            [log_prob(chunk.view(-1, *event_shape)).double() for chunk in centres.split(4096)]
        )
        if not bool((log_weights < math.inf).all()) or bool(torch.isnan(log_weights).any()):
            raise ValueError("log_prob returned NaN or +inf at a cell centre")
        if not bool(log_weights.max() > -math.inf):
            raise ValueError("log_prob is −inf at every cell centre: the density has no mass in the box")
        weights = (log_weights - log_weights.max()).exp()
        return cls(weights.view((bins,) * dim), box, event_shape=event_shape, uniform_weight=uniform_weight)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        device, dim = self.cell_probs.device, len(self._strides)
        picks = torch.multinomial(self.cell_probs, n, replacement=True, generator=generator)
        corners = (picks[:, None] // self._strides) % self.bins  # (n, D) cell coordinates
        offsets = torch.rand((n, dim), generator=generator, device=device)
        drawn = (self.box[0] + (corners + offsets) * self.width).view(n, *self.event_shape)
        uniform = self._uniform.sample(n, generator=generator, device=device)
        use_uniform = torch.rand(n, generator=generator, device=device) < self.uniform_weight
        return torch.where(use_uniform.view(-1, *([1] * len(self.event_shape))), uniform, drawn)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)`` per row, shape ``(B,)``: −inf outside the box."""
        flat = x.flatten(1)
        if flat.dtype not in self._tables:
            self._tables[flat.dtype] = self._log_density.to(flat.dtype)
        log_q = self._tables[flat.dtype][(_cell_index(flat, self.box, self.bins) * self._strides).sum(1)]
        inside = ((flat >= self.box[0]) & (flat <= self.box[1])).all(1)
        return torch.where(inside, log_q, torch.full_like(log_q, -math.inf))


def _grid_strides(bins: int, dim: int, device: torch.device | str) -> Tensor:
    """Row-major strides of a ``(bins,) * dim`` grid: cell coordinates @ strides = flat cell index."""
    return torch.tensor([bins ** (dim - 1 - d) for d in range(dim)], device=device)


def _cell_index(flat: Tensor, box: tuple[float, float], bins: int) -> Tensor:
    """The (B, D) integer cell coordinates of ``flat``, clamped into the grid (the upper edge belongs
    to the last cell)."""
    return ((flat - box[0]) / ((box[1] - box[0]) / bins)).floor().long().clamp_(0, bins - 1)


def _check_cells(bins: int, dim: int) -> None:
    if bins < 1 or bins**dim > GridProposal.MAX_CELLS:
        raise ValueError(
            f"bins must be ≥ 1 with bins^D ≤ {GridProposal.MAX_CELLS} cells, got {bins} bins in {dim}"
            " dimensions (use KernelProposal in more dimensions)"
        )


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _check_box(box: tuple[float, float] | None) -> None:
    """A box is finite (a uniform draw from an infinite one is NaN) with low < high."""
    if box is not None and not (box[0] < box[1] and math.isfinite(box[0]) and math.isfinite(box[1])):
        raise ValueError(f"a box must be (low, high) with finite low < high, got {box}")


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


class GaussianMixtureProposal:
    """Fresh chains from Gaussians fitted to the data: one per class, full covariance, clamped to a box.

    JEM++'s "informative initialisation" (Yang & Ji 2021, https://arxiv.org/abs/2109.09032): chains that
    start from the data's per-class mean and covariance begin with the right brightness, size and
    rough shape, so a few Langevin steps reach recognisable samples that uniform noise needs hundreds
    for. The Gaussians know nothing a model could not be asked to beat: they are blurry, and the
    energy learns to rank them above sharp data.

    Args:
        means: ``(K, *event_shape)`` component means.
        scale_trils: ``(K, D, D)`` lower Cholesky factors of the covariances, ``D`` = prod(event_shape).
        weights: ``(K,)`` mixture weights (non-negative, normalised here).
        low, high: the box each draw is clamped to.
        uniform_weight: the share of draws that are uniform noise on the box instead. Chains only ever
            start near the data otherwise, and nothing would teach the energy that noise is unlikely.
    """

    def __init__(
        self,
        means: Tensor,
        scale_trils: Tensor,
        weights: Tensor,
        *,
        low: float = 0.0,
        high: float = 1.0,
        uniform_weight: float = 0.0,
    ) -> None:
        _check_box((low, high))
        if not 0.0 <= uniform_weight <= 1.0:
            raise ValueError(f"uniform_weight must lie in [0, 1], got {uniform_weight}")
        self.uniform_weight = uniform_weight
        n_components, n_dims = means.shape[0], int(means[0].numel())
        if scale_trils.shape != (n_components, n_dims, n_dims) or weights.shape != (n_components,):
            raise ValueError(
                f"{n_components} means of {n_dims} dims need scale_trils of shape "
                f"{(n_components, n_dims, n_dims)} and weights of shape {(n_components,)}; got "
                f"{tuple(scale_trils.shape)} and {tuple(weights.shape)}"
            )
        if not (weights >= 0).all() or float(weights.sum()) <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.event_shape = tuple(means.shape[1:])
        self.means = means.reshape(n_components, n_dims).float()
        self.scale_trils = scale_trils.float()
        self.weights = (weights / weights.sum()).float()
        self.low, self.high = low, high

    @classmethod
    def fit(
        cls,
        x: Tensor,
        labels: Tensor | None = None,
        *,
        low: float = 0.0,
        high: float = 1.0,
        jitter: float = 1e-4,
        uniform_weight: float = 0.0,
    ) -> GaussianMixtureProposal:
        """Per-class (or, without ``labels``, one) Gaussian of float ``x`` ``(N, *event_shape)``.

        ``jitter`` is added to each covariance's diagonal: pixels that never vary (an image border)
        have zero variance, and the Cholesky factor needs a positive definite matrix.
        """
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"need at least two samples of shape (N, *event_shape), got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1).double()
        classes = [None] if labels is None else labels.unique(sorted=True).tolist()
        groups = [flat] if labels is None else [flat[labels == k] for k in classes]
        few = {k: group.shape[0] for k, group in zip(classes, groups, strict=True) if group.shape[0] < 2}
        if few:
            counts = ", ".join(f"class {k}: {n}" for k, n in few.items())
            raise ValueError(f"every class needs at least two samples to fit its covariance ({counts})")
        means, trils = [], []
        eye = torch.eye(flat.shape[1], dtype=torch.float64)
        for group in groups:
            means.append(group.mean(0))
            trils.append(torch.linalg.cholesky(torch.cov(group.T) + jitter * eye))
        weights = torch.tensor([float(group.shape[0]) for group in groups])
        mean_shape = (len(groups), *x.shape[1:])
        return cls(
            torch.stack(means).reshape(mean_shape),
            torch.stack(trils),
            weights,
            low=low,
            high=high,
            uniform_weight=uniform_weight,
        )

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        device = torch.device(device)
        if self.means.device != device:
            self.means, self.scale_trils, self.weights = (
                t.to(device) for t in (self.means, self.scale_trils, self.weights)
            )
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.means.shape[1]), generator=generator, device=device)
        x = torch.empty_like(z)
        for k in range(self.means.shape[0]):  # one GEMM per component, never a (n, D, D) gather
            rows = (component == k).nonzero().squeeze(1)
            x[rows] = self.means[k] + z[rows] @ self.scale_trils[k].T
        x.clamp_(self.low, self.high)
        if self.uniform_weight > 0:
            noise = UniformBox(tuple(x.shape[1:]), self.low, self.high).sample(
                n, generator=generator, device=device
            )
            from_noise = torch.rand((n, 1), generator=generator, device=device) < self.uniform_weight
            x = torch.where(from_noise, noise, x)
        return x.reshape(n, *self.event_shape).to(dtype)


Proposal = UniformBox | GaussianMixtureProposal


def _require_generator_on(generator: torch.Generator | None, device: torch.device, where: str) -> None:
    """Torch draws on a device only with a generator of that device type; say so in our words."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"{where}: the generator is on {generator.device.type} but the states are on {device}; "
            f"seed a generator there, torch.Generator({device.type!r}).manual_seed(seed)"
        )


class ReplayBuffer:
    """A persistent store of chain states for PCD (Tieleman 2008; Du & Mordatch 2019).

    The buffer is one preallocated tensor of shape ``(capacity, *event_shape)`` on the model's
    device, filled from ``proposal`` at construction. :meth:`sample` draws ``n`` stored states, of
    which a fraction ``reinit_prob`` (in expectation) is replaced by fresh proposal draws;
    :meth:`update` writes the advanced chains back to the same slots.

    The slots are drawn with replacement by default, as in Du & Mordatch's buffer: for a buffer much
    larger than the batch, repeats are rare. With ``replacement=False`` they are distinct, so that a
    batch as large as the buffer advances every chain once (Tieleman's PCD, where the chains *are* the
    batch); drawn with replacement, ~37 % of such a batch would be repeats and a third of the chains
    would stand still each step.
    """

    def __init__(
        self,
        capacity: int,
        proposal: Proposal,
        *,
        reinit_prob: float = 0.05,
        replacement: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must lie in [0, 1], got {reinit_prob}")
        _require_generator_on(generator, torch.device(device), "ReplayBuffer")
        self.proposal = proposal
        self.reinit_prob = reinit_prob
        self.replacement = replacement
        self.states = proposal.sample(capacity, generator=generator, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.states.shape[0]

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(x, slots)``: ``n`` chain states (a copy) and the buffer slots they came from.

        Raises:
            ValueError: the slots are to be distinct (``replacement=False``) and ``n`` exceeds the capacity.
        """
        device = self.states.device
        _require_generator_on(generator, device, "ReplayBuffer.sample")
        if self.replacement:
            slots = torch.randint(self.capacity, (n,), generator=generator, device=device)
        elif n > self.capacity:
            raise ValueError(
                f"cannot draw {n} distinct chains from a replay buffer of {self.capacity}: make the "
                f"buffer at least as large as the batch"
            )
        else:
            slots = torch.randperm(self.capacity, generator=generator, device=device)[:n]
        x = self.states[slots].clone()
        fresh = torch.rand(n, generator=generator, device=device) < self.reinit_prob
        noise = self.proposal.sample(n, generator=generator, device=device, dtype=x.dtype)
        x = torch.where(fresh.view(-1, *([1] * (x.ndim - 1))), noise, x)
        return x, slots

    def update(self, slots: Tensor, x: Tensor) -> None:
        """Write chains ``x`` back to their ``slots``; a slot drawn more than once keeps its last chain.

        An indexed write with repeated indices leaves which row wins to the threads (torch promises
        nothing there), and on two threads a slot could end up holding pixels of two chains, so seeded
        training did not repeat. The repeats are dropped first, keeping each slot's last occurrence.
        """
        x = x.detach().to(self.states.dtype)
        if slots.numel() > 1:
            order = torch.arange(slots.numel(), device=slots.device)
            last = torch.full((self.capacity,), -1, dtype=order.dtype, device=slots.device)
            last.scatter_reduce_(0, slots, order, reduce="amax")  # max: the same whatever the thread order
            keep = last[slots] == order
            if not bool(keep.all()):
                slots, x = slots[keep], x[keep]
        self.states[slots] = x

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


_DEFAULT_JUMP_UNIFORM_WEIGHT = 0.1


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler by name plus its hyperparameters, as ``params.yaml`` gives them.

    ``noise_scale``, ``grad_clip`` and ``clamp`` apply to ``langevin`` only; setting them for
    ``mala`` (which has no such knobs: it must keep exp(−E) invariant) is an error. ``jump_every``
    (``mala`` only) turns on mode-jumping moves from a :class:`KernelProposal` of the training data,
    mixed with uniform noise over the data box at weight ``jump_uniform_weight``. ``jump_grid_bins``
    tabulates that proposal on a grid of this many cells per coordinate (:class:`GridProposal`, for
    low dimensions): the same shape, and a table lookup instead of a sum over the kernel's centres
    at every move. ``jump_uniform_weight`` and ``jump_grid_bins`` without ``jump_every`` are an error,
    as are ``jump_every`` with ``langevin``, ``mala`` with ``noise_scale``, ``grad_clip`` or ``clamp``,
    and a ``name`` not in :data:`SAMPLERS`: all are found when the config is made (a params file fails
    as it is read), not when the sampler is built.
    """

    name: str = "langevin"
    step_size: float = 0.01
    noise_scale: float | None = None
    grad_clip: float | None = None
    clamp: tuple[float, float] | None = None
    jump_every: int | None = None
    jump_uniform_weight: float = _DEFAULT_JUMP_UNIFORM_WEIGHT
    jump_grid_bins: int | None = None

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler name {self.name!r}; choose one of {sorted(SAMPLERS)}")
        # the samplers' own checks (step size, noise, clipping, box) now, not when training starts
        if self.name == "langevin":
            Langevin(self.step_size, self.noise_scale, self.grad_clip, self.clamp)
        else:
            _check_positive("step_size", self.step_size)
        if self.jump_grid_bins is not None and self.jump_grid_bins < 1:
            raise ValueError(f"jump_grid_bins must be ≥ 1 or null, got {self.jump_grid_bins}")
        if self.jump_every is not None and self.jump_every < 1:
            raise ValueError(f"jump_every must be ≥ 1 or null (no jumps), got {self.jump_every}")
        if not 0.0 <= self.jump_uniform_weight < 1.0:
            raise ValueError(f"jump_uniform_weight must lie in [0, 1), got {self.jump_uniform_weight}")
        if self.name != "langevin":
            extras = [
                name
                for name, value in (
                    ("noise_scale", self.noise_scale),
                    ("grad_clip", self.grad_clip),
                    ("clamp", self.clamp),
                )
                if value is not None
            ]
            if extras:
                raise ValueError(
                    f"sampler {self.name!r} takes no {extras} (langevin's knobs: MALA keeps exp(−E) "
                    "invariant only unclipped and unclamped, with noise √(2·step_size)); leave them out"
                )
        if self.name == "langevin" and self.jump_every is not None:
            raise ValueError(
                "jump_every needs the Metropolis-adjusted sampler (name: mala): a mode jump is a Metropolis "
                "move, which plain Langevin has no accept step for"
            )
        if self.jump_every is None:
            ignored = [
                name
                for name, value, default in (
                    ("jump_uniform_weight", self.jump_uniform_weight, _DEFAULT_JUMP_UNIFORM_WEIGHT),
                    ("jump_grid_bins", self.jump_grid_bins, None),
                )
                if value != default
            ]
            if ignored:
                raise ValueError(
                    f"{' and '.join(ignored)} set{'s' if len(ignored) == 1 else ''} up the mode-jumping "
                    "moves, which are off: set jump_every too (with name: mala), or leave "
                    f"{' and '.join(ignored)} out"
                )

    def build(
        self,
        *,
        data: Tensor | None = None,
        box: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> Sampler:
        """The sampler; ``data`` and ``box`` (what the jump proposal is built from) are needed when
        ``jump_every`` is set, and ignored otherwise."""
        if self.name == "langevin":  # __post_init__ refused jump_every for it
            return Langevin(self.step_size, self.noise_scale, self.grad_clip, self.clamp)
        if self.jump_every is None:  # mala: __post_init__ refused langevin's noise_scale, grad_clip, clamp
            return make_sampler(self.name, step_size=self.step_size)
        if data is None or box is None:
            raise ValueError("jump_every is set: building the sampler needs the training data and its box")
        proposal: JumpProposal = KernelProposal.from_data(
            data, box, uniform_weight=self.jump_uniform_weight, generator=generator
        )
        if self.jump_grid_bins is not None:
            proposal = GridProposal.from_density(
                proposal.log_prob,
                box,
                bins=self.jump_grid_bins,
                event_shape=tuple(data.shape[1:]),
                device=data.device,
            )
        return MALA(self.step_size, jump=proposal, jump_every=self.jump_every)
