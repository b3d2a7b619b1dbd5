"""Contrastive divergence: the loss formula, where chains start, the buffer, failures, and the sign."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ebm.energies import EnergyFn, MLPEnergy, MLPEnergyConfig
from ebm.losses import CDStats, ContrastiveDivergence, NonFiniteLossError
from ebm.samplers import SAMPLERS, Langevin, ReplayBuffer, Sampler, SamplerStats, UniformBox, make_sampler


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_mlp_energy() -> MLPEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16)))


@dataclass(frozen=True)
class SamplerCall:
    x0: Tensor
    x: Tensor
    n_steps: int
    grads_were_none: bool
    requires_grad_after: list[bool]
    stats: SamplerStats


class RecordingSampler:
    """Wraps a sampler and records what it was given, what it returned, and the parameters' state."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.calls: list[SamplerCall] = []

    @property
    def step_size(self) -> float:
        return self.sampler.step_size

    def run(
        self, energy: EnergyFn, x0: Tensor, n_steps: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]:
        x, stats = self.sampler.run(energy, x0, n_steps, generator=generator)
        params = list(energy.parameters()) if isinstance(energy, nn.Module) else []
        self.calls.append(
            SamplerCall(
                x0=x0.clone(),
                x=x.clone(),
                n_steps=n_steps,
                grads_were_none=all(p.grad is None for p in params),
                requires_grad_after=[p.requires_grad for p in params],
                stats=stats,
            )
        )
        return x, stats


def hand_loss(energy: EnergyFn, x_pos: Tensor, x_neg: Tensor, alpha: float) -> Tensor:
    e_pos, e_neg = energy(x_pos), energy(x_neg)
    return e_pos.mean() - e_neg.mean() + alpha * (e_pos.square().mean() + e_neg.square().mean())


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_loss_and_stats_equal_the_formula_computed_by_hand(alpha: float) -> None:
    energy = small_mlp_energy()
    sampler = RecordingSampler(Langevin(step_size=0.01))
    cd = ContrastiveDivergence(sampler, n_steps=3, alpha=alpha)
    x_pos = torch.randn(16, 2, generator=seeded(0))

    loss, stats = cd(energy, x_pos, generator=seeded(1))

    (call,) = sampler.calls
    assert call.n_steps == 3
    with torch.no_grad():
        e_pos, e_neg = energy(x_pos), energy(call.x)
        expected = hand_loss(energy, x_pos, call.x, alpha)
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(stats.loss, expected)
    torch.testing.assert_close(stats.energy_pos, e_pos.mean())
    torch.testing.assert_close(stats.energy_neg, e_neg.mean())
    torch.testing.assert_close(stats.gap, e_pos.mean() - e_neg.mean())
    torch.testing.assert_close(stats.regularisation, alpha * (e_pos.square().mean() + e_neg.square().mean()))


def test_cd_k_starts_chains_at_the_data() -> None:
    sampler = RecordingSampler(Langevin(step_size=0.01))
    x_pos = torch.randn(8, 2, generator=seeded(2))
    x_pos_before = x_pos.clone()

    ContrastiveDivergence(sampler, n_steps=2)(small_mlp_energy(), x_pos, generator=seeded(3))

    (call,) = sampler.calls
    assert torch.equal(call.x0, x_pos_before)
    assert torch.equal(x_pos, x_pos_before), "the positives were modified in place"


def test_pcd_starts_chains_in_the_buffer_and_writes_them_back(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = ReplayBuffer(32, UniformBox((2,)), reinit_prob=0.0, generator=seeded(4))
    states_before = buffer.states.clone()
    updates: list[tuple[Tensor, Tensor]] = []
    update = buffer.update

    def recording_update(slots: Tensor, x: Tensor) -> None:
        updates.append((slots.clone(), x.clone()))
        update(slots, x)

    monkeypatch.setattr(buffer, "update", recording_update)
    sampler = RecordingSampler(Langevin(step_size=0.01))
    cd = ContrastiveDivergence(sampler, n_steps=2, buffer=buffer)

    cd(small_mlp_energy(), torch.randn(12, 2, generator=seeded(5)), generator=seeded(6))

    (call,) = sampler.calls
    ((slots, written),) = updates
    assert torch.equal(call.x0, states_before[slots]), "chains did not start from their buffer slots"
    assert torch.equal(written, call.x)
    # A slot drawn twice keeps one of its two chains; every other slot is untouched.
    for slot in slots.unique():
        assert (buffer.states[slot] == call.x[slots == slot]).all(1).any()
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(buffer.states[untouched], states_before[untouched])
    assert not torch.equal(buffer.states, states_before)


@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
def test_sampler_diagnostics_are_the_samplers_own_for_the_negatives_of_the_loss(sampler_name: str) -> None:
    energy = ScaledSquaredNorm(2.0)  # steep enough that MALA rejects some of its moves
    sampler = RecordingSampler(make_sampler(sampler_name, step_size=0.3))
    cd = ContrastiveDivergence(sampler, n_steps=4)  # CD-k: the sampler is the generator's only user

    _, stats = cd(energy, 2 * torch.randn(12, 2, generator=seeded(11)), generator=seeded(12))

    (call,) = sampler.calls
    # The same chains run again from the same start and seed: the same negatives, the same diagnostics.
    x_again, sampler_stats = sampler.sampler.run(energy, call.x0, 4, generator=seeded(12))
    assert torch.equal(x_again, call.x)
    assert torch.equal(stats.sampler_grad_norm, sampler_stats.grad_norm)
    assert torch.equal(stats.acceptance_rate, sampler_stats.acceptance_rate)
    assert float(stats.sampler_grad_norm) > 0.0 and float(stats.sampler_steps) == 4.0
    if sampler_name == "mala":  # a rate strictly inside (0, 1) tells it apart from any constant
        assert 0.0 < float(stats.acceptance_rate) < 1.0


@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
def test_stats_are_zero_dim_tensors(sampler_name: str) -> None:
    cd = ContrastiveDivergence(make_sampler(sampler_name, step_size=0.01), n_steps=2, alpha=0.1)

    _, stats = cd(small_mlp_energy(), torch.randn(8, 2, generator=seeded(7)), generator=seeded(8))

    assert isinstance(stats, CDStats)
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        assert isinstance(value, Tensor) and value.ndim == 0 and not value.requires_grad, field.name
    floats = stats.as_floats()
    assert set(floats) == {f.name for f in dataclasses.fields(stats)}
    assert all(isinstance(v, float) for v in floats.values())


class ScaledSquaredNorm(nn.Module):
    """E(x) = c‖x‖², with c a parameter (so it can be made NaN or infinite)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x.square().sum(1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_energy_raises_with_the_step_number(scale: float) -> None:
    cd = ContrastiveDivergence(Langevin(step_size=0.01), n_steps=2)
    x_pos = torch.randn(8, 2, generator=seeded(9))

    with pytest.raises(NonFiniteLossError, match="at step 123") as raised:
        cd(ScaledSquaredNorm(scale), x_pos, generator=seeded(10), step=123)
    assert raised.value.step == 123
    assert isinstance(raised.value, FloatingPointError)

    with pytest.raises(NonFiniteLossError, match="outside training"):
        cd(ScaledSquaredNorm(scale), x_pos, generator=seeded(10))


def test_gradient_reaches_the_parameters_only_through_the_loss() -> None:
    energy = small_mlp_energy()
    sampler = RecordingSampler(Langevin(step_size=0.01))
    cd = ContrastiveDivergence(sampler, n_steps=3, alpha=0.1)
    x_pos = torch.randn(16, 2, generator=seeded(11))

    loss, _ = cd(energy, x_pos, generator=seeded(12))

    (call,) = sampler.calls
    assert call.grads_were_none, "sampling accumulated into param.grad"
    assert all(call.requires_grad_after)
    loss.backward()
    grads = [p.grad.clone() for p in energy.parameters()]
    energy.zero_grad(set_to_none=True)
    hand_loss(energy, x_pos, call.x, 0.1).backward()
    # The negatives are constants of the loss: its gradient is the CD estimate, nothing flows via x⁻.
    for grad, expected in zip(grads, [p.grad for p in energy.parameters()], strict=True):
        torch.testing.assert_close(grad, expected)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "arguments",
    [{"n_steps": 0}, {"n_steps": -1}, {"alpha": -0.1}, {"alpha": float("nan")}, {"alpha": float("inf")}],
)
def test_invalid_arguments_raise(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(arguments))):
        ContrastiveDivergence(Langevin(), **{"n_steps": 1, **arguments})


def test_step_size_scaling_and_state_dict_round_trip() -> None:
    sampler = Langevin(step_size=0.1, grad_clip=0.5)
    cd = ContrastiveDivergence(
        sampler, n_steps=1, buffer=ReplayBuffer(8, UniformBox((2,)), generator=seeded(13))
    )
    cd.with_step_size(0.5)
    assert cd.sampler == Langevin(step_size=0.05, grad_clip=0.5)

    restored = ContrastiveDivergence(
        sampler, n_steps=1, buffer=ReplayBuffer(8, UniformBox((2,)), generator=seeded(14))
    )
    restored.load_state_dict(cd.state_dict())
    assert restored.sampler == cd.sampler
    assert restored.buffer is not None and cd.buffer is not None
    assert torch.equal(restored.buffer.states, cd.buffer.states)


class LearnableGaussian(nn.Module):
    """E(x) = (x − m)² / (2s²) + log s with s = exp(log_std): a 1D GaussianEnergy with learnable m, s."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1))
        self.log_std = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.log_std.exp()
        return 0.5 * z.square().sum(1) + self.log_std.sum()


def test_pcd_training_recovers_a_gaussian() -> None:
    # With the wrong sign the model would lower the energy of its own samples and raise it on the data,
    # and m, s would run off instead of settling at the data's 2 and 0.5. The tolerances are loose on
    # purpose: Adam at a fixed learning rate jitters (over ten other seeds m ∈ [1.98, 2.07] and
    # s ∈ [0.48, 0.52]), and unadjusted Langevin at η = 0.02 samples a variance s²/(1 − η/(2s²)), 2% too
    # wide, so s settles ~1% low.
    generator = seeded(15)
    model = LearnableGaussian()
    buffer = ReplayBuffer(1000, UniformBox((1,), low=-3.0, high=3.0), reinit_prob=0.05, generator=generator)
    cd = ContrastiveDivergence(Langevin(step_size=0.02), n_steps=20, buffer=buffer)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    for step in range(200):
        x_pos = 2.0 + 0.5 * torch.randn(128, 1, generator=generator)
        loss, _ = cd(model, x_pos, generator=generator, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert model.mean.item() == pytest.approx(2.0, abs=0.1)
    assert model.log_std.exp().item() == pytest.approx(0.5, abs=0.05)


def test_offset_anchor_adds_beta_m_squared_and_only_it_moves_the_output_bias() -> None:
    energy = small_mlp_energy()
    x_pos = torch.randn(16, 2, generator=seeded(0))
    output_bias = energy.net[-1].bias

    plain = ContrastiveDivergence(Langevin(step_size=0.01), n_steps=2)
    loss, _ = plain(energy, x_pos, generator=seeded(1))
    loss.backward()
    assert output_bias.grad is not None
    torch.testing.assert_close(output_bias.grad, torch.zeros_like(output_bias))  # CD is blind to E + c
    energy.zero_grad()

    sampler = RecordingSampler(Langevin(step_size=0.01))
    anchored = ContrastiveDivergence(sampler, n_steps=2, offset_weight=0.5)
    loss, stats = anchored(energy, x_pos, generator=seeded(1))
    loss.backward()
    with torch.no_grad():
        m = 0.5 * (energy(x_pos).mean() + energy(sampler.calls[0].x).mean())
    torch.testing.assert_close(stats.regularisation, 0.5 * m.square())
    assert output_bias.grad is not None
    torch.testing.assert_close(output_bias.grad, (2 * 0.5 * m).reshape(1))  # d(β m²)/db = 2βm


@pytest.mark.parametrize(("step_size", "direction"), [(5.0, -1), (1e-4, +1)])
def test_step_size_adapts_towards_the_target_acceptance_within_bounds(
    step_size: float, direction: int
) -> None:
    from ebm.energies import GaussianEnergy
    from ebm.samplers import MALA

    energy = GaussianEnergy(torch.zeros(2), torch.eye(2))
    cd = ContrastiveDivergence(MALA(step_size), n_steps=3, target_acceptance=0.6)
    x = torch.randn(256, 2, generator=seeded(0))
    sizes = [cd.sampler.step_size]
    for _ in range(200):
        cd.negatives(energy, x, generator=seeded(len(sizes)))
        sizes.append(cd.sampler.step_size)
    assert (sizes[-1] - sizes[0]) * direction > 0
    assert step_size / 100 <= min(sizes) and max(sizes) <= step_size * 10
    if direction < 0:  # from a step far too large, the rate climbs towards the target
        _, stats = MALA(sizes[-1]).run(energy, x, 20, generator=seeded(1))
        assert float(stats.acceptance_rate) > 0.3


def test_target_acceptance_must_be_a_rate() -> None:
    from ebm.samplers import MALA

    with pytest.raises(ValueError, match="target_acceptance must lie in"):
        ContrastiveDivergence(MALA(0.1), n_steps=1, target_acceptance=1.5)


@pytest.mark.parametrize(
    "sampler", [Langevin(0.01), Langevin(0.01, noise_scale=0.005)], ids=["proper", "annealed"]
)
def test_target_acceptance_needs_a_metropolis_adjusted_sampler(sampler: Langevin) -> None:
    # Langevin accepts every move: the rate would read 1 forever and η grow tenfold, silently.
    with pytest.raises(ValueError, match=r"target_acceptance needs a Metropolis-adjusted sampler.*Langevin"):
        ContrastiveDivergence(sampler, n_steps=1, target_acceptance=0.57)
    with pytest.raises(ValueError, match="Metropolis-adjusted"):
        ContrastiveDivergence(ShiftSampler(0.0), n_steps=1, target_acceptance=0.57)  # declares nothing
    ContrastiveDivergence(sampler, n_steps=1)  # without a target, any sampler


@dataclass
class ShiftSampler:
    """Negatives at a fixed offset from where the chains start; records the chain length it was asked for."""

    offset: float
    step_size: float = 0.1
    lengths: list[int] = dataclasses.field(default_factory=list)

    def run(
        self, energy: EnergyFn, x0: Tensor, n_steps: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, SamplerStats]:
        self.lengths.append(n_steps)
        zero = torch.zeros(())
        return x0 + self.offset, SamplerStats(grad_norm=zero, acceptance_rate=zero, final_energy=zero)


def test_chain_length_grows_while_the_chains_lag_and_shrinks_back_once_they_keep_up() -> None:
    from ebm.energies import GaussianEnergy

    energy = GaussianEnergy(torch.zeros(2), torch.eye(2))  # E = ½|x|² (+ const): far from 0 is high
    x_pos = torch.zeros(64, 2)
    lagging = ShiftSampler(offset=3.0)  # negatives at (3, 3), 9 above the data in energy
    cd = ContrastiveDivergence(lagging, n_steps=4, max_steps=9, lag_threshold=0.5, lag_decay=0.5)
    for _ in range(12):
        _, stats = cd(energy, x_pos)
    # average E⁺ − E⁻ −4.5, −6.75, …: past the dead band from the first step, +1 per step, capped at 9
    assert lagging.lengths == [4, 5, 6, 7, 8, 9, 9, 9, 9, 9, 9, 9]
    assert float(stats.sampler_steps) == 9 and cd.n_steps == 9

    restored = ContrastiveDivergence(
        ShiftSampler(0.0), n_steps=4, max_steps=9, lag_threshold=0.5, lag_decay=0.5
    )
    restored.load_state_dict(cd.state_dict())  # a resumed run continues with the grown chain length
    assert (restored.n_steps, restored.gap_average) == (9, cd.gap_average)

    keeping_up = ShiftSampler(offset=0.0)  # E⁺ − E⁻ = 0: the average decays into the band, the length holds
    restored.sampler = keeping_up  # type: ignore[assignment]
    for _ in range(8):
        restored(energy, x_pos)
    assert keeping_up.lengths == [9] * 8 and abs(restored.gap_average) < 0.5

    ahead = ShiftSampler(offset=-2.0)  # negatives at 0 below data at 2: E⁺ − E⁻ = +4, shrink to n_steps
    restored.sampler = ahead  # type: ignore[assignment]
    for _ in range(8):
        restored(energy, torch.full((64, 2), 2.0))
    assert ahead.lengths == [9, 8, 7, 6, 5, 4, 4, 4]

    fixed = ContrastiveDivergence(ShiftSampler(offset=3.0), n_steps=4)  # max_steps None: never adapts
    for _ in range(5):
        fixed(energy, x_pos)
    assert fixed.sampler.lengths == [4] * 5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"max_steps": 3}, "max_steps"),
        ({"lag_threshold": -1.0}, "lag_threshold"),
        ({"lag_decay": 1.0}, "lag_decay"),
    ],
)
def test_chain_length_controller_rejects_bad_settings(arguments: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ContrastiveDivergence(Langevin(), n_steps=4, **arguments)


class RecordingContext:
    """Stands in for the process group: records every all-reduce of :meth:`mean` the loss runs."""

    def __init__(self) -> None:
        self.means: list[dict[str, float]] = []

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        self.means.append(dict(metrics))
        return dict(metrics)


class NaNEnergy(nn.Module):
    """E = ½|x|², NaN in training mode (the loss's forward) while ``nan`` is set; the chains run in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.nan = False

    def forward(self, x: Tensor) -> Tensor:
        e = 0.5 * self.scale * x.square().sum(dim=1)
        return e * float("nan") if self.training and self.nan else e


def test_the_chain_length_all_reduce_runs_before_a_non_finite_loss_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under DDP a rank whose loss is NaN must still join the controller's all-reduce that the healthy
    # ranks run: had it raised first, it would meet them in the trainer's vote instead, a different
    # collective, and gloo aborts. The vote's NaN flag rides along, and leaves the average as it was.
    context = RecordingContext()
    monkeypatch.setattr("ebm.losses.process_group_context", lambda: context)
    cd = ContrastiveDivergence(
        ShiftSampler(offset=3.0), n_steps=4, max_steps=9, lag_threshold=0.5, lag_decay=0.5
    )
    energy, x_pos = NaNEnergy(), torch.zeros(8, 2)
    cd(energy, x_pos, step=0)
    assert context.means == [{"gap": -9.0, "non_finite": 0.0}] and cd.gap_average == -4.5 and cd.n_steps == 5

    energy.nan = True
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        cd(energy, x_pos, step=1)
    assert context.means[1] == {"gap": 0.0, "non_finite": 1.0}  # joined, then raised
    assert (cd.gap_average, cd.n_steps) == (-4.5, 5)  # the thrown-away step adapts nothing

    context.means.clear()
    fixed = ContrastiveDivergence(ShiftSampler(offset=3.0), n_steps=4)  # no controller: no collective
    with pytest.raises(NonFiniteLossError):
        fixed(energy, x_pos, step=2)
    assert context.means == []
