"""Training an RBM by CD-k or PCD with the library's contrastive-divergence loss and trainer.

The loss is :class:`~ebm.losses.ContrastiveDivergence` over the free energy with a :class:`Gibbs` sampler:
its gradient, mean ∇F(data) − mean ∇F(v_k), is Hinton's (2002) CD-k update (with hidden probabilities in
the statistics), and with a replay buffer of persistent chains it is PCD (Tieleman 2008). Two of the loss's
extras are turned off because they would bias an RBM: the energy-magnitude penalty α (it pulls F towards 0,
i.e. shrinks the biases and weights) and the offset anchor (an RBM's free energy has no free additive
constant to pin; the anchor would move b and c instead).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ebm.boltzmann.gibbs import Gibbs
from ebm.boltzmann.rbm import BernoulliRBM, RBMConfig, init_rbm_
from ebm.losses import ContrastiveDivergence
from ebm.samplers import ReplayBuffer, UniformBox
from ebm.trainer import MetricsCallback, TrainConfig, Trainer, TrainResult, resolve_device


@dataclass(frozen=True)
class BinarizeConfig:
    """How grey [0, 1] images become binary visible vectors.

    Attributes:
        method: ``stochastic`` draws each pixel on with probability equal to its intensity, once, from a
            seeded generator (the usual binarised MNIST of Salakhutdinov & Murray 2008); ``threshold``
            sets pixels above ``threshold`` on.
        threshold: the cut for ``threshold``.
        seed: seed of the stochastic draw (each split adds its own offset).
    """

    method: Literal["stochastic", "threshold"] = "stochastic"
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("stochastic", "threshold"):
            raise ValueError(f"binarize.method must be 'stochastic' or 'threshold', got {self.method!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"binarize.threshold must lie in (0, 1), got {self.threshold}")


def binarize(images: Tensor, config: BinarizeConfig, *, offset: int = 0) -> Tensor:
    """uint8 ``(N, 1, H, W)`` images → float {0, 1} of the same shape.

    Raises:
        ValueError: the images are not single-channel uint8 (an RBM over colour images needs another
            visible model).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"binarising needs uint8 greyscale images (N, 1, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    unit = images.float().div_(255.0)
    if config.method == "threshold":
        return (unit > config.threshold).float()
    generator = torch.Generator().manual_seed(config.seed + offset)
    return (torch.rand(unit.shape, generator=generator) < unit).float()


@dataclass(frozen=True)
class RBMTrainingConfig:
    """One way of training: CD-k from the data, or PCD from persistent chains.

    Attributes:
        n_steps: k, Gibbs steps per training step.
        persistent: negatives from persistent chains (PCD) instead of chains started at the batch (CD-k).
        n_chains: persistent chains kept (PCD), at least the batch size; each step advances a batch of
            distinct chains drawn at random (every chain, when there are as many as the batch).
    """

    n_steps: int = 1
    persistent: bool = False
    n_chains: int = 100

    def __post_init__(self) -> None:
        if self.n_steps < 1 or self.n_chains < 1:
            raise ValueError(f"n_steps and n_chains must be ≥ 1, got {self.n_steps}, {self.n_chains}")


def _default_train() -> TrainConfig:
    # Adam with β₁ = 0.5, no gradient clipping, the learning rate decayed tenfold on a cosine (persistent
    # chains follow the model only while its steps shrink, Tieleman 2008); free energies of 784 units reach
    # hundreds of nats, so the divergence guard watches |F| > 10⁵ rather than the image models' 10³.
    return TrainConfig(
        steps=5000,
        batch_size=100,
        lr=1e-3,
        final_lr_fraction=0.1,
        betas=(0.5, 0.999),
        grad_clip=None,
        checkpoint_every=1000,
        log_every=100,
        max_abs_energy=1e5,
        device="cpu",
    )


@dataclass(frozen=True)
class RBMRecipe:
    """Everything that decides a trained RBM: its size, the CD variant and the optimiser."""

    n_hidden: int = 500
    weight_std: float = 0.01
    cd: RBMTrainingConfig = field(default_factory=RBMTrainingConfig)
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        if isinstance(self.n_hidden, bool) or not isinstance(self.n_hidden, int) or self.n_hidden < 1:
            raise ValueError(f"n_hidden must be a whole number ≥ 1, got {self.n_hidden!r}")
        if not 0 < self.weight_std < math.inf:
            raise ValueError(f"weight_std must be a finite number > 0, got {self.weight_std}")
        if self.cd.persistent and self.cd.n_chains < self.train.batch_size:
            raise ValueError(
                f"PCD advances a batch of distinct persistent chains: n_chains ({self.cd.n_chains}) must be "
                f"at least the batch size ({self.train.batch_size})"
            )


def build_rbm_objective(
    cd: RBMTrainingConfig, event_shape: Sequence[int], *, device: torch.device, generator: torch.Generator
) -> ContrastiveDivergence:
    """The CD-k or PCD loss with a β = 1 Gibbs sampler, α = 0 and no offset anchor."""
    buffer = None
    if cd.persistent:
        # Chains start uniform in [0, 1]: their first Gibbs step draws h from p(h | v) of that point and
        # returns a binary v. reinit_prob = 0: Tieleman's chains are never restarted, and each step
        # advances distinct chains (all of them when there are as many as the batch).
        proposal = UniformBox(tuple(event_shape), 0.0, 1.0)
        buffer = ReplayBuffer(
            cd.n_chains, proposal, reinit_prob=0.0, replacement=False, generator=generator, device=device
        )
    return ContrastiveDivergence(Gibbs(), n_steps=cd.n_steps, alpha=0.0, offset_weight=0.0, buffer=buffer)


def train_rbm(
    data: Tensor,
    recipe: RBMRecipe,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
) -> tuple[BernoulliRBM, TrainResult]:
    """Train an RBM on binary ``data`` ``(N, *event)``; returns it (trained weights, eval mode) and the run.

    Raises:
        ValueError: ``data`` is not binary.
    """
    if len(data) == 0:
        raise ValueError("RBM training data holds no image")
    if not bool(((data == 0) | (data == 1)).all()):
        raise ValueError("RBM training data must be binary (0/1): binarise the images first")
    device = resolve_device(recipe.train.device)
    event_shape = tuple(data.shape[1:])
    rbm = BernoulliRBM(RBMConfig(event_shape, recipe.n_hidden))
    init_rbm_(
        rbm, data, generator=torch.Generator().manual_seed(recipe.train.seed), weight_std=recipe.weight_std
    )
    rbm = rbm.to(device)
    objective = build_rbm_objective(
        recipe.cd,
        event_shape,
        device=device,
        generator=torch.Generator(device).manual_seed(recipe.train.seed + 1),
    )
    trainer = Trainer(
        rbm, objective, data, recipe.train, checkpoint_path=checkpoint_path, callbacks=callbacks
    )
    result = trainer.fit()
    trained = BernoulliRBM(rbm.config).to(device)
    trained.load_state_dict(trainer.model.state_dict())
    return trained.eval(), result


@torch.no_grad()
def reconstruction_error(rbm: BernoulliRBM, data: Tensor, *, batch_size: int = 1000) -> float:
    """Mean squared error per pixel between binary ``data`` and its mean-field reconstruction."""
    device = rbm.weight.device
    total = sum(
        float((rbm.reconstruct(chunk.to(device)) - chunk.to(device)).square().sum())
        for chunk in data.split(batch_size)
    )
    return total / data.numel()


@torch.no_grad()
def sample_rbm(
    rbm: BernoulliRBM, n_samples: int, n_steps: int, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Run ``n_samples`` Gibbs chains for ``n_steps`` from the visible biases' own Bernoulli draws.

    Returns:
        The final binary states and their mean-field images p(v = 1 | h), both ``(n, *event_shape)``.
    """
    device = rbm.weight.device
    probabilities = torch.sigmoid(rbm.visible_bias.detach()).expand(n_samples, -1)
    uniform = torch.rand(probabilities.shape, generator=generator, device=device)
    start = (uniform < probabilities).float().view(n_samples, *rbm.event_shape)
    states, _ = Gibbs().run(rbm, start, n_steps, generator=generator)
    hidden = rbm.sample_hidden(states, generator=generator)
    means = torch.sigmoid(rbm.visible_preactivation(hidden)).view(n_samples, *rbm.event_shape)
    return states, means


def recipe_with(recipe: RBMRecipe, **train_overrides: object) -> RBMRecipe:
    """``recipe`` with some :class:`TrainConfig` fields replaced (``steps=…``, ``seed=…``)."""
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **train_overrides))  # type: ignore[arg-type]
