"""Annealed importance sampling of an RBM's partition function (Salakhutdinov & Murray 2008).

The base model A is the "base-rate" RBM: no weights, visible biases b_A from the training data's
marginals, so p_A(v) = Πᵢ σ(b_Aᵢ)^vᵢ σ(−b_Aᵢ)^(1−vᵢ) is sampled exactly.
The intermediate distributions follow the geometric path p_β ∝ p_A*^(1−β) p_B*^β, which for RBMs is again
an RBM:

    log p_β*(v) = (1 − β) b_Aᵀv + β b_Bᵀv + Σⱼ softplus(β (cⱼ + vᵀW₋ⱼ)),

whose normaliser at β = 0 is log Z₀ = Σᵢ softplus(b_Aᵢ) + H log 2 (each hidden unit of B, switched off,
still counts its two states),

with a block-Gibbs transition T_β that leaves it invariant (h ~ σ(β(c + vᵀW)), then
v ~ σ((1 − β) b_A + β (b_B + W h))). Each of M independent runs v₁ ~ p_A, v_{k+1} ~ T_{β_k}(v_k) has the
importance weight

    log w = Σₖ [log p_{β_k}*(v_k) − log p_{β_{k−1}}*(v_k)],

and Ẑ_B = Z_A · mean(w) is unbiased for Z_B. Its log is reported with the delta-method standard error
SE[log Ẑ] ≈ sd(w) / (mean(w) √M) and the interval log(Ẑ ± 3 σ̂) that Salakhutdinov & Murray quote
(σ̂ = Z_A sd(w)/√M). log Ẑ is biased low in expectation (Jensen), so the log-likelihoods it gives are, if
anything, optimistic; with enough temperatures the bias is far below the standard error.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ebm.boltzmann.rbm import BernoulliRBM, data_marginal_logits, free_energy_float64


@dataclass(frozen=True)
class RBMAISConfig:
    """AIS settings.

    Attributes:
        n_chains: M, independent annealing runs (importance weights); Salakhutdinov & Murray use 100.
        n_temperatures: K, intermediate distributions. They are spread as in Salakhutdinov & Murray (500
            over β ∈ [0, 0.5], 4,000 over [0.5, 0.9], 10,000 over [0.9, 1] of K = 14,500): the same
            fractions for any K.
    """

    n_chains: int = 100
    n_temperatures: int = 14500

    def __post_init__(self) -> None:
        if self.n_chains < 2 or self.n_temperatures < 3:
            raise ValueError(
                f"AIS needs n_chains ≥ 2 and n_temperatures ≥ 3, got {self.n_chains}, {self.n_temperatures}"
            )


@dataclass(frozen=True)
class RBMAISResult:
    """log Ẑ, its standard error in log space, the ±3σ̂ interval, and the weights' effective sample size.

    ``log_partition_minus_3sd`` is ``-inf`` when Ẑ − 3σ̂ ≤ 0 (the weights are too uneven to bound it).
    """

    log_partition: float
    standard_error: float
    log_partition_minus_3sd: float
    log_partition_plus_3sd: float
    effective_sample_size: float
    log_partition_base: float
    n_chains: int
    n_temperatures: int


def salakhutdinov_murray_schedule(n_temperatures: int) -> Tensor:
    """β₀ = 0 < β₁ < … < β_K = 1, linear in three pieces holding 500/14,500, 4,000/14,500 and the rest of
    the K steps over [0, 0.5], [0.5, 0.9] and [0.9, 1]; shape ``(K + 1,)``, float64."""
    first = max(1, round(n_temperatures * 500 / 14500))
    second = max(1, round(n_temperatures * 4000 / 14500))
    third = n_temperatures - first - second
    if third < 1:
        raise ValueError(f"n_temperatures = {n_temperatures} is too few for the three-piece schedule")
    pieces = [
        torch.linspace(0.0, 0.5, first + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.5, 0.9, second + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.9, 1.0, third + 1, dtype=torch.float64),
    ]
    return torch.cat(pieces)


@torch.no_grad()
def ais_log_partition(
    rbm: BernoulliRBM, train_data: Tensor, config: RBMAISConfig, *, generator: torch.Generator
) -> RBMAISResult:
    """Estimate log Z of ``rbm`` by AIS from the base-rate RBM fitted to ``train_data`` ``(N, *event)``.

    Matrix products run in the model's dtype on its device; every quantity summed over the K temperatures
    (the log-weight increments) is accumulated in float64.

    Raises:
        FloatingPointError: a log weight came out NaN or infinite.
    """
    device = rbm.weight.device
    weight, hidden_bias = rbm.weight.detach(), rbm.hidden_bias.detach()
    base_bias = data_marginal_logits(train_data, rbm.n_visible).to(device, weight.dtype)
    bias_gap = (rbm.visible_bias.detach() - base_bias).double()  # b_B − b_A
    betas = salakhutdinov_murray_schedule(config.n_temperatures).tolist()

    probabilities = torch.sigmoid(base_bias).expand(config.n_chains, -1)
    v = _bernoulli(probabilities, generator)  # (M, V): exact draws from p_A
    log_weights = torch.zeros(config.n_chains, dtype=torch.float64, device=device)
    for previous, beta in itertools.pairwise(betas):
        preactivation = torch.addmm(hidden_bias, v, weight)  # (M, H): c + vᵀW
        wide = preactivation.double()
        log_weights += (beta - previous) * (v.double() @ bias_gap)
        log_weights += (F.softplus(beta * wide) - F.softplus(previous * wide)).sum(1)
        if beta < 1.0:
            h = _bernoulli(torch.sigmoid(beta * preactivation), generator)
            visible_logits = (1.0 - beta) * base_bias + beta * torch.addmm(
                rbm.visible_bias.detach(), h, weight.T
            )
            v = _bernoulli(torch.sigmoid(visible_logits), generator)
    if not torch.isfinite(log_weights).all():
        raise FloatingPointError("AIS produced a non-finite log importance weight")
    # At β = 0 each hidden unit still contributes softplus(0) = log 2 to log p₀*, independently of v.
    log_partition_base = float(F.softplus(base_bias.double()).sum()) + rbm.n_hidden * math.log(2.0)
    return _summarise(log_weights.cpu(), log_partition_base, config)


def _bernoulli(probabilities: Tensor, generator: torch.Generator) -> Tensor:
    uniform = torch.rand(probabilities.shape, generator=generator, device=probabilities.device)
    return (uniform < probabilities).to(probabilities.dtype)


def _summarise(log_weights: Tensor, log_partition_base: float, config: RBMAISConfig) -> RBMAISResult:
    n = log_weights.numel()
    shift = float(log_weights.max())
    weights = torch.exp(log_weights - shift)  # w / max w, in (0, 1]
    mean, sd = float(weights.mean()), float(weights.std())
    log_scale = log_partition_base + shift
    spread = 3.0 * sd / math.sqrt(n)
    return RBMAISResult(
        log_partition=log_scale + math.log(mean),
        standard_error=sd / (mean * math.sqrt(n)),
        log_partition_minus_3sd=log_scale + math.log(mean - spread) if mean > spread else -math.inf,
        log_partition_plus_3sd=log_scale + math.log(mean + spread),
        effective_sample_size=float(weights.sum() ** 2 / weights.square().sum()),
        log_partition_base=log_partition_base,
        n_chains=n,
        n_temperatures=config.n_temperatures,
    )


@dataclass(frozen=True)
class LogLikelihood:
    """Mean test log-likelihood in nats per image, with its standard error.

    ``standard_error`` combines the spread over test images (``sampling_error``, sd/√N) with the AIS
    estimate's (``partition_error``), as independent errors: √(a² + b²).
    """

    mean: float
    standard_error: float
    sampling_error: float
    partition_error: float
    n_images: int


@torch.no_grad()
def mean_log_likelihood(
    rbm: BernoulliRBM, test_data: Tensor, log_partition: float, partition_error: float = 0.0
) -> LogLikelihood:
    """Mean of log p(v) = −F(v) − log Z over the rows of ``test_data`` (F in float64).

    Raises:
        ValueError: ``test_data`` holds no image (its mean would be NaN).
        FloatingPointError: a free energy is NaN or infinite.
    """
    if len(test_data) == 0:
        raise ValueError("mean_log_likelihood needs at least one test image, got none")
    log_probabilities = -free_energy_float64(rbm, test_data) - log_partition
    if not torch.isfinite(log_probabilities).all():
        raise FloatingPointError("a test image has a non-finite free energy")
    n = log_probabilities.numel()
    sampling_error = float(log_probabilities.std() / math.sqrt(n)) if n > 1 else 0.0
    return LogLikelihood(
        mean=float(log_probabilities.mean()),
        standard_error=math.hypot(sampling_error, partition_error),
        sampling_error=sampling_error,
        partition_error=partition_error,
        n_images=n,
    )
