"""The grid CRF E(x, y): its local fields, checkerboard Gibbs against enumeration, ICM, and learning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_rbm import fashion_mnist_images, needs_fashion_mnist

from ebm.boltzmann.gibbs import Gibbs
from ebm.boltzmann.rbm import binary_states
from ebm.boltzmann.structured import (
    ClampedInputEnergy,
    DenoisingTaskConfig,
    GridCRFConfig,
    GridCRFEnergy,
    InferenceConfig,
    StructuredRecipe,
    compare_inference,
    decode_annealed,
    independent_labels,
    make_denoising_states,
    seed_grid_crf_,
    segmentation_scores,
    train_grid_crf,
)
from ebm.energies import check_energy_output, energy_and_grad
from ebm.trainer import TrainConfig


def random_crf(seed: int = 0) -> GridCRFEnergy:
    generator = torch.Generator().manual_seed(seed)
    model = seed_grid_crf_(GridCRFEnergy(GridCRFConfig(channels=4, layers=1)), generator=generator)
    with torch.no_grad():
        model.compatibility.normal_(0.0, 1.0, generator=generator)
    return model


def test_the_energy_maps_stacked_states_to_one_energy_per_row_and_rejects_other_shapes() -> None:
    model = random_crf()
    state = torch.rand(3, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    assert check_energy_output(model(state), state).shape == (3,)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\).*\(3, 1, 5, 6\)"):
        model(state[:, :1])


def test_the_local_field_is_the_energy_gradient_and_the_energy_change_of_one_flip() -> None:
    model = random_crf()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 5, 6, generator=generator)
    y = torch.rand(2, 1, 5, 6, generator=generator)
    _, gradient = energy_and_grad(ClampedInputEnergy(model, x), y)
    with torch.no_grad():
        field = model.pairwise_field(y) - model.unary(x)
    torch.testing.assert_close(field, gradient, atol=1e-5, rtol=1e-5)

    binary = (y > 0.5).float()
    with torch.no_grad():
        field = model.pairwise_field(binary) - model.unary(x)
        for row, column in ((0, 0), (2, 3), (4, 5)):
            on, off = binary.clone(), binary.clone()
            on[..., row, column], off[..., row, column] = 1.0, 0.0
            change = model.joint(x, on) - model.joint(x, off)
            torch.testing.assert_close(field[:, 0, row, column], change, atol=1e-5, rtol=1e-5)


def test_checkerboard_gibbs_samples_the_exactly_enumerated_conditional_distribution() -> None:
    model = random_crf(seed=2)
    x = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    labels = binary_states(9, 0, 512).float().view(512, 1, 3, 3)
    with torch.no_grad():
        log_p = -model.joint(x.expand(512, -1, -1, -1), labels).double()
    exact = (log_p - torch.logsumexp(log_p, 0)).exp()

    generator = torch.Generator().manual_seed(4)
    n_chains = 20000
    start = torch.cat([x.expand(n_chains, -1, -1, -1), torch.zeros(n_chains, 1, 3, 3)], dim=1)
    samples, _ = Gibbs().run(model, start, 20, generator=generator)
    assert torch.equal(samples[:, :1], start[:, :1])  # the input stays clamped
    codes = (samples[:, 1].flatten(1).long() * (1 << torch.arange(9))).sum(1)
    empirical = torch.bincount(codes, minlength=512).double() / n_chains
    assert 0.5 * (empirical - exact).abs().sum() < 0.06  # sampling noise over 512 states ≈ 0.04


def test_icm_only_lowers_the_energy_and_ends_where_no_single_flip_lowers_it() -> None:
    model = random_crf(seed=5)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 1, 6, 6, generator=generator)
    state = torch.cat([x, (torch.rand(4, 1, 6, 6, generator=generator) < 0.5).float()], dim=1)
    icm = Gibbs(math.inf, math.inf)
    energies = [model(state)]
    for _ in range(8):
        state, _ = icm.run(model, state, 1)
        energies.append(model(state))
    assert all(torch.all(later <= earlier + 1e-5) for earlier, later in itertools.pairwise(energies))
    with torch.no_grad():
        field = model.pairwise_field(state[:, 1:]) - model.unary(x)
    flip_change = torch.where(state[:, 1:] > 0.5, -field, field)  # E(flipped) − E(now), per pixel
    assert torch.all(flip_change >= -1e-5)


def test_annealed_gibbs_ends_with_icm_where_no_single_flip_lowers_the_energy() -> None:
    model = random_crf(seed=7)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(8))
    labels = decode_annealed(
        model, x, torch.Generator().manual_seed(9), sweeps=3, beta_end=2.0, icm_sweeps=10
    )
    with torch.no_grad():
        field = model.pairwise_field(labels) - model.unary(x)
    flip_change = torch.where(labels > 0.5, -field, field)  # E(flipped) − E(now), per pixel
    assert torch.all(flip_change >= -1e-5)
    # three sweeps at β ≤ 2 alone leave flips that lower it: the ICM finish did the rest
    state = torch.cat([x, independent_labels(model, x)], dim=1)
    hot, _ = Gibbs(1.0, 2.0).run(model, state, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        hot_field = model.pairwise_field(hot[:, 1:]) - model.unary(x)
    assert torch.any(torch.where(hot[:, 1:] > 0.5, -hot_field, hot_field) < -1e-5)


def test_segmentation_scores() -> None:
    predicted = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    truth = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert segmentation_scores(predicted, truth) == (0.5, pytest.approx(1 / 3))


@needs_fashion_mnist
def test_the_crf_learns_to_segment_noisy_images_better_than_the_noisy_input_and_its_own_unaries() -> None:
    task = DenoisingTaskConfig(noise_std=0.6)
    states = make_denoising_states(fashion_mnist_images(1000), task)
    test = make_denoising_states(fashion_mnist_images(200, train=False), task, offset=2)
    train = TrainConfig(
        steps=120, batch_size=16, lr=0.01, betas=(0.9, 0.999), grad_clip=None, log_every=40,
        checkpoint_every=0, max_abs_energy=1e6, device="cpu", progress=False,
    )  # fmt: skip
    model, result = train_grid_crf(
        states, StructuredRecipe(GridCRFConfig(channels=8), n_steps=1, train=train)
    )
    assert result.recoveries == 0
    right, down = model.compatibility.detach()
    for table in (right, down):  # neighbours that agree are rewarded
        assert table[0, 0] + table[1, 1] - table[0, 1] - table[1, 0] < -0.5

    config = InferenceConfig(
        gibbs_sweeps=30, gibbs_burn_in=10, anneal_sweeps=20, icm_sweeps=5, langevin_steps=60,
        langevin_step_size=0.02,
    )  # fmt: skip
    rows, labels = compare_inference(
        model, test, config, generator=torch.Generator().manual_seed(0), threshold=task.mask_threshold
    )
    by_key = {row.key: row for row in rows}
    assert rows[0].key == "noisy_threshold" and rows[-1].key == "ground_truth"
    baseline = by_key["noisy_threshold"].accuracy
    assert baseline < 0.8
    for key in ("gibbs_marginals", "icm", "annealed_gibbs_icm", "langevin_low_noise"):
        assert by_key[key].accuracy > baseline + 0.1
        assert by_key[key].accuracy > by_key["independent"].accuracy
        assert by_key[key].energy < by_key["independent"].energy  # the pairwise terms are being optimised
    assert by_key["annealed_gibbs_icm"].energy <= by_key["gibbs_marginals"].energy + 1.0
    assert all(row.seconds >= 0 and math.isfinite(row.energy) for row in rows)
    assert set(labels) == {row.method for row in rows[1:-1]}


@pytest.mark.parametrize(
    "settings",
    [
        {"batch_size": 0},
        {"langevin_step_size": 0.0},
        {"langevin_noise_scale": -1.0},
        {"anneal_beta_end": math.inf},
    ],
)
def test_inference_settings_that_fail_late_are_refused_when_made(settings: dict[str, float]) -> None:
    # before: each failed inside compare_inference, some only after Gibbs and ICM had decoded everything
    with pytest.raises(ValueError):
        InferenceConfig(**settings)  # type: ignore[arg-type]


def test_segmentation_scores_refuse_labels_that_are_not_binary() -> None:
    # before: a probability of 0.2 counted as foreground
    with pytest.raises(ValueError, match="binary"):
        segmentation_scores(torch.tensor([0.2, 0.2, 0.9]), torch.tensor([0.0, 1.0, 1.0]))
    scores = segmentation_scores(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    assert scores == pytest.approx((2 / 3, 0.5))


def test_the_example_panels_stack_input_truth_and_each_method_clipped_to_the_unit_interval() -> None:
    from ebm.boltzmann.figures import structured_examples

    generator = torch.Generator().manual_seed(0)
    noisy = 2.0 * torch.randn(10, 1, 5, 5, generator=generator)  # far outside [0, 1]
    truth = (torch.rand(10, 1, 5, 5, generator=generator) < 0.5).float()
    labels = {"icm": 1 - truth, "gibbs": truth}
    rows = structured_examples(torch.cat([noisy, truth], dim=1), labels, n_images=4)
    assert rows.shape == ((2 + 2) * 4, 1, 5, 5)
    assert torch.equal(rows[:4], noisy[:4].clamp(0, 1)) and rows.min() >= 0 and rows.max() <= 1
    assert torch.equal(rows[4:8], truth[:4]) and torch.equal(rows[8:12], 1 - truth[:4])
