"""The JEM hybrid objective: dequantisation, loss composition, diagnostics, trainer protocol, learning."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ebm.energies import MLPEnergy, MLPEnergyConfig
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy
from ebm.jem import JEMConfig, JEMObjective, JEMStats, dequantise, random_shift
from ebm.losses import ContrastiveDivergence, NonFiniteLossError
from ebm.samplers import Langevin, ReplayBuffer, UniformBox
from ebm.trainer import TrainConfig, Trainer

SHAPE = (1, 28, 28)


def tiny_energy(seed: int = 0) -> ImageEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ImageEnergy(CNN28(CNN28Config(channels=(4, 4, 4, 4), hidden=8, n_classes=3)), SHAPE)


def tiny_cd(capacity: int = 32) -> ContrastiveDivergence:
    buffer = ReplayBuffer(capacity, UniformBox(SHAPE, 0.0, 1.0), generator=torch.Generator().manual_seed(5))
    sampler = Langevin(step_size=1.0, noise_scale=0.01, grad_clip=1.0, clamp=(0.0, 1.0))
    return ContrastiveDivergence(sampler, n_steps=2, alpha=0.1, buffer=buffer)


def tiny_batch(n: int = 8) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, *SHAPE), generator=generator, dtype=torch.uint8)
    return images, torch.randint(0, 3, (n,), generator=generator)


def test_dequantised_pixels_stay_in_their_bin_and_follow_the_generator() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(4).view(4, 1, 16, 16)
    x = dequantise(pixels, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    assert torch.equal(torch.floor(x * 256).to(torch.uint8), pixels)  # (k + u) / 256 ∈ [k/256, (k+1)/256)
    assert x.std() > 0 and not torch.equal(x * 256, pixels.float())
    offsets = x * 256 - pixels.float()  # uniform on [0, 1): not one constant shift of every pixel
    assert offsets.std() > 0.25 and offsets.min() < 0.05 and offsets.max() > 0.95
    assert torch.equal(x, dequantise(pixels, generator=torch.Generator().manual_seed(0)))
    floats = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    jittered = dequantise(floats, generator=torch.Generator().manual_seed(0))
    assert (jittered - floats).abs().max() <= 0.5 / 256 and jittered.min() >= 0 and jittered.max() <= 1
    with pytest.raises(TypeError, match="uint8"):
        dequantise(torch.zeros(2, 3, dtype=torch.int64))


def test_random_shift_translates_each_image_within_its_range_and_fills_with_zeros() -> None:
    images = torch.rand(64, 2, 9, 7, generator=torch.Generator().manual_seed(0)) + 1.0  # no zeros inside
    shifted = random_shift(images, 2, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape and shifted.is_contiguous()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen = set()
    for image, out in zip(padded, shifted, strict=True):
        # exactly one crop of the zero-padded image is the output: the shift that image drew
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(image[:, dy : dy + 9, dx : dx + 7], out)
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 15  # the 25 shifts are all drawn, image by image (not one per batch)
    again = random_shift(images, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(shifted, again)
    assert torch.equal(random_shift(images, 0), images)
    with pytest.raises(ValueError, match="out of its frame"):
        random_shift(images, 7)
    with pytest.raises(ValueError, match="max_shift"):
        JEMConfig(max_shift=-1)


def test_positives_are_shifted_when_asked_and_only_then() -> None:
    images, _ = tiny_batch()
    plain = JEMObjective(None, JEMConfig(generative_weight=0.0))
    shifting = JEMObjective(None, JEMConfig(generative_weight=0.0, max_shift=3))
    x = plain.positives(images, generator=torch.Generator().manual_seed(0))
    y = shifting.positives(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, dequantise(images, generator=torch.Generator().manual_seed(0)))
    # the raw pixels are shifted (the shifts drawn first), then dequantised: zeros shifted in are black
    # pixels in [0, 1/256), not exactly 0
    generator = torch.Generator().manual_seed(0)
    expected = dequantise(random_shift(images, 3, generator=generator), generator=generator)
    assert torch.equal(y, expected) and not torch.equal(x, y)
    assert (y < 1 / 256).sum() > (x < 1 / 256).sum()  # moved: black pixels shifted in


def test_positives_get_gaussian_noise_of_noise_std_after_dequantisation() -> None:
    images, _ = tiny_batch()
    noisy = JEMObjective(None, JEMConfig(generative_weight=0.0, noise_std=0.1))
    generator = torch.Generator().manual_seed(0)
    x = noisy.positives(images, generator=generator)
    generator = torch.Generator().manual_seed(0)
    clean = dequantise(images, generator=generator)
    expected = clean + 0.1 * torch.randn(clean.shape, generator=generator)  # drawn after dequantisation
    assert torch.equal(x, expected)
    assert (x - clean).std() == pytest.approx(0.1, rel=0.1)


def test_pixels_shifted_in_are_dequantised_not_a_point_mass_at_zero() -> None:
    # Shifting after dequantisation filled with exactly 0.0: 8% of the pixels of black images at
    # max_shift 2, a value no dequantised pixel (k + u) / 256 takes (but with probability 0).
    black = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    objective = JEMObjective(None, JEMConfig(generative_weight=0.0, max_shift=2))
    x = objective.positives(black, generator=torch.Generator().manual_seed(0))
    assert not (x == 0).any()
    assert x.max() < 1 / 256  # every pixel, shifted in or not, is a dequantised black pixel
    floats = torch.full((64, 1, 28, 28), 0.5)  # float [0, 1] images get the jitter on the filled pixels too
    y = objective.positives(floats, generator=torch.Generator().manual_seed(0))
    filled = y < 0.25
    assert filled.any() and (y[filled] > 0).any()


@pytest.mark.parametrize("noise_std", [float("nan"), float("inf"), -0.1])
def test_a_noise_std_that_is_not_a_finite_number_at_least_zero_is_refused(noise_std: float) -> None:
    with pytest.raises(ValueError, match="noise_std must be a finite number"):
        JEMConfig(noise_std=noise_std)


def test_label_smoothing_scores_against_the_smoothed_targets() -> None:
    images, labels = tiny_batch()
    energy = tiny_energy()
    with torch.no_grad():  # margins big enough that smoothing changes the loss
        energy.logits_net.features[-1].weight.mul_(50.0)  # type: ignore[index, union-attr, operator]
    loss = {}
    for epsilon in (0.0, 0.2):
        objective = JEMObjective(None, JEMConfig(generative_weight=0.0, label_smoothing=epsilon))
        loss[epsilon], _ = objective(energy, (images, labels), generator=torch.Generator().manual_seed(0))
    x = dequantise(images, generator=torch.Generator().manual_seed(0))
    log_p = torch.log_softmax(energy.logits(x), dim=1)
    targets = torch.full_like(log_p, 0.2 / 3).scatter_(1, labels[:, None], 1 - 0.2 + 0.2 / 3)
    assert loss[0.2].item() == pytest.approx(-(targets * log_p).sum(1).mean().item(), rel=1e-5)
    assert loss[0.0].item() == pytest.approx(-log_p.gather(1, labels[:, None]).mean().item(), rel=1e-5)
    assert abs(loss[0.2].item() - loss[0.0].item()) > 1e-3
    with pytest.raises(ValueError, match="label_smoothing"):
        JEMConfig(label_smoothing=1.0)


def test_the_loss_is_cross_entropy_plus_weighted_cd_and_every_diagnostic_is_reported() -> None:
    objective = JEMObjective(tiny_cd(), JEMConfig(generative_weight=0.5))
    energy = tiny_energy()
    before = objective.cd.buffer.states.clone()  # type: ignore[union-attr]
    loss, stats = objective(energy, tiny_batch(), generator=torch.Generator().manual_seed(2), step=0)

    assert isinstance(stats, JEMStats)
    assert torch.allclose(loss, stats.cross_entropy + 0.5 * stats.generative_loss)
    values = stats.as_floats()
    assert set(values) == {f.name for f in dataclasses.fields(JEMStats)}
    assert all(math.isfinite(v) for v in values.values())
    assert values["gap"] == pytest.approx(values["energy_pos"] - values["energy_neg"])
    assert 0.0 <= values["accuracy"] <= 1.0 and values["sampler_grad_norm"] > 0
    assert values["cross_entropy"] == pytest.approx(math.log(3), abs=0.2)  # an untrained net: near uniform
    assert not torch.equal(before, objective.cd.buffer.states)  # type: ignore[union-attr]  # PCD wrote back
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in energy.parameters())


def test_a_generative_batch_runs_chains_for_part_of_the_batch_and_classifies_all_of_it() -> None:
    images, labels = tiny_batch(8)
    cd = tiny_cd(capacity=8)
    drawn: list[int] = []
    negatives = cd.negatives
    cd.negatives = lambda energy, x, **kw: (drawn.append(x.shape[0]), negatives(energy, x, **kw))[1]  # type: ignore[method-assign]
    objective = JEMObjective(cd, JEMConfig(generative_batch=3))
    energy = tiny_energy()
    _, stats = objective(energy, (images, labels), generator=torch.Generator().manual_seed(2), step=0)

    assert drawn == [3]  # three chains, not eight
    x = objective.positives(images, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(energy.logits(x).float(), labels)
        first = torch.nn.functional.cross_entropy(energy.logits(x[:3]).float(), labels[:3])
    assert float(stats.cross_entropy) == pytest.approx(float(full), abs=1e-5)
    assert float(stats.cross_entropy) != pytest.approx(float(first), abs=1e-3)
    with pytest.raises(ValueError, match="generative_batch"):
        JEMConfig(generative_batch=0)


def test_without_a_generative_term_it_is_a_plain_classifier_watching_noise() -> None:
    objective = JEMObjective(None, JEMConfig(generative_weight=0.0))
    loss, stats = objective(tiny_energy(), tiny_batch(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loss, stats.cross_entropy)
    assert torch.equal(stats.energy_neg, stats.energy_noise) and float(stats.sampler_grad_norm) == 0
    objective.with_step_size(0.5)  # nothing to shrink, nothing to fail
    assert objective.state_dict() == {"step_size": 0.0}
    with pytest.raises(ValueError, match="ContrastiveDivergence"):
        JEMObjective(None, JEMConfig(generative_weight=1.0))


def test_step_size_and_buffer_round_trip_through_state_dict() -> None:
    objective = JEMObjective(tiny_cd())
    objective.with_step_size(0.5)
    state = objective.state_dict()
    assert state["step_size"] == 0.5
    other = JEMObjective(tiny_cd())
    other.load_state_dict(state)
    assert other.cd.sampler.step_size == 0.5  # type: ignore[union-attr]
    assert torch.equal(other.cd.buffer.states, objective.cd.buffer.states)  # type: ignore[union-attr]


class NaNLogits(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0], 3), math.nan) + 0 * x.flatten(1)[:, :3]


def test_non_finite_losses_and_non_classifier_energies_fail_loudly() -> None:
    objective = JEMObjective(None, JEMConfig(generative_weight=0.0))
    with pytest.raises(NonFiniteLossError, match="step 7"):
        objective(ImageEnergy(NaNLogits(), SHAPE), tiny_batch(), step=7)
    with pytest.raises(TypeError, match="ClassConditionalEnergy"):
        objective(MLPEnergy(MLPEnergyConfig(in_features=784)), tiny_batch())


def two_class_images(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class 0: a bright left half; class 1: a bright right half; plus pixel noise. uint8."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.zeros(n, *SHAPE)
    images[labels == 0, :, :, :14] = 0.8
    images[labels == 1, :, :, 14:] = 0.8
    images += 0.1 * torch.rand(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).to(torch.uint8), labels


@pytest.mark.slow
def test_jem_on_the_core_trainer_learns_to_classify_and_to_prefer_data_over_noise() -> None:
    images, labels = two_class_images(256, torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = ImageEnergy(CNN28(CNN28Config(channels=(4, 8, 8, 8), hidden=16, n_classes=2)), SHAPE)
    objective = JEMObjective(tiny_cd(64), JEMConfig(generative_weight=1.0))
    config = TrainConfig(steps=60, batch_size=32, lr=3e-3, log_every=10, progress=False)
    result = Trainer(energy, objective, (images, labels), config).fit()

    assert {"accuracy", "cross_entropy", "energy_noise", "sampler_grad_norm"} <= set(result.history[-1])
    test_images, test_labels = two_class_images(200, torch.Generator().manual_seed(1))
    x = test_images.float() / 255
    with torch.no_grad():
        assert (energy.classify(x) == test_labels).float().mean() > 0.95
        assert (
            energy(x).mean()
            < energy(torch.rand(200, *SHAPE, generator=torch.Generator().manual_seed(2))).mean()
        )


class CountingDDP(nn.parallel.DistributedDataParallel):
    """DDP that counts the forwards it ran with gradients on: the ones whose backward it averages."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.graph_forwards = 0

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        self.graph_forwards += torch.is_grad_enabled()
        return super().forward(*inputs, **kwargs)


@pytest.mark.parametrize("generative_weight", [0.0, 1.0])
def test_every_term_that_trains_the_weights_runs_through_the_data_parallel_wrapper(
    generative_weight: float, tmp_path: Any
) -> None:
    # before: JEM refused a DDP energy, since its cross-entropy called energy.logits on the module, which
    # DDP never sees; a plain classifier's gradients would then not be averaged at all. A one-rank group
    # averages nothing, so here the wrapper must give exactly the bare energy's loss and gradients, and
    # every forward with gradients (the logits; the CD energies) must be its own.
    import torch.distributed as dist

    def loss_and_grads(wrap: bool) -> tuple[Tensor, list[Tensor], int]:
        energy = tiny_energy()
        cd = tiny_cd() if generative_weight else None
        objective = JEMObjective(cd, JEMConfig(generative_weight=generative_weight))
        wrapped = CountingDDP(energy) if wrap else energy
        loss, _ = objective(wrapped, tiny_batch(), generator=torch.Generator().manual_seed(0), step=0)
        loss.backward()
        forwards = wrapped.graph_forwards if isinstance(wrapped, CountingDDP) else 0
        return loss.detach(), [p.grad.clone() for p in energy.parameters()], forwards

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        loss, grads, forwards = loss_and_grads(wrap=True)
    finally:
        dist.destroy_process_group()
    bare_loss, bare_grads, _ = loss_and_grads(wrap=False)
    assert forwards == (2 if generative_weight else 1)
    assert torch.equal(loss, bare_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, bare_grads, strict=True))


def test_the_energy_forward_gives_the_logits_when_asked_and_the_energy_otherwise() -> None:
    energy, x = tiny_energy(), torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(energy(x, return_logits=True), energy.logits(x))
    assert energy(x).shape == (4,) and torch.equal(energy(x), -torch.logsumexp(energy.logits(x), dim=1))
