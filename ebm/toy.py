"""The 2D density recipe: an MLP energy trained by PCD with MALA negatives, evaluated exactly.

This module wires the library's parts (energy, sampler, replay buffer, loss, trainer, grid
evaluation) for 2D data; the pipeline stages, the CLI and ``benchmarks/toy_density.py`` all call it,
so they train and measure the same thing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ebm.data.toy2d import ToyDataset
from ebm.distributed import process_group_context
from ebm.energies import MLPEnergy, MLPEnergyConfig, seed_linear_layers_
from ebm.evaluation.density2d import DensityReport, evaluate_density, module_placement
from ebm.losses import CDConfig, ContrastiveDivergence, NonFiniteLossError
from ebm.samplers import ReplayBuffer, Sampler, SamplerConfig, UniformBox
from ebm.trainer import MetricsCallback, TrainConfig, Trainer, TrainResult, resolve_device


@dataclass(frozen=True)
class SamplingConfig:
    """Long-run sampling for evaluation: chains from uniform noise over the data box."""

    n_samples: int = 5000
    n_steps: int = 1000

    def __post_init__(self) -> None:
        # n_steps < 0 ran no step, and the uniform starting noise was scored as the model's samples
        if self.n_samples < 1 or self.n_steps < 0:
            raise ValueError(f"need n_samples ≥ 1 and n_steps ≥ 0, got {self.n_samples} and {self.n_steps}")


@dataclass(frozen=True)
class PolishConfig:
    """Exact-likelihood fine-tuning after PCD: possible in 2D, where log Z is a sum over a grid.

    PCD's negatives build sharp edges that exact likelihood trained from scratch does not reach
    (``docs/checkerboard.md``, session 17); from there, a few hundred steps of the exact gradient fit the
    training points without the chains' noise: in ``benchmarks/toy_density.py`` the checkerboard's gap
    falls from 0.0226 to 0.0176 nats, and the six smooth sets' move by under 0.0005 (session 23).

    Attributes:
        steps: Adam steps (0: off, the model is PCD's).
        resolution: grid cells a side. Every step draws one uniform point in every cell
            (:class:`GridNLL` with ``jitter``), so log Z's estimate is unbiased at any resolution and a
            coarser grid only adds noise; an edge between the cell centres of a fixed grid would be
            invisible to it.
        lr: Adam's learning rate at the first step.
        final_lr_fraction: the rate decays on a cosine to ``lr * final_lr_fraction`` at the last step.
        batch_size: data points per step, drawn with replacement.
    """

    steps: int = 400
    resolution: int = 128
    lr: float = 3e-4
    final_lr_fraction: float = 0.05
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if self.steps < 0 or self.resolution < 2 or self.batch_size < 1:
            raise ValueError(
                "polish needs steps ≥ 0, resolution ≥ 2 and batch_size ≥ 1, got "
                f"{self.steps}, {self.resolution} and {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"polish.lr must be a positive finite learning rate, got {self.lr}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(f"polish.final_lr_fraction must lie in (0, 1], got {self.final_lr_fraction}")


@dataclass(frozen=True)
class Toy2DConfig:
    """Everything that defines a 2D run; ``params.yaml``'s ``toy`` section maps onto it."""

    model: MLPEnergyConfig = field(
        default_factory=lambda: MLPEnergyConfig(in_features=2, widths=(128, 128, 128), activation="relu")
    )
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(name="mala", step_size=0.05, jump_every=5, jump_grid_bins=128)
    )
    loss: CDConfig = field(default_factory=lambda: CDConfig(offset_weight=1.0))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=8000,
            batch_size=256,
            lr=4e-3,
            betas=(0.9, 0.999),
            warmup_steps=100,
            final_lr_fraction=0.05,
            ema_decay=0.999,
        )
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    polish: PolishConfig = field(default_factory=PolishConfig)

    def __post_init__(self) -> None:
        if self.model.in_features != 2:  # else a shape error deep in the first training step
            raise ValueError(f"model.in_features must be 2 for 2D data, got {self.model.in_features}")


def build_objective(
    config: Toy2DConfig,
    bounds: tuple[float, float],
    *,
    x_train: Tensor,
    device: torch.device,
    generator: torch.Generator,
) -> ContrastiveDivergence:
    """The CD/PCD loss of ``config``, its buffer filled with uniform noise over ``bounds``², its
    sampler's mode-jumping proposal (if on) built from ``x_train``."""
    buffer = None
    if config.loss.persistent:
        proposal = UniformBox((config.model.in_features,), *bounds)
        buffer = ReplayBuffer(
            config.loss.buffer_size,
            proposal,
            reinit_prob=config.loss.reinit_prob,
            generator=generator,
            device=device,
        )
    return config.loss.build(build_sampler(config, bounds, x_train=x_train.to(device)), buffer=buffer)


def build_sampler(config: Toy2DConfig, bounds: tuple[float, float], *, x_train: Tensor) -> Sampler:
    """The configured sampler; mode-jumping proposals come from ``x_train``, chosen by the training
    seed, so a resumed run rebuilds the same proposal."""
    generator = torch.Generator(x_train.device).manual_seed(config.train.seed)
    return config.sampler.build(data=x_train, box=bounds, generator=generator)


def train_energy(
    x_train: Tensor,
    config: Toy2DConfig,
    *,
    bounds: tuple[float, float],
    checkpoint_path: str | os.PathLike[str] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
) -> tuple[nn.Module, ToyTrainResult]:
    """Train an MLP energy on ``x_train`` (N, D) by PCD, then polish it by exact likelihood
    (:func:`polish_energy`, unless ``polish.steps`` is 0); return the weights to use and the runs.

    With ``checkpoint_path`` both phases checkpoint and resume, the polish beside PCD's file
    (:func:`polish_checkpoint`). ``callbacks`` see PCD's metrics, then the polish's as ``polish/<name>``
    at steps counted on from PCD's last.

    In a data-parallel run (a process group joined with :func:`ebm.distributed.init_from_env`) every
    rank calls this alike: it trains on the device the launcher gave it, with a replay-buffer shard of
    ``buffer_size / world_size`` chains (the global buffer is the configured one, and each chain is
    revisited as often as in one process) filled from its own seed.
    """
    context = process_group_context()
    device = context.device or resolve_device(config.train.device)
    init_generator = torch.Generator().manual_seed(config.train.seed)
    energy = seed_linear_layers_(MLPEnergy(config.model), generator=init_generator).to(device)
    # seed + 1 in one process; under DDP seeds that no rank's trainer generator (seed + rank) also uses.
    buffer_seed = config.train.seed + context.world_size + context.rank
    buffer_generator = torch.Generator(device).manual_seed(buffer_seed)
    if config.loss.persistent and config.loss.buffer_size % context.world_size:
        raise ValueError(  # each rank holds an equal shard; a remainder would be dropped, a 0 shard fail
            f"loss.buffer_size {config.loss.buffer_size} must be divisible by the {context.world_size} "
            "data-parallel processes"
        )
    shard = dataclasses.replace(config.loss, buffer_size=config.loss.buffer_size // context.world_size)
    objective = build_objective(
        dataclasses.replace(config, loss=shard),
        bounds,
        x_train=x_train,
        device=device,
        generator=buffer_generator,
    )
    trainer = Trainer(
        energy, objective, x_train, config.train, checkpoint_path=checkpoint_path, callbacks=callbacks
    )
    result = trainer.fit()
    if config.polish.steps == 0:
        return trainer.model.eval(), ToyTrainResult(**dataclasses.asdict(result))
    polished, polish = polish_energy(
        trainer.model,
        x_train,
        config,
        bounds=bounds,
        checkpoint_path=polish_checkpoint(checkpoint_path) if checkpoint_path is not None else None,
        callbacks=[_after_pcd(callback, result.steps) for callback in callbacks],
    )
    return polished, ToyTrainResult(**dataclasses.asdict(result), polish=polish)


@dataclass
class ToyTrainResult(TrainResult):
    """PCD's run, and the exact-likelihood polish's after it (``None`` when ``polish.steps`` is 0)."""

    polish: TrainResult | None = None


def polish_checkpoint(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The polish's own checkpoint beside PCD's: ``run.ckpt`` → ``run.polish.ckpt``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.polish{path.suffix}")


def _after_pcd(callback: MetricsCallback, pcd_steps: int) -> MetricsCallback:
    """``callback`` for the polish's metrics: named ``polish/<metric>``, stepped on from PCD's last step."""

    def forward(trainer: Trainer, step: int, values: dict[str, float]) -> None:
        callback(trainer, pcd_steps + step, {f"polish/{key}": value for key, value in values.items()})

    return forward


def polish_energy(
    energy: nn.Module,
    x_train: Tensor,
    config: Toy2DConfig,
    *,
    bounds: tuple[float, float],
    checkpoint_path: str | os.PathLike[str] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
) -> tuple[nn.Module, TrainResult]:
    """A copy of ``energy`` fine-tuned by exact likelihood (:class:`PolishConfig`); ``energy`` is left as
    it was. The trainer is the same as PCD's (checkpoints, resume, divergence guard, DDP), with the
    polish's steps, batch and learning-rate schedule, and without EMA: the steps are few and small."""
    polish = config.polish
    model = copy.deepcopy(energy).train().requires_grad_(True)
    weights = list(model.parameters())
    if not weights:  # else a bare StopIteration, or Adam's "empty parameter list"
        raise ValueError(f"polish_energy fine-tunes an energy's parameters; {type(energy).__name__} has none")
    device = weights[0].device
    train = dataclasses.replace(
        config.train,
        steps=polish.steps,
        batch_size=polish.batch_size,
        lr=polish.lr,
        weight_decay=0.0,
        warmup_steps=0,
        final_lr_fraction=polish.final_lr_fraction,
        ema_decay=None,
        max_lag=None,  # the lag guard watches PCD's chains; there are none here
    )
    objective = GridNLL(bounds, polish.resolution, device=device, jitter=True, pin_log_z=False)
    trainer = Trainer(model, objective, x_train, train, checkpoint_path=checkpoint_path, callbacks=callbacks)
    result = trainer.fit()
    return trainer.model.eval(), result


def energy_device(energy: nn.Module) -> torch.device:
    """The device of ``energy``'s floating parameters or buffers; the CPU for a stateless energy."""
    return module_placement(energy)[0]


def sample_energy(
    energy: nn.Module,
    config: Toy2DConfig,
    bounds: tuple[float, float],
    *,
    x_train: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Long-run samples: ``sampling.n_steps`` of the training sampler from uniform noise.

    The chains run on the energy's device (:func:`energy_device`); ``generator`` must live there too.
    """
    device = energy_device(energy)
    proposal = UniformBox((config.model.in_features,), *bounds)
    x0 = proposal.sample(config.sampling.n_samples, generator=generator, device=device)
    sampler = build_sampler(config, bounds, x_train=x_train.to(device))
    samples, _ = sampler.run(energy, x0, config.sampling.n_steps, generator=generator)
    return samples


def evaluate_energy(
    energy: nn.Module,
    dataset: ToyDataset,
    config: Toy2DConfig,
    *,
    x_train: Tensor,
    x_test: Tensor,
    seed: int,
) -> tuple[DensityReport, Tensor]:
    """Long-run samples, then the exact-grid report (NLL, gap, MMD, CV-KDE); returns both.

    The sampling generator is seeded with ``seed`` on the energy's device, so a CUDA energy (what
    ``train.device="auto"`` gives on a GPU machine) samples with a CUDA generator and a CPU one draws
    exactly what a plain ``torch.Generator().manual_seed(seed)`` would.
    """
    generator = torch.Generator(energy_device(energy)).manual_seed(seed)
    samples = sample_energy(energy, config, dataset.bounds, x_train=x_train, generator=generator)
    report = evaluate_density(
        energy,
        bounds=dataset.bounds,
        x_test=x_test,
        true_log_prob=dataset.log_prob,
        x_train=x_train,
        samples=samples,
    )
    return report, samples


@dataclass(frozen=True)
class GridNLLStats:
    """Diagnostics of :class:`GridNLL` (0-dim tensors); ``energy_neg`` is the model's mean energy."""

    loss: Tensor
    energy_pos: Tensor
    energy_neg: Tensor
    gap: Tensor
    log_z: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.__dict__.items()}


class GridNLL:
    """Exact maximum likelihood in 2D: the reference that tells sampler error from model error.

    The loss is the exact negative log-likelihood with log Z by quadrature on a fixed grid,

        L = mean E(x⁺) + log Z + ½ (log Z)²,    log Z = log Σᵢ exp(−E(cᵢ)) Δ²,

    whose gradient is E_data[∇θE] − E_model[∇θE] with the model expectation computed exactly on the
    grid instead of estimated by MCMC negatives. The ½ (log Z)² term pins the energy's free additive
    constant (which the likelihood cannot see) at log Z = 0; the output bias alone zeroes it, so it
    leaves the learned density unbiased. Only possible in very low dimension; the benchmark
    trains it next to the PCD recipe so the gap between the two is the sampler's share of the error.

    ``pin_log_z=False`` drops the ½ (log Z)² term, for fine-tuning a model whose constant is already
    set elsewhere (:func:`polish_energy`): the likelihood's gradient with respect to that constant is
    exactly zero, while the pin's, ∝ log Z, moves every weight under Adam until log Z is 0 (a PCD model
    pinned by its own anchor sits at log Z ≈ −3 on the checkerboard, and 200 steps of the pin undid
    its edges: 0.75 nats from the floor instead of 0.018).

    With ``jitter`` every call evaluates one uniform point in every cell instead of the cell centres:
    Σᵢ exp(−E(uᵢ)) Δ² is then an unbiased (stratified) estimate of Z whatever the energy does between
    the centres, where a fixed grid cannot see a sharp edge move within a cell. Its log is biased low by
    about half the estimate's relative variance, negligible at 128² for these densities.
    """

    def __init__(
        self,
        bounds: tuple[float, float],
        resolution: int = 128,
        *,
        device: torch.device,
        jitter: bool = False,
        pin_log_z: bool = True,
    ) -> None:
        low, high = bounds
        self.pin_log_z = pin_log_z
        self.cell = (high - low) / resolution
        self.jitter = jitter
        offset = 0.0 if jitter else 0.5  # jittered: each cell's lower corner plus a fresh U[0, cell)² draw
        ticks = low + (torch.arange(resolution, dtype=torch.float32, device=device) + offset) * self.cell
        self.grid = torch.cartesian_prod(ticks, ticks)  # (R², 2)
        self.log_cell_area = 2 * math.log(self.cell)

    def points(self, generator: torch.Generator | None) -> Tensor:
        """Where this step evaluates the energy: the cell centres, or one uniform point in every cell."""
        if not self.jitter:
            return self.grid
        if generator is None:
            raise ValueError("a jittered GridNLL draws its points from the trainer's generator; got none")
        shift = torch.rand(self.grid.shape, generator=generator, device=self.grid.device)
        return self.grid + self.cell * shift

    def __call__(
        self,
        energy: nn.Module,
        x_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, GridNLLStats]:
        e_pos = energy(x_pos)
        e_grid = energy(self.points(generator))
        log_z = torch.logsumexp(-e_grid, dim=0) + self.log_cell_area
        loss = e_pos.mean() + log_z + (0.5 * log_z.square() if self.pin_log_z else 0.0)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(step, "grid negative log-likelihood")
        with torch.no_grad():
            e_model = (torch.softmax(-e_grid, dim=0) * e_grid).sum()
        stats = GridNLLStats(
            loss.detach(), e_pos.detach().mean(), e_model, e_pos.detach().mean() - e_model, log_z.detach()
        )
        return loss, stats

    def with_step_size(self, factor: float) -> None:
        """No sampler to slow down: the trainer's rollback still shrinks the learning rate."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def train_energy_exact(
    x_train: Tensor, config: Toy2DConfig, *, bounds: tuple[float, float], resolution: int = 128
) -> tuple[nn.Module, TrainResult]:
    """The same MLP and optimiser as :func:`train_energy`, trained by exact grid likelihood."""
    device = resolve_device(config.train.device)
    energy = seed_linear_layers_(
        MLPEnergy(config.model), generator=torch.Generator().manual_seed(config.train.seed)
    )
    trainer = Trainer(energy.to(device), GridNLL(bounds, resolution, device=device), x_train, config.train)
    result = trainer.fit()
    return trainer.model.eval(), result
