"""Seeded 2D toy datasets with their exact log-densities.

Seven generative stories after the toy sets of FFJORD (Grathwohl et al. 2019,
https://arxiv.org/abs/1810.01367) and noise-contrastive estimation papers: "8gaussians", "moons",
"swissroll", "checkerboard", "rings", "pinwheel" and "2spirals". Each dataset samples with an
explicit ``torch.Generator`` and returns the normalised log-density of the very distribution it
samples from, so a model's NLL can be compared with the entropy of the data and KL(p ‖ q) can be
computed on a grid.

Densities come in closed form where one exists (a Gaussian mixture, a piecewise-uniform board,
noisy circles through a Bessel function, a swirled Gaussian by change of variables). The noisy
curves ``x = f(t) + σε`` with a latent ``t`` ("moons", "swissroll", "2spirals") have

    p(x) = ∫ p(t) N(x; f(t), σ²I) dt,

which :class:`NoisyCurveDataset` computes by composite Gauss–Legendre quadrature in ``t``: the
integral becomes a Gaussian mixture with one component per node, evaluated in chunks of query
points so memory stays bounded.

Every dataset keeps all but a negligible (< 1e-6) part of its mass inside ``bounds = (-4.5, 4.5)``
squared, and no feature is narrower than a noise scale of 0.1, so a grid with spacing 0.02
resolves every density.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "TOY_DATASETS",
    "Checkerboard",
    "EightGaussians",
    "Moons",
    "NoisyCurveDataset",
    "Pinwheel",
    "Rings",
    "SwissRoll",
    "ToyDataset",
    "TwoSpirals",
    "make_toy_dataset",
]

TOY_BOUNDS: tuple[float, float] = (-4.5, 4.5)

# Entries of the (query chunk × mixture component) matrix held in memory at once: 2²² float64 = 32 MiB.
_CHUNK_ELEMENTS = 2**22
# Gauss–Legendre nodes per quadrature panel for the latent integrals.
_GAUSS_LEGENDRE_ORDER = 8
_END_GRADING_LEVELS = 4


class ToyDataset(ABC):
    """A 2D distribution that samples with an explicit generator and knows its exact log-density.

    Attributes:
        name: the registry key, e.g. ``"moons"``.
        bounds: ``(lo, hi)``; the box ``[lo, hi]²`` holds all but < 1e-6 of the mass.
    """

    name: ClassVar[str]
    bounds: ClassVar[tuple[float, float]] = TOY_BOUNDS

    def sample(self, n: int, *, generator: torch.Generator) -> Tensor:
        """Draw ``n`` points, float32 of shape ``(n, 2)`` on ``generator``'s device.

        Only ``generator`` is used for randomness, so the same seed gives the same points.
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        return self._sample(n, generator).to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact normalised log-density at ``x`` of shape ``(n, 2)``, float64 of shape ``(n,)``.

        Computed in float64 on ``x``'s device whatever ``x``'s floating dtype. A NaN or infinite
        coordinate is an error (it has no density; the checkerboard's comparisons would call it −inf and
        the mixtures' arithmetic NaN).
        """
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must have shape (n, 2), got {tuple(x.shape)}")
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
        if bad.numel():
            rows = ", ".join(str(int(r)) for r in bad[:5])
            raise ValueError(f"{self.name}.log_prob: x holds NaN or ±inf at row(s) {rows} of {len(x)}")
        return self._log_prob(x.to(torch.float64))

    @abstractmethod
    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points ``(n, 2)`` in float64 on ``generator.device``."""

    @abstractmethod
    def _log_prob(self, x: Tensor) -> Tensor:
        """log p at float64 ``x`` of shape ``(n, 2)``."""


# --- shared maths -------------------------------------------------------------------------------------


def _randn(n: int, generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=generator, device=generator.device, dtype=torch.float64)


def _rand(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)


def _randint(high: int, n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(high, (n,), generator=generator, device=generator.device)


def _rotate(points: Tensor, angles: Tensor) -> Tensor:
    """Rotate ``points`` ``(..., 2)`` counter-clockwise by ``angles`` ``(...)``."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    x, y = points.unbind(-1)
    return torch.stack([cos * x - sin * y, sin * x + cos * y], dim=-1)


def log_isotropic_gaussian_mixture(x: Tensor, means: Tensor, log_weights: Tensor, std: float) -> Tensor:
    """log Σₖ wₖ N(x; μₖ, σ²I) for ``x`` ``(n, 2)``, ``means`` ``(K, 2)``, ``log_weights`` ``(K,)``.

    Uses ``−|x − μ|²/2σ² + log w = [x, |x|², 1] · [μ/σ², −1/2σ², log w − |μ|²/2σ²]``, one matrix
    product per chunk of queries, chunked so that a chunk times ``K`` stays below 2²² entries.
    The weights need not sum to one (quadrature weights do so only approximately).
    """
    inv_var = 1.0 / std**2
    component_features = torch.cat(
        [
            means * inv_var,
            torch.full_like(means[:, :1], -0.5 * inv_var),
            (log_weights - 0.5 * inv_var * means.square().sum(1))[:, None],
        ],
        dim=1,
    )  # (K, 4)
    chunk = max(1, _CHUNK_ELEMENTS // means.shape[0])
    log_density = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        queries = x[start : start + chunk]
        query_features = torch.cat(
            [queries, queries.square().sum(1, keepdim=True), torch.ones_like(queries[:, :1])], dim=1
        )  # (B, 4)
        log_terms = query_features @ component_features.T  # (B, K)
        peak = log_terms.amax(dim=1, keepdim=True)  # (B, 1); an in-place logsumexp, faster on CPU
        log_density[start : start + chunk] = log_terms.sub_(peak).exp_().sum(dim=1).log_() + peak[:, 0]
    return log_density - math.log(2 * math.pi * std**2)


def gauss_legendre(order: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the ``order``-point Gauss–Legendre rule on [−1, 1] (Golub–Welsch), float64."""
    k = torch.arange(1, order, dtype=torch.float64)
    off_diagonal = k / torch.sqrt(4 * k.square() - 1)
    jacobi = torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    return nodes, 2 * vectors[0].square()


# --- closed-form densities -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EightGaussians(ToyDataset):
    """An equal-weight mixture of 8 isotropic Gaussians on a circle:

        p(x) = ⅛ Σₖ N(x; μₖ, σ²I),   μₖ = r (cos kπ/4, sin kπ/4),   k = 0..7,

    with r = 2.5 and σ = 0.35 (FFJORD: r = 2√2, σ = 0.5/√2), so the nearest box edge is 5.7σ away.
    """

    name: ClassVar[str] = "8gaussians"
    radius: float = 2.5
    noise_std: float = 0.35
    n_components: int = 8

    def means(self, device: torch.device) -> Tensor:
        """Component means ``(K, 2)``, float64."""
        angles = torch.arange(self.n_components, dtype=torch.float64, device=device)
        angles = angles * (2 * math.pi / self.n_components)
        return self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        component = _randint(self.n_components, n, generator)
        return self.means(generator.device)[component] + self.noise_std * _randn(n, generator, 2)

    def _log_prob(self, x: Tensor) -> Tensor:
        log_weights = x.new_full((self.n_components,), -math.log(self.n_components))
        return log_isotropic_gaussian_mixture(x, self.means(x.device), log_weights, self.noise_std)


@dataclass(frozen=True, kw_only=True)
class Checkerboard(ToyDataset):
    """Uniform on the 8 "black" squares of a 4×4 board of side-``s`` squares centred at the origin:

        p(x) = 1 / (8 s²)   if ⌊(x₁ + 2s)/s⌋ + ⌊(x₂ + 2s)/s⌋ is even and x ∈ [−2s, 2s)², else 0,

    with s = 2 (FFJORD's board), so the support is [−4, 4)² and p = 1/32 there. The density is
    discontinuous at the square edges and ``log_prob`` is −inf off the support. Sampling picks a
    column i ~ U{0..3}, a row j = 2·U{0, 1} + (i mod 2), then a uniform point in square (i, j).
    """

    name: ClassVar[str] = "checkerboard"
    n_squares: ClassVar[int] = 4
    square_size: float = 2.0

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        column = _randint(self.n_squares, n, generator)
        row = 2 * _randint(self.n_squares // 2, n, generator) + column % 2
        corner = torch.stack([column, row], dim=1).to(torch.float64) - self.n_squares / 2
        offset = torch.stack([_rand(n, generator), _rand(n, generator)], dim=1)
        points = (self.square_size * (corner + offset)).to(torch.float32)
        # A point within ~1e-7 below a square's upper edge rounds onto it in float32, and the squares are
        # half-open: log p there is −inf (about once in 2·10⁷ draws). Keep it the float32 step below.
        upper = (self.square_size * (corner + 1)).to(torch.float32)
        return torch.where(points < upper, points, torch.nextafter(upper, torch.full_like(upper, -math.inf)))

    def _log_prob(self, x: Tensor) -> Tensor:
        square = torch.floor(x / self.square_size + self.n_squares / 2)  # (n, 2) indices, 0..3 on the board
        on_board = ((square >= 0) & (square < self.n_squares)).all(dim=1)
        black = square.sum(dim=1).remainder(2) == 0
        n_black = self.n_squares**2 // 2
        log_density = torch.full_like(x[:, 0], -math.log(n_black * self.square_size**2))
        return log_density.masked_fill(~(on_board & black), -math.inf)


@dataclass(frozen=True, kw_only=True)
class Rings(ToyDataset):
    """An equal-weight mixture of noisy circles: pick a radius Rₖ, an angle α ~ U[0, 2π), add noise,

        x = Rₖ (cos α, sin α) + σε,   Rₖ ∈ {0.75, 1.5, 2.25, 3},   σ = 0.1,

    (FFJORD uses σ = 0.08). Integrating the angle out gives, with r = |x| and the modified Bessel
    function I₀,

        p(x) = ¼ Σₖ exp(−(r² + Rₖ²)/2σ²) I₀(r Rₖ/σ²) / (2πσ²),

    evaluated stably as −(r − Rₖ)²/2σ² + log i0e(r Rₖ/σ²) with i0e(z) = e⁻ᶻ I₀(z).
    """

    name: ClassVar[str] = "rings"
    radii: tuple[float, ...] = (0.75, 1.5, 2.25, 3.0)
    noise_std: float = 0.1

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        radii = torch.tensor(self.radii, dtype=torch.float64, device=generator.device)
        radius = radii[_randint(len(self.radii), n, generator)]
        angle = 2 * math.pi * _rand(n, generator)
        circle = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return circle + self.noise_std * _randn(n, generator, 2)

    def _log_prob(self, x: Tensor) -> Tensor:
        radii = torch.tensor(self.radii, dtype=torch.float64, device=x.device)
        variance = self.noise_std**2
        r = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (n, 1)
        log_ring = -(r - radii).square() / (2 * variance) + torch.log(torch.special.i0e(r * radii / variance))
        log_ring = log_ring - math.log(2 * math.pi * variance)  # (n, K)
        return torch.logsumexp(log_ring, dim=1) - math.log(len(self.radii))


@dataclass(frozen=True, kw_only=True)
class Pinwheel(ToyDataset):
    """Five Gaussian arms, each swirled by an angle that grows with the distance from the origin:

        z ~ N((μ, 0), diag(σᵣ², σₜ²)),   k ~ U{0..K−1},
        x = s · R(2πk/K + τ e^{|z|}) z,

    with R(θ) the rotation by θ, K = 5, μ = 1, σᵣ = 0.25, σₜ = 0.1, twist τ = 0.25 and scale
    s = 1.8 (so the narrowest noise scale is sσₜ = 0.18). FFJORD's pinwheel twists by τ e^{z₁};
    twisting by τ e^{|z|} instead makes the map invertible: in polar coordinates it is
    (ρ, α) ↦ (sρ, α + θ(ρ)), which preserves area up to s², and |x| = s|z| recovers ρ. So

        p(x) = (1/K) Σₖ N(zₖ(x); (μ, 0), diag(σᵣ², σₜ²)) / s²,
        zₖ(x) = R(−2πk/K − τ e^{|x|/s}) x / s.

    P(|x| > 4.5) = P(|z| > 2.5) ≈ P(z₁ > μ + 6σᵣ) ≈ 1e-9.
    """

    name: ClassVar[str] = "pinwheel"
    n_arms: int = 5
    radial_mean: float = 1.0
    radial_std: float = 0.25
    tangential_std: float = 0.1
    twist: float = 0.25
    scale: float = 1.8

    def _arm_angles(self, device: torch.device) -> Tensor:
        return torch.arange(self.n_arms, dtype=torch.float64, device=device) * (2 * math.pi / self.n_arms)

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        noise = _randn(n, generator, 2)
        latent = torch.stack(
            [self.radial_mean + self.radial_std * noise[:, 0], self.tangential_std * noise[:, 1]], dim=1
        )
        arm = _randint(self.n_arms, n, generator)
        angle = self._arm_angles(generator.device)[arm] + self.twist * torch.exp(latent.norm(dim=1))
        return self.scale * _rotate(latent, angle)

    def _log_prob(self, x: Tensor) -> Tensor:
        unscaled = x / self.scale
        swirl = self.twist * torch.exp(torch.linalg.vector_norm(unscaled, dim=1, keepdim=True))  # (n, 1)
        angles = -(self._arm_angles(x.device) + swirl)  # (n, K)
        latent = _rotate(unscaled[:, None, :].expand(-1, self.n_arms, -1), angles)  # (n, K, 2)
        radial = (latent[..., 0] - self.radial_mean) / self.radial_std
        tangential = latent[..., 1] / self.tangential_std
        log_latent = -0.5 * (radial.square() + tangential.square()) - math.log(
            2 * math.pi * self.radial_std * self.tangential_std
        )  # (n, K)
        return torch.logsumexp(log_latent, dim=1) - math.log(self.n_arms) - 2 * math.log(self.scale)


# --- noisy curves: densities by quadrature over the latent -------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NoisyCurveDataset(ToyDataset):
    """Points near curves: pick a branch c and a latent t, then add isotropic Gaussian noise,

        x = f_c(t) + σε,   c ~ U{1..C},   t ~ p(t) on [a, b],
        p(x) = (1/C) Σ_c ∫ₐᵇ p(t) N(x; f_c(t), σ²I) dt.

    The integral is computed by composite Gauss–Legendre quadrature (8 nodes per panel). Panels are
    spread evenly in the "resolution length" ∫ |f'(t)| √(1 + 4σκ(t)) / σ dt, κ the curvature:
    along the curve the integrand is a bump of width σ in arc length, narrowed by √(1 + dκ) for a
    query at distance d on the outside of a bend, and ``nodes_per_std`` nodes cover each such width.
    A query beyond an end of the curve sees the integrand fall off over σ²/d there, so the two end
    panels are halved four times towards the ends. With the default of 2 the error is < 1e-4 nats
    everywhere in the bounds and ~1e-7 nats where log p is within 10 nats of its maximum (the tests
    compare against 3× as many nodes). The cost is one Gaussian-mixture evaluation with 300–650
    components per query point: a few seconds per 250k points on two CPU cores.

    Attributes:
        noise_std: σ.
        nodes_per_std: quadrature resolution.
    """

    noise_std: float
    nodes_per_std: float = 2.0

    @property
    @abstractmethod
    def latent_range(self) -> tuple[float, float]:
        """The latent's support [a, b]."""

    @abstractmethod
    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` draws of t, float64 ``(n,)``."""

    @abstractmethod
    def latent_log_density(self, t: Tensor) -> Tensor:
        """log p(t) on [a, b]."""

    @abstractmethod
    def branches(self, t: Tensor) -> Tensor:
        """The curves f_c(t) for every branch, ``(C, *t.shape, 2)``."""

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        t = self.sample_latent(n, generator)
        curves = self.branches(t)  # (C, n, 2)
        branch = _randint(curves.shape[0], n, generator)
        on_curve = curves[branch, torch.arange(n, device=generator.device)]
        return on_curve + self.noise_std * _randn(n, generator, 2)

    def quadrature(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Latent nodes ``(M,)`` and weights ``(M,)`` with Σ w g(tᵢ) ≈ ∫ₐᵇ p(t) g(t) dt."""
        edges = self.panel_edges(device)
        unit_nodes, unit_weights = gauss_legendre(_GAUSS_LEGENDRE_ORDER)
        half_width = (edges[1:] - edges[:-1])[:, None] / 2  # (P, 1)
        nodes = ((edges[:-1, None] + half_width) + half_width * unit_nodes.to(device)).flatten()
        weights = (half_width * unit_weights.to(device)).flatten() * torch.exp(self.latent_log_density(nodes))
        return nodes, weights

    def panel_edges(self, device: torch.device) -> Tensor:
        """Quadrature panel edges ``(P + 1,)`` from a to b, even in resolution length, ends graded."""
        low, high = self.latent_range
        fine = torch.linspace(low, high, 4097, dtype=torch.float64, device=device)
        velocity = torch.gradient(self.branches(fine), spacing=(fine,), dim=1)[0]  # (C, F, 2)
        acceleration = torch.gradient(velocity, spacing=(fine,), dim=1)[0]
        speed = torch.linalg.vector_norm(velocity, dim=-1)
        cross = velocity[..., 0] * acceleration[..., 1] - velocity[..., 1] * acceleration[..., 0]
        curvature = cross.abs() / speed**3
        rate = (speed * torch.sqrt(1 + 4 * self.noise_std * curvature)).amax(dim=0) / self.noise_std  # (F,)
        length = torch.cat([rate.new_zeros(1), torch.cumulative_trapezoid(rate, fine)])
        n_panels = math.ceil(float(length[-1]) * self.nodes_per_std / _GAUSS_LEGENDRE_ORDER)
        targets = torch.linspace(0, float(length[-1]), n_panels + 1, dtype=torch.float64, device=device)
        edges = _interpolate(targets, length, fine)
        edges[0], edges[-1] = low, high
        return _grade_ends(edges, _END_GRADING_LEVELS)

    def _log_prob(self, x: Tensor) -> Tensor:
        nodes, weights = self.quadrature(x.device)
        keep = weights > 0
        nodes, weights = nodes[keep], weights[keep]
        curves = self.branches(nodes)  # (C, M, 2)
        n_branches = curves.shape[0]
        log_weights = (torch.log(weights) - math.log(n_branches)).repeat(n_branches)
        return log_isotropic_gaussian_mixture(x, curves.reshape(-1, 2), log_weights, self.noise_std)


def _grade_ends(edges: Tensor, levels: int) -> Tensor:
    """Split the first and last panels geometrically towards the ends, halving ``levels`` times."""
    halvings = 0.5 ** torch.arange(levels, 0, -1, dtype=edges.dtype, device=edges.device)  # 2⁻ᴸ .. 2⁻¹
    first = edges[0] + (edges[1] - edges[0]) * halvings
    last = edges[-1] - (edges[-1] - edges[-2]) * halvings.flip(0)
    return torch.cat([edges[:1], first, edges[1:-1], last, edges[-1:]])


def _interpolate(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x``, for increasing ``xp``."""
    index = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x_low, x_high = xp[index - 1], xp[index]
    fraction = ((x - x_low) / (x_high - x_low)).clamp(0, 1)
    return fp[index - 1] + fraction * (fp[index] - fp[index - 1])


@dataclass(frozen=True, kw_only=True)
class Moons(NoisyCurveDataset):
    """Two interleaved half circles, point reflections of each other:

        x = c · f(t) + σε,   c ~ U{+1, −1},   t ~ U[0, π],
        f(t) = R (cos t − ½, sin t − ¼),

    with R = 2 and σ = 0.2: sklearn's ``make_moons(noise=0.1)`` scaled by 2 as in FFJORD, shifted
    to have mean zero (FFJORD shifts by (−1, −0.2) instead of (−1, −0.5)).
    """

    name: ClassVar[str] = "moons"
    radius: float = 2.0
    noise_std: float = 0.2

    @property
    def latent_range(self) -> tuple[float, float]:
        return 0.0, math.pi

    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        return math.pi * _rand(n, generator)

    def latent_log_density(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -math.log(math.pi))

    def branches(self, t: Tensor) -> Tensor:
        upper = self.radius * torch.stack([torch.cos(t) - 0.5, torch.sin(t) - 0.25], dim=-1)
        return torch.stack([upper, -upper])


@dataclass(frozen=True, kw_only=True)
class SwissRoll(NoisyCurveDataset):
    """A noisy Archimedean spiral with a uniform latent angle:

        x = f(t) + σε,   t ~ U[1.5π, 4.5π],   f(t) = a t (cos t, sin t),

    with a = 1/5 and σ = 0.2: sklearn's ``make_swiss_roll(noise=1)`` projected to its (x, z) plane
    and divided by 5, as in FFJORD. Successive turns are 2πa ≈ 1.26 = 6.3σ apart.
    """

    name: ClassVar[str] = "swissroll"
    scale: float = 0.2
    noise_std: float = 0.2

    @property
    def latent_range(self) -> tuple[float, float]:
        return 1.5 * math.pi, 4.5 * math.pi

    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        low, high = self.latent_range
        return low + (high - low) * _rand(n, generator)

    def latent_log_density(self, t: Tensor) -> Tensor:
        low, high = self.latent_range
        return torch.full_like(t, -math.log(high - low))

    def branches(self, t: Tensor) -> Tensor:
        return (self.scale * t[..., None] * torch.stack([torch.cos(t), torch.sin(t)], dim=-1))[None]


@dataclass(frozen=True, kw_only=True)
class TwoSpirals(NoisyCurveDataset):
    """Two interleaved Archimedean spirals, point reflections of each other:

        x = c · f(t) + σε,   c ~ U{+1, −1},   t = T√u with u ~ U[0, 1],
        f(t) = a t (−cos t, sin t),   so p(t) = 2t/T² on [0, T],

    with T = 3π (one and a half turns), a = 1/3 and σ = 0.15. FFJORD's version adds U[0, 0.5]/3
    box noise before the Gaussian N(0, 0.1²); here the noise is Gaussian only. Neighbouring arms
    of the two spirals are πa ≈ 1.05 = 7σ apart.
    """

    name: ClassVar[str] = "2spirals"
    scale: float = 1.0 / 3.0
    max_angle: float = 3 * math.pi
    noise_std: float = 0.15

    @property
    def latent_range(self) -> tuple[float, float]:
        return 0.0, self.max_angle

    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        return self.max_angle * torch.sqrt(_rand(n, generator))

    def latent_log_density(self, t: Tensor) -> Tensor:
        return torch.log(2 * t / self.max_angle**2)

    def branches(self, t: Tensor) -> Tensor:
        spiral = self.scale * t[..., None] * torch.stack([-torch.cos(t), torch.sin(t)], dim=-1)
        return torch.stack([spiral, -spiral])


# --- registry ------------------------------------------------------------------------------------------

TOY_DATASETS: dict[str, ToyDataset] = {
    dataset.name: dataset
    for dataset in (
        EightGaussians(),
        Moons(),
        SwissRoll(),
        Checkerboard(),
        Rings(),
        Pinwheel(),
        TwoSpirals(),
    )
}


def make_toy_dataset(name: str) -> ToyDataset:
    """The registered dataset called ``name``.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    try:
        return TOY_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown toy dataset {name!r}; valid names: {', '.join(TOY_DATASETS)}") from None
