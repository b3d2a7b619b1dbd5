"""The RBM: its energy contract, Gibbs conditionals against enumeration, exact and AIS log Z, CD training."""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path

import pytest
import torch

from ebm.boltzmann.ais import (
    RBMAISConfig,
    ais_log_partition,
    mean_log_likelihood,
    salakhutdinov_murray_schedule,
)
from ebm.boltzmann.gibbs import Gibbs, inverse_temperatures
from ebm.boltzmann.rbm import (
    BernoulliRBM,
    RBMConfig,
    binary_states,
    exact_log_partition,
    exact_log_probabilities,
    init_rbm_,
)
from ebm.boltzmann.training import (
    BinarizeConfig,
    RBMRecipe,
    RBMTrainingConfig,
    binarize,
    build_rbm_objective,
    recipe_with,
    reconstruction_error,
    train_rbm,
)
from ebm.checkpoint import load_model, save_model
from ebm.energies import check_energy_output
from ebm.trainer import TrainConfig, TrainingDivergedError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed (make data)"
)


def fashion_mnist_images(n: int, *, train: bool = True) -> torch.Tensor:
    """The first ``n`` real Fashion-MNIST images, uint8 ``(n, 1, 28, 28)``, read from the IDX file."""
    name = "train-images-idx3-ubyte.gz" if train else "t10k-images-idx3-ubyte.gz"
    with gzip.open(FASHION_MNIST / name, "rb") as handle:
        handle.read(16)  # magic number and the three dimensions
        pixels = handle.read(n * 28 * 28)
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(n, 1, 28, 28).clone()


def random_rbm(n_visible: int, n_hidden: int, *, std: float, seed: int = 0) -> BernoulliRBM:
    generator = torch.Generator().manual_seed(seed)
    rbm = BernoulliRBM(RBMConfig((n_visible,), n_hidden))
    with torch.no_grad():
        for parameter in rbm.parameters():
            parameter.normal_(0.0, std, generator=generator)
    return rbm


# --- the energy contract --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (5, 784)])
def test_the_free_energy_maps_a_batch_to_one_energy_per_row(shape: tuple[int, ...]) -> None:
    rbm = BernoulliRBM(RBMConfig((1, 28, 28), 7))
    v = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    assert check_energy_output(rbm(v), v).shape == (5,)
    with pytest.raises(ValueError, match=r"784 visible units.*\(5, 1, 27, 28\)"):
        rbm(torch.zeros(5, 1, 27, 28))


def test_the_free_energy_is_minus_log_sum_over_hidden_states_of_exp_minus_e() -> None:
    rbm = random_rbm(6, 5, std=1.0)
    v = binary_states(6, 0, 64).float()  # every visible state
    hidden = binary_states(5, 0, 32).float()
    joint = torch.stack([rbm.joint_energy(v, h.expand(64, -1)) for h in hidden], dim=1)  # (64, 32)
    expected = -torch.logsumexp(-joint.double(), dim=1)
    torch.testing.assert_close(rbm(v).double(), expected, atol=1e-5, rtol=1e-5)


def test_lower_free_energy_means_more_probable() -> None:
    rbm = random_rbm(5, 3, std=1.5)
    v = binary_states(5, 0, 32).float()
    log_p = exact_log_probabilities(rbm, v)
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(torch.argsort(log_p, descending=True), torch.argsort(rbm(v).double()))


# --- Gibbs ----------------------------------------------------------------------------------------


def test_block_gibbs_samples_the_exactly_enumerated_distribution() -> None:
    rbm = random_rbm(4, 3, std=1.2, seed=3)
    generator = torch.Generator().manual_seed(1)
    start = (torch.rand(20000, 4, generator=generator) < 0.5).float()
    samples, stats = Gibbs().run(rbm, start, 30, generator=generator)

    codes = (samples.long() * (1 << torch.arange(4))).sum(1)
    empirical = torch.bincount(codes, minlength=16).double() / samples.shape[0]
    exact = exact_log_probabilities(rbm, binary_states(4, 0, 16).float()).exp()
    assert 0.5 * (empirical - exact).abs().sum() < 0.02  # total variation; sampling noise ≈ 0.01
    assert float(stats.acceptance_rate) == 1.0
    # the same chains at β = 2 sample a sharper distribution, which the test can tell apart
    colder, _ = Gibbs(2.0, 2.0).run(rbm, start, 30, generator=generator)
    colder_codes = (colder.long() * (1 << torch.arange(4))).sum(1)
    colder_empirical = torch.bincount(colder_codes, minlength=16).double() / colder.shape[0]
    assert 0.5 * (colder_empirical - exact).abs().sum() > 0.05


def test_gibbs_refuses_a_model_without_block_conditionals() -> None:
    with pytest.raises(TypeError, match="gibbs_context and gibbs_sweep"):
        Gibbs().run(lambda x: x.sum(1), torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="ICM"):
        Gibbs(1.0, math.inf)
    assert inverse_temperatures(1.0, 8.0, 4) == pytest.approx([1.0, 2.0, 4.0, 8.0])


# --- exact and AIS log Z --------------------------------------------------------------------------


def test_exact_log_partition_matches_brute_force_over_both_layers_whichever_is_enumerated() -> None:
    rbm = random_rbm(5, 4, std=1.0)
    v = binary_states(5, 0, 32).float().repeat_interleave(16, 0)
    h = binary_states(4, 0, 16).float().repeat(32, 1)
    brute = torch.logsumexp(-rbm.joint_energy(v, h).double(), 0).item()
    assert exact_log_partition(rbm) == pytest.approx(brute, abs=1e-5)  # sums the 4 hidden units
    transposed = BernoulliRBM(RBMConfig((4,), 5))
    with torch.no_grad():
        transposed.weight.copy_(rbm.weight.T)
        transposed.visible_bias.copy_(rbm.hidden_bias)
        transposed.hidden_bias.copy_(rbm.visible_bias)
    assert exact_log_partition(transposed) == pytest.approx(brute, abs=1e-5)  # sums the 4 visible units
    with pytest.raises(ValueError, match="at most 26"):
        exact_log_partition(BernoulliRBM(RBMConfig((30,), 30)))


def test_the_annealing_schedule_is_salakhutdinov_and_murrays_at_full_length() -> None:
    betas = salakhutdinov_murray_schedule(14500)
    assert betas.shape == (14501,) and betas[0] == 0 and betas[-1] == 1
    assert torch.all(betas[1:] > betas[:-1])
    assert betas[500] == pytest.approx(0.5) and betas[4500] == pytest.approx(0.9)


@needs_fashion_mnist
def test_ais_is_within_a_tenth_of_a_nat_of_the_exact_log_partition_of_a_trained_rbm() -> None:
    data = binarize(fashion_mnist_images(2000), BinarizeConfig())
    train = TrainConfig(
        steps=300, batch_size=100, lr=0.01, betas=(0.5, 0.999), grad_clip=None, log_every=100,
        checkpoint_every=0, max_abs_energy=1e5, device="cpu", progress=False,
    )  # fmt: skip
    rbm, _ = train_rbm(data, RBMRecipe(n_hidden=16, cd=RBMTrainingConfig(n_steps=1), train=train))
    assert rbm.weight.abs().max() > 0.5  # far from the base-rate model AIS starts from

    exact = exact_log_partition(rbm)
    generator = torch.Generator().manual_seed(0)
    ais = ais_log_partition(rbm, data, RBMAISConfig(n_chains=100, n_temperatures=1500), generator=generator)

    assert abs(ais.log_partition - exact) < 0.1
    assert ais.log_partition_minus_3sd <= exact + 0.05 and exact - 0.05 <= ais.log_partition_plus_3sd
    assert 0 < ais.standard_error < 0.1 and ais.effective_sample_size > 10
    ll = mean_log_likelihood(rbm, data[:500], ais.log_partition, ais.standard_error)
    exact_ll = exact_log_probabilities(rbm, data[:500]).mean().item()
    assert ll.mean == pytest.approx(exact_ll, abs=0.1)
    assert ll.standard_error >= ll.sampling_error > 0


# --- training -------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_cd_and_pcd_training_lower_reconstruction_error_and_raise_the_log_likelihood(tmp_path: Path) -> None:
    data = binarize(fashion_mnist_images(1500), BinarizeConfig())
    test = binarize(fashion_mnist_images(300, train=False), BinarizeConfig(), offset=2)
    base = RBMRecipe(n_hidden=12, train=TrainConfig(
        steps=300, batch_size=50, lr=0.003, betas=(0.5, 0.999), grad_clip=None, log_every=50,
        checkpoint_every=0, max_abs_energy=1e5, device="cpu", progress=False,
    ))  # fmt: skip
    # lr 0.003: PCD's 50 chains follow the model (over training seeds 0–3, gains of 31–48 nats and
    # reconstruction errors 0.86–0.89 of the untrained); at 0.01 the gain after 150 steps was 4 to 41 nats
    untrained = init_rbm_(
        BernoulliRBM(RBMConfig((1, 28, 28), 12)), data, generator=torch.Generator().manual_seed(0)
    )
    untrained_ll = exact_log_probabilities(untrained, test).mean().item()
    untrained_error = reconstruction_error(untrained, test)

    for cd in (RBMTrainingConfig(n_steps=1), RBMTrainingConfig(n_steps=1, persistent=True, n_chains=50)):
        rbm, result = train_rbm(data, dataclasses.replace(base, cd=cd))
        assert result.steps == 300 and result.recoveries == 0
        assert reconstruction_error(rbm, test) < 0.9 * untrained_error
        assert exact_log_probabilities(rbm, test).mean().item() > untrained_ll + 10

    save_model(tmp_path / "rbm.pt", rbm, kind="rbm", config=rbm.config)
    loaded = load_model(tmp_path / "rbm.pt")
    assert isinstance(loaded, BernoulliRBM)
    torch.testing.assert_close(loaded(test), rbm(test))


def test_training_refuses_grey_data_and_binarising_refuses_colour() -> None:
    with pytest.raises(ValueError, match="holds no image"):  # before: a reshape error from deep inside
        train_rbm(torch.zeros(0, 1, 2, 2), RBMRecipe(n_hidden=2))
    with pytest.raises(ValueError, match="at least one test image"):  # before: a NaN mean
        mean_log_likelihood(BernoulliRBM(RBMConfig((4,), 2)), torch.zeros(0, 4), 0.0)
    with pytest.raises(ValueError, match="binary"):
        train_rbm(torch.full((4, 1, 2, 2), 0.5), RBMRecipe(n_hidden=2))
    with pytest.raises(ValueError, match=r"greyscale.*\(2, 3, 4, 4\)"):
        binarize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), BinarizeConfig())


def test_pcd_training_resumes_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    data = (torch.rand(200, 1, 6, 6, generator=generator) < 0.3).float()
    train = TrainConfig(
        steps=20, batch_size=20, lr=0.01, grad_clip=None, log_every=5, checkpoint_every=10,
        max_abs_energy=1e5, device="cpu", progress=False,
    )  # fmt: skip
    recipe = RBMRecipe(n_hidden=5, cd=RBMTrainingConfig(n_steps=2, persistent=True, n_chains=30), train=train)
    straight, _ = train_rbm(data, recipe)
    checkpoint = tmp_path / "rbm.ckpt"
    train_rbm(data, recipe_with(recipe, steps=10), checkpoint_path=checkpoint)
    resumed, result = train_rbm(data, recipe, checkpoint_path=checkpoint)
    assert result.steps == 20
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)


def test_pcd_advances_every_persistent_chain_once_when_there_are_as_many_as_the_batch() -> None:
    # before: 100 slots drawn with replacement from 100 chains, ~37 % repeats and a third of the chains idle
    objective = build_rbm_objective(
        RBMTrainingConfig(n_steps=1, persistent=True, n_chains=100),
        (1, 4, 4),
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    assert objective.buffer is not None
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        _, slots = objective.buffer.sample(100, generator=generator)
        assert sorted(slots.tolist()) == list(range(100))
    with pytest.raises(ValueError, match=r"n_chains \(50\) must be at least the batch size \(100\)"):
        RBMRecipe(cd=RBMTrainingConfig(persistent=True, n_chains=50))


def test_log_likelihoods_refuse_rows_that_are_not_binary() -> None:
    # before: rows of 3.0 scored log p = +71 nats, which no probability over discrete states can be
    rbm = BernoulliRBM(RBMConfig((1, 2, 3), 4))
    for grey in (torch.full((2, 1, 2, 3), 3.0), torch.full((2, 1, 2, 3), 0.5)):
        with pytest.raises(ValueError, match="binary"):
            exact_log_probabilities(rbm, grey)
        with pytest.raises(ValueError, match="binary"):
            mean_log_likelihood(rbm, grey, 0.0)


def test_a_batch_of_the_right_size_but_another_shape_is_refused() -> None:
    # before: a channels-last (B, 4, 4, 3) batch for event shape (3, 4, 4) was reshaped, pixels scrambled
    rbm = BernoulliRBM(RBMConfig((3, 4, 4), 5))
    with pytest.raises(ValueError, match=r"got shape \(2, 4, 4, 3\)"):
        rbm(torch.zeros(2, 4, 4, 3))
    assert rbm(torch.zeros(2, 3, 4, 4)).shape == rbm(torch.zeros(2, 48)).shape == (2,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weight_std", float("inf")),
        ("weight_std", float("nan")),
        ("weight_std", -0.1),
        ("weight_std", 0.0),
        ("n_hidden", 0),
        ("n_hidden", 2.5),
    ],
)
def test_a_recipe_with_a_bad_size_or_initial_scale_is_refused_by_name(field: str, value: float) -> None:
    # weight_std inf gave infinite weights, then three rollbacks and advice to lower the learning rate
    with pytest.raises(ValueError, match=f"^{field} must be"):
        RBMRecipe(**{field: value})  # type: ignore[arg-type]


def test_a_diverging_rbm_is_told_to_lower_its_lr_not_a_step_size_or_alpha_it_does_not_have(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # before: "Try a smaller lr or sampler step size, or a larger alpha"; Gibbs has no step, α is fixed at 0
    data = (torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    train = TrainConfig(steps=20, batch_size=16, lr=1e6, checkpoint_every=5, progress=False)
    with pytest.raises(TrainingDivergedError) as raised:
        train_rbm(data, RBMRecipe(n_hidden=4, train=train))
    assert str(raised.value).endswith("Try a smaller lr or smaller initial weights.")
    assert "smaller learning rates did not help" in str(raised.value)
    assert "lr × 0.5" in capsys.readouterr().out and "sampler step" not in str(raised.value)


def test_stochastic_binarising_draws_from_its_seed_and_offset_and_keeps_the_intensity() -> None:
    """Train (offset 0) and test (offset 2) must not share their noise; the seed picks the draw."""
    images = torch.full((200, 1, 4, 4), 64, dtype=torch.uint8)  # intensity 64/255 ≈ 0.25
    config = BinarizeConfig(seed=3)
    train, again = binarize(images, config), binarize(images, config)
    assert torch.equal(train, again)
    assert not torch.equal(train, binarize(images, config, offset=2))
    assert not torch.equal(train, binarize(images, BinarizeConfig(seed=4)))
    assert float(train.mean()) == pytest.approx(64 / 255, abs=0.02)


def test_reconstruction_error_is_the_mean_squared_error_per_pixel() -> None:
    data = (torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    rbm = BernoulliRBM(RBMConfig((1, 2, 2), n_hidden=3))
    init_rbm_(rbm, data, generator=torch.Generator().manual_seed(0), weight_std=1.0)
    with torch.no_grad():
        expected = float((rbm.reconstruct(data) - data).square().mean())
    assert reconstruction_error(rbm, data, batch_size=2) == pytest.approx(expected)
