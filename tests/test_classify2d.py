"""Binary 2D classification as an energy: data, training, the decision rule and its figure.

Training runs are tiny (a 2×32 MLP, a few hundred Adam steps on 1000 points) and shared per module,
so the whole file takes seconds on CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ebm.classify2d import (
    LABELLED_2D,
    Classifier2DConfig,
    accuracy,
    classifier_loss,
    conditional_nll,
    decision_energy,
    generative_term,
    make_labelled_2d,
    predict,
    seeded_logits,
    train_classifier,
)
from ebm.energies import ClassConditionalEnergy, MLPClassifierConfig
from ebm.losses import CDConfig, NonFiniteLossError
from ebm.plots import plot_decision_energy, save_figure
from ebm.samplers import SamplerConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL_MODEL = MLPClassifierConfig(widths=(32, 32))
QUICK = Classifier2DConfig(model=SMALL_MODEL, steps=300, batch_size=128, lr=1e-2, seed=0)
HYBRID = dataclasses.replace(
    QUICK,
    steps=150,
    generative_weight=1.0,
    sampler=SamplerConfig(name="langevin", step_size=0.02),
    loss=CDConfig(n_steps=5, alpha=0.1, buffer_size=1000),
)


def labelled(name: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    return make_labelled_2d(name, n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def moons_train() -> tuple[Tensor, Tensor]:
    return labelled("moons", 1000, seed=0)


@pytest.fixture(scope="module")
def moons_test() -> tuple[Tensor, Tensor]:
    return labelled("moons", 2000, seed=1)


@pytest.fixture(scope="module")
def classifier(moons_train: tuple[Tensor, Tensor]) -> ClassConditionalEnergy:
    return train_classifier(*moons_train, QUICK)


@pytest.fixture(scope="module")
def hybrid(moons_train: tuple[Tensor, Tensor]) -> ClassConditionalEnergy:
    return train_classifier(*moons_train, HYBRID)


# --- data -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LABELLED_2D))
def test_labelled_data_contract(name: str) -> None:
    x, y = labelled(name, 4000, seed=0)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1}
    assert 0.45 < y.float().mean() < 0.55
    assert x.abs().max() < 4.5
    assert (x.abs() < 3.5).all(dim=1).float().mean() > 0.99  # about [-3, 3]²
    again_x, again_y = labelled(name, 4000, seed=0)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert not torch.equal(x, labelled(name, 4000, seed=1)[0])


def test_labelled_data_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    labelled("moons", 100, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"valid names: moons, blobs, xor"):
        make_labelled_2d("circles", 10, generator=torch.Generator())


@pytest.mark.parametrize(
    "bad",
    [
        {"model": MLPClassifierConfig(n_classes=3)},
        {"steps": -1},
        {"generative_weight": -0.5},
        {"generative_weight": float("nan")},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Classifier2DConfig(**bad)  # type: ignore[arg-type]


# --- the likelihood and the decision rule -----------------------------------------------------------


def test_conditional_nll_is_joint_minus_marginal_energy() -> None:
    energy = ClassConditionalEnergy(seeded_logits(SMALL_MODEL, generator=torch.Generator().manual_seed(0)))
    x, y = labelled("xor", 64, seed=0)
    expected = (energy.joint(x, y) - energy(x)).mean()  # E(x, y) − E(x) = −log p(y | x)
    torch.testing.assert_close(conditional_nll(energy, x, y), expected)


def test_decision_rule_is_argmin_energy_and_argmax_logits(
    classifier: ClassConditionalEnergy, moons_test: tuple[Tensor, Tensor]
) -> None:
    x, _ = moons_test
    with torch.no_grad():
        logits = classifier.logits(x)
        difference = decision_energy(classifier, x)
    assert torch.equal(predict(classifier, x), logits.argmax(dim=1))
    assert torch.equal(predict(classifier, x), (difference < 0).long())
    log_odds_of_class_0 = logits.log_softmax(dim=1) @ torch.tensor([1.0, -1.0])
    torch.testing.assert_close(difference, log_odds_of_class_0)


def test_true_label_has_the_lower_energy_on_training_points(
    classifier: ClassConditionalEnergy, moons_train: tuple[Tensor, Tensor]
) -> None:
    x, y = moons_train
    with torch.no_grad():
        true, wrong = classifier.joint(x, y), classifier.joint(x, 1 - y)
    assert (true < wrong).float().mean() > 0.95


def test_moons_test_accuracy(
    classifier: ClassConditionalEnergy,
    moons_train: tuple[Tensor, Tensor],
    moons_test: tuple[Tensor, Tensor],
) -> None:
    assert accuracy(classifier, *moons_train) >= 0.97
    assert accuracy(classifier, *moons_test) >= 0.95


@pytest.mark.parametrize("name", ["blobs", "xor"])
def test_other_datasets_are_learned(name: str) -> None:
    energy = train_classifier(*labelled(name, 1000, seed=0), dataclasses.replace(QUICK, steps=150))
    assert accuracy(energy, *labelled(name, 2000, seed=1)) >= 0.95


# --- training mechanics -----------------------------------------------------------------------------


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_training_is_reproducible_from_the_seed(
    moons_train: tuple[Tensor, Tensor], spectral_norm: bool
) -> None:
    config = dataclasses.replace(
        QUICK, model=dataclasses.replace(SMALL_MODEL, spectral_norm=spectral_norm), steps=5
    )
    torch.manual_seed(1)
    first = train_classifier(*moons_train, config).state_dict()
    torch.manual_seed(2)  # the global RNG must not matter
    second = train_classifier(*moons_train, config).state_dict()
    other_seed = train_classifier(*moons_train, dataclasses.replace(config, seed=1)).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


@pytest.mark.parametrize(
    ("y", "message"),
    [(torch.zeros(7, dtype=torch.int64), "shape"), (torch.full((10,), 2), r"\{0, 1\}")],
)
def test_bad_labels_are_rejected(y: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_classifier(torch.zeros(10, 2), y, QUICK)


def test_a_non_finite_loss_fails_loudly() -> None:
    energy = ClassConditionalEnergy(seeded_logits(SMALL_MODEL, generator=torch.Generator().manual_seed(0)))
    x = torch.full((4, 2), float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        classifier_loss(energy, x, torch.zeros(4, dtype=torch.int64), step=3)


# --- the hybrid (JEM) mode --------------------------------------------------------------------------


def test_hybrid_mode_classifies_and_fits_the_marginal(
    hybrid: ClassConditionalEnergy, classifier: ClassConditionalEnergy, moons_test: tuple[Tensor, Tensor]
) -> None:
    x, y = moons_test
    assert accuracy(hybrid, x, y) >= 0.95
    noise = 8 * torch.rand(len(x), 2, generator=torch.Generator().manual_seed(0)) - 4  # U[-4, 4]²

    def marginal_gap(energy: ClassConditionalEnergy) -> float:
        """Mean marginal energy E(x) of noise minus that of data: > 0 when data is more likely."""
        with torch.no_grad():
            return float(energy(noise).mean() - energy(x).mean())

    assert marginal_gap(hybrid) > 1.0
    assert marginal_gap(hybrid) > marginal_gap(classifier) + 1.0  # the generative term did that


def test_hybrid_loss_reports_the_generative_term(moons_train: tuple[Tensor, Tensor]) -> None:

    x, y = moons_train
    energy = ClassConditionalEnergy(seeded_logits(SMALL_MODEL, generator=torch.Generator().manual_seed(0)))
    generator = torch.Generator().manual_seed(0)
    objective = generative_term(HYBRID, x, generator=generator)
    loss, stats = classifier_loss(
        energy, x[:64], y[:64], generative=objective, generative_weight=0.5, generator=generator
    )
    assert stats.generative is not None
    torch.testing.assert_close(loss, stats.conditional_nll + 0.5 * stats.generative.loss)
    _, discriminative_only = classifier_loss(energy, x[:64], y[:64])
    assert discriminative_only.generative is None


def test_the_generative_term_s_buffer_takes_the_configured_size_and_reinitialisation(
    moons_train: tuple[Tensor, Tensor],
) -> None:
    x, _ = moons_train
    config = dataclasses.replace(
        HYBRID, loss=dataclasses.replace(HYBRID.loss, buffer_size=300, reinit_prob=0.3)
    )
    objective = generative_term(config, x, generator=torch.Generator().manual_seed(0))
    assert objective.buffer is not None
    assert objective.buffer.reinit_prob == 0.3 and len(objective.buffer.states) == 300


# --- the figure -------------------------------------------------------------------------------------


def test_decision_energy_figure_of_the_trained_model(
    classifier: ClassConditionalEnergy, moons_test: tuple[Tensor, Tensor], tmp_path: Path
) -> None:
    x, y = moons_test
    fig = plot_decision_energy(classifier.joint, (-4.0, 4.0), x=x, y=y, resolution=120)
    path = save_figure(fig, tmp_path / "decision_energy.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda(moons_train: tuple[Tensor, Tensor], moons_test: tuple[Tensor, Tensor]) -> None:
    energy = train_classifier(*moons_train, dataclasses.replace(HYBRID, steps=50), device="cuda")
    assert next(energy.parameters()).device.type == "cuda"
    x, y = moons_test
    assert accuracy(energy, x.cuda(), y.cuda()) >= 0.9


def test_each_labelled_set_puts_its_labels_where_its_docstring_says() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = make_labelled_2d("xor", 2000, generator=generator)
    signs_differ = (x[:, 0] > 0) != (x[:, 1] > 0)
    assert (y == signs_differ.long()).float().mean() > 0.98  # y = 1 where the two coordinates' signs differ
    x, y = make_labelled_2d("blobs", 2000, generator=generator)
    assert (y == (x.sum(1) > 0).long()).float().mean() > 0.98  # y = 1 is the upper-right blob
    x, y = make_labelled_2d("moons", 2000, generator=generator)
    assert x[y == 0, 1].mean() > x[y == 1, 1].mean() + 0.5  # y = 0 is the upper moon
