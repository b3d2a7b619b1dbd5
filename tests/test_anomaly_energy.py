"""The detector's energy: tabulated marginals (gradient, normalisation, tails), normal scores, the Gaussian
copula, the proposal, plain MLPs."""

from __future__ import annotations

import itertools

import pytest
import torch

from ebm.anomaly.energy import AnomalyEnergy, GaussianCopula, MarginalEnergy, MarginalProposal, plain_mlp
from ebm.energies import MLPEnergy, MLPEnergyConfig, energy_and_grad, seed_linear_layers_


@pytest.fixture(scope="module")
def columns() -> torch.Tensor:
    """Five columns of different kinds: Gaussian, wide, narrow, heavy-tailed, discrete."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 20.0, 0.01, 1.0, 2.0])
    x[:, 3] = x[:, 3].exp() * 10
    x[:, 4] = x[:, 4].round()
    return x


@pytest.fixture(scope="module")
def marginal(columns: torch.Tensor) -> MarginalEnergy:
    return MarginalEnergy.fit(columns, grid_size=512, calibration=0.0).double()


def test_analytic_gradient_matches_finite_differences(
    marginal: MarginalEnergy, columns: torch.Tensor
) -> None:
    g = torch.Generator().manual_seed(1)
    spread = columns.std(0)
    x = columns.mean(0) + 3 * spread * torch.randn(300, 5, generator=g, dtype=torch.float64)  # in and out
    _, grad = energy_and_grad(marginal, x)
    step = 1e-6 * spread
    finite = torch.stack(
        [
            (
                marginal(x + step[j] * torch.eye(5, dtype=x.dtype)[j])
                - marginal(x - step[j] * torch.eye(5, dtype=x.dtype)[j])
            )
            / (2 * step[j])
            for j in range(5)
        ],
        dim=1,
    )
    assert torch.allclose(grad, finite, rtol=1e-3, atol=1e-3 / spread.min().item())


def test_each_column_density_integrates_to_one(marginal: MarginalEnergy, columns: torch.Tensor) -> None:
    for j in (0, 1, 2, 4):  # the heavy-tailed column's mass reaches past any finite integration box
        low, high = columns[:, j].min().item(), columns[:, j].max().item()
        pad = 0.5 * (high - low)
        grid = torch.linspace(low - pad, high + pad, 400_001, dtype=torch.float64)
        x = torch.zeros(grid.numel(), 5, dtype=torch.float64)
        x[:, j] = grid
        density = torch.exp(-marginal.per_feature(x)[:, j])
        assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=0.02)


def test_energy_keeps_growing_beyond_the_data(marginal: MarginalEnergy, columns: torch.Tensor) -> None:
    top = columns.max(0).values
    spread = columns.std(0)
    energies = [marginal.per_feature((top + k * spread)[None])[0] for k in (1, 2, 4, 8)]
    for near, far in itertools.pairwise(energies):
        assert (far > near).all()


def test_adaptive_kernels_keep_a_stray_point_from_making_a_low_energy_pocket() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(2000, 1, generator=g), torch.full((3, 1), 8.0)])
    probe = torch.tensor([[8.0], [0.0]])
    fixed = MarginalEnergy.fit(x, adaptive=False, calibration=0.0)(probe)
    adaptive = MarginalEnergy.fit(x, adaptive=True, calibration=0.0)(probe)
    assert adaptive[0] - adaptive[1] > fixed[0] - fixed[1] + 0.5


def test_calibrated_energy_is_the_log_p_value_of_the_density_and_keeps_its_order(
    columns: torch.Tensor,
) -> None:
    plain = MarginalEnergy.fit(columns, grid_size=512, calibration=0.0).double()
    calibrated = MarginalEnergy.fit(columns, grid_size=512, calibration=1.0).double()
    with torch.no_grad():
        e_plain, e_cal = plain.per_feature(columns), calibrated.per_feature(columns)
    for j in range(columns.shape[1]):
        order = torch.argsort(e_plain[:, j])
        assert (e_cal[order, j].diff() >= -0.1).all()  # same ranking, up to interpolation between knots
    # −log of the conformal p-value (#{i: e(Xᵢ) ≥ e(x)} + 1) / (n + 1) over the training rows, ties included
    n = columns.shape[0]
    at_least = (e_plain[None, :, :] >= e_plain[:, None, :]).sum(1)  # (n, C)
    off = (e_cal + ((at_least + 1) / (n + 1)).log()).abs()
    assert (off.median(0).values < 0.01).all() and off.max() < 0.2
    # a continuous column's median row sits near log 2; the discrete one's ties lift its p-values
    assert e_cal[:, :4].median(0).values.sub(torch.log(torch.tensor(2.0))).abs().max() < 0.1
    top = torch.tensor([[columns[:, 0].max() + 10.0, 0, 0, 1, 0]], dtype=torch.float64)
    assert calibrated.per_feature(top)[0, 0] > torch.log(torch.tensor(columns.shape[0] + 1.0))


@pytest.mark.parametrize("grid_size", [512, 1000, 1024])
def test_a_level_shared_by_many_rows_scores_its_own_frequency_wherever_the_grid_falls(grid_size: int) -> None:
    # three one-hot levels of near-equal frequency; before: 2.6, 4.8 and 2.9 at c = 1 (a level's value
    # fell between grid points whose energies sit just above its own, and read the share of rows *strictly*
    # less likely), and a level of frequency 0.30 scored above one of 0.20
    g = torch.Generator().manual_seed(0)
    for probs in ([0.34, 0.33, 0.33], [0.5, 0.3, 0.2]):
        levels = torch.multinomial(torch.tensor(probs), 30_000, replacement=True, generator=g)
        one_hot = torch.nn.functional.one_hot(levels, 3).double()
        calibrated = MarginalEnergy.fit(one_hot, grid_size=grid_size, calibration=1.0)
        frequency = one_hot.mean(0)
        # level k's row: −log f_k from its own column (the rarer value there), 0 from the others' commoner 0s
        expected = -torch.where(frequency <= 0.5, frequency, torch.ones(3, dtype=torch.float64)).log()
        with torch.no_grad():
            energies = calibrated(torch.eye(3)).double()
        # up to the table's own resolution at a sharp peak (≤ 0.1 over grids of 512–2048 points)
        torch.testing.assert_close(energies, expected, atol=0.1, rtol=0)


def test_proposal_draws_each_column_from_its_marginal(
    marginal: MarginalEnergy, columns: torch.Tensor
) -> None:
    x = columns.float()
    samples = MarginalProposal(x, marginal.bandwidth).sample(
        20_000, generator=torch.Generator().manual_seed(3)
    )
    assert samples.shape == (20_000, 5)
    assert torch.allclose(
        samples.median(0).values, x.median(0).values, rtol=0.1, atol=0.05 * x.std(0).max().item()
    )
    correlation = torch.corrcoef(samples.T)[0, 1]
    assert abs(correlation) < 0.05  # columns independent, as in the marginal model


def test_plain_mlp_equals_the_spectrally_normalised_one_in_eval_mode() -> None:
    energy = MLPEnergy(MLPEnergyConfig(4, (8, 8), spectral_norm=True))
    seed_linear_layers_(energy, generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 4)
    plain = plain_mlp(energy)
    energy.eval()
    assert torch.allclose(plain(x), energy(x), atol=1e-6)
    assert not any("parametrizations" in name for name, _ in plain.named_parameters())


def test_anomaly_energy_adds_only_the_residual_above_its_offset(marginal: MarginalEnergy) -> None:
    member = MLPEnergy(MLPEnergyConfig(5, (4,), spectral_norm=False)).double()
    energy = AnomalyEnergy(marginal, [member], scale=3.0, offset=0.0)
    x = torch.randn(64, 5, dtype=torch.float64)
    with torch.no_grad():
        residual = member(x)
        expected = marginal(x) + 3.0 * residual.clamp_min(0)
        assert torch.allclose(energy(x), expected)


def test_the_residual_is_the_members_mean_and_its_part_is_measured_from_the_offset(
    marginal: MarginalEnergy,
) -> None:
    members = [
        seed_linear_layers_(
            MLPEnergy(MLPEnergyConfig(5, (4,))), generator=torch.Generator().manual_seed(seed)
        )
        for seed in (1, 2)
    ]
    members = [member.double() for member in members]
    energy = AnomalyEnergy(marginal, members, scale=2.0, offset=0.1)
    x = torch.randn(32, 5, dtype=torch.float64)
    with torch.no_grad():
        mean = (members[0](x) + members[1](x)) / 2
        assert not torch.allclose(members[0](x), members[1](x))
        assert torch.allclose(energy.residual(x), mean)
        assert torch.allclose(energy.residual_part(x), 2.0 * (mean - 0.1).clamp_min(0))


def test_integrated_gradients_take_the_midpoint_rule() -> None:
    """On a residual quadratic along the path one midpoint is exact; a left or right sum is not."""
    from ebm.anomaly.explain import attribute

    class Quadratic(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1.0 + (x.square() * torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype)).sum(1)

    data = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    energy = AnomalyEnergy(MarginalEnergy.fit(data, grid_size=64).double(), [Quadratic()], scale=1.0)
    x, reference = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        marginal_part = attribute(energy, x, method="integrated_gradients", n_steps=1, reference=reference)
        residual_only = marginal_part - attribute(
            AnomalyEnergy(energy.marginal, [], scale=1.0),
            x,
            method="integrated_gradients",
            reference=reference,
        )
    # ∫₀¹ ∂f/∂xⱼ(αx) dα · xⱼ = cⱼ xⱼ² for f = 1 + Σ cⱼ xⱼ² (the relu is open: f ≥ 1 > offset 0)
    expected = torch.tensor([[1.0 * 0.25, 2.0 * 1.0, 3.0 * 4.0]], dtype=torch.float64)
    assert torch.allclose(residual_only, expected, atol=1e-9)


# --- normal scores and the Gaussian copula ----------------------------------------------------------


def test_normal_scores_are_the_normal_quantiles_of_the_ranks(
    marginal: MarginalEnergy, columns: torch.Tensor
) -> None:
    n = columns.shape[0]
    with torch.no_grad():
        z = marginal.normal_scores_of(columns)
    for j in range(4):  # the continuous columns
        ranks = columns[:, j].argsort().argsort().to(torch.float64)
        expected = torch.special.ndtri((ranks + 0.5) / n)
        assert (z[:, j] - expected).abs().median().item() < 0.03
        if j < 3:  # the heavy-tailed column's kernels spill past its sharp lower end (0.38 at rank 16)
            central = (ranks >= 0.02 * n) & (ranks < 0.98 * n)  # at the extremes the kernels smooth more
            assert (z[central, j] - expected[central]).abs().max().item() < 0.15  # ≤ 0.12 measured
    order = columns[:, 1].argsort()
    assert (z[order, 1].diff() >= 0).all()  # monotone in the value


def test_normal_scores_gradient_matches_finite_differences_and_is_zero_past_the_grid(
    marginal: MarginalEnergy, columns: torch.Tensor
) -> None:
    g = torch.Generator().manual_seed(5)
    spread = columns.std(0)
    x = (
        columns.mean(0) + 2 * spread * torch.randn(200, 5, generator=g, dtype=torch.float64)
    ).requires_grad_()
    (grad,) = torch.autograd.grad(marginal.normal_scores_of(x).sum(), x)
    step = 1e-6 * spread
    with torch.no_grad():
        finite = (marginal.normal_scores_of(x + step) - marginal.normal_scores_of(x - step)) / (2 * step)
    assert torch.allclose(grad, finite, rtol=1e-3, atol=1e-3 / spread.min().item())
    far = (marginal.x_high + 10 * spread).expand(3, 5).clone().requires_grad_()
    scores = marginal.normal_scores_of(far)
    (grad_far,) = torch.autograd.grad(scores.sum(), far)
    assert (grad_far == 0).all()
    bound = torch.special.ndtri(torch.tensor(1 - 0.5 / (columns.shape[0] + 1), dtype=torch.float64))
    assert torch.allclose(scores[0], bound.expand(5).to(scores.dtype), atol=1e-5)  # the clipped top


def test_a_flag_scores_the_normal_quantile_of_its_mid_rank() -> None:
    flag = torch.cat([torch.zeros(700), torch.ones(300)]).to(torch.float64)[:, None]
    marginal = MarginalEnergy.fit(flag, grid_size=256).double()
    with torch.no_grad():
        z = marginal.normal_scores_of(torch.tensor([[0.0], [1.0]], dtype=torch.float64))[:, 0]
    assert z[0].item() == pytest.approx(torch.special.ndtri(torch.tensor(0.35)).item(), abs=0.02)
    assert z[1].item() == pytest.approx(torch.special.ndtri(torch.tensor(0.85)).item(), abs=0.02)


def correlated_scores(n: int, seed: int, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    correlation = torch.tensor(
        [[1.0, rho, rho / 2], [rho, 1.0, rho], [rho / 2, rho, 1.0]], dtype=torch.float64
    )
    z = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(correlation).T
    return z, correlation


def test_the_copula_keeps_a_real_dependence_and_drops_an_absent_one() -> None:
    z, correlation = correlated_scores(5000, 0, 0.8)
    copula = GaussianCopula.fit(z, generator=torch.Generator().manual_seed(0))
    assert copula.shrinkage.item() <= 0.01
    expected = torch.linalg.inv(correlation) - torch.eye(3, dtype=torch.float64)
    assert torch.allclose(copula.precision.double(), expected, atol=0.1 * expected.abs().max().item())
    independent, _ = correlated_scores(5000, 1, 0.0)
    assert GaussianCopula.fit(independent, generator=torch.Generator().manual_seed(0)).shrinkage.item() >= 0.5


def test_the_copula_scores_a_broken_dependence_and_shares_it_exactly_between_columns() -> None:
    z, _ = correlated_scores(5000, 2, 0.8)
    copula = GaussianCopula.fit(z, weight=0.5, generator=torch.Generator().manual_seed(0)).double()
    rows = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [0.5, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    with torch.no_grad():
        quadratic = 0.25 * torch.einsum("bi,ij,bj->b", rows, copula.precision, rows)
        assert torch.allclose(copula.quadratic(rows), quadratic)
        scores = copula(rows)
        assert torch.equal(scores, quadratic.clamp_min(0))
        # Along the correlations the joint density beats the marginals' product: no credit for that.
        assert quadratic[0] < 0 and scores[0] == 0
        assert scores[1] > 5  # the same |z| in every column, the middle one against the rest
        reference = rows[3:]
        shares = copula.attribute(rows, reference)
        assert torch.allclose(shares.sum(1), scores - copula(reference))
        assert shares[1, 1] == shares[1].max()  # the column that broke ranks takes the largest share
        assert (shares[0] == 0).all()  # clipped away entirely
        # A change the clip passes only in part: the exact shares of Q, scaled to what passes.
        start = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
        partial = copula.attribute(rows[1:2], start)
        exact = (rows[1:2] - start) * (0.5 * (0.5 * (rows[1:2] + start) @ copula.precision))
        assert copula.quadratic(start).item() < 0 < copula.quadratic(rows[1:2]).item()
        assert torch.allclose(partial.sum(1), copula(rows[1:2]) - copula(start))
        passed = (copula(rows[1:2]) - copula(start)) / (copula.quadratic(rows[1:2]) - copula.quadratic(start))
        assert 0 < passed.item() < 1 and torch.allclose(partial, exact * passed)


def test_the_copula_needs_rows_to_cross_validate_on_and_finite_scores() -> None:
    few = GaussianCopula.fit(torch.randn(9, 3, dtype=torch.float64))  # < 2 × 5 folds
    assert few.shrinkage.item() == 1.0 and (few.precision == 0).all()
    constant = torch.randn(200, 3, dtype=torch.float64)
    constant[:, 1] = 0.0
    fitted = GaussianCopula.fit(constant, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(fitted.precision).all() and (fitted.precision[1] == 0).all()
    bad = torch.randn(50, 3, dtype=torch.float64)
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        GaussianCopula.fit(bad)
    with pytest.raises(ValueError, match="folds must be ≥ 2"):
        GaussianCopula.fit(constant, folds=1)


def test_look_ups_take_input_in_any_memory_layout(marginal: MarginalEnergy, columns: torch.Tensor) -> None:
    x = columns[:50]
    transposed = x.T.contiguous().T  # the same values, stored column by column
    assert not transposed.is_contiguous()
    with torch.no_grad():
        assert torch.equal(marginal.per_feature(transposed), marginal.per_feature(x))
        assert torch.equal(marginal.normal_scores_of(transposed), marginal.normal_scores_of(x))


def test_with_nothing_to_shrink_the_copula_reports_the_independence_model() -> None:
    one_column = GaussianCopula.fit(torch.randn(200, 1, dtype=torch.float64))
    assert one_column.shrinkage.item() == 1.0 and (one_column.precision == 0).all()


@pytest.mark.parametrize(
    ("x", "complaint"),
    [
        (torch.zeros(0, 3), r"at least one row, got shape \(0, 3\)"),  # was torch's quantile() error
        (torch.zeros(5), r"got shape \(5,\)"),  # was an IndexError
        (torch.tensor([[1.0, 2.0], [3.0, float("nan")]]), "NaN or inf values, first at row 1, column 1"),
    ],
)
def test_marginal_fit_refuses_empty_flat_or_non_finite_input_by_name(x: torch.Tensor, complaint: str) -> None:
    # a NaN was accepted and left a NaN table behind
    with pytest.raises(ValueError, match=complaint):
        MarginalEnergy.fit(x)
