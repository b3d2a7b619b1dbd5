"""Structured prediction with an energy over an image and a binary label grid.

The task: recover the foreground mask y ∈ {0, 1}^(H×W) of an image (its pixels brighter than a threshold)
from a noisy copy x of the image. The energy scores a labelling y of an input x:

    E(x, y) = −Σᵢ yᵢ uᵢ(x) + Σ_{d ∈ {→, ↓}} Σ_{(i, j) ∈ edges_d} Σ_{a, b ∈ {0, 1}} φ_d[a, b] pᵢ(a) pⱼ(b),

with pᵢ(1) = yᵢ, pᵢ(0) = 1 − yᵢ: unary terms uᵢ(x) from a small convolutional net and a learned 2×2
compatibility table φ_d per neighbour direction (a conditional random field on the 4-neighbour grid,
Lafferty et al. 2001; the textbook's segmentation example). On binary y that is the usual CRF energy; on
y ∈ [0, 1] the same formula is its multilinear relaxation, which Langevin dynamics can run on. E is
multilinear in y, so ∂E/∂yᵢ does not depend on yᵢ and equals E(yᵢ = 1) − E(yᵢ = 0): the Gibbs conditional
is p(yᵢ = 1 | y₋ᵢ, x) = σ(−∂E/∂yᵢ), and the two colours of a checkerboard are redrawn one at a time.

The model's chain state stacks input and labels as channels, ``(B, 2, H, W)`` = [x; y], so the library's
contrastive-divergence loss trains it unchanged: positives are (x, y_true), negatives are Gibbs chains
over y with x clamped, started at y_true (conditional CD-k); ``forward(state)`` is E(x, y).

Inference (:func:`compare_inference`): Gibbs sampling at β = 1 with the posterior marginals thresholded at
½ (the maximiser of expected per-pixel accuracy), annealed Gibbs finished by ICM, ICM alone, and Langevin
dynamics on the relaxation y ∈ [0, 1]^(H×W), rounded at ½. All start from the labels each pixel prefers
when its neighbours tell it nothing (neighbours at ½), the usual starting point of ICM.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ebm.boltzmann.gibbs import Gibbs, bernoulli_from_logits
from ebm.losses import ContrastiveDivergence
from ebm.samplers import Langevin
from ebm.trainer import MetricsCallback, TrainConfig, Trainer, TrainResult, resolve_device

# --- the task -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenoisingTaskConfig:
    """Foreground masks of real images, to be recovered from noisy copies.

    Attributes:
        mask_threshold: y = 1 where the clean image's intensity (in [0, 1]) exceeds this.
        noise_std: x = clean image + N(0, noise_std²) per pixel (not clipped).
        seed: seed of the noise; each split adds its own offset, so the noise is fixed per split.
    """

    mask_threshold: float = 0.25
    noise_std: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_threshold < 1.0 or not self.noise_std > 0:
            raise ValueError(
                f"mask_threshold must lie in (0, 1) and noise_std be positive, got {self.mask_threshold}, "
                f"{self.noise_std}"
            )


def make_denoising_states(images: Tensor, config: DenoisingTaskConfig, *, offset: int = 0) -> Tensor:
    """uint8 greyscale images ``(N, 1, H, W)`` → task states ``(N, 2, H, W)`` = [noisy image; true mask].

    Raises:
        ValueError: the images are not single-channel uint8.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"the denoising task needs uint8 greyscale images (N, 1, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    clean = images.float().div_(255.0)
    generator = torch.Generator().manual_seed(config.seed + offset)
    noisy = clean + config.noise_std * torch.randn(clean.shape, generator=generator)
    mask = (clean > config.mask_threshold).float()
    return torch.cat([noisy, mask], dim=1)


def split_state(state: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, 2, H, W)`` → input x ``(B, 1, H, W)`` and labels y ``(B, 1, H, W)``."""
    if state.ndim != 4 or state.shape[1] != 2:
        raise ValueError(f"a structured state is (B, 2, H, W) = [x; y], got shape {tuple(state.shape)}")
    return state[:, :1], state[:, 1:]


# --- the energy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridCRFConfig:
    """The unary net (``layers`` 3×3 convolutions of ``channels`` channels, then a 1×1 to one logit)."""

    channels: int = 16
    layers: int = 2

    def __post_init__(self) -> None:
        if self.channels < 1 or self.layers < 1:
            raise ValueError(f"channels and layers must be ≥ 1, got {self.channels}, {self.layers}")


class GridCRFEnergy(nn.Module):
    """E(x, y) on a 4-neighbour pixel grid: learned unaries u(x) and pairwise tables φ (module docstring).

    Attributes:
        unary_net: x ``(B, 1, H, W)`` → u ``(B, 1, H, W)``.
        compatibility: φ, shape ``(2, 2, 2)``: direction (→, ↓), label of the left/upper pixel, label of
            the right/lower one.
    """

    def __init__(self, config: GridCRFConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(config.layers):
            layers += [nn.Conv2d(channels, config.channels, 3, padding=1), nn.SiLU()]
            channels = config.channels
        layers.append(nn.Conv2d(channels, 1, 1))
        self.unary_net = nn.Sequential(*layers)
        self.compatibility = nn.Parameter(torch.zeros(2, 2, 2))

    def unary(self, x: Tensor) -> Tensor:
        """u(x), shape ``(B, 1, H, W)``: the energy falls by uᵢ when pixel i is labelled 1."""
        return self.unary_net(x)

    def pairwise(self, y: Tensor) -> Tensor:
        """Σ over neighbour pairs of Σ_{a,b} φ_d[a, b] pᵢ(a) pⱼ(b), shape ``(B,)``."""
        p = torch.cat([1.0 - y, y], dim=1)  # (B, 2, H, W): p(0), p(1) per pixel
        right = torch.einsum("bahw,ac,bchw->b", p[..., :, :-1], self.compatibility[0], p[..., :, 1:])
        down = torch.einsum("bahw,ac,bchw->b", p[..., :-1, :], self.compatibility[1], p[..., 1:, :])
        return right + down

    def joint(self, x: Tensor, y: Tensor) -> Tensor:
        """E(x, y), shape ``(B,)``, for binary or relaxed y ``(B, 1, H, W)``."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x and y must both be (B, 1, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
        return -(y * self.unary(x)).flatten(1).sum(1) + self.pairwise(y)

    def forward(self, state: Tensor) -> Tensor:
        """E(x, y) for states ``(B, 2, H, W)`` = [x; y], shape ``(B,)``."""
        x, y = split_state(state)
        return self.joint(x, y)

    def pairwise_field(self, y: Tensor) -> Tensor:
        """∂(pairwise)/∂y, shape ``(B, 1, H, W)``; exact for any y since the energy is multilinear."""
        p = torch.cat([1.0 - y, y], dim=1)  # (B, 2, H, W)
        right, down = self.compatibility
        # A pair (i, j), j right of or below i, adds Σ_b (φ[1, b] − φ[0, b]) pⱼ(b) to ∂E/∂yᵢ and
        # Σ_a pᵢ(a) (φ[a, 1] − φ[a, 0]) to ∂E/∂yⱼ; pads put each sum on the pixel it belongs to.
        field = F.pad(_weighted(right[1] - right[0], p[..., :, 1:]), (0, 1))
        field = field + F.pad(_weighted(right[:, 1] - right[:, 0], p[..., :, :-1]), (1, 0))
        field = field + F.pad(_weighted(down[1] - down[0], p[..., 1:, :]), (0, 0, 0, 1))
        field = field + F.pad(_weighted(down[:, 1] - down[:, 0], p[..., :-1, :]), (0, 0, 1, 0))
        return field

    # --- the block-Gibbs interface (ebm.boltzmann.gibbs.BlockConditionals) ---------------------------

    def gibbs_context(self, state: Tensor) -> Tensor:
        """The unaries of the clamped input: fixed along the chain."""
        x, _ = split_state(state)
        return self.unary(x)

    def gibbs_sweep(
        self, state: Tensor, context: Any, beta: float, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Redraw the labels of one checkerboard colour, then of the other; x stays as it is."""
        x, y = split_state(state)
        unary: Tensor = context
        colours = _checkerboard(y.shape[-2:], y.device)
        for colour in (colours, ~colours):
            local_field = self.pairwise_field(y) - unary  # ∂E/∂y = E(yᵢ = 1) − E(yᵢ = 0)
            redrawn = bernoulli_from_logits(-local_field, beta, generator=generator)
            y = torch.where(colour, redrawn, y)
        return torch.cat([x, y], dim=1)


def _weighted(weights: Tensor, partner: Tensor) -> Tensor:
    """Σ_c weights[c] · partner[:, c], shape ``(B, 1, h, w)`` for ``partner`` ``(B, 2, h, w)``."""
    return torch.einsum("c,bchw->bhw", weights, partner).unsqueeze(1)


def _checkerboard(shape: Sequence[int], device: torch.device) -> Tensor:
    rows = torch.arange(shape[0], device=device)[:, None]
    columns = torch.arange(shape[1], device=device)[None, :]
    return ((rows + columns) % 2 == 0).view(1, 1, *shape)  # (1, 1, H, W)


class ClampedInputEnergy(nn.Module):
    """y ↦ E(x, y) for fixed inputs x ``(B, 1, H, W)``: the energy a sampler over y alone runs on.

    The unaries u(x) do not depend on y and are computed once, as the Gibbs chains do: the energy and its
    gradient in y are the model's, without running the unary net at every step.
    """

    unary: Tensor

    def __init__(self, model: GridCRFEnergy, x: Tensor) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("unary", model.unary(x))

    def forward(self, y: Tensor) -> Tensor:
        if y.shape != self.unary.shape:
            raise ValueError(
                f"labels must have the inputs' shape {tuple(self.unary.shape)}, got {tuple(y.shape)}"
            )
        return -(y * self.unary).flatten(1).sum(1) + self.model.pairwise(y)


# --- training -------------------------------------------------------------------------------------


def _default_train() -> TrainConfig:
    return TrainConfig(
        steps=1500,
        batch_size=32,
        lr=1e-3,
        betas=(0.9, 0.999),
        grad_clip=None,
        checkpoint_every=500,
        log_every=50,
        max_abs_energy=1e6,
        device="cpu",
    )


@dataclass(frozen=True)
class StructuredRecipe:
    """The grid CRF, conditional CD-k (k Gibbs sweeps from the true labels) and the optimiser."""

    model: GridCRFConfig = field(default_factory=GridCRFConfig)
    n_steps: int = 1
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise ValueError(f"n_steps (Gibbs sweeps per training step) must be ≥ 1, got {self.n_steps}")


def seed_grid_crf_(model: GridCRFEnergy, *, generator: torch.Generator) -> GridCRFEnergy:
    """Redraw the convolutions from ``generator`` (PyTorch's default ranges); φ = 0. Returns ``model``."""
    with torch.no_grad():
        for layer in model.unary_net:
            if isinstance(layer, nn.Conv2d):
                bound = 1.0 / math.sqrt(layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1])
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)
        model.compatibility.zero_()
    return model


def train_grid_crf(
    states: Tensor,
    recipe: StructuredRecipe,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
) -> tuple[GridCRFEnergy, TrainResult]:
    """Train on task states ``(N, 2, H, W)`` by conditional CD-k; returns the model (eval mode) and run."""
    split_state(states)
    device = resolve_device(recipe.train.device)
    model = seed_grid_crf_(
        GridCRFEnergy(recipe.model), generator=torch.Generator().manual_seed(recipe.train.seed)
    )
    model = model.to(device)
    objective = ContrastiveDivergence(Gibbs(), n_steps=recipe.n_steps, alpha=0.0, offset_weight=0.0)
    trainer = Trainer(
        model, objective, states, recipe.train, checkpoint_path=checkpoint_path, callbacks=callbacks
    )
    result = trainer.fit()
    trained = GridCRFEnergy(recipe.model).to(device)
    trained.load_state_dict(trainer.model.state_dict())
    return trained.eval(), result


# --- inference ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceConfig:
    """Settings of the inference methods compared.

    Attributes:
        gibbs_sweeps: Gibbs sweeps at β = 1; the marginals average the sweeps after ``gibbs_burn_in``.
        anneal_sweeps: Gibbs sweeps with β rising geometrically from 1 to ``anneal_beta_end``, then
            ``icm_sweeps`` sweeps of ICM.
        icm_sweeps: ICM sweeps (after annealing, and for ICM alone).
        langevin_steps: Langevin steps on the relaxation y ∈ [0, 1].
        langevin_step_size: η.
        langevin_noise_scale: σ of the decoupled-noise run (the low-temperature practice of EBM training);
            a second run uses the proper σ = √(2η), a sampler of exp(−E) on the relaxed box.
        batch_size: images decoded at once.
    """

    gibbs_sweeps: int = 100
    gibbs_burn_in: int = 20
    anneal_sweeps: int = 100
    anneal_beta_end: float = 10.0
    icm_sweeps: int = 10
    langevin_steps: int = 200
    langevin_step_size: float = 0.01
    langevin_noise_scale: float = 0.01
    batch_size: int = 500

    def __post_init__(self) -> None:
        counts = (self.gibbs_sweeps, self.anneal_sweeps, self.icm_sweeps, self.langevin_steps)
        if min(counts) < 1 or not 0 <= self.gibbs_burn_in < self.gibbs_sweeps:
            raise ValueError("sweeps and steps must be ≥ 1 and 0 ≤ gibbs_burn_in < gibbs_sweeps")
        # finite: β = ∞ is ICM, which the annealing hands over to after its sweeps
        if not (1.0 <= self.anneal_beta_end < math.inf):
            raise ValueError(f"anneal_beta_end must be finite and ≥ 1, got {self.anneal_beta_end}")
        # found otherwise inside compare_inference, after the earlier methods had decoded the test set
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not (0 < self.langevin_step_size < math.inf) or not (0 <= self.langevin_noise_scale < math.inf):
            raise ValueError(
                "langevin_step_size must be positive and langevin_noise_scale ≥ 0, both finite; got "
                f"{self.langevin_step_size} and {self.langevin_noise_scale}"
            )


Decoder = Callable[[GridCRFEnergy, Tensor, torch.Generator], Tensor]
"""(model, inputs x (B, 1, H, W), generator) → binary labels ŷ (B, 1, H, W)."""


def independent_field(model: GridCRFEnergy, x: Tensor) -> Tensor:
    """∂E/∂y with every neighbour at ½: each pixel's preference when its neighbours tell it nothing.

    The compatibility tables carry per-pixel biases as well as the interaction (φ[1, ·] − φ[0, ·]), so
    the unaries u(x) alone are not the no-interaction model; this field keeps those biases.
    Shape ``(B, 1, H, W)``.
    """
    return model.pairwise_field(torch.full_like(x, 0.5)) - model.unary(x)


def independent_labels(model: GridCRFEnergy, x: Tensor) -> Tensor:
    """1[−∂E/∂y > 0] with neighbours at ½ (:func:`independent_field`): every method's starting point."""
    return (independent_field(model, x) < 0).to(x.dtype)


def decode_gibbs_marginals(
    model: GridCRFEnergy, x: Tensor, generator: torch.Generator, *, sweeps: int, burn_in: int
) -> Tensor:
    """1[p̂(yᵢ = 1 | x) > ½], p̂ the average of the Gibbs samples after burn-in (β = 1)."""
    state = torch.cat([x, independent_labels(model, x)], dim=1)
    unary = model.gibbs_context(state)
    total = torch.zeros_like(x)
    for sweep in range(sweeps):
        state = model.gibbs_sweep(state, unary, 1.0, generator=generator)
        if sweep >= burn_in:
            total += state[:, 1:]
    return (total / (sweeps - burn_in) > 0.5).to(x.dtype)


def decode_gibbs(
    model: GridCRFEnergy, x: Tensor, generator: torch.Generator, *, sampler: Gibbs, sweeps: int
) -> Tensor:
    """The last state of a Gibbs chain (annealed, or ICM) started at the independent-pixel labels."""
    state, _ = sampler.run(
        model, torch.cat([x, independent_labels(model, x)], dim=1), sweeps, generator=generator
    )
    return state[:, 1:]


def decode_annealed(
    model: GridCRFEnergy,
    x: Tensor,
    generator: torch.Generator,
    *,
    sweeps: int,
    beta_end: float,
    icm_sweeps: int,
) -> Tensor:
    """Annealed Gibbs (β: 1 → ``beta_end``) finished by ``icm_sweeps`` sweeps of ICM."""
    state = torch.cat([x, independent_labels(model, x)], dim=1)
    state, _ = Gibbs(1.0, beta_end).run(model, state, sweeps, generator=generator)
    state, _ = Gibbs(math.inf, math.inf).run(model, state, icm_sweeps, generator=generator)
    return state[:, 1:]


def decode_langevin(
    model: GridCRFEnergy, x: Tensor, generator: torch.Generator, *, sampler: Langevin, steps: int
) -> Tensor:
    """Langevin on y ∈ [0, 1] from the independent pixels' probabilities σ(−∂E/∂y), x fixed; rounded at ½."""
    start = torch.sigmoid(-independent_field(model, x))
    relaxed, _ = sampler.run(ClampedInputEnergy(model, x), start, steps, generator=generator)
    return (relaxed > 0.5).to(x.dtype)


@dataclass(frozen=True)
class Method:
    """An inference method: key (JSON and metric names), label, decoder, and steps per image."""

    key: str
    label: str
    decoder: Decoder
    steps: int


def inference_methods(config: InferenceConfig) -> list[Method]:
    """The compared inference methods, in table order."""
    proper = Langevin(config.langevin_step_size, None, None, (0.0, 1.0))
    decoupled = Langevin(config.langevin_step_size, config.langevin_noise_scale, None, (0.0, 1.0))
    icm = Gibbs(math.inf, math.inf)
    return [
        Method(
            "independent",
            "independent pixels (neighbours at ½)",
            lambda model, x, g: independent_labels(model, x),
            0,
        ),
        Method(
            "gibbs_marginals",
            "Gibbs marginals (β=1)",
            lambda model, x, g: decode_gibbs_marginals(
                model, x, g, sweeps=config.gibbs_sweeps, burn_in=config.gibbs_burn_in
            ),
            config.gibbs_sweeps,
        ),
        Method(
            "icm",
            "ICM",
            lambda model, x, g: decode_gibbs(model, x, g, sampler=icm, sweeps=config.icm_sweeps),
            config.icm_sweeps,
        ),
        Method(
            "annealed_gibbs_icm",
            f"annealed Gibbs (β 1→{config.anneal_beta_end:g}) + ICM",
            lambda model, x, g: decode_annealed(
                model,
                x,
                g,
                sweeps=config.anneal_sweeps,
                beta_end=config.anneal_beta_end,
                icm_sweeps=config.icm_sweeps,
            ),
            config.anneal_sweeps + config.icm_sweeps,
        ),
        Method(
            "langevin",
            "Langevin on relaxation (σ=√2η)",
            lambda model, x, g: decode_langevin(model, x, g, sampler=proper, steps=config.langevin_steps),
            config.langevin_steps,
        ),
        Method(
            "langevin_low_noise",
            f"Langevin on relaxation (σ={config.langevin_noise_scale:g})",
            lambda model, x, g: decode_langevin(model, x, g, sampler=decoupled, steps=config.langevin_steps),
            config.langevin_steps,
        ),
    ]


@dataclass(frozen=True)
class InferenceRow:
    """One method's results on the test states.

    Attributes:
        key: the method's identifier.
        method: its label.
        accuracy: fraction of pixels labelled correctly.
        iou: intersection over union of the predicted and true foreground.
        energy: mean E(x, ŷ) of the binary labelling per image (lower: a better optimum of the model).
        seconds: wall time to decode all test images.
        steps: sweeps (Gibbs, ICM) or gradient steps (Langevin) per image.
    """

    key: str
    method: str
    accuracy: float
    iou: float
    energy: float
    seconds: float
    steps: int


def segmentation_scores(predicted: Tensor, truth: Tensor) -> tuple[float, float]:
    """Per-pixel accuracy and foreground IoU of binary label tensors of the same shape.

    Raises:
        ValueError: the shapes differ, or a tensor holds a value other than 0 and 1 (a probability of 0.2
            would count as foreground).
    """
    if predicted.shape != truth.shape:
        raise ValueError(
            f"prediction {tuple(predicted.shape)} and truth {tuple(truth.shape)} differ in shape"
        )
    for labels, name in ((predicted, "prediction"), (truth, "truth")):
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"the {name} must hold binary labels 0/1; threshold probabilities first")
    predicted, truth = predicted.bool(), truth.bool()
    accuracy = float((predicted == truth).float().mean())
    union = float((predicted | truth).sum())
    iou = float((predicted & truth).sum()) / union if union else 1.0
    return accuracy, iou


@torch.no_grad()
def mean_energy(model: GridCRFEnergy, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> float:
    """Mean E(x, y) over the rows."""
    total = sum(
        float(model.joint(xb, yb).double().sum())
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return total / x.shape[0]


def decode(
    model: GridCRFEnergy, x: Tensor, decoder: Decoder, *, generator: torch.Generator, batch_size: int
) -> Tensor:
    """Labels for every row of ``x``, decoded in batches."""
    with torch.no_grad():
        return torch.cat([decoder(model, chunk, generator) for chunk in x.split(batch_size)])


def compare_inference(
    model: GridCRFEnergy,
    states: Tensor,
    config: InferenceConfig,
    *,
    generator: torch.Generator,
    threshold: float,
) -> tuple[list[InferenceRow], dict[str, Tensor]]:
    """Decode the test ``states`` ``(N, 2, H, W)`` with every method; also score two references.

    The references: the noisy input thresholded at the mask threshold (what a pixel-wise rule without a
    model gets) and the true labels (their energy tells whether the model's optima are the truth).

    Returns:
        The table rows, and each method's labels (for figures), keyed by method label.
    """
    model = model.eval()
    x, truth = split_state(states.to(next(model.parameters()).device))
    noisy_threshold = (x > threshold).to(x.dtype)
    rows = [_row(model, "noisy_threshold", "noisy input thresholded", noisy_threshold, x, truth, 0.0, 0)]
    labels = {}
    for method in inference_methods(config):
        start = time.perf_counter()
        predicted = decode(model, x, method.decoder, generator=generator, batch_size=config.batch_size)
        seconds = time.perf_counter() - start
        rows.append(_row(model, method.key, method.label, predicted, x, truth, seconds, method.steps))
        labels[method.label] = predicted.cpu()
    rows.append(_row(model, "ground_truth", "ground truth", truth, x, truth, 0.0, 0))
    return rows, labels


def _row(
    model: GridCRFEnergy,
    key: str,
    label: str,
    predicted: Tensor,
    x: Tensor,
    truth: Tensor,
    seconds: float,
    steps: int,
) -> InferenceRow:
    accuracy, iou = segmentation_scores(predicted, truth)
    energy = mean_energy(model, x, predicted)
    if not math.isfinite(energy):
        raise FloatingPointError(f"the energy of the {label} labels is not finite")
    return InferenceRow(key, label, accuracy, iou, energy, seconds, steps)
