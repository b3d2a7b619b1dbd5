"""The 2D recipe's exact-likelihood polish: the jittered grid's estimate of Z, and the fine-tuning that
runs on it after PCD (its steps, metrics, checkpoints and resume)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ebm.data.toy2d import make_toy_dataset
from ebm.energies import MLPEnergy, MLPEnergyConfig, seed_linear_layers_
from ebm.samplers import SamplerConfig
from ebm.toy import GridNLL, PolishConfig, Toy2DConfig, polish_checkpoint, polish_energy, train_energy
from ebm.trainer import TrainConfig


class Square(nn.Module):
    """Uniform on [low, high]²: energy 0 inside, 40 outside (exp(−40) is nothing next to the area)."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: Tensor) -> Tensor:
        inside = ((x >= self.low) & (x <= self.high)).all(dim=1)
        return torch.where(inside, 0.0, 40.0)


def test_a_jittered_grid_estimates_z_where_the_cell_centres_miss_an_edge() -> None:
    # The square's side 0.7 spans 2.8 cells of 0.25, its edges between the centres: the centres count
    # 3 × 3 cells, Z 0.5625 instead of 0.49. One uniform point a cell sees every edge where it is.
    square = Square(-0.3, 0.4)
    fixed = GridNLL((-1.0, 1.0), 8, device=torch.device("cpu"))
    jittered = GridNLL((-1.0, 1.0), 8, device=torch.device("cpu"), jitter=True)
    x = torch.zeros(4, 2)
    _, stats = fixed(square, x)
    assert math.exp(float(stats.log_z)) == pytest.approx(9 * 0.25**2)
    generator = torch.Generator().manual_seed(0)
    draws = [math.exp(float(jittered(square, x, generator=generator)[1].log_z)) for _ in range(2000)]
    assert sum(draws) / len(draws) == pytest.approx(0.7**2, rel=0.01)
    assert len(set(draws)) > 3  # a fresh draw every call (Ẑ counts cells inside: k · 0.0625), not one reused


def test_a_jittered_grid_without_a_generator_says_what_it_needs() -> None:
    jittered = GridNLL((-1.0, 1.0), 8, device=torch.device("cpu"), jitter=True)
    with pytest.raises(ValueError, match="generator"):
        jittered(Square(0.0, 0.5), torch.zeros(2, 2))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": -1}, "steps ≥ 0"),
        ({"resolution": 1}, "resolution ≥ 2"),
        ({"batch_size": 0}, "batch_size ≥ 1"),
        ({"lr": float("nan")}, "polish.lr"),
        ({"lr": 0.0}, "polish.lr"),
        ({"final_lr_fraction": 0.0}, "final_lr_fraction"),
    ],
)
def test_polish_settings_are_checked(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolishConfig(**changes)


def _grid_nll(energy: nn.Module, x: Tensor, bounds: tuple[float, float], resolution: int = 256) -> float:
    """Exact NLL of ``x`` with log Z over a fine fixed grid (the test's own, not the polish's)."""
    low, high = bounds
    cell = (high - low) / resolution
    ticks = low + (torch.arange(resolution) + 0.5) * cell
    with torch.no_grad():
        log_z = torch.logsumexp(-energy(torch.cartesian_prod(ticks, ticks)), 0) + 2 * math.log(cell)
        return float(energy(x).mean() + log_z)


RECIPE = Toy2DConfig(
    model=MLPEnergyConfig(in_features=2, widths=(32, 32), activation="relu"),
    sampler=SamplerConfig(name="mala", step_size=0.05),
    train=TrainConfig(steps=20, batch_size=64, lr=3e-3, log_every=5, checkpoint_every=10, progress=False),
    polish=PolishConfig(steps=30, resolution=32, lr=1e-2, batch_size=256),
)


def test_polish_raises_the_training_likelihood_and_leaves_its_input_alone() -> None:
    dataset = make_toy_dataset("moons")
    x_train = dataset.sample(1000, generator=torch.Generator().manual_seed(0))
    energy = seed_linear_layers_(MLPEnergy(RECIPE.model), generator=torch.Generator().manual_seed(0))
    before = {name: value.clone() for name, value in energy.state_dict().items()}
    polished, result = polish_energy(energy, x_train, RECIPE, bounds=dataset.bounds)
    assert result.steps == RECIPE.polish.steps
    assert all(torch.equal(before[name], value) for name, value in energy.state_dict().items())
    # an untrained MLP sits at the box's log-area (4.4 nats for moons' box); the data's entropy is ~1.4
    start, end = _grid_nll(energy, x_train, dataset.bounds), _grid_nll(polished, x_train, dataset.bounds)
    assert end < start - 1.0, (start, end)
    assert not polished.training


def test_an_energy_without_parameters_has_nothing_to_polish_and_says_so() -> None:
    with pytest.raises(ValueError, match="Square has none"):
        polish_energy(Square(0.0, 1.0), torch.zeros(8, 2), RECIPE, bounds=(-1.0, 1.0))


def test_train_energy_polishes_after_pcd_and_logs_the_polish_after_pcd_s_steps() -> None:
    dataset = make_toy_dataset("8gaussians")
    x_train = dataset.sample(500, generator=torch.Generator().manual_seed(1))
    seen: list[tuple[int, str]] = []

    def record(_trainer: Any, step: int, values: dict[str, float]) -> None:
        seen.extend((step, key) for key in values if key.endswith("loss"))

    polished, result = train_energy(x_train, RECIPE, bounds=dataset.bounds, callbacks=[record])
    pcd_only = dataclasses.replace(RECIPE, polish=dataclasses.replace(RECIPE.polish, steps=0))
    pcd, pcd_result = train_energy(x_train, pcd_only, bounds=dataset.bounds)
    assert pcd_result.polish is None and result.polish is not None
    assert (result.steps, result.polish.steps) == (20, 30)
    # the trainer logs steps 1, 1 + log_every, … and the last; the polish's go on from PCD's step 20
    pcd_steps, polish_steps = [1, 6, 11, 16, 20], [21, 26, 31, 36, 41, 46, 50]
    assert seen == [(s, "loss") for s in pcd_steps] + [(s, "polish/loss") for s in polish_steps]
    # PCD's phase is the same run either way; the polish moved the weights on from it
    assert [row["loss"] for row in result.history] == [row["loss"] for row in pcd_result.history]
    pcd_weights, polished_weights = pcd.state_dict(), polished.state_dict()
    assert any(not torch.equal(pcd_weights[name], polished_weights[name]) for name in pcd_weights)


def test_a_polish_cut_short_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    dataset = make_toy_dataset("moons")
    x_train = dataset.sample(500, generator=torch.Generator().manual_seed(2))
    full, cut = tmp_path / "full.ckpt", tmp_path / "cut.ckpt"

    def keep_the_files_at_polish_step_10(_trainer: Any, step: int, _values: dict[str, float]) -> None:
        # callbacks run before their own step's checkpoint: at PCD's 20 + 11 the polish's file holds step 10
        if step == RECIPE.train.steps + 11:
            shutil.copyfile(full, cut)  # PCD's, finished
            shutil.copyfile(polish_checkpoint(full), polish_checkpoint(cut))

    straight, _ = train_energy(
        x_train,
        RECIPE,
        bounds=dataset.bounds,
        checkpoint_path=full,
        callbacks=[keep_the_files_at_polish_step_10],
    )
    assert polish_checkpoint(cut).is_file(), "the run was not cut"
    seen: list[int] = []
    resumed, result = train_energy(
        x_train,
        RECIPE,
        bounds=dataset.bounds,
        checkpoint_path=cut,
        callbacks=[lambda t, s, v: seen.append(s)],
    )
    assert seen[0] == RECIPE.train.steps + 11, "PCD trained again, or the polish started over"
    assert result.polish is not None and result.polish.steps == RECIPE.polish.steps
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_the_polish_checkpoint_sits_beside_pcd_s() -> None:
    assert polish_checkpoint(Path("models/toy/moons-ab12.ckpt")) == Path("models/toy/moons-ab12.polish.ckpt")


def test_the_polish_sees_densities_not_energies_so_a_constant_added_to_the_energy_stays_put() -> None:
    # before: the polish kept GridNLL's ½ (log Z)² pin, and under Adam its pull moved every weight until
    # log Z was 0: a checkerboard model 0.022 nats from the floor came back 0.75 nats from it
    dataset = make_toy_dataset("moons")
    x_train = dataset.sample(500, generator=torch.Generator().manual_seed(3))
    energy = seed_linear_layers_(MLPEnergy(RECIPE.model), generator=torch.Generator().manual_seed(3))
    shifted = MLPEnergy(RECIPE.model)
    shifted.load_state_dict(energy.state_dict())
    output_bias = [module for module in shifted.modules() if isinstance(module, nn.Linear)][-1].bias
    with torch.no_grad():
        output_bias += 5.0
    polish = dataclasses.replace(RECIPE, polish=dataclasses.replace(RECIPE.polish, steps=10, lr=1e-3))
    a, _ = polish_energy(energy, x_train, polish, bounds=dataset.bounds)
    b, _ = polish_energy(shifted, x_train, polish, bounds=dataset.bounds)
    grid = torch.cartesian_prod(torch.linspace(-3, 3, 41), torch.linspace(-3, 3, 41))
    with torch.no_grad():
        # the same density; the constants themselves may differ by Adam's steps on a zero gradient's
        # rounding error (~lr per step), which no density sees
        log_density_a, log_density_b = (-m(grid) - torch.logsumexp(-m(grid), 0) for m in (a, b))
        torch.testing.assert_close(log_density_b, log_density_a, atol=1e-4, rtol=0)
