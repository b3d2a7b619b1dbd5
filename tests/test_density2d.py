"""Grid partition functions, NLL, MMD and the KDE baseline against analytic densities and references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from ebm.data.toy2d import make_toy_dataset
from ebm.energies import GaussianMixtureEnergy
from ebm.evaluation.density2d import (
    DensityReport,
    GridPartition,
    KDEBaseline,
    LogProbFn,
    converged_log_partition,
    evaluate_density,
    grid_log_partition,
    mmd,
    nll,
    true_nll,
)

BOUNDS = (-5.0, 5.0)
ENTROPY_OF_STANDARD_2D_GAUSSIAN = math.log(2 * math.pi * math.e)


def eight_gaussians() -> GaussianMixtureEnergy:
    angles = torch.arange(8) * 2 * math.pi / 8
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)  # (8, 2) on a circle of radius 2
    return GaussianMixtureEnergy(means, 0.3)


def sample_mixture(mixture: GaussianMixtureEnergy, n: int, generator: torch.Generator) -> Tensor:
    component = torch.randint(len(mixture.means), (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    return mixture.means[component] + mixture.stds[component, None] * noise


def test_grid_partition_of_a_normalised_mixture_is_zero() -> None:
    assert abs(grid_log_partition(eight_gaussians(), BOUNDS, 128)) < 1e-3


def test_grid_partition_of_a_shifted_energy_is_minus_the_shift() -> None:
    mixture, shift = eight_gaussians(), 3.7
    log_z = grid_log_partition(lambda x: mixture(x) + shift, BOUNDS, 128, batch_size=4096)
    assert log_z == pytest.approx(-shift, abs=1e-3)


def test_converged_partition_doubles_until_the_change_is_below_tol() -> None:
    narrow = GaussianMixtureEnergy(torch.zeros(1, 2), 0.1)  # needs cells ≲ σ: 16 and 32 are too coarse
    partition = converged_log_partition(narrow, (-4.0, 4.0), start_resolution=16, max_resolution=1024)
    assert isinstance(partition, GridPartition)
    assert partition.resolution == 128
    assert partition.change < 1e-3
    assert abs(partition.log_z) < 1e-3


def test_converged_partition_raises_with_the_values_seen_when_tol_is_out_of_reach() -> None:
    narrow = GaussianMixtureEnergy(torch.zeros(1, 2), 0.1)
    with pytest.raises(RuntimeError, match=r"did not converge.*8: .*16: .*32: "):
        converged_log_partition(narrow, (-4.0, 4.0), start_resolution=8, max_resolution=32)


@pytest.mark.parametrize(("start", "maximum"), [(128, 200), (128, 128), (64, 127)])
def test_converged_partition_needs_room_to_double_once(start: int, maximum: int) -> None:
    # Without one doubling there is nothing to compare: it used to report "did not converge" instead.
    with pytest.raises(ValueError, match=rf"start_resolution={start}, max_resolution={maximum}"):
        converged_log_partition(eight_gaussians(), BOUNDS, start_resolution=start, max_resolution=maximum)


def test_converged_partition_accepts_exactly_one_doubling() -> None:
    partition = converged_log_partition(
        eight_gaussians(), BOUNDS, start_resolution=128, max_resolution=256, tol=1e-2
    )
    assert partition.resolution == 256


def test_non_finite_energy_on_the_grid_raises_with_count_and_example() -> None:
    mixture = eight_gaussians()

    def half_infinite(x: Tensor) -> Tensor:
        return torch.where(x[:, 0] > 0, torch.inf, mixture(x))

    with pytest.raises(ValueError, match=r"50 of 100 grid energies are not finite, e\.g\. inf at x = \["):
        grid_log_partition(half_infinite, BOUNDS, 10)


def test_nll_of_the_analytic_mixture_equals_its_true_nll_and_the_gap_vanishes() -> None:
    mixture = eight_gaussians()
    x = sample_mixture(mixture, 2000, torch.Generator().manual_seed(0))
    floor = true_nll(lambda points: -mixture(points), x)
    assert nll(mixture, x, log_z=0.0) == pytest.approx(floor, abs=1e-9)
    gap = nll(mixture, x, grid_log_partition(mixture, BOUNDS, 256)) - floor
    assert abs(gap) < 1e-3


def test_mmd_is_near_zero_for_one_distribution_and_clearly_positive_for_two() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 2, generator=generator), torch.randn(1000, 2, generator=generator)
    shifted = torch.randn(1000, 2, generator=generator) + torch.tensor([0.5, 0.0])
    assert abs(mmd(x, y)) < 0.01
    assert mmd(x, shifted) > 0.03  # ~10× the same-distribution noise at n = 1000


def numpy_mmd(x: np.ndarray, y: np.ndarray, bandwidths: list[float]) -> float:
    """Unbiased MMD² from full kernel matrices with explicit off-diagonal masks."""

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sq_dist = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-sq_dist / (2 * h**2)) for h in bandwidths)

    n, m = len(x), len(y)
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    off_xx, off_yy = ~np.eye(n, dtype=bool), ~np.eye(m, dtype=bool)
    return float(k_xx[off_xx].mean() + k_yy[off_yy].mean() - 2 * kernel(x, y).mean())


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_mmd_matches_a_direct_numpy_computation(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 2)), rng.normal(0.3, 1.2, size=(40, 2))
    expected = numpy_mmd(x, y, [0.4, 1.3])
    got = mmd(torch.from_numpy(x), torch.from_numpy(y), bandwidths=[0.4, 1.3], chunk_size=chunk_size)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)

    pooled = np.concatenate([x, y])
    pairwise = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))[np.triu_indices(len(pooled), 1)]
    median_bandwidths = [np.median(pairwise) * factor for factor in (0.25, 0.5, 1.0, 2.0, 4.0)]
    got_default = mmd(torch.from_numpy(x), torch.from_numpy(y), chunk_size=chunk_size)
    assert got_default == pytest.approx(numpy_mmd(x, y, median_bandwidths), rel=1e-9, abs=1e-12)


def test_mmd_of_float32_samples_far_from_the_origin_matches_float64() -> None:
    # before: torch.cdist's float32 distances lost their digits at |x| ~ 1000: -8.5e-4 against -7.4e-4
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 2)) + 1000.0, rng.normal(size=(300, 2)) + 1000.0
    exact = mmd(torch.from_numpy(x), torch.from_numpy(y), bandwidths=[0.5, 1.0])
    single = mmd(torch.from_numpy(x).float(), torch.from_numpy(y).float(), bandwidths=[0.5, 1.0])
    assert single == pytest.approx(exact, abs=2e-5)


def test_mmd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="need x"):
        mmd(torch.zeros(10, 2), torch.zeros(10, 3))


def test_kde_baseline_picks_a_sensible_bandwidth_and_nearly_matches_a_gaussian() -> None:
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(1500, 2, generator=generator), torch.randn(2000, 2, generator=generator)
    kde = KDEBaseline(seed=0).fit(train)
    scott = 1500 ** (-1 / 6)  # Scott's rule for a standard normal in 2D, near-optimal here
    assert 0.5 * scott < kde.bandwidth_ < 2 * scott
    kde_nll = -float(kde.log_prob(test).mean())
    assert 0.0 < kde_nll - ENTROPY_OF_STANDARD_2D_GAUSSIAN < 0.1


def test_kde_baseline_chooses_its_bandwidth_on_all_points_not_by_rescaling_a_subsample_s_alone() -> None:
    # the checkerboard's edges break the smooth-density rate: rescaled from 400 of 4,000 points the
    # bandwidth is ~1.8× the one cross-validation picks on all of them
    checkerboard = make_toy_dataset("checkerboard")
    x = checkerboard.sample(4000, generator=torch.Generator().manual_seed(0))
    refined = KDEBaseline(max_cv_points=400, seed=0).fit(x)
    on_all_points = KDEBaseline(max_cv_points=4000, seed=0).fit(x)  # the whole first-round grid on all
    rescaled = refined.cv_bandwidth_ * (400 / 4000) ** (1 / 6)
    assert rescaled > 1.5 * on_all_points.bandwidth_  # what the baseline used to be fit with
    assert refined.bandwidth_ == pytest.approx(on_all_points.bandwidth_, rel=0.1)
    assert refined.log_prob(x[:5]).shape == (5,)


def test_kde_baseline_refinement_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="n_refine must be ≥ 3 and refine_span > 1"):
        KDEBaseline(n_refine=2)
    with pytest.raises(ValueError, match="n_refine must be ≥ 3 and refine_span > 1"):
        KDEBaseline(refine_span=1.0)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (
            torch.tensor([[float("nan"), 0.0], *[[float(i), 1.0] for i in range(9)]]),
            "1 of 10 rows of the KDE",
        ),
        (torch.ones(50, 2), "no spread"),
        (torch.randn(3, 2), "at least n_folds=5"),
    ],
)
def test_kde_baseline_says_what_is_wrong_with_its_training_points(points: Tensor, message: str) -> None:
    # before: scikit-learn's "All the 125 fits failed", blaming a NaN or zero bandwidth
    with pytest.raises(ValueError, match=message):
        KDEBaseline().fit(points)


def test_nll_refuses_a_non_finite_log_partition() -> None:
    # before: NaN passed straight through as the model's NLL
    with pytest.raises(ValueError, match="log_z must be finite"):
        nll(eight_gaussians(), torch.zeros(3, 2), float("nan"))


def test_kde_baseline_refuses_log_prob_before_fit() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        KDEBaseline().log_prob(torch.zeros(3, 2))


def test_evaluate_density_of_the_true_energy_has_no_gap_and_beats_the_kde() -> None:
    mixture, generator = eight_gaussians(), torch.Generator().manual_seed(0)
    x_train, x_test, samples = (sample_mixture(mixture, n, generator) for n in (1500, 1000, 1000))
    report = evaluate_density(
        mixture,
        bounds=BOUNDS,
        x_test=x_test,
        true_log_prob=lambda x: -mixture(x),
        x_train=x_train,
        samples=samples,
    )
    assert isinstance(report, DensityReport)
    assert abs(report.log_z) < 1e-3 and report.grid_resolution >= 256
    assert abs(report.gap) < 1e-3
    assert report.gap == pytest.approx(report.nll - report.entropy_floor)
    assert 0.0 < report.kde_gap < 0.3
    assert report.kde_gap == pytest.approx(report.kde_nll - report.entropy_floor)
    assert abs(report.mmd) < 0.01


def log_prob_with_a_hole(value: float) -> LogProbFn:
    """The eight Gaussians' true log-density, but ``value`` wherever x₁ > 0: a bug in half the plane."""
    mixture = eight_gaussians()
    return lambda x: torch.where(x[:, 0] > 0, torch.full_like(x[:, 0], value), -mixture(x))


@pytest.mark.parametrize("value", [math.nan, -math.inf, math.inf])
def test_true_nll_raises_on_a_non_finite_true_log_density(value: float) -> None:
    # Test points are drawn from the true density, so even −inf there is a bug, not a certain miss.
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=rf"2 of 3 true log-densities are not finite, e\.g\. {value} at"):
        true_nll(log_prob_with_a_hole(value), x)


def evaluate_small_mixture(true_log_prob: LogProbFn | None = None) -> None:
    """``evaluate_density`` of the 8-gaussian mixture's own energy on small sets (its true density unless
    ``true_log_prob`` is given)."""
    mixture, generator = eight_gaussians(), torch.Generator().manual_seed(0)
    x_train, x_test, samples = (sample_mixture(mixture, n, generator) for n in (200, 100, 100))
    evaluate_density(
        mixture,
        bounds=BOUNDS,
        x_test=x_test,
        true_log_prob=true_log_prob or (lambda x: -mixture(x)),
        x_train=x_train,
        samples=samples,
        tol=1e-2,
        max_resolution=256,
    )


def test_evaluate_density_raises_on_a_nan_true_log_density_instead_of_reporting_a_nan_gap() -> None:
    with pytest.raises(ValueError, match="true log-densities are not finite"):
        evaluate_small_mixture(log_prob_with_a_hole(math.nan))


def test_evaluate_density_raises_on_a_non_finite_kde_log_density(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KDEBaseline, "log_prob", lambda self, x: torch.full((len(x),), -math.inf))
    with pytest.raises(ValueError, match=r"100 of 100 KDE log-densities are not finite"):
        evaluate_small_mixture()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_mmd_names_a_non_finite_sample_row_instead_of_returning_nan(bad: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 2, generator=generator), torch.randn(60, 2, generator=generator)
    y[17, 1] = bad
    with pytest.raises(ValueError, match=r"1 of 60 rows of y are not finite, e.g. row 17"):
        mmd(x, y)


def test_mmd_of_a_collapsed_sampler_is_large_not_an_error_about_bandwidths() -> None:
    # more than half the pooled pairs coincide: the median distance was 0, and so were the bandwidths
    generator = torch.Generator().manual_seed(0)
    test_points = torch.randn(100, 2, generator=generator)
    collapsed = torch.zeros(400, 2)
    assert mmd(collapsed, test_points) > 10 * mmd(torch.randn(400, 2, generator=generator), test_points)


def test_nll_and_true_nll_refuse_an_empty_set_of_points() -> None:
    mixture = eight_gaussians()
    with pytest.raises(ValueError, match="no points"):
        nll(mixture, torch.empty(0, 2), 0.0)
    with pytest.raises(ValueError, match="no points"):
        true_nll(lambda points: -mixture(points), torch.empty(0, 2))


def test_nll_of_an_unnormalised_energy_does_not_depend_on_its_constant() -> None:
    """nll adds log Z: E + c has log Z − c, and the same NLL. Every other test's energy is normalised
    (log Z ≈ 0), where a wrong sign on log Z shows nowhere."""
    mixture = eight_gaussians()
    x = sample_mixture(mixture, 500, torch.Generator().manual_seed(0))
    reference = nll(mixture, x, grid_log_partition(mixture, BOUNDS, 256))
    for c in (-7.0, 3.0):

        def shifted(points: Tensor, c: float = c) -> Tensor:
            return mixture(points) + c

        log_z = grid_log_partition(shifted, BOUNDS, 256)
        assert log_z == pytest.approx(grid_log_partition(mixture, BOUNDS, 256) - c, abs=1e-5)
        assert nll(shifted, x, log_z) == pytest.approx(reference, abs=1e-5)


def test_kde_baseline_says_when_its_bandwidth_search_runs_off_its_grid() -> None:
    # 20 points, each 200 times: held-out folds hold exact copies, so the likelihood grows without bound
    # as the bandwidth shrinks, and no grid around the subsample's guess holds a best bandwidth
    distinct = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="bandwidth search on all 4000 points ended at the edge"):
        KDEBaseline(max_cv_points=400, seed=0).fit(distinct.repeat(200, 1))
