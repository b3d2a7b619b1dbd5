"""Samplers and the replay buffer: the contract, statistical correctness on Gaussians, and the knobs."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from ebm.energies import (
    ClassConditionalEnergy,
    GaussianEnergy,
    GaussianMixtureEnergy,
    MLPClassifierConfig,
    MLPEnergy,
    MLPEnergyConfig,
    mlp_logits,
)
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy, ResNet32, ResNet32Config
from ebm.samplers import (
    MALA,
    SAMPLERS,
    GaussianMixtureProposal,
    GridProposal,
    KernelProposal,
    Langevin,
    ReplayBuffer,
    SamplerConfig,
    SamplerStats,
    UniformBox,
    make_sampler,
)

# The correlated 2D target of the statistical tests: Σ has eigenvalues 1.51 and 0.29, so the
# precision P = Σ⁻¹ has eigenvalues λ_min = 0.66 and λ_max = 3.43.
MEAN = torch.tensor([1.0, -0.5])
COVARIANCE = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
PRECISION = torch.linalg.inv(COVARIANCE)
N_CHAINS = 4000

# One line per sampler configuration. Every registered sampler needs at least one case (checked below).
SAMPLER_CASES = [
    pytest.param("langevin", {}, id="langevin"),
    pytest.param(
        "langevin",
        {"step_size": 0.05, "noise_scale": 0.01, "grad_clip": 0.5, "clamp": (-2.0, 2.0)},
        id="langevin_decoupled_clipped_clamped",
    ),
    pytest.param("mala", {"step_size": 0.05}, id="mala"),
    # "jump_from_x0": the contract test builds a KernelProposal ("kernel") or a GridProposal (its
    # histogram, "histogram") around the chains' start.
    pytest.param(
        "mala", {"step_size": 0.05, "jump_every": 2, "jump_from_x0": "kernel"}, id="mala_mode_jumping"
    ),
    pytest.param(
        "mala",
        {"step_size": 0.05, "jump_every": 2, "jump_from_x0": "histogram"},
        id="mala_mode_jumping_histogram",
    ),
]


# One line per energy every sampler must run on: (factory, event shape, dtype), the factory run under a
# fixed seed. Energies over continuous inputs only: the RBM's and the grid CRF's binary units have Gibbs.
ENERGY_CASES = [
    pytest.param(
        lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16))), (2,), torch.float32, id="mlp_rows"
    ),
    pytest.param(
        lambda: MLPEnergy(MLPEnergyConfig(in_features=9, widths=(16, 16))),
        (1, 3, 3),
        torch.float64,
        id="mlp_images_float64",
    ),
    pytest.param(lambda: GaussianEnergy(MEAN, COVARIANCE), (2,), torch.float32, id="gaussian"),
    pytest.param(
        lambda: GaussianMixtureEnergy(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), 0.5),
        (2,),
        torch.float64,
        id="gaussian_mixture_float64",
    ),
    pytest.param(
        lambda: ClassConditionalEnergy(
            mlp_logits(MLPClassifierConfig(in_features=2, n_classes=3, widths=(16,)))
        ),
        (2,),
        torch.float32,
        id="class_conditional",
    ),
    pytest.param(
        lambda: ImageEnergy(CNN28(CNN28Config(channels=(2, 2, 2, 2), hidden=4, n_classes=3)), (1, 28, 28)),
        (1, 28, 28),
        torch.float32,
        id="cnn28_images",
    ),
    pytest.param(
        lambda: ImageEnergy(ResNet32(ResNet32Config(width=2, n_classes=3)), (3, 32, 32)),
        (3, 32, 32),
        torch.float32,
        id="resnet32_images",
    ),
]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """Construct an energy with seeded initial weights, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().to(dtype)


def mean_and_covariance_with_standard_errors(samples: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample mean and covariance of independent rows, each with its Monte Carlo standard error."""
    n = samples.shape[0]
    centred = samples - samples.mean(0)
    products = centred[:, :, None] * centred[:, None, :]  # (N, D, D)
    return (
        samples.mean(0),
        samples.std(0) / math.sqrt(n),
        products.mean(0),
        products.std(0) / math.sqrt(n),
    )


def unadjusted_langevin_stationary_covariance(step_size: float) -> Tensor:
    """Stationary covariance of x' = x − ηP(x − μ) + √(2η)ξ, the ULA chain on N(μ, Σ).

    It solves S = (I − ηP) S (I − ηP) + 2ηI, whose solution is S = Σ(I − ηP/2)⁻¹ = Σ + (η/2)(I − ηP/2)⁻¹:
    the exact O(η) discretisation bias of unadjusted Langevin on a Gaussian (the mean is unbiased).
    """
    return COVARIANCE + step_size / 2 * torch.linalg.inv(torch.eye(2) - step_size * PRECISION / 2)


# --- contract -----------------------------------------------------------------------------------


def test_every_registered_sampler_has_a_contract_case() -> None:
    assert {case.values[0] for case in SAMPLER_CASES} == set(SAMPLERS)


@pytest.mark.parametrize(("factory", "event_shape", "dtype"), ENERGY_CASES)
@pytest.mark.parametrize(("name", "hyperparameters"), SAMPLER_CASES)
def test_sampler_contract(
    name: str,
    hyperparameters: dict[str, Any],
    factory: Callable[[], nn.Module],
    event_shape: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    hyperparameters = dict(hyperparameters)
    jump_from = hyperparameters.pop("jump_from_x0", None)
    if jump_from == "histogram" and 2 ** math.prod(event_shape) > GridProposal.MAX_CELLS:
        pytest.skip("a grid proposal tabulates low-dimensional events only (2 bins a coordinate here)")
    energy = build(factory, dtype)
    for first in itertools.islice(energy.parameters(), 1):  # the analytic energies have none
        first.requires_grad_(False)  # a partly frozen model must stay partly frozen
    requires_grad_before = [p.requires_grad for p in energy.parameters()]
    x0 = torch.randn((6, *event_shape), generator=seeded(1), dtype=dtype)
    if jump_from == "kernel":
        hyperparameters["jump"] = KernelProposal(x0 + 0.5, bandwidth=0.3, box=(-3.0, 3.0))
    elif jump_from == "histogram":  # 2 bins a coordinate: 512 cells for the 3×3 images
        hyperparameters["jump"] = GridProposal.from_data(x0 + 0.5, (-3.0, 3.0), bins=2)
    sampler = make_sampler(name, **hyperparameters)
    x0_before = x0.clone()
    global_rng_before = torch.get_rng_state()

    x, stats = sampler.run(energy, x0, 5, generator=seeded(0))

    assert x.shape == x0.shape and x.dtype == x0.dtype and x.device == x0.device
    assert torch.isfinite(x).all() and not x.requires_grad
    assert not torch.equal(x, x0), "the chains did not move"
    assert torch.equal(x0, x0_before), "x0 was modified in place"
    assert isinstance(stats, SamplerStats)
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if field.name == "jump_acceptance_rate" and getattr(sampler, "jump", None) is None:
            assert value is None
            continue
        assert isinstance(value, Tensor) and value.ndim == 0 and torch.isfinite(value), field.name
    assert 0.0 <= stats.acceptance_rate.item() <= 1.0
    assert torch.equal(torch.get_rng_state(), global_rng_before), "the global RNG was used"
    assert [p.requires_grad for p in energy.parameters()] == requires_grad_before
    assert all(p.grad is None for p in energy.parameters())

    x_again, stats_again = sampler.run(energy, x0, 5, generator=seeded(0))
    x_other_seed, _ = sampler.run(energy, x0, 5, generator=seeded(1))
    assert torch.equal(x_again, x)
    assert all(
        getattr(stats, f.name) is getattr(stats_again, f.name) is None
        or torch.equal(getattr(stats, f.name), getattr(stats_again, f.name))
        for f in dataclasses.fields(stats)
    )
    assert not torch.equal(x_other_seed, x)


def test_make_sampler_builds_registered_samplers_and_names_the_valid_choices() -> None:
    assert all(isinstance(make_sampler(name), sampler_class) for name, sampler_class in SAMPLERS.items())
    assert make_sampler("mala", step_size=0.2) == MALA(step_size=0.2)
    with pytest.raises(ValueError, match="unknown sampler 'nope'") as raised:
        make_sampler("nope")
    assert all(repr(name) in str(raised.value) for name in SAMPLERS)


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"step_size": 0.0},
        {"step_size": -0.1},
        {"step_size": math.nan},
        {"step_size": math.inf},
        {"noise_scale": -1.0},
        {"grad_clip": 0.0},
        {"clamp": (1.0, -1.0)},
    ],
)
def test_langevin_rejects_invalid_hyperparameters(hyperparameters: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Langevin(**hyperparameters)


@pytest.mark.parametrize("step_size", [0.0, -1.0, math.nan])
def test_mala_rejects_invalid_step_size(step_size: float) -> None:
    with pytest.raises(ValueError, match="step_size"):
        MALA(step_size=step_size)


# --- statistics on Gaussians --------------------------------------------------------------------
#
# Every chain's final state is an independent draw, so the Monte Carlo standard error (SE) of a
# mean or a covariance entry over N_CHAINS chains is the sample std of the summand over √N_CHAINS.
# Tolerances are 4 SE (a two-sided miss has probability ~6e-5 per entry were the seed changed),
# plus, for unadjusted Langevin, its known discretisation bias and the transient left from x0.


def test_langevin_recovers_mean_and_covariance_of_correlated_gaussian() -> None:
    step_size, n_steps = 0.05, 250
    energy = GaussianEnergy(MEAN, COVARIANCE)
    x0 = torch.zeros(N_CHAINS, 2)

    x, _ = Langevin(step_size=step_size).run(energy, x0, n_steps, generator=seeded(0))
    mean, mean_se, covariance, covariance_se = mean_and_covariance_with_standard_errors(x)

    # On a Gaussian the chain is linear: E[x_n] − μ = (I − ηP)ⁿ(x0 − μ) and
    # S_n − S = (I − ηP)ⁿ(S_0 − S)(I − ηP)ⁿ with S_0 = 0, both contracting by 1 − ηλ_min per step
    # (η λ_max < 1 here). The stationary covariance S differs from Σ by the O(η) bias
    # (η/2)(I − ηP/2)⁻¹ ≈ 0.025·I, which the tolerance allows in full.
    eigenvalues = torch.linalg.eigvalsh(PRECISION)
    assert step_size * eigenvalues.max() < 1
    contraction = (1 - step_size * eigenvalues.min()).item() ** n_steps  # ≈ 2e-4
    stationary = unadjusted_langevin_stationary_covariance(step_size)
    mean_tolerance = 4 * mean_se + contraction * (x0[0] - MEAN).norm()
    covariance_tolerance = (
        4 * covariance_se + (stationary - COVARIANCE).abs() + contraction**2 * stationary.abs()
    )
    assert ((mean - MEAN).abs() <= mean_tolerance).all(), (mean, mean_tolerance)
    assert ((covariance - COVARIANCE).abs() <= covariance_tolerance).all(), (covariance, covariance_tolerance)


def test_mala_recovers_mean_and_covariance_of_correlated_gaussian() -> None:
    # MALA is exact, so only Monte Carlo error is allowed. 150 steps are ~17 times the relaxation time
    # 1 / (η λ_min · acceptance) ≈ 9 steps of the slowest direction.
    energy = GaussianEnergy(MEAN, COVARIANCE)

    x, stats = MALA(step_size=0.2).run(energy, torch.zeros(N_CHAINS, 2), 150, generator=seeded(1))
    mean, mean_se, covariance, covariance_se = mean_and_covariance_with_standard_errors(x)

    assert ((mean - MEAN).abs() <= 4 * mean_se).all(), (mean, mean_se)
    assert ((covariance - COVARIANCE).abs() <= 4 * covariance_se).all(), (covariance, covariance_se)
    assert 0.5 < stats.acceptance_rate.item() < 1.0


def test_mala_is_exact_at_a_step_size_where_unadjusted_langevin_is_biased() -> None:
    step_size = 0.4  # η λ_max = 1.37: ULA is stable (< 2) but its covariance is ~(η/2)(I − ηP/2)⁻¹ off
    energy = GaussianEnergy(MEAN, COVARIANCE)
    x0 = torch.zeros(N_CHAINS, 2)

    x_ula, _ = Langevin(step_size=step_size).run(energy, x0, 100, generator=seeded(2))
    x_mala, _ = MALA(step_size=step_size).run(energy, x0, 150, generator=seeded(3))
    _, _, covariance_ula, se_ula = mean_and_covariance_with_standard_errors(x_ula)
    _, _, covariance_mala, se_mala = mean_and_covariance_with_standard_errors(x_mala)

    # ULA is clearly biased, and by exactly the amount its stationary covariance predicts (the transient
    # from x0 has shrunk by max|1 − ηλ|¹⁰⁰ = 0.735¹⁰⁰, i.e. to nothing)...
    assert ((covariance_ula - COVARIANCE).abs() / se_ula).max() > 10
    stationary = unadjusted_langevin_stationary_covariance(step_size)
    assert ((covariance_ula - stationary).abs() <= 4 * se_ula).all(), (covariance_ula, stationary)
    # ...while MALA, with the same proposal, recovers Σ within Monte Carlo error.
    assert ((covariance_mala - COVARIANCE).abs() <= 4 * se_mala).all(), (covariance_mala, se_mala)


def stationary_mala_acceptance(
    dim: int, step_size: float, n: int, generator: torch.Generator
) -> tuple[float, float]:
    """Monte Carlo estimate (and SE) of MALA's stationary acceptance on π = N(0, I_d),

        a(h) = E_{x∼π, y∼q(·|x)}[min(1, α(x, y))],   α = π(y) q(x|y) / (π(x) q(y|x)),

    with exact draws x ~ π and the Langevin proposal q(·|x) = N((1 − h)x, 2h I), written from the
    densities independently of the sampler's code.
    """
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    proposal_std = math.sqrt(2 * step_size)
    y = (1 - step_size) * x + proposal_std * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    target = Normal(0.0, 1.0)
    log_alpha = (
        target.log_prob(y).sum(1)
        - target.log_prob(x).sum(1)
        + Normal((1 - step_size) * y, proposal_std).log_prob(x).sum(1)
        - Normal((1 - step_size) * x, proposal_std).log_prob(y).sum(1)
    )
    acceptance = log_alpha.exp().clamp(max=1.0)
    return acceptance.mean().item(), acceptance.std().item() / math.sqrt(n)


@pytest.mark.parametrize("step_size", [0.1, 0.5, 1.0])
def test_mala_acceptance_at_stationarity_matches_its_expectation(step_size: float) -> None:
    # Theory tested: started at stationarity (x0 ~ π exactly), every MALA step's acceptance indicator has
    # mean a(h) above, for any d and h; this is exact, not the d → ∞ limit of Roberts & Rosenthal (1998).
    # The sampler's rate averages 5 steps over B independent chains, so its SE is at most √(a(1 − a)/B).
    # Sensitivity: dropping the Hastings correction q(x|y)/q(y|x) gives 0.48 instead of 0.70 at h = 0.5.
    dim, n_chains, n_steps = 10, 20_000, 5
    energy = GaussianEnergy(torch.zeros(dim), torch.eye(dim))
    x0 = torch.randn(n_chains, dim, generator=seeded(4))

    _, stats = MALA(step_size=step_size).run(energy, x0, n_steps, generator=seeded(5))
    expected, expected_se = stationary_mala_acceptance(dim, step_size, 200_000, seeded(6))

    sampler_se = math.sqrt(expected * (1 - expected) / n_chains)
    tolerance = 4 * math.hypot(sampler_se, expected_se)
    assert stats.acceptance_rate.item() == pytest.approx(expected, abs=tolerance)


def test_mala_acceptance_tends_to_one_and_decreases_with_step_size() -> None:
    # At stationarity 1 − a(h) = O(h^{3/2}) as h → 0 (log α has standard deviation O(√d h^{3/2})), and on
    # N(0, I_10) a(h) falls from 0.99997 (h = 1e-3) to 0.29 (h = 1): adjacent steps below differ by
    # ≥ 0.0008 in rejection rate, i.e. ≥ 40 expected rejections over the 50 000 chain-steps.
    dim, n_chains, n_steps = 10, 10_000, 5
    energy = GaussianEnergy(torch.zeros(dim), torch.eye(dim))
    x0 = torch.randn(n_chains, dim, generator=seeded(7))
    step_sizes = [1e-3, 1e-2, 0.1, 0.3, 0.5, 0.7, 1.0]

    rates = [
        MALA(step_size=h).run(energy, x0, n_steps, generator=seeded(8))[1].acceptance_rate.item()
        for h in step_sizes
    ]

    assert rates[0] > 0.999
    assert all(smaller > larger for smaller, larger in itertools.pairwise(rates)), rates


# --- the Langevin knobs -------------------------------------------------------------------------


def test_grad_clip_caps_each_chains_step_separately() -> None:
    step_size, max_norm, stiffness = 0.1, 1.0, 100.0

    def stiff_quadratic(x: Tensor) -> Tensor:
        return 0.5 * stiffness * x.square().sum(1)  # ∇ₓE = stiffness · x

    x0 = torch.tensor([[0.001, 0.002], [0.003, -0.004], [1.0, 0.0], [-3.0, 4.0]])  # ‖∇E‖: 0.22, 0.5, 100, 500
    sampler = Langevin(step_size=step_size, noise_scale=0.0, grad_clip=max_norm)

    x, stats = sampler.run(stiff_quadratic, x0, 1)

    step = x - x0
    small = slice(0, 2)
    torch.testing.assert_close(step[small], -step_size * stiffness * x0[small])  # under the cap: untouched
    large = slice(2, 4)
    torch.testing.assert_close(step[large].norm(dim=1), torch.full((2,), step_size * max_norm))
    torch.testing.assert_close(
        step[large] / step[large].norm(dim=1, keepdim=True), -x0[large] / x0[large].norm(dim=1, keepdim=True)
    )
    # The reported gradient norm is the pre-clipping one.
    torch.testing.assert_close(stats.grad_norm, (stiffness * x0.norm(dim=1)).mean())


def test_clamp_keeps_chains_in_the_box() -> None:
    energy = GaussianEnergy(torch.tensor([3.0, -3.0]), torch.eye(2))  # pulls chains out of both sides
    sampler = Langevin(step_size=0.1, noise_scale=1.0, clamp=(-1.0, 1.0))
    x0 = UniformBox((2,)).sample(500, generator=seeded(9))

    x, _ = sampler.run(energy, x0, 50, generator=seeded(10))

    assert x.min() >= -1.0 and x.max() <= 1.0
    assert (x[:, 0] == 1.0).any() and (x[:, 1] == -1.0).any(), "the box was never reached: test too weak"


@pytest.mark.parametrize(
    ("noise_scale", "sigma"),
    [pytest.param(0.3, 0.3, id="decoupled_noise_scale"), pytest.param(None, 0.2, id="default_sqrt_2_eta")],
)
def test_one_langevin_step_moves_by_the_gradient_step_plus_the_noise_scale_times_the_drawn_noise(
    noise_scale: float | None, sigma: float
) -> None:
    # η = 0.02: the default σ = √(2η) = 0.2 is far from the decoupled 0.3, so a swap of the two shows.
    step_size = 0.02
    energy = GaussianEnergy(MEAN, COVARIANCE)
    sampler = Langevin(step_size=step_size, noise_scale=noise_scale)
    x0 = 2 * torch.randn(8, 2, generator=seeded(14))
    xi = torch.randn(x0.shape, generator=seeded(15))  # the ξ the sampler draws first from that generator

    one_step, _ = sampler.run(energy, x0, 1, generator=seeded(15))

    gradient = (x0 - MEAN) @ PRECISION  # ∇ₓE = P(x − μ), one row per chain
    torch.testing.assert_close(one_step, x0 - step_size * gradient + sigma * xi)
    assert sampler.sigma == pytest.approx(sigma)


def test_langevin_reports_the_gradient_norm_averaged_over_its_steps_and_chains() -> None:
    energy = GaussianEnergy(MEAN, COVARIANCE)
    sampler = Langevin(step_size=0.2, noise_scale=0.0)  # deterministic: the path can be replayed by hand
    x = 3 * torch.randn(16, 2, generator=seeded(16))
    norms = []
    for _ in range(3):
        gradient = (x - MEAN) @ PRECISION  # ∇ₓE = P(x − μ)
        norms.append(gradient.norm(dim=1))
        x = x - 0.2 * gradient

    _, stats = sampler.run(energy, 3 * torch.randn(16, 2, generator=seeded(16)), 3)

    torch.testing.assert_close(stats.grad_norm, torch.stack(norms).mean())
    assert not torch.allclose(stats.grad_norm, norms[0].mean()), "the steps' norms must differ: test too weak"


def test_zero_noise_is_deterministic_gradient_descent_to_the_mode() -> None:
    energy = GaussianEnergy(MEAN, COVARIANCE)
    sampler = Langevin(step_size=0.2, noise_scale=0.0)
    x0 = 3 * torch.randn(64, 2, generator=seeded(11))

    x, _ = sampler.run(energy, x0, 150, generator=seeded(12))
    x_other_seed, _ = sampler.run(energy, x0, 150, generator=seeded(13))
    one_step, _ = sampler.run(energy, x0, 1)

    # One step is exactly x − η∇E(x) = x − ηP(x − μ); then it contracts by (1 − ηλ_min)¹⁵⁰ ≈ 6e-10.
    torch.testing.assert_close(one_step, x0 - 0.2 * (x0 - MEAN) @ PRECISION)
    assert torch.equal(x, x_other_seed)
    torch.testing.assert_close(x, MEAN.expand_as(x), atol=1e-5, rtol=0)


# --- proposals and the replay buffer ------------------------------------------------------------


def test_uniform_box_fills_exactly_its_box() -> None:
    box = UniformBox((3, 2), low=-2.0, high=0.5)

    x = box.sample(20_000, generator=seeded(14), dtype=torch.float64)

    assert x.shape == (20_000, 3, 2) and x.dtype == torch.float64
    assert x.min() >= -2.0 and x.max() <= 0.5
    assert x.min() < -1.99 and x.max() > 0.49  # fills the box, not a corner of it
    assert x.mean().item() == pytest.approx(-0.75, abs=0.01)  # 4 SE of the mean of 120 000 uniforms
    with pytest.raises(ValueError, match="low < high"):
        UniformBox((2,), low=1.0, high=1.0)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_replay_buffer_shape_device_and_dtype(device: str) -> None:
    buffer = ReplayBuffer(
        100,
        UniformBox((1, 4, 4)),
        generator=torch.Generator(device).manual_seed(15),
        device=device,
        dtype=torch.float64,
    )

    x, slots = buffer.sample(32, generator=torch.Generator(device).manual_seed(16))

    assert buffer.states.shape == (100, 1, 4, 4) and buffer.capacity == 100
    assert x.shape == (32, 1, 4, 4) and x.dtype == torch.float64 and x.device.type == device
    assert slots.shape == (32,) and slots.dtype == torch.long and slots.device.type == device
    assert slots.min() >= 0 and slots.max() < 100


def test_a_replay_buffer_refuses_a_generator_of_another_device_type_by_name() -> None:
    # the meta device stands in for a GPU here: torch would fail on it with its own message, or not at all
    with pytest.raises(ValueError, match=r"ReplayBuffer: the generator is on cpu but the states are on meta"):
        ReplayBuffer(10, UniformBox((2,)), generator=seeded(0), device="meta")
    buffer = ReplayBuffer(10, UniformBox((2,)), generator=seeded(0))
    buffer.states = buffer.states.to("meta")
    with pytest.raises(ValueError, match=r"ReplayBuffer.sample: the generator is on cpu"):
        buffer.sample(4, generator=seeded(1))


@pytest.mark.parametrize("reinit_prob", [0.0, 0.05, 0.3, 1.0])
def test_replay_buffer_reinitialises_the_expected_fraction(reinit_prob: float) -> None:
    buffer = ReplayBuffer(50, UniformBox((2,)), reinit_prob=reinit_prob)
    stale = 5.0  # outside the proposal box, so a fresh draw is recognisable
    buffer.load_state_dict({"states": torch.full((50, 2), stale), "reinit_prob": reinit_prob})
    generator, n_draws, batch = seeded(17), 20, 5000

    x = torch.cat([buffer.sample(batch, generator=generator)[0] for _ in range(n_draws)])
    fresh = (x.abs() <= 1.0).all(1)

    assert (fresh | (x == stale).all(1)).all()
    n = n_draws * batch
    assert fresh.float().mean().item() == pytest.approx(
        reinit_prob, abs=4 * math.sqrt(reinit_prob * (1 - reinit_prob) / n)
    )


def test_replay_buffer_sample_is_a_copy_and_update_writes_back_its_slots() -> None:
    buffer = ReplayBuffer(10, UniformBox((2,)), reinit_prob=0.0, generator=seeded(18))
    before = buffer.states.clone()

    x, slots = buffer.sample(4, generator=seeded(19))
    torch.testing.assert_close(x, before[slots])
    x.add_(100.0)
    assert torch.equal(buffer.states, before), "sample returned a view into the buffer"

    slots = torch.tensor([7, 2, 4])
    new_states = torch.arange(6, dtype=torch.float64).reshape(3, 2).requires_grad_(True)
    buffer.update(slots, new_states * 1)

    untouched = torch.ones(10, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(buffer.states[slots], new_states.detach().float())
    assert torch.equal(buffer.states[untouched], before[untouched])
    assert buffer.states.dtype == torch.float32 and not buffer.states.requires_grad


def test_replay_buffer_without_replacement_draws_distinct_slots_and_refuses_more_than_it_holds() -> None:
    buffer = ReplayBuffer(12, UniformBox((2,)), reinit_prob=0.0, replacement=False, generator=seeded(23))
    generator = seeded(24)
    for n in (5, 12):
        _, slots = buffer.sample(n, generator=generator)
        assert slots.unique().numel() == n and int(slots.min()) >= 0 and int(slots.max()) < 12
    with pytest.raises(ValueError, match="cannot draw 13 distinct chains from a replay buffer of 12"):
        buffer.sample(13, generator=generator)


def test_replay_buffer_state_dict_round_trips_through_torch_save() -> None:
    saved = ReplayBuffer(20, UniformBox((3,)), reinit_prob=0.2, generator=seeded(20))
    state = saved.state_dict()
    saved.update(torch.tensor([0]), torch.zeros(1, 3))  # later changes must not leak into the saved state

    restored = ReplayBuffer(5, UniformBox((3,)), reinit_prob=0.9, generator=seeded(21))
    restored.load_state_dict(state)
    assert torch.equal(restored.states, state["states"]) and restored.reinit_prob == 0.2
    assert not torch.equal(restored.states[0], torch.zeros(3))

    file = io.BytesIO()
    torch.save(state, file)
    file.seek(0)
    reloaded = ReplayBuffer(20, UniformBox((3,)))
    reloaded.load_state_dict(torch.load(file, weights_only=True))
    assert torch.equal(reloaded.states, restored.states) and reloaded.reinit_prob == 0.2
    assert torch.equal(
        reloaded.sample(8, generator=seeded(22))[0], restored.sample(8, generator=seeded(22))[0]
    )


def test_replay_buffer_rejects_states_of_another_shape() -> None:
    buffer = ReplayBuffer(10, UniformBox((2,)))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        buffer.load_state_dict({"states": torch.zeros(10, 3), "reinit_prob": 0.05})


@pytest.mark.parametrize(("capacity", "reinit_prob"), [(0, 0.05), (10, -0.1), (10, 1.5)])
def test_replay_buffer_rejects_invalid_arguments(capacity: int, reinit_prob: float) -> None:
    with pytest.raises(ValueError):
        ReplayBuffer(capacity, UniformBox((2,)), reinit_prob=reinit_prob)


# --- mode-jumping moves ------------------------------------------------------------------------------


def _two_separated_modes() -> GaussianMixtureEnergy:
    """Modes 8 standard deviations apart, weighted 0.8 / 0.2: local moves essentially never cross."""
    return GaussianMixtureEnergy(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.25, torch.tensor([0.8, 0.2]))


def test_kernel_proposal_log_prob_is_a_normalised_density() -> None:
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, -1.0]])
    proposal = KernelProposal(centres, bandwidth=0.4, box=(-4.0, 4.0), uniform_weight=0.2)
    resolution = 400
    axis = torch.linspace(-6.0, 6.0, resolution + 1, dtype=torch.float64)
    mids = (axis[1:] + axis[:-1]) / 2
    grid = torch.cartesian_prod(mids, mids)
    cell = (axis[1] - axis[0]) ** 2
    mass = float(proposal.log_prob(grid).exp().sum() * cell)
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_kernel_proposal_log_prob_is_the_mixture_formula_to_float32_precision() -> None:
    """The GEMM form of the kernel sum against the mixture written out term by term, in float64, on
    the 2D sets' scale (±4.5, a narrow bandwidth), near the centres and far from them."""
    generator = torch.Generator().manual_seed(3)
    centres = 8 * torch.rand(2048, 2, generator=generator) - 4
    proposal = KernelProposal(centres, bandwidth=0.08, box=(-4.5, 4.5), uniform_weight=0.1)
    x = torch.cat(
        [
            centres[:100] + 0.05 * torch.randn(100, 2, generator=generator),
            9 * torch.rand(100, 2, generator=generator) - 4.5,
        ]
    )
    c, x64, h = centres.double(), x.double(), 0.08
    sq = (x64[:, None, :] - c[None, :, :]).square().sum(-1)
    kernel = torch.exp(-sq / (2 * h**2)).mean(1) / (2 * math.pi * h**2)
    expected = torch.log(0.9 * kernel + 0.1 / 9**2)
    torch.testing.assert_close(proposal.log_prob(x).double(), expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(proposal.log_prob(x64), expected, rtol=0, atol=1e-9)


def test_kernel_proposal_samples_follow_its_log_prob() -> None:
    """The fraction of draws in a region matches ∫ q over it (the uniform and kernel parts alike)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    proposal = KernelProposal(centres, bandwidth=0.3, box=(-4.0, 4.0), uniform_weight=0.25)
    draws = proposal.sample(200_000, generator=generator)
    in_band = ((draws[:, 0] > 1.0) & (draws[:, 0] < 3.0) & (draws[:, 1].abs() < 1.0)).double().mean()
    axis = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
    xs = torch.linspace(1.0, 3.0, 201, dtype=torch.float64)
    grid = torch.cartesian_prod((xs[1:] + xs[:-1]) / 2, (axis[1:] + axis[:-1]) / 2)
    expected = float(proposal.log_prob(grid).exp().sum() * (xs[1] - xs[0]) * (axis[1] - axis[0]))
    standard_error = math.sqrt(expected * (1 - expected) / draws.shape[0])
    assert abs(float(in_band) - expected) < 5 * standard_error


def test_mala_without_jumps_keeps_the_split_it_started_with() -> None:
    """The failure the jumps fix: every chain starts in the light mode and stays there."""
    x0 = torch.tensor([2.0, 0.0]) + 0.1 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    x, _ = MALA(step_size=0.02).run(
        _two_separated_modes(), x0, 300, generator=torch.Generator().manual_seed(2)
    )
    assert float((x[:, 0] < 0).float().mean()) < 0.01


@pytest.mark.parametrize("tabulated", [False, True], ids=["kernel", "kernel_tabulated_on_a_grid"])
def test_mala_with_jumps_recovers_the_weights_of_separated_modes(tabulated: bool) -> None:
    energy = _two_separated_modes()
    x0 = torch.tensor([2.0, 0.0]) + 0.1 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    # The proposal's modes are weighted 0.5 / 0.5, not the target's 0.8 / 0.2: the acceptance step, not
    # the proposal, must get the weights right.
    centres = torch.cat([x0[:128], x0[128:256] - torch.tensor([4.0, 0.0])])
    proposal: KernelProposal | GridProposal
    proposal = KernelProposal(centres, bandwidth=0.3, box=(-4.0, 4.0), uniform_weight=0.1)
    if tabulated:
        proposal = GridProposal.from_density(proposal.log_prob, (-4.0, 4.0), bins=64, event_shape=(2,))
    x, stats = MALA(step_size=0.02, jump=proposal, jump_every=5).run(
        energy, x0, 300, generator=torch.Generator().manual_seed(2)
    )
    heavy = float((x[:, 0] < 0).float().mean())
    standard_error = math.sqrt(0.8 * 0.2 / x.shape[0])
    assert abs(heavy - 0.8) < 5 * standard_error
    assert stats.jump_acceptance_rate is not None and 0.0 < float(stats.jump_acceptance_rate) < 1.0
    # Within the heavy mode, MALA still samples its Gaussian: spread 0.25 per coordinate.
    assert float(x[x[:, 0] < 0].std(0).mean()) == pytest.approx(0.25, rel=0.1)


def test_grid_proposal_from_data_is_the_normalised_mixture_of_a_histogram_and_the_box() -> None:
    # 4 bins over [-2, 2]: cells of side 1. Points: 3 in the cell [-1, 0) × [0, 1), 1 in [1, 2] × [1, 2]
    # (the box's upper edge belongs to the last cell), 1 below the box (counted in the nearest cell).
    x = torch.tensor([[-0.5, 0.5], [-0.9, 0.1], [-0.1, 0.9], [2.0, 2.0], [-0.5, -7.0]])
    proposal = GridProposal.from_data(x, (-2.0, 2.0), bins=4, uniform_weight=0.2)
    assert proposal.cell_probs.sum().item() == pytest.approx(1.0)
    queries = torch.tensor([[-0.7, 0.2], [1.5, 1.5], [-0.5, -1.9], [0.5, 0.5], [2.5, 0.0]])
    uniform = 0.2 / 16  # w / box area
    expected = torch.tensor([0.8 * 3 / 5 + uniform, 0.8 / 5 + uniform, 0.8 / 5 + uniform, uniform, 0.0]).log()
    torch.testing.assert_close(proposal.log_prob(queries), expected.float())

    resolution = 600  # the density integrates to 1 over the plane (grid cells of 0.01, aligned to its own)
    axis = torch.linspace(-3.0, 3.0, resolution + 1, dtype=torch.float64)
    mids = (axis[1:] + axis[:-1]) / 2
    mass = float(proposal.log_prob(torch.cartesian_prod(mids, mids)).exp().sum() * (axis[1] - axis[0]) ** 2)
    assert mass == pytest.approx(1.0, abs=1e-9)


def test_grid_proposal_samples_follow_its_log_prob() -> None:
    """Per cell, the fraction of draws matches q integrated over the cell, the empty cells included."""
    generator = torch.Generator().manual_seed(0)
    data = torch.cat(
        [
            torch.randn(300, 2, generator=generator) * 0.4 + torch.tensor([-1.0, 2.0]),
            torch.rand(100, 2, generator=generator),
        ]
    )
    proposal = GridProposal.from_data(data, (-4.0, 4.0), bins=8, uniform_weight=0.25)
    draws = proposal.sample(200_000, generator=generator)
    assert draws.shape == (200_000, 2) and bool(((draws >= -4) & (draws <= 4)).all())
    cells = ((draws + 4).floor().long().clamp(0, 7) * torch.tensor([8, 1])).sum(1)
    observed = torch.bincount(cells, minlength=64).double() / draws.shape[0]
    expected = (
        proposal.log_prob(torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0)) - 3.5).double().exp()
    )
    standard_error = (expected * (1 - expected) / draws.shape[0]).sqrt()
    assert bool(((observed - expected).abs() < 5 * standard_error).all())


def test_grid_proposal_rejects_what_it_cannot_build() -> None:
    x = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="bins"):
        GridProposal.from_data(x, (-1.0, 1.0), bins=0)
    with pytest.raises(ValueError, match="KernelProposal"):  # 64⁵ cells
        GridProposal.from_data(torch.zeros(10, 5), (-1.0, 1.0), bins=64)
    with pytest.raises(ValueError, match="NaN"):
        GridProposal.from_data(torch.tensor([[0.0, math.nan]]), (-1.0, 1.0))
    with pytest.raises(ValueError, match="uniform_weight"):
        GridProposal.from_data(x, (-1.0, 1.0), uniform_weight=1.0)
    with pytest.raises(ValueError, match="not all zero"):
        GridProposal(torch.zeros(4, 4), (-1.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        GridProposal.from_density(lambda x: x.sum(1) * math.nan, (-1.0, 1.0), bins=4, event_shape=(2,))
    with pytest.raises(ValueError, match="no mass in the box"):
        GridProposal.from_density(lambda x: x.sum(1) - math.inf, (-1.0, 1.0), bins=4, event_shape=(2,))


def test_grid_proposal_from_density_tabulates_a_kernel_proposal_at_the_cell_centres() -> None:
    """At every cell centre the tabulated density is the kernel's, times one constant: 1 over the kernel's
    mass in the box by the midpoint rule (≈ 1 here); off the centre it is the centre's value."""
    kernel = KernelProposal(torch.tensor([[-1.0, 0.5], [1.5, -1.0]]), bandwidth=0.6, box=(-4.0, 4.0))
    grid = GridProposal.from_density(kernel.log_prob, (-4.0, 4.0), bins=128, event_shape=(2,))
    centres = -4.0 + (torch.tensor([[48, 72], [112, 112], [70, 40]]) + 0.5) / 16  # cells of side 1/16
    shift = grid.log_prob(centres) - kernel.log_prob(centres)
    torch.testing.assert_close(shift, torch.full_like(shift, float(shift[0])), rtol=0, atol=1e-5)
    assert abs(float(shift[0])) < 1e-3
    off_centre = centres + torch.tensor([0.02, -0.03])  # the same cells
    torch.testing.assert_close(grid.log_prob(off_centre), grid.log_prob(centres))


def test_sampler_config_builds_mode_jumping_mala_only_with_data() -> None:
    config = SamplerConfig(name="mala", step_size=0.05, jump_every=5)
    with pytest.raises(ValueError, match="training data"):
        config.build()
    data = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    sampler = config.build(data=data, box=(-3.0, 3.0))
    assert isinstance(sampler, MALA) and isinstance(sampler.jump, KernelProposal)
    assert sampler.jump_every == 5
    with pytest.raises(ValueError, match="mala"):
        SamplerConfig(name="langevin", jump_every=5).build(data=data, box=(-3.0, 3.0))
    tabulated = dataclasses.replace(config, jump_grid_bins=16).build(data=data, box=(-3.0, 3.0))
    assert isinstance(tabulated, MALA) and isinstance(tabulated.jump, GridProposal)
    assert tabulated.jump.bins == 16 and tabulated.jump.uniform_weight == 0.0  # the kernel's own is kept
    with pytest.raises(ValueError, match="jump_grid_bins"):
        SamplerConfig(name="mala", jump_every=5, jump_grid_bins=0)


@pytest.mark.parametrize("overrides", [{}, {"jump_every": 5}], ids=["plain", "jumping"])
def test_sampler_config_rejects_an_unknown_name_when_made(overrides: dict[str, Any]) -> None:
    # With jump_every set, an unknown name used to become MALA silently.
    with pytest.raises(ValueError, match=r"unknown sampler name 'hmc'; choose one of \['langevin', 'mala'\]"):
        SamplerConfig(name="hmc", **overrides)


@pytest.mark.parametrize(
    ("overrides", "ignored"),
    [
        ({"jump_grid_bins": 64}, "jump_grid_bins"),
        ({"jump_uniform_weight": 0.3}, "jump_uniform_weight"),
        ({"jump_grid_bins": 64, "jump_uniform_weight": 0.0}, "jump_uniform_weight and jump_grid_bins"),
    ],
)
def test_sampler_config_rejects_jump_options_without_jump_every(
    overrides: dict[str, Any], ignored: str
) -> None:
    for name in ("langevin", "mala"):
        with pytest.raises(ValueError, match=f"^{ignored} set.*jump_every"):
            SamplerConfig(name=name, **overrides)
    SamplerConfig(name="mala", jump_every=5, **overrides)  # with jumps on, they are used


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"jump_every": 0}, "jump_every must be ≥ 1"),
        ({"jump_uniform_weight": 1.0}, "jump_uniform_weight must"),
    ],
)
def test_sampler_config_rejects_bad_jump_settings_when_made(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplerConfig(name="mala", **{"jump_every": 5, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [{"noise_scale": 0.01}, {"grad_clip": 1.0}, {"clamp": (0.0, 1.0)}],
    ids=lambda o: next(iter(o)),
)
def test_sampler_config_rejects_langevin_knobs_for_mala_when_made(overrides: dict[str, Any]) -> None:
    # Found only by build(), at the start of training, a params file with them used to pass as read.
    (knob,) = overrides
    with pytest.raises(ValueError, match=f"sampler 'mala' takes no \\['{knob}'\\]"):
        SamplerConfig(name="mala", **overrides)
    assert isinstance(SamplerConfig(name="langevin", **overrides).build(), Langevin)


def test_sampler_config_rejects_mode_jumps_for_langevin_when_made() -> None:
    # Found only by build(), at the start of training, a params file with them used to pass as read.
    with pytest.raises(ValueError, match=r"jump_every needs the Metropolis-adjusted sampler \(name: mala\)"):
        SamplerConfig(name="langevin", jump_every=5)
    assert SamplerConfig(name="mala", jump_every=5).jump_every == 5


def test_the_shipped_sampler_configs_are_accepted() -> None:
    from pathlib import Path

    import yaml

    from ebm.config import from_dict
    from ebm.toy import Toy2DConfig

    root = Path(__file__).resolve().parents[1]
    assert Toy2DConfig().sampler.jump_grid_bins == 128
    for params in (root / "params.yaml", root / "configs" / "quick.yaml"):
        sections = yaml.safe_load(params.read_text())
        for section in ("toy", "images"):
            if section in sections:
                from_dict(SamplerConfig, sections[section]["sampler"], f"{section}.sampler")


def test_only_metropolis_adjusted_samplers_say_so() -> None:
    assert MALA.metropolis_adjusted and not Langevin.metropolis_adjusted
    assert dataclasses.replace(MALA(0.1), step_size=0.2).metropolis_adjusted  # a class constant, no field
    assert "metropolis_adjusted" not in {field.name for field in dataclasses.fields(MALA)}


def test_the_class_gaussian_proposal_reproduces_each_class_mean_covariance_and_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[0.05, 0.0, 0.0], [0.03, 0.04, 0.0], [0.0, -0.02, 0.06]])
    centres = torch.tensor([[0.2, 0.3, 0.3], [0.8, 0.7, 0.7]])  # far apart: nearest centre = class
    labels = torch.cat([torch.zeros(3000), torch.ones(1000)]).long()
    x = centres[labels] + (torch.randn(4000, 3, generator=generator) @ mixing.T) * (1 + labels[:, None])
    proposal = GaussianMixtureProposal.fit(x.view(4000, 1, 3), labels, jitter=1e-8)

    draws = proposal.sample(40000, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (40000, 1, 3) and draws.min() >= 0 and draws.max() <= 1
    flat = draws.view(-1, 3)
    nearer_second = (flat - centres[1]).norm(dim=1) < (flat - centres[0]).norm(dim=1)
    assert float(nearer_second.float().mean()) == pytest.approx(0.25, abs=0.02)  # the class weights
    for k in (0, 1):
        rows = flat[nearer_second == bool(k)]
        expected_cov = (1 + k) ** 2 * mixing @ mixing.T
        assert torch.allclose(rows.mean(0), centres[k], atol=0.01)
        assert torch.allclose(torch.cov(rows.T), expected_cov, atol=0.1 * float(expected_cov.max()))


def test_the_class_gaussian_proposal_clamps_to_its_box_and_rejects_what_it_cannot_fit() -> None:
    wide = torch.rand(100, 4) * 10 - 5
    draws = GaussianMixtureProposal.fit(wide, low=-1.0, high=1.0).sample(500)
    assert draws.min() == -1 and draws.max() == 1  # clamped, and the tails reach the walls
    noisy = GaussianMixtureProposal.fit(wide, low=-1.0, high=1.0, uniform_weight=0.5).sample(4000)
    interior = ((noisy > -1) & (noisy < 1)).all(dim=1)  # the Gaussian's draws mostly hit a wall
    assert float(interior.float().mean()) == pytest.approx(0.5, abs=0.06)
    assert (GaussianMixtureProposal.fit(wide, uniform_weight=1.0).sample(1000).mean() - 0.5).abs() < 0.02
    with pytest.raises(ValueError, match="uniform_weight"):
        GaussianMixtureProposal.fit(wide, uniform_weight=1.5)
    with pytest.raises(ValueError, match="two samples"):
        GaussianMixtureProposal.fit(wide, torch.cat([torch.zeros(99), torch.ones(1)]).long())
    with pytest.raises(ValueError, match="scale_trils"):
        GaussianMixtureProposal(torch.zeros(2, 4), torch.zeros(1, 4, 4), torch.ones(2))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": "langevin", "noise_scale": math.nan}, "noise_scale must be a finite number ≥ 0"),
        ({"name": "langevin", "noise_scale": math.inf}, "noise_scale must be a finite number ≥ 0"),
        ({"name": "langevin", "noise_scale": -1.0}, "noise_scale must be a finite number ≥ 0"),
        ({"name": "langevin", "step_size": -0.5}, "step_size must be a positive finite number"),
        ({"name": "mala", "step_size": math.nan}, "step_size must be a positive finite number"),
        ({"name": "langevin", "grad_clip": 0.0}, "grad_clip must be a positive finite number"),
        ({"name": "langevin", "clamp": (0.0, math.inf)}, "finite low < high"),
    ],
    ids=["nan-noise", "inf-noise", "negative-noise", "negative-step", "nan-step", "zero-clip", "inf-clamp"],
)
def test_sampler_config_refuses_bad_hyperparameters_when_made(overrides: dict[str, Any], match: str) -> None:
    # a NaN or infinite noise scale passed, turned every chain NaN and surfaced as a divergence of training;
    # the others passed the params file and failed only when training built the sampler
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**overrides)


@pytest.mark.parametrize("box", [(-math.inf, math.inf), (0.0, math.inf), (math.nan, 1.0)])
def test_an_infinite_box_is_refused_not_sampled_into_nan(box: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="finite low < high"):
        UniformBox((2,), *box)


def test_a_slot_drawn_twice_keeps_its_last_chain_whatever_the_threads() -> None:
    # an indexed write with a repeated slot left the winner to the threads: on two threads about one
    # update in thirty kept chain 0's image, or a mix of both, and seeded image training did not repeat
    shape = (3, 32, 32)
    buffer = ReplayBuffer(16, UniformBox(shape, 0.0, 1.0), generator=seeded(0))
    slots = torch.tensor([3, 9, 5, 1, 7, 11, 12, 3])  # slot 3: chains 0 and 7
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, *shape).contiguous()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kept = set()
        for _ in range(500):
            buffer.update(slots, x)
            kept.add(tuple(buffer.states[3].unique().tolist()))
    finally:
        torch.set_num_threads(previous)
    assert kept == {(7.0,)}
    assert torch.equal(buffer.states[slots[1:7]], x[1:7])  # the other slots hold their own chains
