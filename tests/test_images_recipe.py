"""The image recipe: building and seeding energies, model files, sample grids, generation, restoration."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import ebm
from ebm.checkpoint import save_model
from ebm.config import ConfigError
from ebm.energies import frozen
from ebm.image_energies import CNN28Config, ImageEnergy, ResNet32Config
from ebm.images import (
    ImageEnergySpec,
    ImageModelConfig,
    ImageRecipe,
    ImageSamplingConfig,
    MixedPrecisionImageEnergy,
    buffer_grid_callback,
    build_image_energy,
    build_objective,
    denoise,
    generate,
    half_mask,
    inpaint,
    make_energy,
    psnr,
    restore_images,
    seed_image_energy_,
    train_image_energy,
    uniform_images,
)
from ebm.jem import JEMConfig
from ebm.losses import CDConfig
from ebm.samplers import MALA, Langevin, SamplerConfig
from ebm.stages.images import ImagesParams
from ebm.trainer import TrainConfig

TINY_CNN = ImageModelConfig(architecture="cnn28", channels=(4, 4, 4, 4), hidden=8)
TINY_RESNET = ImageModelConfig(architecture="resnet32", width=4, blocks_per_stage=1, spectral_norm=True)


@pytest.mark.parametrize(
    ("model", "shape"), [(TINY_CNN, (1, 28, 28)), (TINY_RESNET, (3, 32, 32))], ids=["cnn28", "resnet32"]
)
def test_every_architecture_is_an_energy_and_a_classifier_on_unit_images(
    model: ImageModelConfig, shape: tuple
) -> None:
    torch.manual_seed(0)
    energy = build_image_energy(ImageEnergySpec(model, shape, 10))
    x = torch.rand(5, *shape)
    assert energy(x).shape == (5,) and energy.logits(x).shape == (5, 10)
    assert energy.classify(x).shape == (5,)
    # in train mode spectral norm takes a power-iteration step on every call, so two calls see slightly
    # different weights; the identity holds for one set of weights
    energy.eval()
    assert torch.allclose(energy(x), -torch.logsumexp(energy.logits(x), dim=1))


def test_an_architecture_for_the_wrong_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="use resnet32"):
        build_image_energy(ImageEnergySpec(TINY_CNN, (3, 32, 32), 10))
    with pytest.raises(ValueError, match="use cnn28"):
        build_image_energy(ImageEnergySpec(TINY_RESNET, (1, 28, 28), 10))
    with pytest.raises(ValueError, match="resnet32"):
        ImageModelConfig(architecture="vit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"blocks_per_stage": 0}, "blocks_per_stage"),  # a ResNet32 without a residual block
        ({"blocks_per_stage": -1}, "blocks_per_stage"),
        ({"width": 0}, "width"),
        ({"hidden": 0}, "hidden"),
        ({"channels": (4, 0, 4, 4)}, r"channels\[1\]"),
        ({"width": True}, "width"),
    ],
)
def test_network_sizes_below_one_are_refused_when_the_config_is_built(
    overrides: dict[str, Any], named: str
) -> None:
    # They were accepted, then built no residual blocks or failed at the first forward pass with a
    # bare torch error.
    with pytest.raises(ValueError, match=f"{named} must be an int ≥ 1"):
        ImageModelConfig(**overrides)
    with pytest.raises(ValueError, match=f"{named} must be an int ≥ 1"):  # the network configs too
        if "channels" in overrides or "hidden" in overrides:
            CNN28Config(**overrides)
        else:
            ResNet32Config(**overrides)


@pytest.mark.parametrize(
    ("key", "value"), [("blocks_per_stage", 0), ("width", 0), ("hidden", 0), ("channels", [8, 16, 0, 32])]
)
def test_a_network_size_below_one_in_params_is_an_error_naming_the_key(key: str, value: Any) -> None:
    from paramfiles import quick_params

    raw = quick_params()
    raw["images"]["model"][key] = value
    with pytest.raises(ConfigError, match=rf"images\.model: .*{key}(\[2\])? must be an int ≥ 1, got 0"):
        ImagesParams.from_params(raw)


@pytest.mark.parametrize(("model", "shape"), [(TINY_CNN, (1, 28, 28)), (TINY_RESNET, (3, 32, 32))])
def test_an_image_energy_refuses_integer_images(model: ImageModelConfig, shape: tuple) -> None:
    # uint8 pixels were read as values 0-255, mapped to 2k − 1 up to 509, and scored without a word
    torch.manual_seed(0)
    energy = build_image_energy(ImageEnergySpec(model, shape, 3))
    pixels = torch.randint(0, 256, (4, *shape), dtype=torch.uint8)
    for call in (
        energy,
        energy.logits,
        energy.classify,
        lambda x: energy.joint(x, torch.zeros(4, dtype=torch.long)),
    ):
        with pytest.raises(TypeError, match=r"float tensors in \[0, 1\].*uint8.*divide by 255"):
            call(pixels)
    if model.architecture == "cnn28":  # a chain ebm.fastgrad's hand-written pass takes: checked there too
        with frozen(energy), pytest.raises(TypeError, match="float tensors"):
            energy.frozen_energy_and_grad(pixels)
    assert energy(pixels.float() / 255).shape == (4,)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_seeding_fixes_every_weight_and_nothing_else(spectral_norm: bool) -> None:
    spec = ImageEnergySpec(dataclasses.replace(TINY_RESNET, spectral_norm=spectral_norm), (3, 32, 32), 10)

    def seeded(seed: int) -> dict[str, Tensor]:
        energy = build_image_energy(spec)
        return seed_image_energy_(energy, generator=torch.Generator().manual_seed(seed)).state_dict()

    a, b, c = seeded(0), seeded(0), seeded(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith(("weight", "original", "bias"))]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)
    if spectral_norm:
        us = [k for k in a if k.endswith("_u")]
        assert us and all(torch.allclose(a[k].norm(), torch.tensor(1.0)) for k in us)


def test_the_mixed_precision_training_copy_saves_weights_a_plain_energy_loads() -> None:
    spec = ImageEnergySpec(TINY_CNN, (1, 28, 28), 10)
    plain = build_image_energy(spec)
    mixed = MixedPrecisionImageEnergy(plain.logits_net, spec.image_shape)
    assert mixed.state_dict().keys() == plain.state_dict().keys()
    logits = mixed.logits(torch.rand(3, 1, 28, 28))
    assert logits.dtype == torch.float32  # bf16 inside, float32 out
    assert (
        type(make_energy(spec, device=torch.device("cpu"), seed=0)) is ImageEnergy
    )  # CPU: fp32, no autocast


def test_ebm_load_model_returns_energy_and_classify_on_unit_images(tmp_path: Path) -> None:
    spec = ImageEnergySpec(TINY_RESNET, (3, 32, 32), 10)
    energy = seed_image_energy_(build_image_energy(spec), generator=torch.Generator().manual_seed(0)).eval()
    save_model(tmp_path / "m.pt", energy, kind="image_energy", config=spec)

    loaded = ebm.load_model(tmp_path / "m.pt")

    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(loaded.energy(x), energy(x)) and torch.equal(loaded.classify(x), energy.classify(x))
    with pytest.raises(ValueError, match=r"\[0, 1\] images of shape \(B, 3, 32, 32\)"):
        loaded.energy(torch.rand(4, 1, 28, 28))


class WellEnergy(nn.Module):
    """E(x) = ½ k ‖x − target‖²: its minimum (and, for large k, nearly all its mass) is ``target``."""

    def __init__(self, target: Tensor, stiffness: float = 50.0) -> None:
        super().__init__()
        self.register_buffer("target", target)
        self.stiffness = stiffness
        self.anchor = nn.Parameter(torch.zeros(()))  # so the energy has a parameter to freeze

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * self.stiffness * (x - self.target).flatten(1).square().sum(1) + 0 * self.anchor


def test_psnr_and_half_masks() -> None:
    reference = torch.zeros(2, 1, 4, 4)
    assert torch.allclose(psnr(reference + 0.1, reference), torch.tensor([20.0, 20.0]))
    mask = half_mask(reference)
    assert mask.sum() == 16 and mask[..., 2:, :].all() and not mask[..., :2, :].any()
    assert half_mask(reference, side="right")[..., :, 2:].all()


def test_psnr_refuses_images_it_would_broadcast_or_score_on_the_wrong_scale() -> None:
    reference = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"same shape.*\(2, 1, 4, 4\) and \(2, 3, 4, 4\)"):
        psnr(reference[:, :1], reference)  # broadcast to (2, 3, 4, 4) before
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 4, 4\) and \(3, 4, 4\)"):
        psnr(reference, reference[0])
    with pytest.raises(TypeError, match="float"):
        psnr((reference * 255).round().to(torch.uint8), (reference * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match=r"reference images must lie in \[0, 1\]"):
        psnr(reference, (reference * 255).round())  # 0–255 pixels: −43 dB before
    with pytest.raises(ValueError, match=r"reference images must lie in \[0, 1\]"):
        psnr(reference, torch.where(reference > 0.5, float("nan"), reference))
    with pytest.raises(ValueError, match="NaN or infinite"):
        psnr(torch.full_like(reference, float("nan")), reference)


@pytest.mark.parametrize("side", ["top", "left", "Bottom", ""])
def test_half_mask_refuses_a_side_it_does_not_know(side: str) -> None:
    # every side but "bottom" masked the right half ("top" too)
    with pytest.raises(ValueError, match=r"side must be one of \['bottom', 'right'\], got"):
        half_mask(torch.zeros(2, 1, 4, 4), side=side)  # type: ignore[arg-type]


def test_inpainting_keeps_the_known_half_and_restores_the_other_towards_the_energy_minimum() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 8, 8, generator=generator)
    images = target.expand(4, -1, -1, -1).clone()
    mask = half_mask(images)
    sampler = Langevin(step_size=0.005, noise_scale=0.005, clamp=(0.0, 1.0))
    start, restored = inpaint(
        WellEnergy(target), images, mask, sampler=sampler, n_steps=60, generator=generator
    )
    assert torch.equal(restored[~mask], images[~mask]) and torch.equal(start[~mask], images[~mask])
    assert psnr(restored, images).mean() > psnr(start, images).mean() + 10


class GaussianEnergy2D(nn.Module):
    """E(x) = ½ xᵀ P x on two coordinates: x₁ | x₂ is N(−P₁₂ x₂ / P₁₁, 1 / P₁₁)."""

    def __init__(self, precision: Tensor) -> None:
        super().__init__()
        self.register_buffer("precision", precision)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * ((x @ self.precision) * x).sum(1) + 0 * self.anchor


@pytest.mark.parametrize("sampler", [MALA(step_size=0.5), Langevin(step_size=0.01)], ids=["mala", "langevin"])
def test_inpainting_samples_the_conditional_of_the_masked_pixels_with_either_sampler(sampler: Any) -> None:
    # The known x₂ = 0.5 sits far out in a stiff direction (precision 100). MALA's joint proposal moved
    # it, the Metropolis test priced that move and the write-back undid it: x₁ came out with variance
    # 0.08 and mean 0.5 instead of the conditional's 1 and −0.25.
    energy = GaussianEnergy2D(torch.tensor([[1.0, 0.5], [0.5, 100.0]]))
    images = torch.zeros(4000, 2)
    images[:, 1] = 0.5
    mask = torch.zeros(4000, 2, dtype=torch.bool)
    mask[:, 0] = True
    generator = torch.Generator().manual_seed(0)
    _, restored = inpaint(energy, images, mask, sampler=sampler, n_steps=300, generator=generator)
    assert torch.equal(restored[:, 1], images[:, 1])
    assert float(restored[:, 0].mean()) == pytest.approx(-0.25, abs=0.07)
    assert float(restored[:, 0].var()) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"grid_every": 0}, "grid_every must be ≥ 1"),  # divided by zero at the first log step
        ({"grid_every": -5}, "grid_every must be ≥ 1"),  # never wrote a grid
        ({"buffer_init_uniform_weight": 0.5}, "buffer_init_uniform_weight .*class_gaussians"),
        ({"sampler": SamplerConfig(name="mala", jump_every=5)}, "sampler.jump_every"),
    ],
    ids=["grid_every-0", "grid_every-negative", "uniform-weight-unused", "jump_every"],
)
def test_the_recipe_refuses_settings_it_would_ignore_or_fail_on_in_training(
    overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ImageRecipe(buffer_init="uniform", **overrides)
    ImageRecipe(buffer_init="class_gaussians", buffer_init_uniform_weight=0.5)  # there it is used


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_steps": -200}, "n_steps must be ≥ 0"),
        ({"buffer_steps": -1}, "buffer_steps must be ≥ 0"),
        ({"inpaint_steps": -1}, "inpaint_steps must be ≥ 0"),
        ({"denoise_steps": -10}, "denoise_steps must be ≥ 0"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"denoise_std": -0.3}, "denoise_std must be"),
        ({"denoise_std": float("nan")}, "denoise_std must be"),
    ],
)
def test_sampling_settings_that_would_run_no_steps_or_fail_late_are_refused(
    overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ImageSamplingConfig(**overrides)
    ImageSamplingConfig(n_steps=0, buffer_steps=0, inpaint_steps=0, denoise_steps=0, denoise_std=0.0)


def test_denoising_by_energy_minimisation_raises_psnr_and_restore_images_reports_it() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 28, 28, generator=generator)
    images = target.expand(6, -1, -1, -1).clone()
    noisy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    sampler = Langevin(step_size=0.005, noise_scale=0.002, clamp=(0.0, 1.0))
    restored = denoise(WellEnergy(target), noisy, sampler=sampler, n_steps=40, generator=generator)
    assert psnr(restored, images).mean() > psnr(noisy, images).mean() + 10

    recipe = ImageRecipe(
        sampler=SamplerConfig(name="langevin", step_size=0.005, noise_scale=0.002, clamp=(0.0, 1.0)),
        sampling=ImageSamplingConfig(inpaint_steps=40, denoise_steps=40, denoise_std=0.3),
    )
    report, panels = restore_images(WellEnergy(target), images, recipe, generator=generator)
    assert report.denoise_psnr_after > report.denoise_psnr_before + 10
    assert report.inpaint_psnr_after > report.inpaint_psnr_before + 10
    assert set(panels) == {"original", "masked", "inpainted", "noisy", "denoised"}
    noise = (panels["noisy"] - panels["original"]).flatten()
    unclipped = (panels["original"].flatten() > 0.05) & (panels["original"].flatten() < 0.95)
    assert noise[unclipped].std() == pytest.approx(0.3, rel=0.2)  # sampling.denoise_std

    quieter = dataclasses.replace(recipe, sampling=dataclasses.replace(recipe.sampling, denoise_std=0.05))
    quiet_report, _ = restore_images(WellEnergy(target), images, quieter, generator=generator)
    # PSNR of N(0, σ²) noise on [0, 1] images: −20 log10 σ, less what the clamp cuts off
    assert quiet_report.denoise_psnr_before == pytest.approx(-20 * math.log10(0.05), abs=1.5)
    assert report.denoise_psnr_before < quiet_report.denoise_psnr_before - 10


def test_generation_from_noise_in_batches_reaches_the_energy_minimum() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 6, 6, generator=generator)
    start = uniform_images(10, (1, 6, 6), generator=generator)
    assert start.min() >= 0 and start.max() <= 1
    sampler = Langevin(step_size=0.005, noise_scale=0.001, clamp=(0.0, 1.0))
    samples = generate(
        WellEnergy(target), start, sampler=sampler, n_steps=50, generator=generator, batch_size=3
    )
    assert samples.shape == start.shape
    assert (samples - target).abs().max() < 0.05


def tiny_recipe(steps: int = 4) -> ImageRecipe:
    return ImageRecipe(
        model=TINY_CNN,
        loss=CDConfig(n_steps=2, alpha=0.1, buffer_size=16),
        jem=JEMConfig(generative_weight=1.0),
        # on the CPU wherever the tests run: the seeding tests compare weights bit for bit, which cuDNN
        # does not promise on a GPU (the CUDA test below opts in)
        train=TrainConfig(
            steps=steps, batch_size=8, log_every=2, ema_decay=0.9, progress=False, device="cpu"
        ),
        grid_every=2,
    )


def test_training_writes_buffer_grids_and_returns_plain_eval_weights(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,), generator=generator)
    spec = ImageEnergySpec(TINY_CNN, (1, 28, 28), 10)

    model, trainer, result = train_image_energy(
        images, labels, spec, tiny_recipe(), callbacks=[buffer_grid_callback(tmp_path, every=2)]
    )

    assert type(model) is ImageEnergy and not model.training and result.steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "buffer-000003.png",
        "buffer-000004.png",
    ]  # log steps 1, 3, 4
    ema_state = trainer.model.state_dict()
    assert all(torch.equal(v, ema_state[k]) for k, v in model.state_dict().items())  # the EMA weights
    again, _, _ = train_image_energy(images, labels, spec, tiny_recipe())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())  # seeded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_training_runs_bf16_channels_last_and_saves_the_same_kind_of_weights() -> None:
    spec = ImageEnergySpec(TINY_CNN, (1, 28, 28), 10)
    energy = make_energy(spec, device=torch.device("cuda"), seed=0)
    assert isinstance(energy, MixedPrecisionImageEnergy)
    conv = next(m for m in energy.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    recipe = dataclasses.replace(tiny_recipe(), train=dataclasses.replace(tiny_recipe().train, device="cuda"))
    model, _, _ = train_image_energy(images, torch.randint(0, 10, (32,)), spec, recipe)
    assert (
        type(model) is ImageEnergy and model(torch.rand(2, 1, 28, 28, device="cuda")).dtype == torch.float32
    )


def test_class_gaussian_buffer_init_starts_chains_from_the_data_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    # two classes of 12×12-pixel blocks on black: one top-left bright, one bottom-right
    images = torch.zeros(40, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(40) % 2
    images[labels == 0, :, :12, :12] = 200
    images[labels == 1, :, 16:, 16:] = 200
    images = (images.float() + torch.randint(0, 40, images.shape, generator=generator)).clamp(0, 255)
    images = images.to(torch.uint8)
    spec = ImageEnergySpec(TINY_CNN, (1, 28, 28), 10)
    recipe = dataclasses.replace(
        tiny_recipe(steps=1), buffer_init="class_gaussians", buffer_init_uniform_weight=0.0
    )

    _, trainer, _ = train_image_energy(images, labels, spec, recipe)
    states = trainer.objective.cd.buffer.states  # type: ignore[attr-defined]
    top_left, bottom_right = states[:, 0, :12, :12].mean((1, 2)), states[:, 0, 16:, 16:].mean((1, 2))
    bright = (top_left > 0.6) ^ (bottom_right > 0.6)  # each chain is one class's block, not grey noise
    assert float(bright.float().mean()) > 0.9
    assert 0.2 < float((top_left > 0.6).float().mean()) < 0.8  # both classes

    with pytest.raises(ValueError, match="buffer_init"):
        dataclasses.replace(recipe, buffer_init="data")


def test_the_recipe_s_chains_stay_on_the_unit_interval_that_images_live_on() -> None:
    """Langevin noise alone carries a pixel at 0.999 past 1; the recipe's sampler clamps to [0, 1], and
    its negatives (what the classifier sees as model samples) hold no pixel outside it."""
    recipe = ImageRecipe(model=TINY_CNN)
    assert recipe.sampler.clamp == (0.0, 1.0)
    energy = make_energy(
        ImageEnergySpec(TINY_CNN, (1, 28, 28), n_classes=10), device=torch.device("cpu"), seed=0
    )
    objective = build_objective(
        recipe, (1, 28, 28), device=torch.device("cpu"), generator=torch.Generator().manual_seed(0)
    )
    assert objective.cd is not None
    positives = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    negatives, _ = objective.cd.negatives(energy, positives, generator=torch.Generator().manual_seed(2))
    assert negatives.min() >= 0.0 and negatives.max() <= 1.0
    at_the_bounds = ((negatives == 0.0) | (negatives == 1.0)).float().mean()
    assert at_the_bounds > 0.001, "no pixel reached a bound: the test no longer tests the clamp"
