"""Image evaluation: accuracy, OOD scores and AUROC, Fréchet distance, AIS log Z against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from ebm.energies import energy_and_grad
from ebm.evaluation.images import (
    N_STATISTICS,
    OOD_SCORES,
    AISConfig,
    OODScores,
    ReferenceStatistics,
    TemperedLogitEnergy,
    Typicality,
    accuracy,
    ais_log_partition,
    auroc,
    bits_per_dim,
    digits_images,
    fit_reference,
    frechet_distance,
    model_statistics,
    ood_aurocs,
    ood_score,
    ood_scores,
    ood_sets,
    penultimate_features,
    photo_patches,
    png_bits,
    sigmoid_schedule,
)
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy

SHAPE = (1, 28, 28)


def tiny_energy() -> ImageEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ImageEnergy(CNN28(CNN28Config(channels=(4, 4, 4, 4), hidden=8, n_classes=3)), SHAPE).eval()


def test_accuracy_counts_argmax_logits() -> None:
    energy = tiny_energy()
    x = torch.rand(20, *SHAPE)
    predicted = energy.classify(x)
    assert accuracy(energy, x, predicted, batch_size=7) == 1.0
    assert accuracy(energy, x, (predicted + 1) % 3) == 0.0


def test_accuracy_refuses_an_empty_set() -> None:
    # before: NaN, the mean of nothing
    with pytest.raises(ValueError, match="at least one image"):
        accuracy(tiny_energy(), torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long))


def test_accuracy_refuses_labels_that_would_broadcast() -> None:
    # before: an (N, 1) column compared N × N and returned 0.58 for a perfect classifier
    energy = tiny_energy()
    x = torch.rand(20, *SHAPE)
    predicted = energy.classify(x)
    for bad in (predicted[:, None], predicted[:1]):
        with pytest.raises(ValueError, match=r"labels must have shape \(20,\)"):
            accuracy(energy, x, bad)


class _DropoutLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_evaluation_is_in_eval_mode_whatever_mode_the_model_was_left_in() -> None:
    # before: the logits of model_statistics, accuracy and penultimate_features ran with dropout on
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageEnergy(_DropoutLogits(), SHAPE)
    x = torch.rand(40, *SHAPE)
    model.eval()
    expected_statistics = model_statistics(model, x)
    expected_accuracy = accuracy(model, x, torch.zeros(40, dtype=torch.long))
    expected_features = penultimate_features(model, x)
    model.train()
    torch.testing.assert_close(model_statistics(model, x), expected_statistics)
    assert accuracy(model, x, torch.zeros(40, dtype=torch.long)) == expected_accuracy
    torch.testing.assert_close(penultimate_features(model, x), expected_features)
    assert model.training, "the caller's mode must come back"


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (torch.randn(1, 4), torch.randn(10, 4), "features_a must be"),
        (torch.randn(10, 4), torch.randn(10, 3), "differ in width"),
        (torch.randn(10, 4).index_fill(0, torch.tensor([3]), math.nan), torch.randn(10, 4), "1 of 10 rows"),
    ],
)
def test_frechet_distance_says_what_is_wrong_with_its_inputs(a: Tensor, b: Tensor, message: str) -> None:
    # before: scipy's "Internal error in scipy.linalg.sqrtm: -102"
    with pytest.raises(ValueError, match=message):
        frechet_distance(a, b)


@pytest.mark.parametrize(
    "settings", [{"n_temperatures": 0}, {"n_chains": 1}, {"step_size": 0.0}, {"mala_steps": 0}]
)
def test_ais_settings_that_cannot_estimate_are_refused(settings: dict[str, float]) -> None:
    # before: n_temperatures 0 ran no step and reported log Z = 0 with a standard error of 0
    with pytest.raises(ValueError, match="AIS"):
        AISConfig(**settings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_temperatures"):
        sigmoid_schedule(0)


def test_auroc_agrees_with_sklearn_and_in_distribution_is_the_positive_class() -> None:
    generator = torch.Generator().manual_seed(0)
    in_scores, out_scores = torch.randn(50, generator=generator) + 1, torch.randn(70, generator=generator)
    expected = roc_auc_score(np.r_[np.ones(50), np.zeros(70)], torch.cat([in_scores, out_scores]).numpy())
    assert auroc(in_scores, out_scores) == pytest.approx(expected)
    assert auroc(torch.ones(3), torch.zeros(3)) == 1.0 and auroc(torch.zeros(3), torch.ones(3)) == 0.0


@pytest.mark.parametrize(
    ("in_scores", "out_scores", "message"),
    [
        (torch.ones(3), torch.empty(0), "out-of-distribution scores must be a non-empty"),
        (torch.empty(0), torch.ones(3), "in-distribution scores must be a non-empty"),
        (torch.ones(3, 1), torch.ones(3), r"non-empty \(N,\) tensor, got \(3, 1\)"),
        (torch.ones(3), torch.tensor([0.0, float("nan")]), "1 of 2 out-of-distribution scores are NaN"),
    ],
)
def test_auroc_refuses_empty_misshapen_or_non_finite_scores(
    in_scores: Tensor, out_scores: Tensor, message: str
) -> None:
    # before: NaN for an empty side (sklearn only warns), sklearn's bare "Input contains NaN" otherwise
    with pytest.raises(ValueError, match=message):
        auroc(in_scores, out_scores)


def test_ood_aurocs_names_the_score_and_the_set_of_an_empty_ood_set() -> None:
    energy = tiny_energy()
    with pytest.raises(ValueError, match="score 'energy' on the OOD set 'empty'"):
        ood_aurocs(energy, torch.rand(4, *SHAPE), {"empty": torch.empty(0, *SHAPE)}, scores=["energy"])


def test_typicality_refuses_statistics_of_the_wrong_width_or_with_nan() -> None:
    typicality = Typicality(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"must be \(M, 3\)"):
        typicality.log_density(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"1 of 4 rows of statistics are not finite, e.g. row 3: \[0.0, nan"):
        typicality.log_density(torch.tensor([[0.0, 0.0, 0.0]] * 3 + [[0.0, float("nan"), 0.0]]))


def test_every_ood_score_is_defined_by_its_formula() -> None:
    energy = tiny_energy()
    x = torch.rand(6, *SHAPE)
    with torch.no_grad():
        logits = energy.logits(x)
    assert torch.allclose(ood_score(energy, x, "energy", batch_size=4), -energy(x).detach())
    assert torch.allclose(ood_score(energy, x, "max_softmax"), logits.softmax(1).max(1).values)
    _, grad = energy_and_grad(energy, x)
    assert torch.allclose(ood_score(energy, x, "grad_norm"), -grad.flatten(1).norm(dim=1))
    corrected = -energy(x).detach() + math.log(2) * png_bits(x)
    assert torch.allclose(ood_score(energy, x, "complexity"), corrected)
    assert all(p.grad is None for p in energy.parameters())
    with pytest.raises(ValueError, match="grad_norm"):
        ood_score(energy, x, "likelihood")


def test_typicality_scores_atypical_statistics_on_either_side_as_out_of_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2000, 2, generator=generator) * torch.tensor([1.0, 3.0]) + torch.tensor(
        [5.0, 0.0]
    )
    typicality = Typicality(reference)
    probes = torch.tensor([[5.0, 0.0], [3.0, 0.0], [7.0, 0.0], [5.0, 9.0]])
    log_density = typicality.log_density(probes)
    assert log_density[0] > log_density[1:].max()  # too low and too high are both atypical
    assert float(log_density[1]) == pytest.approx(float(log_density[2]), abs=0.3)  # symmetric around the mean
    expected = (
        -0.5 * math.log(2 * math.pi) * 2 - math.log(1.0) - math.log(3.0)
    )  # N(5, 1) × N(0, 9) at the mean
    assert float(log_density[0]) == pytest.approx(expected, abs=0.1)
    with pytest.raises(ValueError, match="1 of 2 rows of reference statistics are not finite"):
        Typicality(torch.tensor([[0.0], [float("nan")]]))


def test_the_fitted_scores_are_fitted_on_reference_images_only_and_need_them() -> None:
    energy = tiny_energy()
    reference_images, images = torch.rand(40, *SHAPE), torch.rand(6, *SHAPE)
    statistics = model_statistics(energy, images, batch_size=4)
    _, grad = energy_and_grad(energy, images)
    assert statistics.shape == (6, N_STATISTICS + 1)
    assert torch.allclose(statistics[:, 0], -energy(images).detach())
    assert torch.allclose(statistics[:, 1], grad.flatten(1).norm(dim=1).log(), atol=1e-5)
    assert torch.equal(statistics[:, 3].long(), energy.classify(images))
    with pytest.warns(UserWarning, match="fewer than 2"):  # a random net need not use all 3 classes
        reference = fit_reference(energy, reference_images)
    pooled = Typicality(model_statistics(energy, reference_images)[:, :N_STATISTICS])
    assert torch.allclose(
        ood_score(energy, images, "typicality", reference=reference),
        pooled.log_density(statistics[:, :N_STATISTICS]).float(),
    )
    assert torch.allclose(
        ood_score(energy, images, "class_typicality", reference=reference),
        reference.class_typicality(statistics).float(),
    )
    for score in ("typicality", "class_typicality"):
        with pytest.raises(ValueError, match=f"the {score} score needs ReferenceStatistics"):
            ood_score(energy, images, score)
        with pytest.raises(ValueError, match="fitted on in-distribution"):
            ood_aurocs(energy, images, {"noise": torch.rand(4, *SHAPE)}, scores=[score])
    noise = {"noise": torch.rand(4, *SHAPE)}
    with pytest.warns(UserWarning, match="fewer than 2"):
        assert set(ood_aurocs(energy, images, noise, reference_images=reference_images)) == set(OOD_SCORES)
    assert set(ood_aurocs(energy, images, noise)) == set(OOD_SCORES) - {"typicality", "class_typicality"}


def test_class_typicality_scores_an_image_under_the_class_the_model_assigns_it() -> None:
    generator = torch.Generator().manual_seed(0)
    # class 0's images have −E ≈ 0, class 1's −E ≈ 10; the other two statistics are shared
    values = torch.randn(400, N_STATISTICS, generator=generator)
    classes = torch.arange(400) % 2
    values[:, 0] += 10.0 * classes
    reference = ReferenceStatistics(torch.cat([values, classes[:, None].float()], dim=1), n_classes=2)
    assert reference.pooled_classes == []
    probe = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # the same statistics, either class
    per_class = reference.class_typicality(probe)
    assert per_class[0] > per_class[1] + 20  # an energy typical of class 0 is 10 σ off for class 1
    pooled = reference.typicality(probe)
    assert pooled[0] == pooled[1]  # the pooled score cannot tell them apart
    # a class the model never assigns to a reference image is scored against the pool, and said so
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        sparse = ReferenceStatistics(torch.cat([values, classes[:, None].float()], dim=1), n_classes=3)
    assert sparse.class_typicality(torch.tensor([[0.0, 0.0, 0.0, 2.0]])) == pooled[0]
    with pytest.raises(ValueError, match=r"predicted classes must lie in \[0, 2\)"):
        ReferenceStatistics(torch.tensor([[0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 1.0, 0.0]]), n_classes=2)
    with pytest.raises(ValueError, match="predicted class last"):
        reference.class_typicality(values)


def test_png_bits_measure_complexity() -> None:
    flat, noisy = torch.zeros(1, *SHAPE), torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    bits = png_bits(torch.cat([flat, noisy]))
    assert bits[0] < 1000 < 5000 < bits[1]  # 784 random bytes do not compress


def test_ood_sets_are_transformations_of_the_test_images_and_real_digits() -> None:
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sets = ood_sets(images, generator=torch.Generator().manual_seed(1))
    assert set(sets) == {"uniform_noise", "hflip", "vflip", "inverted", "sklearn_digits", "photo_patches"}
    assert torch.equal(sets["inverted"], 1 - images) and torch.equal(sets["hflip"][..., 0], images[..., -1])
    assert torch.equal(sets["vflip"][..., 0, :], images[..., -1, :])
    digits = sets["sklearn_digits"]
    assert digits.shape == (1797, 3, 32, 32) and digits.min() >= 0 and digits.max() <= 1
    assert torch.equal(digits[:, 0], digits[:, 2])
    grey = digits_images((1, 28, 28))
    assert grey[:, :, :4, :].mean() < grey[:, :, 10:18, 10:18].mean()  # ink in the middle, dark border


def test_photo_patches_are_natural_image_crops_grey_or_colour() -> None:
    colour = photo_patches((3, 32, 32), 7, generator=torch.Generator().manual_seed(0))
    grey = photo_patches((1, 32, 32), 7, generator=torch.Generator().manual_seed(0))
    assert colour.shape == (7, 3, 32, 32) and grey.shape == (7, 1, 32, 32)
    assert torch.allclose(grey, colour.mean(dim=1, keepdim=True), atol=1e-6)  # same crops, grey = RGB mean
    assert colour.min() >= 0 and colour.max() <= 1
    assert (colour.flatten(1).std(dim=1) > 0.02).all()  # texture and edges, not flat colour
    assert not torch.equal(colour[0], colour[1]) and not torch.equal(colour[0], colour[4])
    with pytest.raises(ValueError, match="grey or RGB"):
        photo_patches((2, 28, 28), 2, generator=torch.Generator())


@pytest.mark.filterwarnings("ignore:class_typicality")  # the random net assigns most images to one class
def test_ood_aurocs_tables_every_score_and_set() -> None:
    energy = tiny_energy()
    images = torch.rand(8, *SHAPE)
    table = ood_aurocs(
        energy,
        images,
        {"same": images.clone(), "noise": torch.rand(8, *SHAPE)},
        scores=OOD_SCORES,
        reference_images=torch.rand(8, *SHAPE),
    )
    assert set(table) == set(OOD_SCORES) and all(set(row) == {"same", "noise"} for row in table.values())
    assert all(row["same"] == pytest.approx(0.5) for row in table.values())  # identical sets: chance


def test_the_roc_curves_are_those_of_the_scores_behind_the_aurocs_from_one_pass() -> None:
    from sklearn.metrics import auc

    generator = torch.Generator().manual_seed(0)
    energy = tiny_energy()
    images = torch.rand(40, *SHAPE, generator=generator)
    out_sets = {"dark": 0.2 * torch.rand(30, *SHAPE, generator=generator), "same": images.clone()}
    scores = ood_scores(energy, images, out_sets, scores=["energy", "max_softmax"])
    table, curves = scores.aurocs(), scores.roc_curves("energy")
    assert table == ood_aurocs(energy, images, out_sets, scores=["energy", "max_softmax"])
    assert set(curves) == {"dark", "same"}
    for name, (fpr, tpr) in curves.items():
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert auc(fpr, tpr) == pytest.approx(table["energy"][name], abs=1e-3)
    with pytest.raises(ValueError, match="no 'grad_norm' scores computed"):
        scores.roc_curves("grad_norm")


def test_a_roc_curve_of_a_nan_score_names_the_score_and_the_set() -> None:
    scores = OODScores({"energy": torch.rand(5)}, {"noise": {"energy": torch.tensor([0.1, float("nan")])}})
    with pytest.raises(ValueError, match="score 'energy' on the OOD set 'noise': 1 of 7 scores are NaN"):
        scores.roc_curves("energy")


@pytest.mark.parametrize("score", ["typicality", "class_typicality"])
def test_the_fitted_scores_are_fitted_on_the_reference_images_not_the_images_scored(score: str) -> None:
    generator = torch.Generator().manual_seed(0)
    energy = tiny_energy()
    images, out = torch.rand(10, *SHAPE, generator=generator), torch.rand(10, *SHAPE, generator=generator)
    reference_images = 0.3 * torch.rand(30, *SHAPE, generator=generator)  # unlike the images scored
    table = ood_aurocs(energy, images, {"out": out}, scores=[score], reference_images=reference_images)
    reference = fit_reference(energy, reference_images)
    expected = auroc(
        ood_score(energy, images, score, reference=reference),
        ood_score(energy, out, score, reference=reference),
    )
    assert table[score]["out"] == pytest.approx(expected)
    wrong = fit_reference(energy, images)  # what a reference fitted on the scored images gives instead
    mistaken = auroc(
        ood_score(energy, images, score, reference=wrong), ood_score(energy, out, score, reference=wrong)
    )
    assert mistaken != pytest.approx(expected)  # else this test could not tell the two apart


def test_frechet_distance_matches_closed_forms() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=generator) @ torch.randn(5, 5, generator=generator)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    scale = 3.0  # b = s·a: ‖(1 − s) μ‖² + (1 − s)² tr Σ
    mean, cov = a.double().mean(0), np.cov(a.double().numpy(), rowvar=False)
    expected = (1 - scale) ** 2 * (float(mean.square().sum()) + float(np.trace(cov)))
    assert frechet_distance(a, scale * a) == pytest.approx(expected, rel=1e-5)


def test_penultimate_features_are_the_last_linear_layers_input() -> None:
    energy = tiny_energy()
    x = torch.rand(7, *SHAPE)
    features = penultimate_features(energy, x, batch_size=3)
    assert features.shape == (7, 8)
    last = energy.logits_net.features[-1]
    assert torch.allclose(last(features), energy.logits(x).detach(), atol=1e-6)
    assert not last._forward_hooks  # the hook is removed


class ExponentialTilt(nn.Module):
    """E(x) = a · Σᵢ xᵢ on [0, 1]^D: log Z = D · log((1 − e^(−a)) / a) in closed form."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = nn.Parameter(torch.tensor(slope))

    def forward(self, x: Tensor) -> Tensor:
        return self.slope * x.flatten(1).sum(1)


def test_the_tempered_logit_energy_is_the_box_density_carried_to_logit_space() -> None:
    # At β = 0 it must be the logistic density (the image of uniform [0, 1]^D): ∫ exp(−E₀(z)) dz = 1.
    tempered = TemperedLogitEnergy(ExponentialTilt(2.0), beta=0.0)
    z = torch.linspace(-30, 30, 20001).view(-1, 1, 1, 1)
    with torch.no_grad():
        mass = torch.trapezoid(torch.exp(-tempered(z)), z.flatten())
    assert float(mass) == pytest.approx(1.0, abs=1e-4)
    tempered.beta = 1.0  # ∫ exp(−E₁(z)) dz = ∫₀¹ exp(−2x) dx
    with torch.no_grad():
        mass = torch.trapezoid(torch.exp(-tempered(z)), z.flatten())
    assert float(mass) == pytest.approx((1 - math.exp(-2.0)) / 2.0, abs=1e-4)
    schedule = sigmoid_schedule(10)
    assert schedule[0] == 0 and schedule[-1] == 1 and (schedule.diff() > 0).all()


def test_ais_recovers_an_analytic_log_partition_within_its_error() -> None:
    slope, shape = 4.0, (1, 4, 4)
    exact = 16 * math.log((1 - math.exp(-slope)) / slope)
    config = AISConfig(n_chains=64, n_temperatures=200, step_size=0.1)
    result = ais_log_partition(
        ExponentialTilt(slope), shape, config, generator=torch.Generator().manual_seed(0)
    )
    assert abs(result.log_partition - exact) < 3 * result.standard_error + 0.1
    assert 0.3 < result.acceptance_rate < 0.95 and result.effective_sample_size > 10


def test_ais_leaves_an_eval_mode_energy_in_eval_mode() -> None:
    energy = tiny_energy()  # eval mode: spectral norm or dropout would otherwise change its outputs
    ais_log_partition(energy, SHAPE, AISConfig(n_chains=2, n_temperatures=3), generator=torch.Generator())
    assert not energy.training


def test_bits_per_dim_of_a_uniform_model_is_eight() -> None:
    # The uniform density on [0, 1]^D (E = 0, log Z = 0) gives every 8-bit image (1/256)^D: 8 bits/dim.
    assert bits_per_dim(0.0, 0.0, 784) == pytest.approx(8.0)
    assert bits_per_dim(784 * math.log(2), 0.0, 784) == pytest.approx(9.0)


class TiltWithHole(ExponentialTilt):
    """The exponential tilt, but ``value`` (NaN or ±inf) wherever x₁ > 0.8: a bug in part of the box."""

    def __init__(self, value: float) -> None:
        super().__init__(1.0)
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        energies = super().forward(x)
        return torch.where(x.flatten(1)[:, 0] > 0.8, torch.full_like(energies, self.value), energies)


@pytest.mark.parametrize("value", [math.nan, -math.inf, math.inf])
def test_ais_raises_on_a_non_finite_energy_instead_of_returning_a_non_finite_log_partition(
    value: float,
) -> None:
    # 64 uniform starts leave x₁ ≤ 0.8 on all of them with probability 0.8⁶⁴ ≈ 6e-7.
    config = AISConfig(n_chains=64, n_temperatures=20, step_size=0.1)
    with pytest.raises(FloatingPointError, match=rf"non-finite.*\(e\.g\. {value}\) on \d+ of 64 chains"):
        ais_log_partition(TiltWithHole(value), (2,), config, generator=torch.Generator().manual_seed(0))


class TurnsNaN(ExponentialTilt):
    """The exponential tilt until its ``calls_before_nan``-th call, NaN on the first row after it."""

    def __init__(self, calls_before_nan: int) -> None:
        super().__init__(1.0)
        self.calls_left = calls_before_nan

    def forward(self, x: Tensor) -> Tensor:
        energies = super().forward(x)
        self.calls_left -= 1
        return energies if self.calls_left >= 0 else energies.index_fill(0, torch.tensor([0]), math.nan)


def test_ais_raises_naming_the_temperature_step_where_a_chain_energy_turns_non_finite() -> None:
    config = AISConfig(n_chains=8, n_temperatures=20, step_size=0.1)
    with pytest.raises(FloatingPointError, match=r"on 1 of 8 chains at temperature step ([1-9]|1\d) of 20"):
        ais_log_partition(TurnsNaN(30), (2,), config, generator=torch.Generator().manual_seed(0))
