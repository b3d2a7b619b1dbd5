"""Binary classification of 2D points as an energy: the first exercise of energy-based learning.

A classifier with logits ``logit_y(x)`` is read as the joint energy ``E(x, y) = −logit_y(x)``
(:class:`~ebm.energies.ClassConditionalEnergy`). Over the two labels the partition function is a
sum of two terms, so the conditional likelihood is exact:

    p(y | x) = exp(−E(x, y)) / Σ_{y'∈{0,1}} exp(−E(x, y')) = σ(E(x, 1−y) − E(x, y)),

and the prediction is the label of lower energy, ``ŷ(x) = argmin_y E(x, y)``. The decision energy
``E(x, 1) − E(x, 0)`` is the log-odds of class 0; its zero set is the decision boundary.

With ``generative_weight > 0`` training also fits the marginal energy
``E(x) = −log Σ_y exp(−E(x, y))`` to the inputs by contrastive divergence, the hybrid of JEM
(Grathwohl et al. 2019, https://arxiv.org/abs/1912.03263).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ebm.data.toy2d import Moons
from ebm.energies import ClassConditionalEnergy, MLPClassifierConfig, mlp_logits, seed_linear_layers_
from ebm.losses import CDConfig, CDStats, ContrastiveDivergence, NonFiniteLossError
from ebm.samplers import ReplayBuffer, SamplerConfig, UniformBox

N_CLASSES = 2

# --- labelled data ----------------------------------------------------------------------------------


def _moons(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles (:class:`~ebm.data.toy2d.Moons`: radius 2, noise σ = 0.2, the
    sklearn ``make_moons(noise=0.1)`` scaled by 2), labelled by the half circle: y = 0 is the upper one.
    """
    moons = Moons()
    t = moons.sample_latent(n, generator)  # (n,) float64
    labels = torch.randint(N_CLASSES, (n,), generator=generator, device=generator.device)
    on_curve = moons.branches(t)[labels, torch.arange(n, device=generator.device)]  # (n, 2)
    noise = torch.randn(n, 2, generator=generator, device=generator.device, dtype=on_curve.dtype)
    return on_curve + moons.noise_std * noise, labels


def _blobs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two isotropic Gaussians N(∓(1.25, 1.25), 0.6² I), one per label: linearly separable but for
    the ~0.2 % of points beyond the diagonal that splits them."""
    labels = torch.randint(N_CLASSES, (n,), generator=generator, device=generator.device)
    means = torch.tensor([[-1.25, -1.25], [1.25, 1.25]], device=generator.device)
    noise = torch.randn(n, 2, generator=generator, device=generator.device)
    return means[labels] + 0.6 * noise, labels


def _xor(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Four Gaussians N((±1.5, ±1.5), 0.5² I); y = 1 where the two coordinates' signs differ."""
    signs = 2 * torch.randint(2, (n, 2), generator=generator, device=generator.device) - 1  # (n, 2) of ±1
    noise = torch.randn(n, 2, generator=generator, device=generator.device)
    labels = (signs[:, 0] != signs[:, 1]).long()
    return 1.5 * signs + 0.5 * noise, labels


LABELLED_2D = {"moons": _moons, "blobs": _blobs, "xor": _xor}


def make_labelled_2d(name: str, n: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``n`` labelled points from the binary 2D task ``name``, all inside about [-3, 3]².

    Only ``generator`` supplies randomness, so a seed fixes the data; both tensors live on its device.

    Returns:
        ``(x, y)``: points float32 ``(n, 2)`` and labels int64 ``(n,)`` in {0, 1}.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid ones) or a negative ``n``.
    """
    if name not in LABELLED_2D:
        raise ValueError(f"unknown labelled 2D dataset {name!r}; valid names: {', '.join(LABELLED_2D)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    x, y = LABELLED_2D[name](n, generator)
    return x.to(torch.float32), y.to(torch.int64)


# --- training ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classifier2DConfig:
    """A binary 2D classifier and how to train it.

    Attributes:
        model: the logits MLP; ``n_classes`` must be 2.
        steps: Adam steps.
        batch_size: labelled points per step, drawn with replacement.
        lr: Adam learning rate.
        seed: seeds the initial weights, the batches and the generative term's chains.
        generative_weight: λ in L = −log p(y|x) + λ · CD(E(x)); 0 trains the classifier alone and
            ignores ``sampler``, ``loss`` and ``box_margin``.
        sampler: the MCMC sampler drawing negatives of the marginal energy.
        loss: CD settings of the generative term (chain length, energy regulariser, replay buffer).
        box_margin: the replay buffer's fresh chains start uniformly in the data's bounding square
            widened by this much on every side.
    """

    model: MLPClassifierConfig = field(default_factory=lambda: MLPClassifierConfig(n_classes=N_CLASSES))
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-2
    seed: int = 0
    generative_weight: float = 0.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: CDConfig = field(default_factory=CDConfig)
    box_margin: float = 1.0

    def __post_init__(self) -> None:
        if self.model.n_classes != N_CLASSES or self.model.in_features != 2:
            raise ValueError(
                "a 2D binary classifier needs model.in_features = 2 and model.n_classes = 2, got "
                f"{self.model.in_features} and {self.model.n_classes}"
            )
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(
                f"steps ≥ 0, batch_size ≥ 1 and lr > 0 are required, got {self.steps}, "
                f"{self.batch_size}, {self.lr}"
            )
        if not (self.generative_weight >= 0 and math.isfinite(self.generative_weight)):
            raise ValueError(f"generative_weight must be a finite number ≥ 0, got {self.generative_weight}")
        if self.box_margin < 0:
            raise ValueError(f"box_margin must be ≥ 0, got {self.box_margin}")


@dataclass(frozen=True)
class ClassifierLossStats:
    """Diagnostics of one classifier loss evaluation (0-dim tensors; ``generative`` is ``None``
    when the generative term is off)."""

    loss: Tensor
    conditional_nll: Tensor
    generative: CDStats | None


def conditional_nll(energy: ClassConditionalEnergy, x: Tensor, y: Tensor) -> Tensor:
    """Mean −log p(y | x) = E(x, y) − E(x): the joint energy minus the marginal one.

    It is the cross-entropy of the logits, computed from them for numerical stability.
    """
    return F.cross_entropy(energy.logits(x), y)


def classifier_loss(
    energy: ClassConditionalEnergy,
    x: Tensor,
    y: Tensor,
    *,
    generative: ContrastiveDivergence | None = None,
    generative_weight: float = 0.0,
    generator: torch.Generator | None = None,
    step: int | None = None,
) -> tuple[Tensor, ClassifierLossStats]:
    """The hybrid loss  L = −mean log p(y | x) + λ · CD(E(x))  on one labelled batch.

    The first term is exact (the partition over labels has two terms); the second is the
    contrastive-divergence surrogate of −mean log p(x) for the marginal energy, with negatives from
    ``generative`` (JEM, Grathwohl et al. 2019). With ``generative=None`` or λ = 0 it is left out.

    Raises:
        NonFiniteLossError: if the loss is NaN or infinite.
    """
    nll = conditional_nll(energy, x, y)
    loss, cd_stats = nll, None
    if generative is not None and generative_weight > 0:
        cd_loss, cd_stats = generative(energy, x, generator=generator, step=step)
        loss = nll + generative_weight * cd_loss
    if not torch.isfinite(loss):
        raise NonFiniteLossError(step, "classifier loss")
    return loss, ClassifierLossStats(loss.detach(), nll.detach(), cd_stats)


def train_classifier(
    x: Tensor, y: Tensor, config: Classifier2DConfig, *, device: torch.device | str | None = None
) -> ClassConditionalEnergy:
    """Train E(x, y) = −logit_y(x) on labelled points by Adam on :func:`classifier_loss`.

    The discriminative term maximises the exact conditional likelihood

        p(y | x) = exp(−E(x, y)) / Σ_{y'∈{0,1}} exp(−E(x, y')),

    whose negative log is the cross-entropy of the logits: each step lowers the energy of the true
    label and raises that of the wrong one, the negative. For ``generative_weight`` λ > 0 the
    marginal E(x) = −log Σ_y exp(−E(x, y)) is also fitted by persistent CD, fresh chains started from
    uniform noise over the data's box (CD-k with chains started at the data when
    ``config.loss.persistent`` is off).

    Randomness comes from generators seeded by ``config.seed`` only, so a run is reproducible.

    Args:
        x: points ``(N, 2)``.
        y: labels ``(N,)`` in {0, 1}.
        config: model and optimisation settings.
        device: where to train; ``None`` means ``x``'s device.

    Returns:
        The trained energy, in eval mode, on ``device``.

    Raises:
        ValueError: for points or labels of the wrong shape, or labels outside {0, 1}.
        NonFiniteLossError: if training diverges.
    """
    device = x.device if device is None else torch.device(device)
    x, y = _check_labelled(x, y)
    x, y = x.to(device, torch.float32), y.to(device, torch.int64)
    energy = ClassConditionalEnergy(
        seeded_logits(config.model, generator=torch.Generator().manual_seed(config.seed))
    ).to(device)
    generator = torch.Generator(device).manual_seed(config.seed + 1)
    generative = generative_term(config, x, generator=generator) if config.generative_weight > 0 else None
    optimizer = torch.optim.Adam(energy.parameters(), lr=config.lr)
    energy.train()
    for step in range(config.steps):
        batch = torch.randint(len(x), (config.batch_size,), generator=generator, device=device)
        loss, _ = classifier_loss(
            energy,
            x[batch],
            y[batch],
            generative=generative,
            generative_weight=config.generative_weight,
            generator=generator,
            step=step,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return energy.eval()


def generative_term(
    config: Classifier2DConfig, x: Tensor, *, generator: torch.Generator
) -> ContrastiveDivergence:
    """The CD objective of the marginal energy, built from ``config.sampler`` and ``config.loss``.

    The replay buffer (on ``x``'s device, filled from ``generator``) holds chains started uniformly
    in the bounding square of the points ``x`` ``(N, 2)``, widened by ``config.box_margin``.
    """
    low = float(x.min()) - config.box_margin
    high = float(x.max()) + config.box_margin
    buffer = None
    if config.loss.persistent:
        buffer = ReplayBuffer(
            config.loss.buffer_size,
            UniformBox((2,), low, high),
            reinit_prob=config.loss.reinit_prob,
            generator=generator,
            device=x.device,
        )
    return config.loss.build(config.sampler.build(), buffer=buffer)


def seeded_logits(config: MLPClassifierConfig, *, generator: torch.Generator) -> nn.Module:
    """:func:`~ebm.energies.mlp_logits` with initial weights drawn from ``generator`` only."""
    return seed_linear_layers_(mlp_logits(config), generator=generator)


def _check_labelled(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"labels must have shape ({x.shape[0]},) for {x.shape[0]} points, got {tuple(y.shape)}"
        )
    if y.is_floating_point() or ((y != 0) & (y != 1)).any():
        raise ValueError("labels must be integers in {0, 1}")
    return x, y


# --- prediction -------------------------------------------------------------------------------------


def joint_energies(energy: ClassConditionalEnergy, x: Tensor) -> Tensor:
    """E(x, y) for both labels, ``(B, 2)``: column y holds E(x, y)."""
    labels = [torch.full((len(x),), label, device=x.device, dtype=torch.int64) for label in range(N_CLASSES)]
    return torch.stack([energy.joint(x, label) for label in labels], dim=1)


def predict(energy: ClassConditionalEnergy, x: Tensor) -> Tensor:
    """ŷ(x) = argmin_y E(x, y), int64 ``(B,)``: the label of lower energy."""
    with torch.inference_mode():
        return joint_energies(energy, x).argmin(dim=1)


def accuracy(energy: ClassConditionalEnergy, x: Tensor, y: Tensor) -> float:
    """Fraction of points whose lower-energy label is the true one."""
    _check_labelled(x, y)
    return float((predict(energy, x) == y.to(x.device)).float().mean())


def decision_energy(energy: ClassConditionalEnergy, x: Tensor) -> Tensor:
    """E(x, 1) − E(x, 0), ``(B,)``: the log-odds log p(0 | x) − log p(1 | x); > 0 predicts class 0."""
    energies = joint_energies(energy, x)
    return energies[:, 1] - energies[:, 0]
