"""Energies: the (B, *event) → (B,) contract, the one gradient function, and the analytic oracles."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import ebm.energies
import ebm.image_energies
import ebm.images
from ebm.energies import (
    ClassConditionalEnergy,
    GaussianEnergy,
    GaussianMixtureEnergy,
    MLPClassifierConfig,
    MLPEnergy,
    MLPEnergyConfig,
    energy_and_grad,
    frozen,
    mlp_logits,
)
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy, ResNet32, ResNet32Config
from ebm.images import MixedPrecisionImageEnergy

MEAN_3D = torch.tensor([1.0, -0.5, 0.0])
COVARIANCE_3D = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.8, 0.0], [0.1, 0.0, 0.5]])
MIXTURE_MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
MIXTURE_STDS = torch.tensor([0.5, 0.7, 1.0])
MIXTURE_WEIGHTS = torch.tensor([0.2, 0.3, 0.5])

# One line per energy: (factory, event shape). Factories run under a fixed seed (see `build`).
ENERGY_CASES = [
    pytest.param(lambda: GaussianEnergy(MEAN_3D, COVARIANCE_3D), (3,), id="gaussian"),
    pytest.param(
        lambda: GaussianMixtureEnergy(MIXTURE_MEANS, MIXTURE_STDS, MIXTURE_WEIGHTS),
        (2,),
        id="gaussian_mixture",
    ),
    pytest.param(lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16))), (2,), id="mlp"),
    pytest.param(
        lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16), fourier_features=8)),
        (2,),
        id="mlp_fourier_features",
    ),
    pytest.param(
        lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16), spectral_norm=True)),
        (2,),
        id="mlp_spectral_norm",
    ),
    pytest.param(lambda: MLPEnergy(MLPEnergyConfig(in_features=12, widths=(16,))), (1, 3, 4), id="mlp_image"),
    pytest.param(
        lambda: ClassConditionalEnergy(
            mlp_logits(MLPClassifierConfig(in_features=2, n_classes=3, widths=(16,)))
        ),
        (2,),
        id="class_conditional_mlp_logits",
    ),
    pytest.param(
        lambda: ImageEnergy(CNN28(CNN28Config(channels=(2, 2, 2, 2), hidden=4, n_classes=3)), (1, 28, 28)),
        (1, 28, 28),
        id="image_cnn28",
    ),
    pytest.param(
        lambda: ImageEnergy(ResNet32(ResNet32Config(width=2, n_classes=3)), (3, 32, 32)),
        (3, 32, 32),
        id="image_resnet32",
    ),
]
# Energies whose gradient is not that of a float64 function (bf16 autocast): the contract, not the central
# differences, holds for them.
CONTRACT_ONLY_CASES = [
    pytest.param(
        lambda: MixedPrecisionImageEnergy(
            CNN28(CNN28Config(channels=(2, 2, 2, 2), hidden=4, n_classes=3)), (1, 28, 28)
        ),
        (1, 28, 28),
        id="image_cnn28_mixed_precision",
    ),
]
# The library's modules of energies, and the networks in them that are no energy: logits (B, n_classes).
ENERGY_MODULES = (ebm.energies, ebm.image_energies, ebm.images)
NOT_ENERGIES = {CNN28, ResNet32}


def build(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct an energy with seeded initial weights, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory()


def test_every_energy_class_has_a_contract_case() -> None:
    energy_classes = {
        cls
        for module in ENERGY_MODULES
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__
        and not name.startswith("_")
        and issubclass(cls, nn.Module)
        and cls.forward is not nn.Module.forward
    }
    assert NOT_ENERGIES <= energy_classes  # the exclusions name existing classes
    covered = {type(build(case.values[0])) for case in ENERGY_CASES + CONTRACT_ONLY_CASES}
    assert energy_classes - NOT_ENERGIES <= covered, "add a line to ENERGY_CASES for each"


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize(("factory", "event_shape"), ENERGY_CASES + CONTRACT_ONLY_CASES)
def test_energy_contract(
    factory: Callable[[], nn.Module], event_shape: tuple[int, ...], batch_size: int
) -> None:
    energy = build(factory)
    requires_grad_before = [p.requires_grad for p in energy.parameters()]
    x = torch.randn((batch_size, *event_shape), generator=torch.Generator().manual_seed(1))
    x_before = x.clone()

    value, grad = energy_and_grad(energy, x)

    assert value.shape == (batch_size,)
    assert grad.shape == x.shape
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert not value.requires_grad and not grad.requires_grad
    assert torch.equal(x, x_before) and not x.requires_grad
    # Close, not equal: a spectrally normalised layer refines its σ estimate on every training forward.
    torch.testing.assert_close(value, energy(x).detach())
    assert all(p.grad is None for p in energy.parameters())
    assert [p.requires_grad for p in energy.parameters()] == requires_grad_before


@pytest.mark.parametrize(("factory", "event_shape"), ENERGY_CASES)
def test_energy_and_grad_matches_central_differences(
    factory: Callable[[], nn.Module], event_shape: tuple[int, ...]
) -> None:
    # eval(): a spectrally normalised layer runs a power iteration per forward in training mode, which
    # would move the function between the two finite-difference evaluations.
    energy = build(factory).double().eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((4, *event_shape), generator=generator, dtype=torch.float64)
    direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    eps = 1e-5

    _, grad = energy_and_grad(energy, x)
    with torch.no_grad():
        finite_difference = (energy(x + eps * direction) - energy(x - eps * direction)) / (2 * eps)

    directional = (grad * direction).flatten(1).sum(1)
    torch.testing.assert_close(directional, finite_difference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("factory", "event_shape"), ENERGY_CASES)
def test_energy_and_grad_of_a_frozen_energy_is_the_same_as_of_a_trainable_one(
    factory: Callable[[], nn.Module], event_shape: tuple[int, ...]
) -> None:
    # Samplers take ∇ₓE inside frozen(), where MLPs, class-conditional and image energies run through the
    # hand-written passes of ebm.fastgrad and ebm.fastconv instead of autograd.
    energy = build(factory).double().eval()
    x = torch.randn((3, *event_shape), generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    value, grad = energy_and_grad(energy, x)
    with frozen(energy):
        frozen_value, frozen_grad = energy_and_grad(energy, x)

    torch.testing.assert_close(frozen_value, value)
    torch.testing.assert_close(frozen_grad, grad)


def test_energy_and_grad_matches_analytic_gaussian_gradient() -> None:
    energy = GaussianEnergy(MEAN_3D, COVARIANCE_3D).double()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean, covariance = MEAN_3D.double(), COVARIANCE_3D.double()

    _, grad = energy_and_grad(energy, x)

    # ∇ₓE = −Σ⁻¹(μ − x), one row per chain.
    expected = -torch.linalg.solve(covariance, (mean - x).T).T
    torch.testing.assert_close(grad, expected)


def test_energy_and_grad_detaches_from_the_callers_graph() -> None:
    energy = GaussianEnergy(MEAN_3D, COVARIANCE_3D)
    leaf = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)

    value, grad = energy_and_grad(energy, leaf * 2)

    assert not value.requires_grad and not grad.requires_grad
    assert leaf.grad is None


@pytest.mark.parametrize(
    ("bad_energy", "got"),
    [
        pytest.param(lambda x: x.sum(1, keepdim=True), "(4, 1)", id="column"),
        pytest.param(lambda x: x.sum(), "()", id="scalar"),
        pytest.param(lambda x: x, "(4, 2)", id="per_coordinate"),
    ],
)
def test_energy_and_grad_rejects_wrong_output_shape(bad_energy: Callable, got: str) -> None:
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"to shape \(B,\) = \(4,\), got " + re.escape(got)):
        energy_and_grad(bad_energy, x)


def test_gaussian_energy_equals_scipy_negative_log_density() -> None:
    energy = GaussianEnergy(MEAN_3D, COVARIANCE_3D).double()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    expected = -stats.multivariate_normal(MEAN_3D.numpy(), COVARIANCE_3D.numpy()).logpdf(x.numpy())

    # The buffers were factorised in float32 before .double(), hence float32-level agreement.
    np.testing.assert_allclose(energy(x).numpy(), expected, rtol=1e-6)


def test_gaussian_mixture_energy_equals_scipy_negative_log_density() -> None:
    energy = GaussianMixtureEnergy(MIXTURE_MEANS, MIXTURE_STDS, MIXTURE_WEIGHTS).double()
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    density = sum(
        weight * stats.multivariate_normal(mean.numpy(), std**2 * np.eye(2)).pdf(x.numpy())
        for mean, std, weight in zip(
            MIXTURE_MEANS, MIXTURE_STDS.tolist(), MIXTURE_WEIGHTS.tolist(), strict=True
        )
    )

    np.testing.assert_allclose(energy(x).numpy(), -np.log(density), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [10, 100])
def test_gaussian_mixture_gradient_is_exact_near_a_mode_at_any_batch_size(batch_size: int) -> None:
    # Regression: torch.cdist switches to ‖x‖² + ‖μ‖² − 2x·μ above 25 rows, whose float32 cancellation
    # made ∇ₓE ~100% wrong within 1e-3 of a mode, for large batches only.
    energy = GaussianMixtureEnergy(MIXTURE_MEANS, MIXTURE_STDS, MIXTURE_WEIGHTS)
    x = MIXTURE_MEANS[1] + 1e-3 * torch.randn(batch_size, 2, generator=torch.Generator().manual_seed(10))

    _, grad = energy_and_grad(energy, x)

    # ∇ₓE = Σₖ rₖ(x) (x − μₖ) / σₖ², with responsibilities rₖ(x) ∝ wₖ N(x; μₖ, σₖ² I), in float64.
    offsets = x.double()[:, None, :] - MIXTURE_MEANS.double()  # (B, K, D)
    variances = MIXTURE_STDS.double().square()
    log_joint = (
        MIXTURE_WEIGHTS.double().log() - torch.log(variances) - 0.5 * offsets.square().sum(-1) / variances
    )
    responsibilities = torch.softmax(log_joint, dim=1)  # (B, K)
    expected = (responsibilities[:, :, None] * offsets / variances[:, None]).sum(1)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "energy",
    [
        pytest.param(GaussianEnergy(MEAN_3D[:2], COVARIANCE_3D[:2, :2]), id="gaussian"),
        pytest.param(
            GaussianMixtureEnergy(MIXTURE_MEANS, MIXTURE_STDS, MIXTURE_WEIGHTS), id="gaussian_mixture"
        ),
    ],
)
def test_analytic_energies_are_normalised(energy: nn.Module) -> None:
    # ∫ exp(−E) dx = 1 (log Z = 0), by the trapezoid rule on a grid that misses
    # under 1e-10 of the mass (every component is ≥ 7 standard deviations from the edge).
    axis = torch.linspace(-9.0, 9.0, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # (601², 2)
    with torch.no_grad():
        density = torch.exp(-energy.double()(grid)).reshape(len(axis), len(axis))
    mass = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis)
    assert mass.item() == pytest.approx(1.0, abs=1e-6)


def test_class_conditional_energy_views_agree() -> None:
    energy = build(lambda: ClassConditionalEnergy(mlp_logits(MLPClassifierConfig(n_classes=3, widths=(8,)))))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 1, 2, 1, 0])

    logits = energy.logits(x)  # (B, n_classes)

    torch.testing.assert_close(energy(x), -torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(energy.joint(x, labels), -logits[torch.arange(5), labels])
    # E(x, y) − E(x) = −log p(y | x): the classifier view is the softmax of the logits.
    torch.testing.assert_close(
        energy.joint(x, labels) - energy(x), -torch.log_softmax(logits, dim=1)[torch.arange(5), labels]
    )


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        pytest.param(torch.tensor([0, 1]), r"shape \(4,\).*\(2,\).*\(4, 2\)", id="too_few"),
        pytest.param(torch.zeros(8, dtype=torch.long), r"shape \(4,\).*\(8,\)", id="too_many"),
        pytest.param(torch.zeros(4, 3, dtype=torch.long), r"\(4, 3\)", id="two_dimensional"),
        pytest.param(torch.tensor(1), r"shape \(\)", id="scalar"),
        pytest.param(torch.tensor([0.0, 1.7, 2.0, 0.4]), "integer class labels", id="floats"),
    ],
)
def test_joint_refuses_labels_that_are_not_one_integer_per_row(labels: torch.Tensor, match: str) -> None:
    # two labels for a batch of four returned two energies, paired with the first two rows
    energy = build(lambda: ClassConditionalEnergy(mlp_logits(MLPClassifierConfig(n_classes=3, widths=(8,)))))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=match):
        energy.joint(x, labels)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: GaussianEnergy(torch.zeros(2), torch.eye(3)), id="gaussian_covariance_shape"),
        pytest.param(lambda: GaussianMixtureEnergy(torch.zeros(2), 1.0), id="mixture_means_not_2d"),
        pytest.param(lambda: GaussianMixtureEnergy(torch.zeros(2, 2), -1.0), id="mixture_negative_std"),
        pytest.param(
            lambda: GaussianMixtureEnergy(torch.zeros(2, 2), 1.0, torch.ones(3)), id="mixture_weight_count"
        ),
    ],
)
def test_analytic_energies_reject_invalid_parameters(make: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError):
        make()


def test_frozen_restores_exactly_the_parameters_it_froze() -> None:
    energy = build(lambda: MLPEnergy(MLPEnergyConfig(widths=(4,))))
    first, *rest = energy.parameters()
    first.requires_grad_(False)

    with pytest.raises(RuntimeError, match="inside"), frozen(energy):
        assert not any(p.requires_grad for p in energy.parameters())
        raise RuntimeError("inside")

    assert not first.requires_grad
    assert all(p.requires_grad for p in rest)


def test_frozen_gives_every_submodule_back_its_own_mode() -> None:
    # A training model with one part deliberately in eval (a frozen batch norm, say): frozen() puts the
    # whole tree in eval, and must give each module back the mode it had, not the root's.
    energy = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 1), nn.Dropout()))
    energy.train()
    energy[1].eval()
    energy[2][1].eval()
    before = {name: module.training for name, module in energy.named_modules()}
    with frozen(energy):
        assert not any(module.training for module in energy.modules())
    assert {name: module.training for name, module in energy.named_modules()} == before
    assert before == {"": True, "0": True, "1": False, "2": True, "2.0": True, "2.1": False}

    energy.eval()
    energy[0].train()  # and the other way round: a training part inside an eval model
    before = {name: module.training for name, module in energy.named_modules()}
    with frozen(energy):
        pass
    assert {name: module.training for name, module in energy.named_modules()} == before


def test_frozen_and_energy_and_grad_accept_plain_callables() -> None:
    def half_square_norm(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.square().sum(1)

    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(9))
    with frozen(half_square_norm):
        value, grad = energy_and_grad(half_square_norm, x)

    torch.testing.assert_close(value, 0.5 * x.square().sum(1))
    torch.testing.assert_close(grad, x)


def test_fourier_features_are_fixed_by_the_config_and_saved_with_the_model() -> None:
    config = MLPEnergyConfig(
        in_features=2, widths=(8,), fourier_features=4, fourier_scale=0.5, fourier_seed=3
    )
    first, second = MLPEnergy(config), MLPEnergy(config)
    assert torch.equal(first.frequencies, second.frequencies)
    assert first.frequencies.shape == (2, 4)
    assert not first.frequencies.requires_grad  # a buffer: never trained, never sampled
    assert "frequencies" in first.state_dict()
    other_seed = MLPEnergy(dataclasses.replace(config, fourier_seed=4))
    assert not torch.equal(first.frequencies, other_seed.frequencies)
    # 2π·s·N(0, 1): the empirical scale of 2000 draws is within 10 % of 2π·0.5
    wide = MLPEnergy(MLPEnergyConfig(in_features=2, widths=(8,), fourier_features=1000, fourier_scale=0.5))
    assert float(wide.frequencies.std()) == pytest.approx(2 * math.pi * 0.5, rel=0.1)


@pytest.mark.parametrize(
    ("field", "value"), [("fourier_features", -1), ("fourier_scale", 0.0), ("fourier_scale", math.inf)]
)
def test_fourier_feature_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        MLPEnergyConfig(**{field: value})


@pytest.mark.parametrize(
    ("means", "stds", "weights", "match"),
    [
        (MIXTURE_MEANS, MIXTURE_STDS, torch.zeros(3), "positive sum"),
        (MIXTURE_MEANS, torch.tensor([0.5, math.nan, 1.0]), MIXTURE_WEIGHTS, "must be finite"),
        (MIXTURE_MEANS.clone().fill_(math.nan), MIXTURE_STDS, MIXTURE_WEIGHTS, "must be finite"),
        (MIXTURE_MEANS, MIXTURE_STDS, torch.tensor([0.5, 0.5]), "one per component"),
    ],
    ids=["zero-weights", "nan-std", "nan-means", "too-few-weights"],
)
def test_a_gaussian_mixture_refuses_parameters_that_give_nan_energies(
    means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianMixtureEnergy(means, stds, weights)


def test_a_gaussian_mixture_refuses_points_of_the_wrong_dimension() -> None:
    # (3, 1) broadcast against 2-D means to the points (x, x) and gave finite energies
    energy = GaussianMixtureEnergy(MIXTURE_MEANS, MIXTURE_STDS, MIXTURE_WEIGHTS)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        energy(torch.zeros(3, 1))


def test_spectral_norm_parametrises_every_linear_layer_of_the_mlp() -> None:
    from torch.nn.utils import parametrize

    # seeded: built from whatever state the global RNG was left in, about one start in seventy missed 0.05
    plain = build(lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16))))
    normed = build(lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16), spectral_norm=True)))
    linears = [layer for layer in normed.modules() if isinstance(layer, nn.Linear)]
    assert len(linears) == 3 and all(parametrize.is_parametrized(layer, "weight") for layer in linears)
    assert not any(
        parametrize.is_parametrized(layer, "weight")
        for layer in plain.modules()
        if isinstance(layer, nn.Linear)
    )
    normed.eval()
    for layer in linears:  # the weight the layer uses has largest singular value 1
        assert float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2)) == pytest.approx(1.0, abs=0.05)
