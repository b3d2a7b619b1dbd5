"""The Bernoulli–Bernoulli restricted Boltzmann machine and its exact partition function.

Visible units v ∈ {0, 1}^V and hidden units h ∈ {0, 1}^H have the joint energy

    E(v, h) = −bᵀv − cᵀh − vᵀW h,

and summing h out analytically gives the free energy, the energy of v in this library's contract:

    F(v) = −bᵀv − Σⱼ softplus(cⱼ + vᵀW₋ⱼ),   p(v) = exp(−F(v)) / Z.

Both conditionals factorise (Smolensky 1986; Hinton 2002):

    p(hⱼ = 1 | v) = σ(cⱼ + vᵀW₋ⱼ),   p(vᵢ = 1 | h) = σ(bᵢ + Wᵢ₋ h),

so block Gibbs sampling (:class:`~ebm.boltzmann.gibbs.Gibbs`) alternates the two layers. The CD-k update of
Hinton (2002) is exactly the gradient of mean F(data) − mean F(v_k) for chains v_k started at the data, so
the library's :class:`~ebm.losses.ContrastiveDivergence` with a Gibbs sampler trains an RBM by CD-k and,
with persistent chains, by PCD (Tieleman 2008).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ebm.boltzmann.gibbs import bernoulli_from_logits


@dataclass(frozen=True)
class RBMConfig:
    """The shape of an RBM.

    Attributes:
        event_shape: the shape of one visible configuration, e.g. ``(1, 28, 28)``; V is its product.
        n_hidden: H, the number of hidden units.
    """

    event_shape: Sequence[int] = (1, 28, 28)
    n_hidden: int = 500

    def __post_init__(self) -> None:
        if self.n_hidden < 1 or not self.event_shape or any(d < 1 for d in self.event_shape):
            raise ValueError(
                f"an RBM needs n_hidden ≥ 1 and a non-empty event shape of positive sizes, "
                f"got n_hidden={self.n_hidden}, event_shape={tuple(self.event_shape)}"
            )

    @property
    def n_visible(self) -> int:
        return math.prod(self.event_shape)


class BernoulliRBM(nn.Module):
    """An RBM with binary visible and hidden units; ``forward(v)`` is the free energy F(v), shape ``(B,)``.

    Attributes:
        weight: W, shape ``(V, H)``.
        visible_bias: b, shape ``(V,)``.
        hidden_bias: c, shape ``(H,)``.
    """

    def __init__(self, config: RBMConfig) -> None:
        super().__init__()
        self.config = config
        self.event_shape = tuple(config.event_shape)
        self.weight = nn.Parameter(torch.zeros(config.n_visible, config.n_hidden))
        self.visible_bias = nn.Parameter(torch.zeros(config.n_visible))
        self.hidden_bias = nn.Parameter(torch.zeros(config.n_hidden))

    @property
    def n_visible(self) -> int:
        return self.weight.shape[0]

    @property
    def n_hidden(self) -> int:
        return self.weight.shape[1]

    def flat(self, v: Tensor) -> Tensor:
        """``v`` of shape ``(B, *event_shape)`` (or ``(B, V)``) as ``(B, V)``; raises for any other shape.

        A same-sized other shape, such as a channels-last batch, would be scrambled pixel by pixel.
        """
        if v.ndim < 2 or tuple(v.shape[1:]) not in (tuple(self.event_shape), (self.n_visible,)):
            raise ValueError(
                f"an RBM with {self.n_visible} visible units (event shape {self.event_shape}) takes "
                f"(B, *event) batches, got shape {tuple(v.shape)}"
            )
        return v.reshape(v.shape[0], self.n_visible)

    def hidden_preactivation(self, v: Tensor) -> Tensor:
        """c + vᵀW for each row, shape ``(B, H)``."""
        return torch.addmm(self.hidden_bias, self.flat(v).to(self.weight.dtype), self.weight)

    def visible_preactivation(self, h: Tensor) -> Tensor:
        """b + W h for each row, shape ``(B, V)``."""
        return torch.addmm(self.visible_bias, h.to(self.weight.dtype), self.weight.T)

    def forward(self, v: Tensor) -> Tensor:
        """F(v) = −bᵀv − Σⱼ softplus(cⱼ + vᵀW₋ⱼ), shape ``(B,)``."""
        flat = self.flat(v).to(self.weight.dtype)
        return -(flat @ self.visible_bias) - F.softplus(self.hidden_preactivation(flat)).sum(1)

    def joint_energy(self, v: Tensor, h: Tensor) -> Tensor:
        """E(v, h) = −bᵀv − cᵀh − vᵀW h, shape ``(B,)``."""
        flat = self.flat(v).to(self.weight.dtype)
        h = h.to(self.weight.dtype)
        return -(flat @ self.visible_bias) - h @ self.hidden_bias - ((flat @ self.weight) * h).sum(1)

    def sample_hidden(
        self, v: Tensor, beta: float = 1.0, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """h ~ p_β(h | v): independent Bernoulli(σ(β (c + vᵀW))), shape ``(B, H)``."""
        return bernoulli_from_logits(self.hidden_preactivation(v), beta, generator=generator)

    def sample_visible(
        self, h: Tensor, beta: float = 1.0, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """v ~ p_β(v | h), shape ``(B, *event_shape)``."""
        v = bernoulli_from_logits(self.visible_preactivation(h), beta, generator=generator)
        return v.view(h.shape[0], *self.event_shape)

    def reconstruct(self, v: Tensor) -> Tensor:
        """Mean-field reconstruction p(v = 1 | h = p(h = 1 | v)), shape ``(B, *event_shape)``."""
        hidden = torch.sigmoid(self.hidden_preactivation(v))
        return torch.sigmoid(self.visible_preactivation(hidden)).view(v.shape[0], *self.event_shape)

    # --- the block-Gibbs interface (ebm.boltzmann.gibbs.BlockConditionals) ---------------------------

    def gibbs_context(self, state: Tensor) -> None:
        """Nothing stays fixed along an RBM chain."""
        self.flat(state)  # shape check, before any sweep

    def gibbs_sweep(
        self, state: Tensor, context: Any, beta: float, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """One block-Gibbs step v → h ~ p_β(h | v) → v′ ~ p_β(v | h), in ``state``'s shape and dtype.

        β tempers the *joint* energy E(v, h): at β = 1 the visible chain samples exp(−F(v)), the RBM's
        energy; at β ≠ 1 it samples Σₕ exp(−β E(v, h)), not exp(−β F(v)), and β = ∞ (ICM) descends
        minₕ E(v, h), not F. Annealed importance sampling (:mod:`ebm.boltzmann.ais`) tempers the
        parameters instead and is not affected.
        """
        hidden = self.sample_hidden(state, beta, generator=generator)
        return self.sample_visible(hidden, beta, generator=generator).view(state.shape).to(state.dtype)


def init_rbm_(
    rbm: BernoulliRBM, data: Tensor, *, generator: torch.Generator, weight_std: float = 0.01
) -> BernoulliRBM:
    """Hinton's (2010) initialisation, in place: W ~ N(0, weight_std²), c = 0, bᵢ = log(pᵢ / (1 − pᵢ)).

    pᵢ is the fraction of training rows with vᵢ = 1, smoothed as (count + 1) / (N + 2) so that pixels never
    on (or always on) get finite biases. Returns ``rbm``.
    """
    with torch.no_grad():
        rbm.weight.normal_(0.0, weight_std, generator=generator)
        rbm.hidden_bias.zero_()
        rbm.visible_bias.copy_(data_marginal_logits(data, rbm.n_visible))
    return rbm


def data_marginal_logits(data: Tensor, n_visible: int) -> Tensor:
    """log(pᵢ / (1 − pᵢ)) of the smoothed per-unit frequencies (count + 1) / (N + 2), shape ``(V,)``."""
    flat = data.reshape(data.shape[0], -1)
    if flat.shape[1] != n_visible:
        raise ValueError(f"data rows have {flat.shape[1]} units, the RBM {n_visible} visible units")
    frequency = (flat.double().sum(0) + 1.0) / (flat.shape[0] + 2.0)
    return torch.logit(frequency).to(torch.get_default_dtype())


# --- exact partition function by enumeration ------------------------------------------------------

MAX_ENUMERATED_UNITS = 26


def binary_states(n_units: int, start: int, stop: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Rows ``start … stop − 1`` of all 2ⁿ binary vectors in counting order, shape ``(stop − start, n)``."""
    codes = torch.arange(start, stop, dtype=torch.int64)
    bits = torch.arange(n_units, dtype=torch.int64)
    return ((codes[:, None] >> bits) & 1).to(dtype)


@torch.no_grad()
def exact_log_partition(rbm: BernoulliRBM, *, chunk: int = 1 << 14) -> float:
    """log Z, summing the smaller layer exhaustively in float64 and the other one analytically.

    Over hidden states: log Z = logsumexp_h [cᵀh + Σᵢ softplus(bᵢ + Wᵢ₋ h)]; over visible states (when
    V < H): log Z = logsumexp_v [−F(v)].

    Raises:
        ValueError: both layers have more than :data:`MAX_ENUMERATED_UNITS` units (2ⁿ terms).
    """
    weight = rbm.weight.detach().double().cpu()
    visible_bias = rbm.visible_bias.detach().double().cpu()
    hidden_bias = rbm.hidden_bias.detach().double().cpu()
    if rbm.n_hidden <= rbm.n_visible:
        n_units, unit_bias, other_bias, coupling = rbm.n_hidden, hidden_bias, visible_bias, weight.T
    else:
        n_units, unit_bias, other_bias, coupling = rbm.n_visible, visible_bias, hidden_bias, weight
    if n_units > MAX_ENUMERATED_UNITS:
        raise ValueError(
            f"exact log Z enumerates the smaller layer, here {n_units} units (2^{n_units} states); "
            f"at most {MAX_ENUMERATED_UNITS} are allowed"
        )
    terms = []
    for start in range(0, 1 << n_units, chunk):
        states = binary_states(n_units, start, min(start + chunk, 1 << n_units))  # (n, units)
        log_weights = states @ unit_bias + F.softplus(torch.addmm(other_bias, states, coupling)).sum(1)
        terms.append(torch.logsumexp(log_weights, 0))
    return float(torch.logsumexp(torch.stack(terms), 0))


@torch.no_grad()
def exact_log_probabilities(rbm: BernoulliRBM, visible: Tensor) -> Tensor:
    """log p(v) = −F(v) − log Z of rows of ``visible`` (float64), log Z by enumeration; shape ``(B,)``."""
    return -free_energy_float64(rbm, visible) - exact_log_partition(rbm)


@torch.no_grad()
def free_energy_float64(rbm: BernoulliRBM, visible: Tensor) -> Tensor:
    """F(v) in float64 on the CPU, shape ``(B,)``: for log-likelihoods summed over many rows.

    Raises:
        ValueError: ``visible`` is not binary; a grey or unscaled row has no probability under the RBM
            (rows of 3.0 scored log p = +71 nats).
    """
    flat = rbm.flat(visible).double().cpu()
    if not bool(((flat == 0) | (flat == 1)).all()):
        raise ValueError("RBM log-likelihoods need binary (0/1) rows: binarise the images first")
    weight = rbm.weight.detach().double().cpu()
    preactivation = torch.addmm(rbm.hidden_bias.detach().double().cpu(), flat, weight)
    return -(flat @ rbm.visible_bias.detach().double().cpu()) - F.softplus(preactivation).sum(1)
