"""Figures: their panels and colour bars, PNG output, atomic saves and input checks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from torch import Tensor, nn

from ebm.energies import ClassConditionalEnergy, GaussianMixtureEnergy
from ebm.plots import (
    SAMPLES_TITLE,
    DensityPanel,
    plot_decision_energy,
    plot_density_grid,
    plot_energy_and_density,
    save_figure,
)

BOUNDS = (-4.0, 4.0)
RESOLUTION = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def four_gaussians() -> GaussianMixtureEnergy:
    angles = torch.arange(4) * 2 * math.pi / 4
    return GaussianMixtureEnergy(2.0 * torch.stack([angles.cos(), angles.sin()], dim=1), 0.4)


def points(n: int, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def heatmap_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_energy_and_density_has_two_heatmaps_with_colour_bars_and_a_legend() -> None:
    fig = plot_energy_and_density(
        four_gaussians(),
        BOUNDS,
        data=points(300),
        samples=points(100, 1),
        title="four",
        resolution=RESOLUTION,
    )
    assert len(fig.axes) == 4  # two panels and their two colour bars
    panels = heatmap_axes(fig)
    assert [ax.get_title() for ax in panels] == ["learned energy E(x)", "learned density exp(−E)/Z"]
    assert all(ax.images[0].colorbar is not None for ax in panels)
    assert all(len(ax.collections) == 2 for ax in panels)  # data and samples overlaid on both
    legend = panels[1].get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["data", "samples"]
    assert fig.get_suptitle() == "four"


def test_learned_density_panel_integrates_to_one_over_the_box() -> None:
    fig = plot_energy_and_density(four_gaussians(), BOUNDS, resolution=RESOLUTION)
    density = heatmap_axes(fig)[1].images[0].get_array()
    cell_area = ((BOUNDS[1] - BOUNDS[0]) / RESOLUTION) ** 2
    assert float(density.sum()) * cell_area == pytest.approx(1.0, abs=1e-6)


def off_centre_unnormalised(points: Tensor) -> Tensor:
    """One Gaussian at (2.125, −0.875) (a cell centre), its energy shifted by 5 (so log Z = −5): neither
    normalised nor symmetric under swapping x and y, as the mixtures above are."""
    return GaussianMixtureEnergy(torch.tensor([[2.125, -0.875]]), 0.5)(points) + 5.0


def test_every_heatmap_is_normalised_and_puts_x_across_and_y_up() -> None:
    cell = (BOUNDS[1] - BOUNDS[0]) / RESOLUTION
    where = (int((-0.875 - BOUNDS[0]) // cell), int((2.125 - BOUNDS[0]) // cell))  # (row = y, column = x)
    figures = [
        plot_energy_and_density(off_centre_unnormalised, BOUNDS, resolution=RESOLUTION),
        plot_density_grid(
            [
                DensityPanel(
                    "off centre",
                    off_centre_unnormalised,
                    BOUNDS,
                    true_log_prob=lambda x: -off_centre_unnormalised(x) + 5.0,
                )
            ],
            resolution=RESOLUTION,
        ),
    ]
    for fig in figures:
        for ax in heatmap_axes(fig):
            values = torch.as_tensor(ax.images[0].get_array().filled(float("nan")))
            extremes = {divmod(int(values.argmax()), RESOLUTION), divmod(int(values.argmin()), RESOLUTION)}
            assert where in extremes, f"{ax.get_title()}: extremes at {extremes}, the mode is at {where}"
            if "density" in ax.get_title().lower():
                assert float(values.sum()) * cell**2 == pytest.approx(1.0, abs=1e-4), ax.get_title()


def test_density_grid_has_four_panels_per_dataset_and_states_the_metrics() -> None:
    mixture = four_gaussians()
    wider_truth = GaussianMixtureEnergy(mixture.means, 0.6)  # peaks lower than the learned density
    panels = [
        DensityPanel(
            "four",
            mixture,
            BOUNDS,
            true_log_prob=lambda x: -wider_truth(x),
            data=points(200),
            samples=points(100, 1),
            nll=2.3456,
            gap=0.0123,
        ),
        DensityPanel("no truth", mixture, BOUNDS),
    ]
    fig = plot_density_grid(panels, resolution=RESOLUTION)
    # per row 4 panels; colour bars on learned density and energy (the true density shares one)
    assert len(fig.axes) == 2 * 4 + 2 * 2
    first_row_titles = [ax.get_title() for ax in fig.axes[:4]]
    assert first_row_titles[0] == "four: true density"
    assert "NLL 2.346" in first_row_titles[1] and "gap 0.012" in first_row_titles[1]
    assert first_row_titles[3] == SAMPLES_TITLE
    true_image, learned_image = fig.axes[0].images[0], fig.axes[1].images[0]
    assert true_image.get_clim() == learned_image.get_clim()  # one colour scale for both densities
    overlay = fig.axes[3]  # the data and the samples drawn over the learned density, in grey
    assert np.array_equal(overlay.images[0].get_array(), learned_image.get_array())
    assert [c.get_offsets().shape[0] for c in overlay.collections] == [200, 100]
    assert not fig.axes[4].axison and not fig.axes[7].axison  # no truth, no samples: blank panels


def test_density_grid_needs_panels() -> None:
    with pytest.raises(ValueError, match="at least one panel"):
        plot_density_grid([])


class LinearLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            self.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def test_decision_energy_draws_the_boundary_where_the_energies_cross() -> None:
    classifier = ClassConditionalEnergy(LinearLogits())  # E(x, 1) − E(x, 0) = −2 x₁: boundary x₁ = 0
    x = points(200)
    fig = plot_decision_energy(classifier.joint, BOUNDS, x=x, y=(x[:, 0] > 0).long(), resolution=RESOLUTION)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.images[0].colorbar is not None
    (contour,) = [c for c in ax.collections if isinstance(c, ContourSet)]
    boundary = torch.cat([torch.as_tensor(path.vertices) for path in contour.get_paths()])
    assert boundary[:, 0].abs().max() < 1e-6
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["y = 0", "y = 1", "decision boundary"]


def test_decision_energy_evaluates_a_float64_classifier_in_float64() -> None:
    # The label wrapper hid the module, so float32 batches reached float64 weights ("same dtype" error).
    classifier = ClassConditionalEnergy(LinearLogits()).double()
    x = points(200)
    fig = plot_decision_energy(classifier.joint, BOUNDS, x=x, y=(x[:, 0] > 0).long(), resolution=RESOLUTION)
    difference = torch.as_tensor(fig.axes[0].images[0].get_array())
    centres = torch.linspace(BOUNDS[0], BOUNDS[1], RESOLUTION + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    assert torch.allclose(difference, (-2 * centres).expand(RESOLUTION, -1), atol=1e-12)


def test_decision_energy_takes_boolean_labels_as_they_come_from_a_comparison() -> None:
    # before: torch.isin refused bool tensors with an internal RuntimeError
    classifier = ClassConditionalEnergy(LinearLogits())
    x = points(200)
    fig = plot_decision_energy(classifier.joint, BOUNDS, x=x, y=x[:, 0] > 0, resolution=RESOLUTION)
    counts = [len(c.get_offsets()) for c in fig.axes[0].collections if not isinstance(c, ContourSet)]
    assert sorted(counts) == sorted([int((x[:, 0] <= 0).sum()), int((x[:, 0] > 0).sum())])


@pytest.mark.parametrize(
    ("y", "message"), [(torch.zeros(5, dtype=torch.long), "shape"), (torch.full((10,), 2), "binary")]
)
def test_decision_energy_rejects_bad_labels(y: Tensor, message: str) -> None:
    classifier = ClassConditionalEnergy(LinearLogits())
    with pytest.raises(ValueError, match=message):
        plot_decision_energy(classifier.joint, BOUNDS, x=points(10), y=y, resolution=RESOLUTION)


@pytest.mark.parametrize("bad", [torch.zeros(10, 3), torch.zeros(10)])
def test_points_of_the_wrong_shape_are_rejected(bad: Tensor) -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_energy_and_density(four_gaussians(), BOUNDS, data=bad, resolution=RESOLUTION)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_energy_and_density(four_gaussians(), BOUNDS, samples=bad, resolution=RESOLUTION)


def test_samples_with_a_nan_row_are_an_error_not_a_scatter_that_leaves_them_out() -> None:
    samples = torch.zeros(10, 2)
    samples[4, 1] = float("nan")  # a diverged chain
    with pytest.raises(ValueError, match=r"1 of 10 rows of samples are not finite, e.g. row 4"):
        plot_energy_and_density(four_gaussians(), BOUNDS, samples=samples, resolution=RESOLUTION)


def test_save_figure_writes_a_png_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = save_figure(
        plot_energy_and_density(four_gaussians(), BOUNDS, resolution=RESOLUTION),
        tmp_path / "plots" / "energy.png",
    )
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == ["energy.png"]
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0600


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "energy.png"
    path.write_bytes(b"old")
    fig = plot_energy_and_density(four_gaussians(), BOUNDS, resolution=RESOLUTION)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    fig.savefig = fail  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["energy.png"]


def test_importing_plots_selects_no_backend_and_loads_no_pyplot() -> None:
    code = "import sys, ebm.plots; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_figure_syncs_the_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A rename without fsync can leave an empty or torn PNG after a power cut.
    synced_inodes: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced_inodes.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fig = plot_energy_and_density(four_gaussians(), BOUNDS, resolution=RESOLUTION)
    path = save_figure(fig, tmp_path / "energy.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert synced_inodes == [path.stat().st_ino, tmp_path.stat().st_ino]
