"""The JEM hybrid objective: a classifier whose logits are also an energy (Grathwohl et al. 2019).

A network with logits f(x) defines E(x, y) = −f_y(x) and the marginal E(x) = −logsumexp_y f_y(x)
(:class:`~ebm.energies.ClassConditionalEnergy`). JEM trains it on

    L = CE(f(x⁺), y⁺) + λ · [ mean E(x⁺) − mean E(x⁻) + α · mean(E(x⁺)² + E(x⁻)²) ],

the cross-entropy of p(y | x) plus λ (``generative_weight``) times the contrastive-divergence surrogate
of −log p(x), with negatives x⁻ from persistent Langevin chains. The CD term is
:class:`~ebm.losses.ContrastiveDivergence` itself (its replay buffer, sampler, α and checks).

Positives are dequantised: uint8 pixels k become x = (k + u) / 256 with u ~ U[0, 1) drawn from the
training generator, a continuous density on [0, 1] whose integral over each pixel bin is the discrete
probability (Theis et al. 2016, https://arxiv.org/abs/1511.01844); float images already in [0, 1] get
the same jitter, x + (u − ½) / 256, clamped to [0, 1]. A random shift (``max_shift``) moves the raw
pixels *before* dequantisation, so the pixels it shifts in are black pixels dequantised like any other,
not a point mass at exactly 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ebm.energies import ClassConditionalEnergy
from ebm.losses import ContrastiveDivergence, NonFiniteLossError


@dataclass(frozen=True)
class JEMConfig:
    """Settings of the hybrid objective (``params.yaml``: ``images.jem``).

    Attributes:
        generative_weight: λ, the weight of the CD term; 0 trains a plain classifier (no sampling).
        noise_std: standard deviation of Gaussian noise added to positives after dequantisation
            (JEM uses 0.03 on [−1, 1] images); 0 for none.
        n_noise_probe: uniform-noise images whose mean energy is reported every step.
        generative_batch: positives (and so negatives) of the CD term per step, the first this many of
            the batch; the cross-entropy sees the whole batch. Labelled images are cheap and chains are
            not: a forward-backward per image against one per image per sampler step, so a larger
            classification batch costs little (``None``: the whole batch).
        max_shift: translate each positive by its own random (dy, dx), each uniform in
            [−max_shift, max_shift] pixels, zero fill (:func:`random_shift`), before dequantisation, so
            the filled pixels are dequantised black ones: the classic augmentation against a classifier
            that memorises its training set; 0 for none.
        label_smoothing: ε of the cross-entropy's smoothed targets (Szegedy et al. 2016): 1 − ε on the
            label and ε spread over all classes, which stops the classifier from growing its logit
            margins without end on images it already gets right; 0 for plain cross-entropy.
    """

    generative_weight: float = 1.0
    noise_std: float = 0.0
    n_noise_probe: int = 16
    generative_batch: int | None = None
    max_shift: int = 0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not (self.generative_weight >= 0 and math.isfinite(self.generative_weight)):
            raise ValueError(f"generative_weight must be a finite number ≥ 0, got {self.generative_weight}")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"noise_std must be a finite number ≥ 0, got {self.noise_std}")
        if self.n_noise_probe < 1:
            raise ValueError(f"n_noise_probe must be ≥ 1, got {self.n_noise_probe}")
        if self.generative_batch is not None and self.generative_batch < 1:
            raise ValueError(f"generative_batch must be ≥ 1 or null, got {self.generative_batch}")
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be a number of pixels ≥ 0, got {self.max_shift}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class JEMStats:
    """Diagnostics of one hybrid-loss evaluation (0-dim tensors; :meth:`as_floats` is the host sync).

    ``energy_neg`` is the negatives' mean energy; without a generative term (a plain classifier) it is
    the uniform-noise probe's, so the trainer's divergence guard still watches both ends.
    """

    loss: Tensor
    cross_entropy: Tensor
    accuracy: Tensor
    generative_loss: Tensor
    energy_pos: Tensor
    energy_neg: Tensor
    gap: Tensor  # E⁺ − E⁻
    energy_noise: Tensor  # mean E of uniform noise on [0, 1]: should stay above E⁺
    regularisation: Tensor
    sampler_grad_norm: Tensor
    sampler_steps: Tensor  # Langevin steps per chain this step (grows while the chains lag; 0: no chains)

    def as_floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


def dequantise(images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """uint8 pixels k → (k + u) / 256, u ~ U[0, 1); float [0, 1] images → x + (u − ½) / 256, clamped."""
    u = torch.rand(images.shape, generator=generator, device=images.device)
    if images.dtype == torch.uint8:
        return (images.float() + u) / 256.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 pixels or float [0, 1] tensors, got {images.dtype}")
    return (images.float() + (u - 0.5) / 256.0).clamp_(0.0, 1.0)


def random_shift(images: Tensor, max_shift: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Each image of ``images`` ``(B, C, H, W)`` translated by its own (dy, dx), both uniform integers in
    [−max_shift, max_shift]; pixels shifted in from outside are 0 (the black background of MNIST-like
    images). Any dtype (uint8 pixels included: :meth:`JEMObjective.positives` shifts before
    dequantising). Returns a new contiguous tensor of the same dtype.
    """
    batch, _, height, width = images.shape
    if max_shift >= min(height, width):
        raise ValueError(f"max_shift {max_shift} would move a {height}×{width} image out of its frame")
    if max_shift == 0:
        return images.clone()
    device = images.device
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift)).permute(0, 2, 3, 1)  # (B, H+, W+, C)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator, device=device)
    rows = offsets[0, :, None] + torch.arange(height, device=device)  # (B, H): padded row of each output row
    cols = offsets[1, :, None] + torch.arange(width, device=device)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class JEMObjective:
    """Cross-entropy plus ``generative_weight`` × CD on the marginal energy; follows the trainer's protocol.

    Args:
        cd: the contrastive-divergence loss for the generative term (its buffer on the model's device);
            ``None`` only with ``generative_weight = 0``.
        config: :class:`JEMConfig`.

    Called as ``objective(energy, (images, labels), generator=, step=)`` with a
    :class:`~ebm.energies.ClassConditionalEnergy` (e.g. :class:`~ebm.image_energies.ImageEnergy`), or,
    under ``torchrun``, the trainer's :class:`~torch.nn.parallel.DistributedDataParallel` around one.

    Every term that trains the weights runs through ``energy``'s forward, so under DDP the ranks'
    gradients are averaged: the logits as ``energy(x, return_logits=True)`` (DDP passes the keyword on),
    the CD term's energies inside :class:`~ebm.losses.ContrastiveDivergence`. DDP reduces a backward
    pass's gradients only when its own forward built the graph; a cross-entropy on ``energy.logits`` of
    the module inside would leave a plain classifier (``generative_weight = 0``) training each rank's
    copy alone. Two forwards (logits, then the CD energies) before one backward are what DDP allows:
    autograd sums each weight's two contributions before DDP's hook averages them. Asking the one
    forward for logits keeps the ``(B, *event) → (B,)`` energy contract for every other caller, and in
    one process it computes exactly what ``energy.logits`` did. What needs no weight gradient (the
    noise probe, the chains) runs on the bare module: no collective per call.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite (with the step).
    """

    def __init__(self, cd: ContrastiveDivergence | None, config: JEMConfig | None = None) -> None:
        self.config = config or JEMConfig()
        if cd is None and self.config.generative_weight > 0:
            raise ValueError("a generative_weight > 0 needs a ContrastiveDivergence for its negatives")
        self.cd = cd if self.config.generative_weight > 0 else None

    def positives(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Dequantised (and optionally shifted and noised) [0, 1] float images from a batch of data.

        The shift runs first, on the raw pixels (uint8 or float), so the pixels it fills in with 0 are
        dequantised like every black pixel of the data; shifting after dequantisation left them at
        exactly 0.0, a point mass no dequantised pixel has. ``generator`` draws, in this order: the
        shifts (only with ``max_shift > 0``), the dequantisation noise, the Gaussian noise (only with
        ``noise_std > 0``); without a shift the draws are those of dequantisation alone.
        """
        if self.config.max_shift > 0:
            images = random_shift(images, self.config.max_shift, generator=generator)
        x = dequantise(images, generator=generator)
        if self.config.noise_std > 0:
            x = x + self.config.noise_std * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    def __call__(
        self,
        energy: nn.Module,
        batch: Any,
        /,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, JEMStats]:
        model = energy.module if isinstance(energy, DistributedDataParallel) else energy
        if not isinstance(model, ClassConditionalEnergy):
            raise TypeError(
                f"JEM needs a ClassConditionalEnergy (logits and E(x)), got {type(model).__name__}"
            )
        images, labels = batch
        x_pos = self.positives(images, generator=generator)
        logits = energy(x_pos, return_logits=True).float()  # (B, n_classes); through DDP's forward
        cross_entropy = F.cross_entropy(logits, labels.long(), label_smoothing=self.config.label_smoothing)
        noise = torch.rand(
            (self.config.n_noise_probe, *x_pos.shape[1:]), generator=generator, device=x_pos.device
        )
        with torch.no_grad():  # a diagnostic: no gradient, so no need of DDP's forward and its collectives
            energy_noise = model(noise).float().mean()
            energy_pos = -torch.logsumexp(logits.detach(), dim=1).mean()
        zero = torch.zeros((), device=x_pos.device)
        if self.cd is not None:
            x_generative = x_pos[: self.config.generative_batch]  # [:None] is the whole batch
            generative_loss, cd_stats = self.cd(energy, x_generative, generator=generator, step=step)
            loss = cross_entropy + self.config.generative_weight * generative_loss
            energy_pos, energy_neg = cd_stats.energy_pos, cd_stats.energy_neg
            regularisation, sampler_grad_norm = cd_stats.regularisation, cd_stats.sampler_grad_norm
            sampler_steps = cd_stats.sampler_steps
        else:
            loss, generative_loss, energy_neg = cross_entropy, zero, energy_noise
            regularisation, sampler_grad_norm, sampler_steps = zero, zero, zero
        if not torch.isfinite(loss):
            raise NonFiniteLossError(step, "JEM loss")
        stats = JEMStats(
            loss=loss.detach(),
            cross_entropy=cross_entropy.detach(),
            accuracy=(logits.detach().argmax(dim=1) == labels).float().mean(),
            generative_loss=generative_loss.detach(),
            energy_pos=energy_pos,
            energy_neg=energy_neg,
            gap=energy_pos - energy_neg,
            energy_noise=energy_noise,
            regularisation=regularisation,
            sampler_grad_norm=sampler_grad_norm,
            sampler_steps=sampler_steps,
        )
        return loss, stats

    def with_step_size(self, factor: float) -> None:
        """Scale the sampler's step size (the trainer's divergence remedy); a plain classifier has none."""
        if self.cd is not None:
            self.cd.with_step_size(factor)

    def state_dict(self) -> dict[str, Any]:
        return self.cd.state_dict() if self.cd is not None else {"step_size": 0.0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cd is not None:
            self.cd.load_state_dict(state)
