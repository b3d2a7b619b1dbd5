"""The image recipe: a JEM energy over [0, 1] images, trained by PCD on the core trainer, then used.

This module wires the library's parts for images (energy, Langevin sampler, replay buffer, CD, the JEM
hybrid objective, the trainer with EMA) and adds what images need on top: buffer sample grids during
training, long-run generation from noise or from the buffer, and restoration (inpainting, denoising) by
Langevin energy minimisation with PSNR before and after. The pipeline stages and
``benchmarks/images.py`` call it, so they train and measure the same thing.

On CUDA the training copy of the energy runs its network under bf16 autocast (energies returned in
float32) and in channels_last memory format; on CPU everything is float32 and contiguous. The saved
weights are the same either way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ebm.distributed import process_group_context
from ebm.energies import energy_and_grad, seed_linear_layers_
from ebm.image_energies import (
    CNN28,
    CNN28Config,
    ImageEnergy,
    ResNet32,
    ResNet32Config,
)
from ebm.jem import JEMConfig, JEMObjective
from ebm.losses import CDConfig
from ebm.samplers import GaussianMixtureProposal, Proposal, ReplayBuffer, Sampler, SamplerConfig, UniformBox
from ebm.trainer import MetricsCallback, TrainConfig, Trainer, TrainResult, resolve_device

ARCHITECTURES = ("cnn28", "resnet32")


@dataclass(frozen=True)
class ImageModelConfig:
    """The energy network; ``in_channels`` and ``n_classes`` come from the dataset.

    Attributes:
        architecture: ``cnn28`` (28×28, strided convs) or ``resnet32`` (32×32 colour).
        channels: the four CNN28 convolution widths.
        hidden: the CNN28 dense width.
        width: the ResNet32 first-stage width.
        blocks_per_stage: ResNet32 residual blocks per stage.
        spectral_norm: spectrally normalise every layer.
    """

    architecture: Literal["cnn28", "resnet32"] = "cnn28"
    channels: tuple[int, int, int, int] = (32, 64, 64, 128)
    hidden: int = 128
    width: int = 32
    blocks_per_stage: int = 1
    spectral_norm: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; choose one of {list(ARCHITECTURES)}"
            )
        # every size is checked whichever architecture uses it (params.yaml sets all of them), by the
        # network configs' own checks, now rather than when the energy is built
        CNN28Config(channels=self.channels, hidden=self.hidden)
        ResNet32Config(width=self.width, blocks_per_stage=self.blocks_per_stage)


@dataclass(frozen=True)
class ImageEnergySpec:
    """What a model file needs to rebuild an image energy: the network config and the data's shape."""

    model: ImageModelConfig
    image_shape: tuple[int, int, int]
    n_classes: int


def build_image_energy(spec: ImageEnergySpec) -> ImageEnergy:
    """An :class:`ImageEnergy` (preprocessing inside) over the spec's network."""
    channels, height, width = spec.image_shape
    model = spec.model
    logits_net: nn.Module
    if model.architecture == "cnn28":
        if (height, width) != (28, 28):
            raise ValueError(f"cnn28 takes 28×28 images, the data are {height}×{width}; use resnet32")
        logits_net = CNN28(
            CNN28Config(channels, model.channels, model.hidden, spec.n_classes, model.spectral_norm)
        )
    else:
        if (height, width) != (32, 32):
            raise ValueError(f"resnet32 takes 32×32 images, the data are {height}×{width}; use cnn28")
        logits_net = ResNet32(
            ResNet32Config(channels, model.width, model.blocks_per_stage, spec.n_classes, model.spectral_norm)
        )
    return ImageEnergy(logits_net, spec.image_shape)


def seed_image_energy_(energy: nn.Module, *, generator: torch.Generator) -> nn.Module:
    """Redraw every convolution's and linear layer's initial weights from ``generator`` (in place).

    PyTorch's default range U(−1/√fan_in, 1/√fan_in) for weights and biases; linear layers go through
    :func:`~ebm.energies.seed_linear_layers_`. Spectrally normalised convolutions get fresh power-iteration
    vectors for their flattened ``(out, in·k·k)`` weight. Returns ``energy``.
    """
    seed_linear_layers_(energy, generator=generator)
    with torch.no_grad():
        for conv in (m for m in energy.modules() if isinstance(m, nn.Conv2d)):
            fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            if conv.bias is not None:
                conv.bias.uniform_(-bound, bound, generator=generator)
            if not parametrize.is_parametrized(conv, "weight"):
                conv.weight.uniform_(-bound, bound, generator=generator)
                continue
            parametrizations = cast(nn.ModuleDict, conv.parametrizations)
            weight = cast(parametrize.ParametrizationList, parametrizations["weight"])
            weight.original.uniform_(-bound, bound, generator=generator)
            matrix = weight.original.flatten(1)  # (out, in·k·k)
            v = F.normalize(torch.randn(matrix.shape[1], generator=generator), dim=0)
            for _ in range(15):
                u = F.normalize(matrix @ v, dim=0)
                v = F.normalize(matrix.T @ u, dim=0)
            cast(Tensor, weight[0]._u).copy_(u)
            cast(Tensor, weight[0]._v).copy_(v)
    return energy


class MixedPrecisionImageEnergy(ImageEnergy):
    """An :class:`ImageEnergy` whose network runs under bf16 autocast, logits returned in float32.

    Same parameters and state-dict keys as :class:`ImageEnergy`: only the training copy on CUDA is of
    this class; saved weights load into a plain :class:`ImageEnergy`.
    """

    def logits(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return super().logits(x).float()


# --- the recipe -----------------------------------------------------------------------------------

_DEFAULT_BUFFER_INIT_UNIFORM_WEIGHT = 0.2


@dataclass(frozen=True)
class ImageSamplingConfig:
    """Long-run sampling and restoration after training.

    Attributes:
        n_steps: Langevin steps for generation from noise.
        buffer_steps: further steps for generation from the replay buffer's states.
        inpaint_steps: Langevin steps that fill the masked half (from noise: as many as generation needs).
        denoise_steps: Langevin steps of energy minimisation from the noisy image. Starting next to the
            data, the number of steps is the regulariser: run too long and the chain forgets the
            observation (PSNR falls again), so it is small.
        denoise_std: standard deviation of the Gaussian noise added to test images before denoising.
        batch_size: chains run at once.

    The step counts may be 0 (the chains' starts are returned), not negative: ``range`` of a negative
    count runs no step either, and a typo would pass as a run. The errors name the key.
    """

    n_steps: int = 200
    buffer_steps: int = 50
    inpaint_steps: int = 100
    denoise_steps: int = 10
    denoise_std: float = 0.3
    batch_size: int = 500

    def __post_init__(self) -> None:
        for name in ("n_steps", "buffer_steps", "inpaint_steps", "denoise_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0 (Langevin steps), got {getattr(self, name)}")
        if self.batch_size < 1:  # Tensor.split(0) fails only at the evaluate stage, after training
            raise ValueError(f"batch_size must be ≥ 1 (chains run at once), got {self.batch_size}")
        if not (self.denoise_std >= 0 and math.isfinite(self.denoise_std)):
            raise ValueError(f"denoise_std must be a finite standard deviation ≥ 0, got {self.denoise_std}")


@dataclass(frozen=True)
class ImageRecipe:
    """Everything that defines an image run; ``params.yaml``'s ``images`` section maps onto it."""

    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(
            name="langevin", step_size=1.0, noise_scale=0.01, grad_clip=0.1, clamp=(0.0, 1.0)
        )
    )
    loss: CDConfig = field(
        default_factory=lambda: CDConfig(n_steps=10, alpha=0.1, buffer_size=10000, reinit_prob=0.05)
    )
    jem: JEMConfig = field(default_factory=JEMConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=4000, batch_size=64, lr=3e-4, warmup_steps=100, final_lr_fraction=0.1, ema_decay=0.999
        )
    )
    sampling: ImageSamplingConfig = field(default_factory=ImageSamplingConfig)
    grid_every: int = 500
    buffer_init: Literal["uniform", "class_gaussians"] = "uniform"
    buffer_init_uniform_weight: float = _DEFAULT_BUFFER_INIT_UNIFORM_WEIGHT

    def __post_init__(self) -> None:
        # Everything the train stage would otherwise find only when it uses it (after minutes of
        # training) is checked here, so a params file fails as it is read.
        if self.grid_every < 1:  # 0 divided by zero at the first log step; < 0 never wrote a grid
            raise ValueError(
                f"grid_every must be ≥ 1 (training steps between buffer grids), got {self.grid_every}"
            )
        if self.buffer_init not in BUFFER_INITS:
            raise ValueError(f"unknown buffer_init {self.buffer_init!r}; choose one of {list(BUFFER_INITS)}")
        if not 0.0 <= self.buffer_init_uniform_weight <= 1.0:
            raise ValueError(
                f"buffer_init_uniform_weight must lie in [0, 1], got {self.buffer_init_uniform_weight}"
            )
        if (
            self.buffer_init == "uniform"
            and self.buffer_init_uniform_weight != _DEFAULT_BUFFER_INIT_UNIFORM_WEIGHT
        ):
            raise ValueError(
                "buffer_init_uniform_weight is the uniform share of the class_gaussians proposal; with "
                "buffer_init: uniform every draw is uniform and it would be ignored: set buffer_init: "
                "class_gaussians, or leave buffer_init_uniform_weight out"
            )
        if self.sampler.jump_every is not None:
            raise ValueError(
                "sampler.jump_every is not supported for images: the mode-jumping proposal is a kernel "
                "density of the training data, which the image recipe does not build; leave it out"
            )


BUFFER_INITS = ("uniform", "class_gaussians")


def buffer_proposal(
    recipe: ImageRecipe,
    image_shape: Sequence[int],
    images: Tensor | None = None,
    labels: Tensor | None = None,
) -> Proposal:
    """Where the replay buffer's fresh chains start: uniform noise on [0, 1], or (``class_gaussians``)
    a full-covariance Gaussian per class fitted to the training ``images`` (uint8 or [0, 1]; JEM++),
    a share ``buffer_init_uniform_weight`` of the draws still uniform noise."""
    if recipe.buffer_init == "uniform":
        return UniformBox(tuple(image_shape), 0.0, 1.0)
    if images is None:
        raise ValueError("buffer_init 'class_gaussians' needs the training images to fit its Gaussians")
    unit = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    try:
        return GaussianMixtureProposal.fit(
            unit, labels, low=0.0, high=1.0, uniform_weight=recipe.buffer_init_uniform_weight
        )
    except ValueError as err:  # a class with fewer than two training images (a small max_train)
        raise ValueError(
            f"buffer_init 'class_gaussians' cannot fit its Gaussians: {err}; train on more images "
            "(images.data.max_train) or start the buffer from uniform noise (images.buffer_init: uniform)"
        ) from err


def build_objective(
    recipe: ImageRecipe,
    image_shape: Sequence[int],
    *,
    device: torch.device,
    generator: torch.Generator,
    proposal: Proposal | None = None,
) -> JEMObjective:
    """The JEM objective of ``recipe``, its replay buffer filled from ``proposal`` (default: uniform
    noise on [0, 1])."""
    if recipe.jem.generative_weight == 0:
        return JEMObjective(None, recipe.jem)
    buffer = None
    if recipe.loss.persistent:
        buffer = ReplayBuffer(
            recipe.loss.buffer_size,
            proposal if proposal is not None else UniformBox(tuple(image_shape), 0.0, 1.0),
            reinit_prob=recipe.loss.reinit_prob,
            generator=generator,
            device=device,
        )
    return JEMObjective(recipe.loss.build(recipe.sampler.build(), buffer=buffer), recipe.jem)


def make_energy(spec: ImageEnergySpec, *, device: torch.device, seed: int) -> ImageEnergy:
    """A freshly initialised (seeded) energy for training on ``device``: mixed precision on CUDA only."""
    energy = build_image_energy(spec)
    seed_image_energy_(energy, generator=torch.Generator().manual_seed(seed))
    if device.type == "cuda":
        training = MixedPrecisionImageEnergy(energy.logits_net, spec.image_shape)
        return training.to(device).to(memory_format=torch.channels_last)
    return energy.to(device)


def rank_share(recipe: ImageRecipe, world_size: int) -> ImageRecipe:
    """What one of ``world_size`` data-parallel ranks runs of ``recipe``: its share of the replay buffer
    (``loss.buffer_size``) and of the chains per step (``jem.generative_batch``). The batch is shared out
    by the trainer. With one process, ``recipe`` itself.

    Raises:
        ValueError: a share that does not divide evenly (a remainder would be dropped, a 0 share fail);
            only the settings a run uses count (no buffer without a generative term or persistence).
    """
    if world_size == 1 or recipe.jem.generative_weight == 0:
        return recipe
    shared = {"jem.generative_batch": recipe.jem.generative_batch}
    if recipe.loss.persistent:
        shared["loss.buffer_size"] = recipe.loss.buffer_size
    for key, count in shared.items():
        if count is not None and count % world_size:
            raise ValueError(
                f"{key} {count} must be divisible by the {world_size} data-parallel processes: each takes "
                f"{key.partition('.')[2]} / world_size"
            )
    generative_batch = recipe.jem.generative_batch
    jem = replace(
        recipe.jem, generative_batch=None if generative_batch is None else generative_batch // world_size
    )
    loss = replace(recipe.loss, buffer_size=recipe.loss.buffer_size // world_size)
    return replace(recipe, loss=loss if recipe.loss.persistent else recipe.loss, jem=jem)


def train_image_energy(
    images: Tensor,
    labels: Tensor,
    spec: ImageEnergySpec,
    recipe: ImageRecipe,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
) -> tuple[ImageEnergy, Trainer, TrainResult]:
    """Train a JEM energy on uint8 ``images`` ``(N, C, H, W)`` with ``labels`` ``(N,)``.

    In a data-parallel run (a process group joined with :func:`ebm.distributed.init_from_env`) every
    rank calls this alike, as the 2D recipe's ranks do: it trains on the device the launcher gave it,
    draws ``batch_size / world_size`` positives a step with its own generator, keeps a replay-buffer
    shard of ``buffer_size / world_size`` chains filled from its own seed and advances
    ``generative_batch / world_size`` of them a step (:func:`rank_share`). DDP averages the gradients
    (:class:`~ebm.jem.JEMObjective`), so every rank keeps the same weights, and the run is one process's
    with the configured global batch, buffer and chains per step, up to the random numbers drawn.

    Returns:
        The weights to use (the EMA copy, as a plain CPU-loadable :class:`ImageEnergy` in eval mode on the
        training device), the trainer (its objective holds this rank's replay buffer) and the run's result.

    Raises:
        ValueError: ``loss.buffer_size``, ``jem.generative_batch`` or ``train.batch_size`` is not divisible
            by the number of data-parallel processes.
    """
    context = process_group_context()
    device = context.device or resolve_device(recipe.train.device)
    energy = make_energy(spec, device=device, seed=recipe.train.seed)
    recipe = rank_share(recipe, context.world_size)
    # seed + 1 in one process; under DDP seeds that no rank's trainer generator (seed + rank) also uses.
    buffer_seed = recipe.train.seed + context.world_size + context.rank
    objective = build_objective(
        recipe,
        spec.image_shape,
        device=device,
        generator=torch.Generator(device).manual_seed(buffer_seed),
        proposal=buffer_proposal(recipe, spec.image_shape, images, labels),
    )
    trainer = Trainer(
        energy,
        objective,
        (images, labels),
        recipe.train,
        checkpoint_path=checkpoint_path,
        callbacks=callbacks,
    )
    result = trainer.fit()
    model = build_image_energy(spec).to(device)
    model.load_state_dict(trainer.model.state_dict())
    return model.eval(), trainer, result


def buffer_grid_callback(folder: Path, every: int, n_images: int = 64) -> MetricsCallback:
    """A trainer callback: every ``every`` steps, the first ``n_images`` replay-buffer states as a PNG grid.

    The trainer calls callbacks at its log steps, so a grid is written at the first log step at or past
    each multiple of ``every``, as ``<folder>/buffer-<step>.png``.
    """
    written = [0]  # the last step a grid was written at

    def write_grid(trainer: Trainer, step: int, _metrics: dict[str, float]) -> None:
        states = buffer_states(trainer)
        if states is not None and step // every > written[0] // every:
            save_image_grid(states[:n_images], folder / f"buffer-{step:06d}.png")
            written[0] = step

    return write_grid


def buffer_states(trainer: Trainer) -> Tensor | None:
    """The replay buffer's chain states ``(capacity, C, H, W)`` of a JEM run; ``None`` without a buffer."""
    objective = trainer.objective
    if not isinstance(objective, JEMObjective) or objective.cd is None or objective.cd.buffer is None:
        return None
    return objective.cd.buffer.states


def save_image_grid(images: Tensor, path: Path, *, n_row: int = 8) -> Path:
    """Write [0, 1] images ``(B, C, H, W)`` as one PNG grid (``n_row`` images per row), atomically: a
    failed write leaves the previous file whole and no temporary file behind."""
    from torchvision.utils import save_image

    from ebm.checkpoint import atomic_write

    grid = images.detach().float().clamp(0, 1).cpu()
    return atomic_write(
        path,
        lambda tmp: save_image(grid, tmp, format="png", nrow=n_row, padding=2, pad_value=0.5),
        suffix=".tmp.png",
    )


# --- generation and restoration -------------------------------------------------------------------


def generate(
    energy: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    sampler: Sampler,
    n_steps: int,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
) -> Tensor:
    """Run ``sampler`` for ``n_steps`` from ``start`` (uniform noise or replay-buffer states), in batches."""
    chunks = [
        sampler.run(energy, chunk, n_steps, generator=generator)[0] for chunk in start.split(batch_size)
    ]
    return torch.cat(chunks)


def uniform_images(
    n: int,
    image_shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Uniform noise images on [0, 1], shape ``(n, *image_shape)``: where chains from noise start."""
    return UniformBox(tuple(image_shape), 0.0, 1.0).sample(n, generator=generator, device=device)


def psnr(restored: Tensor, reference: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of [0, 1] images, per image: 10 log₁₀(1 / MSE), shape ``(B,)``.

    Both are float images of the same shape ``(B, ...)`` on the [0, 1] scale (peak 1): the ``reference``
    must lie in [0, 1], so 0–255 pixels are refused rather than scored at −40 dB.

    Raises:
        TypeError: either is not floating point.
        ValueError: the shapes differ (no broadcasting), the reference leaves [0, 1] or holds NaN, or the
            restored images hold NaN or infinite values.
    """
    if restored.shape != reference.shape:
        raise ValueError(
            f"psnr needs restored and reference images of the same shape, got {tuple(restored.shape)} "
            f"and {tuple(reference.shape)}"
        )
    if not (restored.is_floating_point() and reference.is_floating_point()):
        raise TypeError(
            f"psnr needs float [0, 1] images, got {restored.dtype} (restored) and {reference.dtype} "
            "(reference); divide uint8 pixels by 255"
        )
    if reference.numel() and not (reference.min() >= 0 and reference.max() <= 1):  # NaN fails both
        raise ValueError(
            f"psnr's reference images must lie in [0, 1], got values in [{reference.min().item():g}, "
            f"{reference.max().item():g}]"
        )
    if not torch.isfinite(restored).all():
        raise ValueError("psnr's restored images hold NaN or infinite values")
    mse = (restored - reference).flatten(1).square().mean(dim=1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


HALF_MASK_SIDES = ("bottom", "right")


def half_mask(images: Tensor, *, side: Literal["bottom", "right"] = "bottom") -> Tensor:
    """A boolean mask ``(B, C, H, W)`` that is True on the half of each image to be restored: the
    ``bottom`` rows from ``H // 2`` or the ``right`` columns from ``W // 2``.

    Raises:
        ValueError: ``side`` is neither ``"bottom"`` nor ``"right"``.
    """
    if side not in HALF_MASK_SIDES:
        raise ValueError(f"half_mask side must be one of {list(HALF_MASK_SIDES)}, got {side!r}")
    mask = torch.zeros_like(images, dtype=torch.bool)
    height, width = images.shape[-2:]
    if side == "bottom":
        mask[..., height // 2 :, :] = True
    else:
        mask[..., :, width // 2 :] = True
    return mask


def inpaint(
    energy: Callable[[Tensor], Tensor],
    images: Tensor,
    mask: Tensor,
    *,
    sampler: Sampler,
    n_steps: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Fill the masked pixels by Langevin energy minimisation, the known pixels held fixed.

    The masked pixels start as uniform noise. The sampler runs on the energy of the chain state with the
    known pixels put back, E(where(mask, x, images)): its gradient is zero on the known pixels, so only
    the masked ones move, and a Metropolis test (MALA) compares energies of images that agree on the
    known half. The chain then explores p(x_masked | x_known) ∝ exp(−E(x)) with either sampler. Writing
    the known pixels back after each step of the joint kernel would not: under MALA the joint proposal
    moves them too, and its Metropolis test prices that move. A clipped gradient (``grad_clip``) is
    clipped by its norm over the masked pixels. What the chain state holds on the known pixels is never
    looked at; they are restored at the end.

    Returns:
        ``(start, restored)``: the noise-filled input and the inpainted images.
    """
    start = torch.where(mask, torch.rand(images.shape, generator=generator, device=images.device), images)
    conditional = _KnownPixelsEnergy(energy, images, mask)
    x, _ = sampler.run(conditional, start, n_steps, generator=generator)
    return start, torch.where(mask, x, images)


class _KnownPixelsEnergy(nn.Module):
    """``energy`` of ``x`` with the known pixels (``~mask``) taken from ``images``: a function of the
    masked pixels only, whose gradient on the known ones is exactly zero.

    A module holding ``energy`` (when that is one), so :func:`~ebm.energies.frozen` freezes and sets to
    eval the real network; its ``frozen_energy_and_grad`` hands ``energy`` to
    :func:`~ebm.energies.energy_and_grad`, so the CPU fast paths still apply to it.
    """

    def __init__(self, energy: Callable[[Tensor], Tensor], images: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.energy = energy
        self.images = images
        self.mask = mask

    def forward(self, x: Tensor) -> Tensor:
        return self.energy(torch.where(self.mask, x, self.images))

    def frozen_energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        values, grad = energy_and_grad(self.energy, torch.where(self.mask, x, self.images))
        return values, grad.masked_fill(~self.mask, 0.0)


def denoise(
    energy: Callable[[Tensor], Tensor],
    noisy: Tensor,
    *,
    sampler: Sampler,
    n_steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Energy minimisation from the noisy images: ``n_steps`` of the (low-noise) Langevin sampler."""
    restored, _ = sampler.run(energy, noisy, n_steps, generator=generator)
    return restored


@dataclass(frozen=True)
class RestorationReport:
    """Mean PSNR (dB) before and after inpainting (bottom half) and denoising."""

    inpaint_psnr_before: float
    inpaint_psnr_after: float
    denoise_psnr_before: float
    denoise_psnr_after: float


def restore_images(
    energy: Callable[[Tensor], Tensor],
    images: Tensor,
    recipe: ImageRecipe,
    *,
    generator: torch.Generator,
) -> tuple[RestorationReport, dict[str, Tensor]]:
    """Inpaint the bottom half and denoise (σ = ``sampling.denoise_std``) [0, 1] ``images``.

    Returns:
        The PSNR report and the panels ``{original, masked, inpainted, noisy, denoised}`` for grids.
    """
    sampler, sampling = recipe.sampler.build(), recipe.sampling
    masked, inpainted = inpaint(
        energy,
        images,
        half_mask(images),
        sampler=sampler,
        n_steps=sampling.inpaint_steps,
        generator=generator,
    )
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    noisy = (images + recipe.sampling.denoise_std * noise).clamp(0.0, 1.0)
    denoised = denoise(energy, noisy, sampler=sampler, n_steps=sampling.denoise_steps, generator=generator)
    report = RestorationReport(
        inpaint_psnr_before=float(psnr(masked, images).mean()),
        inpaint_psnr_after=float(psnr(inpainted, images).mean()),
        denoise_psnr_before=float(psnr(noisy, images).mean()),
        denoise_psnr_after=float(psnr(denoised, images).mean()),
    )
    panels = {
        "original": images,
        "masked": masked,
        "inpainted": inpainted,
        "noisy": noisy,
        "denoised": denoised,
    }
    return report, panels
