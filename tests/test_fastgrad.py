"""The hand-written frozen pass (``ebm.fastgrad``) changes speed, not results.

Each case compares :func:`ebm.energies.energy_and_grad` on frozen weights with the same call under
``fastconv.disabled()`` (plain autograd), checks from :func:`ebm.fastgrad.pass_counts` that the hand pass
really ran (or really did not, for networks and situations it must leave to autograd), and that whole
Langevin chains come out the same for a fixed noise sequence.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ebm import fastconv, fastgrad
from ebm.energies import (
    ClassConditionalEnergy,
    MLPClassifierConfig,
    MLPEnergy,
    MLPEnergyConfig,
    energy_and_grad,
    frozen,
    mlp_logits,
)
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy, ResNet32, ResNet32Config
from ebm.images import (
    ImageEnergySpec,
    ImageModelConfig,
    ImageRecipe,
    MixedPrecisionImageEnergy,
    train_image_energy,
)
from ebm.jem import JEMConfig
from ebm.losses import CDConfig
from ebm.samplers import Langevin
from ebm.trainer import TrainConfig


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def passes() -> int:
    return sum(fastgrad.pass_counts().values())


def both_ways(energy: nn.Module, x: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    """(hand pass or whatever energy_and_grad chooses, autograd, hand passes that ran) on frozen weights."""
    with frozen(energy):
        before = passes()
        fast = energy_and_grad(energy, x)
        ran = passes() - before
        with fastconv.disabled():
            reference = energy_and_grad(energy, x)
    assert passes() - before == ran, "fastconv.disabled() must turn the hand pass off too"
    return fast, reference, ran


def assert_same(fast: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> None:
    (e_fast, g_fast), (e_ref, g_ref) = fast, reference
    assert g_fast.shape == g_ref.shape and g_fast.stride() == g_ref.stride()
    torch.testing.assert_close(e_fast, e_ref, rtol=1e-5, atol=1e-5)
    scale = g_ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(g_fast / scale, g_ref / scale, rtol=1e-4, atol=1e-5)


def image_energy(*, spectral_norm: bool = False, seed: int = 0) -> ImageEnergy:
    torch.manual_seed(seed)
    return ImageEnergy(CNN28(CNN28Config(spectral_norm=spectral_norm)), (1, 28, 28))


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_cnn28_energy_and_input_gradient_match_autograd(spectral_norm: bool) -> None:
    energy = image_energy(spectral_norm=spectral_norm)
    x = torch.rand(16, 1, 28, 28, generator=seeded(1))
    fast, reference, ran = both_ways(energy, x)
    assert ran == 1
    assert_same(fast, reference)


def test_multichannel_cnn_takes_onednn_input_gradient() -> None:
    # three input channels: above nothing, below GEMM_INPUT_GRAD_MAX_IN_CHANNELS → the GEMM route; 8 → oneDNN
    torch.manual_seed(0)
    for in_channels in (3, 8):
        config = CNN28Config(in_channels=in_channels, channels=(8, 8, 16, 16), hidden=32)
        energy = ImageEnergy(CNN28(config), (in_channels, 28, 28))
        fast, reference, ran = both_ways(energy, torch.rand(4, in_channels, 28, 28, generator=seeded(2)))
        assert ran == 1
        assert_same(fast, reference)


def test_channels_last_input_gets_a_channels_last_gradient() -> None:
    torch.manual_seed(0)
    energy = ImageEnergy(CNN28(CNN28Config(in_channels=8, channels=(8, 8, 8, 8), hidden=8)), (8, 28, 28))
    x = torch.rand(4, 8, 28, 28, generator=seeded(8)).contiguous(memory_format=torch.channels_last)
    fast, reference, ran = both_ways(energy, x)
    assert ran == 1 and fast[1].is_contiguous(memory_format=torch.channels_last)
    assert_same(fast, reference)


def test_float64_matches_autograd() -> None:
    energy = image_energy().double()
    fast, reference, ran = both_ways(
        energy, torch.rand(4, 1, 28, 28, generator=seeded(3), dtype=torch.float64)
    )
    assert ran == 1
    assert fast[1].dtype == torch.float64
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)


def test_mlp_energy_and_mlp_classifier_match_autograd() -> None:
    torch.manual_seed(0)
    mlp = MLPEnergy(MLPEnergyConfig(widths=(32, 32)))
    fast, reference, ran = both_ways(mlp, torch.randn(64, 2, generator=seeded(4)))
    assert ran == 1
    assert_same(fast, reference)
    # Flatten + a nested Sequential, over inputs with an event shape of their own
    classifier = ClassConditionalEnergy(mlp_logits(MLPClassifierConfig(in_features=6, n_classes=3)))
    x = torch.randn(32, 2, 3, generator=seeded(5))
    fast, reference, ran = both_ways(classifier, x)
    assert ran == 1 and fast[1].shape == x.shape
    assert_same(fast, reference)


def test_relu_mlp_matches_autograd_on_both_sides_of_every_kink() -> None:
    torch.manual_seed(0)
    relu = MLPEnergy(MLPEnergyConfig(widths=(32, 32), activation="relu"))
    assert fastgrad.sequential_layers(relu.net) is not None
    x = 3 * torch.randn(256, 2, generator=seeded(6))
    with torch.no_grad():
        pre = relu.net[0](x)
    assert (pre > 0).any(dim=0).all() and (pre < 0).any(dim=0).all()  # every unit is on and off somewhere
    fast, reference, ran = both_ways(relu, x)
    assert ran == 1
    assert_same(fast, reference)
    with pytest.raises(ValueError, match="activation must be one of"):
        MLPEnergyConfig(activation="tanh")


class MLPEnergyWithPrior(MLPEnergy):
    """A subclass that adds a Gaussian prior term: the hand pass over ``net`` alone would drop it."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 0.5 * x.flatten(1).square().sum(1)


def test_networks_it_cannot_take_run_on_autograd_with_the_same_values() -> None:
    torch.manual_seed(0)
    fourier = MLPEnergy(MLPEnergyConfig(widths=(16,), fourier_features=4))
    with_prior = MLPEnergyWithPrior(MLPEnergyConfig(widths=(8,)))  # before: sampled without its prior
    tanh = ClassConditionalEnergy(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)))
    resnet = ImageEnergy(ResNet32(ResNet32Config(width=8, blocks_per_stage=1)), (3, 32, 32))
    mixed = MixedPrecisionImageEnergy(CNN28(CNN28Config()), (1, 28, 28))  # its own logits(): autocast
    cases = [
        (fourier, torch.randn(8, 2)),
        (with_prior, torch.randn(8, 2)),
        (tanh, torch.randn(8, 2)),
        (resnet, torch.rand(2, 3, 32, 32)),
        (mixed, torch.rand(2, 1, 28, 28)),
    ]
    assert fastgrad.sequential_layers(tanh.logits_net) is None
    assert fastgrad.sequential_layers(resnet.logits_net) is None
    for energy, x in cases:
        fast, reference, ran = both_ways(energy, x)
        assert ran == 0, type(energy).__name__
        torch.testing.assert_close(fast, reference)


def test_cpu_autocast_keeps_the_autograd_path() -> None:
    energy = image_energy()
    with frozen(energy), torch.autocast("cpu", dtype=torch.bfloat16):
        before = passes()
        _, grad = energy_and_grad(energy, torch.rand(2, 1, 28, 28))
    assert passes() == before
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_hooks_keep_the_autograd_path() -> None:
    energy = image_energy()
    calls: list[int] = []
    both_ways(energy, torch.rand(2, 1, 28, 28))  # a first call without hooks: nothing cached may skip them
    energy.logits_net.features[1].register_forward_hook(lambda *_: calls.append(1))
    fast, reference, ran = both_ways(energy, torch.rand(2, 1, 28, 28))
    assert ran == 0 and len(calls) == 2  # the hook saw both passes
    assert_same(fast, reference)


def test_weights_that_require_gradients_keep_autograd_and_their_grad_stays_empty() -> None:
    energy = image_energy()
    before = passes()
    energy_and_grad(energy, torch.rand(2, 1, 28, 28))  # not frozen
    assert passes() == before
    assert all(p.grad is None for p in energy.parameters())
    with frozen(energy):
        energy_and_grad(energy, torch.rand(2, 1, 28, 28))
    assert passes() == before + 1
    assert all(p.grad is None and p.requires_grad for p in energy.parameters())


def test_langevin_chains_are_the_same_with_and_without_the_hand_pass() -> None:
    energy = image_energy()
    x0 = torch.rand(8, 1, 28, 28, generator=seeded(6))
    noise = torch.randn((10, *x0.shape), generator=seeded(7))
    sampler = Langevin(step_size=2.0, noise_scale=0.005, grad_clip=1.0, clamp=(0.0, 1.0))
    before = passes()
    fast, _ = sampler.run(energy, x0, 10, noise=noise)
    assert passes() == before + 10
    with fastconv.disabled():
        reference, _ = sampler.run(energy, x0, 10, noise=noise)
    assert (fast - x0).abs().max() > 1e-3  # the chains moved
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_image_training_samples_through_the_hand_pass_and_trains_the_same_weights() -> None:
    generator = seeded(0)
    images = torch.randint(0, 256, (16, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,), generator=generator)
    spec = ImageEnergySpec(
        ImageModelConfig(architecture="cnn28", channels=(4, 8, 8, 8), hidden=16), (1, 28, 28), 10
    )
    recipe = ImageRecipe(
        model=spec.model,
        loss=CDConfig(n_steps=3, alpha=0.1, buffer_size=16),
        jem=JEMConfig(generative_weight=1.0),
        # the hand pass is the CPU's (a GPU takes the autocast path), so pin the device
        train=TrainConfig(steps=3, batch_size=8, log_every=3, ema_decay=0.9, progress=False, device="cpu"),
    )
    before = passes()
    trained, _, _ = train_image_energy(images, labels, spec, recipe)
    assert passes() >= before + 9  # 3 training steps × 3 Langevin steps
    with fastconv.disabled():
        reference, _, _ = train_image_energy(images, labels, spec, recipe)
    reference_state = reference.state_dict()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], rtol=1e-4, atol=1e-6)
