"""Contract and statistical tests for the 2D toy datasets and their exact log-densities.

Every dataset is checked against its own grid density: it integrates to one, the Monte-Carlo
entropy of its samples matches the grid entropy, and a histogram of its samples matches the grid's
bin probabilities as well as an exact multinomial draw of the same size does.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from torch import Tensor, nn

from ebm.data.toy2d import TOY_DATASETS, NoisyCurveDataset, Rings, make_toy_dataset
from ebm.energies import MLPEnergy, MLPEnergyConfig, seed_linear_layers_
from ebm.samplers import SamplerConfig
from ebm.toy import SamplingConfig, Toy2DConfig, energy_device, evaluate_energy, sample_energy

NAMES = list(TOY_DATASETS)
CURVE_NAMES = [name for name, dataset in TOY_DATASETS.items() if isinstance(dataset, NoisyCurveDataset)]

# Grid cells of side 9/360 = 0.025: the checkerboard's square edges (multiples of 0.5 from -4.5) fall
# on cell edges, so the midpoint rule is exact for it; for the smooth densities (noise ≥ 0.1 = 4
# cells) it is spectrally accurate.
RESOLUTION = 360
BIN_CELLS = 10  # histogram bins of 10 × 10 grid cells (side 0.25)
N_SAMPLES = 20_000
SEED = 1234


def grid_points(bounds: tuple[float, float], resolution: int) -> tuple[Tensor, float]:
    """Cell centres ``(resolution², 2)``, x varying fastest, and the cell area."""
    low, high = bounds
    cell = (high - low) / resolution
    centres = low + (torch.arange(resolution, dtype=torch.float64) + 0.5) * cell
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2), cell**2


@functools.cache
def grid_log_prob(name: str) -> tuple[Tensor, float]:
    """log p on the test grid ``(R, R)`` indexed ``[y, x]``, and the cell area."""
    dataset = TOY_DATASETS[name]
    points, area = grid_points(dataset.bounds, RESOLUTION)
    return dataset.log_prob(points).reshape(RESOLUTION, RESOLUTION), area


@functools.cache
def seeded_samples(name: str) -> Tensor:
    return TOY_DATASETS[name].sample(N_SAMPLES, generator=torch.Generator().manual_seed(SEED))


def total_variation(counts: Tensor, probs: Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


# --- contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_seeding(name: str) -> None:
    dataset = make_toy_dataset(name)
    assert dataset is TOY_DATASETS[name] and dataset.name == name

    first = dataset.sample(64, generator=torch.Generator().manual_seed(0))
    again = dataset.sample(64, generator=torch.Generator().manual_seed(0))
    other = dataset.sample(64, generator=torch.Generator().manual_seed(1))
    assert first.shape == (64, 2) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert dataset.sample(0, generator=torch.Generator()).shape == (0, 2)

    log_prob = dataset.log_prob(first)
    assert log_prob.shape == (64,) and log_prob.dtype == torch.float64
    torch.testing.assert_close(log_prob, dataset.log_prob(first.double()))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        dataset.log_prob(torch.zeros(4, 3))


@pytest.mark.parametrize("name", NAMES)
def test_sampling_ignores_the_global_rng(name: str) -> None:
    samples = []
    with torch.random.fork_rng():
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            samples.append(make_toy_dataset(name).sample(16, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(*samples)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown toy dataset 'gaussians'") as error:
        make_toy_dataset("gaussians")
    assert all(name in str(error.value) for name in NAMES)


# --- the density: normalisation and agreement with the samples ------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one_over_bounds(name: str) -> None:
    log_prob, area = grid_log_prob(name)
    mass = float(log_prob.exp().sum()) * area
    assert abs(mass - 1) < 1e-4, mass  # all datasets put < 1e-6 outside the box; observed |mass − 1| < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_sample_entropy_matches_grid_entropy(name: str) -> None:
    samples = seeded_samples(name)
    low, high = TOY_DATASETS[name].bounds
    assert ((samples > low) & (samples < high)).all()

    log_prob, area = grid_log_prob(name)
    density = log_prob.exp()
    grid_entropy = -float(torch.special.xlogy(density, density).sum()) * area
    sample_log_prob = TOY_DATASETS[name].log_prob(samples)
    assert torch.isfinite(sample_log_prob).all()
    mc_entropy = -float(sample_log_prob.mean())
    standard_error = float(sample_log_prob.std()) / math.sqrt(N_SAMPLES)
    # the checkerboard's −log p is constant, so its standard error is zero and the match exact
    tolerance = 4 * standard_error + 1e-6
    assert abs(mc_entropy - grid_entropy) < tolerance, (mc_entropy, grid_entropy, tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_sample_histogram_matches_grid_density(name: str) -> None:
    """TV(sample histogram, grid bin probabilities) must be within the range an exact multinomial
    sample of the same size reaches: its mean over 50 draws plus 5 of their standard deviations.
    A 20k sample on 36 × 36 bins has TV ≈ 0.05 ± 0.002 from counting noise alone; the grid's bin
    probabilities are accurate to ≪ 0.002 in TV (midpoint rule, cells ≤ σ/4)."""
    log_prob, area = grid_log_prob(name)
    n_bins = RESOLUTION // BIN_CELLS
    bin_probs = (log_prob.exp() * area).reshape(n_bins, BIN_CELLS, n_bins, BIN_CELLS).sum((1, 3)).flatten()
    bin_probs = bin_probs / bin_probs.sum()

    low, high = TOY_DATASETS[name].bounds
    bin_index = ((seeded_samples(name).double() - low) / ((high - low) / n_bins)).floor().long()
    bin_index = bin_index.clamp(0, n_bins - 1)
    counts = torch.bincount(bin_index[:, 1] * n_bins + bin_index[:, 0], minlength=n_bins**2)
    observed = total_variation(counts.double(), bin_probs)

    generator = torch.Generator().manual_seed(SEED)
    null = torch.tensor(
        [
            total_variation(
                torch.bincount(
                    torch.multinomial(bin_probs, N_SAMPLES, replacement=True, generator=generator),
                    minlength=n_bins**2,
                ).double(),
                bin_probs,
            )
            for _ in range(50)
        ]
    )
    threshold = float(null.mean() + 5 * null.std())
    assert observed < threshold, (observed, threshold)


# --- exactness of the closed forms and of the quadrature ------------------------------------------------


@pytest.mark.parametrize("name", CURVE_NAMES)
def test_quadrature_is_converged(name: str) -> None:
    """Default quadrature against three times as many nodes, on samples and on a coarse grid."""
    dataset = TOY_DATASETS[name]
    assert isinstance(dataset, NoisyCurveDataset)
    reference = dataclasses.replace(dataset, nodes_per_std=3 * dataset.nodes_per_std)
    points = torch.cat([seeded_samples(name)[:5000].double(), grid_points(dataset.bounds, 60)[0]])
    error = (dataset.log_prob(points) - reference.log_prob(points)).abs().max()
    assert error < 1e-4, float(error)


def test_rings_bessel_form_matches_quadrature_over_the_angle() -> None:
    rings = Rings()
    x = rings.sample(500, generator=torch.Generator().manual_seed(3)).double()
    angles = torch.arange(2048, dtype=torch.float64) * (2 * math.pi / 2048)  # periodic: trapezoid is exact
    circle = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    variance = rings.noise_std**2
    log_terms = [
        -torch.cdist(x, radius * circle).square() / (2 * variance) - math.log(2 * math.pi * variance * 2048)
        for radius in rings.radii
    ]  # each (n, 2048)
    reference = torch.logsumexp(torch.cat(log_terms, dim=1), dim=1) - math.log(len(rings.radii))
    torch.testing.assert_close(rings.log_prob(x), reference, rtol=0, atol=1e-9)


def test_eight_gaussians_matches_torch_mixture() -> None:
    dataset = make_toy_dataset("8gaussians")
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = 2.5 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(8, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(means, 0.35), 1),
    )
    x = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(dataset.log_prob(x), mixture.log_prob(x), rtol=0, atol=1e-10)


def test_checkerboard_is_uniform_on_black_squares() -> None:
    board = make_toy_dataset("checkerboard")
    x = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0], [3.0, 1.0], [4.5, 0.0], [0.0, -4.01]])
    expected = torch.tensor([-math.log(32), -math.inf, -math.log(32), -math.inf, -math.inf, -math.inf])
    torch.testing.assert_close(board.log_prob(x), expected.double())


def test_a_checkerboard_draw_just_below_an_upper_edge_stays_on_its_square_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # before: offsets within ~1e-7 of 1 rounded onto the edge in float32, where log p is −inf, and the
    # entropy floor of a test set holding one such point failed (about once in 2·10⁷ draws)
    import ebm.data.toy2d as toy2d

    monkeypatch.setattr(toy2d, "_rand", lambda n, generator: torch.full((n,), 1 - 1e-12, dtype=torch.float64))
    x = make_toy_dataset("checkerboard").sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(make_toy_dataset("checkerboard").log_prob(x)).all()


@pytest.mark.parametrize("name", list(TOY_DATASETS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_log_prob_of_a_non_finite_point_is_an_error_naming_its_row(name: str, bad: float) -> None:
    x = torch.zeros(4, 2)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=rf"{name}\.log_prob: x holds NaN or ±inf at row\(s\) 2 of 4"):
        make_toy_dataset(name).log_prob(x)


# --- evaluating a trained energy (ebm.toy) ----------------------------------------------------------


def tiny_recipe() -> Toy2DConfig:
    """A recipe whose long-run sampling takes milliseconds (a few chains, a few MALA steps, no jumps)."""
    return Toy2DConfig(
        model=MLPEnergyConfig(in_features=2, widths=(8,), activation="relu"),
        sampler=SamplerConfig(name="mala", step_size=0.05),
        sampling=SamplingConfig(n_samples=32, n_steps=3),
    )


class Quadratic(nn.Module):
    """A stateless energy ``|x|² / 2``: no parameters or buffers to take a device from."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x.pow(2).sum(-1)


def evaluate_on(device: torch.device, energy: nn.Module, seed: int) -> tuple[Tensor, list[torch.Generator]]:
    """``evaluate_energy`` on moons with ``energy`` moved to ``device``; its samples and the generators
    it handed to ``sample_energy``."""
    dataset = make_toy_dataset("moons")
    x_train = dataset.sample(256, generator=torch.Generator().manual_seed(0))
    x_test = dataset.sample(256, generator=torch.Generator().manual_seed(1))
    seen: list[torch.Generator] = []

    def spy(*args: object, generator: torch.Generator, **kwargs: object) -> Tensor:
        seen.append(generator)
        return sample_energy(*args, generator=generator, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ebm.toy.sample_energy", spy)
        _, samples = evaluate_energy(
            energy.to(device), dataset, tiny_recipe(), x_train=x_train, x_test=x_test, seed=seed
        )
    return samples, seen


def test_energy_device_is_where_the_weights_are_and_the_cpu_for_a_stateless_energy() -> None:
    assert energy_device(MLPEnergy(tiny_recipe().model)) == torch.device("cpu")
    assert energy_device(Quadratic()) == torch.device("cpu")
    assert energy_device(nn.Linear(2, 1).to(torch.float64)) == torch.device("cpu")


def test_evaluate_energy_on_cpu_samples_exactly_what_a_cpu_generator_with_its_seed_draws() -> None:
    recipe = tiny_recipe()
    energy = seed_linear_layers_(MLPEnergy(recipe.model), generator=torch.Generator().manual_seed(0)).eval()
    samples, seen = evaluate_on(torch.device("cpu"), energy, seed=5)
    assert [(g.device, g.initial_seed()) for g in seen] == [(torch.device("cpu"), 5)]
    moons = make_toy_dataset("moons")
    x_train = moons.sample(256, generator=torch.Generator().manual_seed(0))
    expected = sample_energy(
        energy, recipe, moons.bounds, x_train=x_train, generator=torch.Generator().manual_seed(5)
    )
    assert samples.device.type == "cpu" and torch.equal(samples, expected)
    other, _ = evaluate_on(torch.device("cpu"), energy, seed=6)
    assert not torch.equal(samples, other)  # the seed is what chose the draw


def test_evaluate_energy_samples_a_stateless_energy_on_the_cpu() -> None:
    samples, seen = evaluate_on(torch.device("cpu"), Quadratic(), seed=3)
    assert [g.device for g in seen] == [torch.device("cpu")]
    assert samples.shape == (32, 2) and bool(samples.isfinite().all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_energy_of_a_cuda_energy_samples_with_a_cuda_generator() -> None:
    """What ``train.device="auto"`` returns on a GPU machine; a CPU generator would be rejected there."""
    energy = seed_linear_layers_(MLPEnergy(tiny_recipe().model), generator=torch.Generator().manual_seed(0))
    samples, seen = evaluate_on(torch.device("cuda"), energy.eval(), seed=5)
    assert [(g.device.type, g.initial_seed()) for g in seen] == [("cuda", 5)]
    assert samples.device.type == "cuda" and bool(samples.isfinite().all())
