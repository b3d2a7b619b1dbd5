"""The training loop: seeded, resumable exactly, guarded against divergence.

One :class:`Trainer` trains an energy with any objective that follows the
:class:`~ebm.losses.ContrastiveDivergence` interface (``objective(energy, x, generator=, step=)``
returning ``(loss, stats)``, plus ``state_dict``/``load_state_dict``/``with_step_size``).

Under ``torchrun`` (a process group joined with :func:`ebm.distributed.init_from_env`) the same trainer
runs data-parallel: the loss goes through :class:`~torch.nn.parallel.DistributedDataParallel`, which
averages the gradients over the ranks; each rank draws ``batch_size / world_size`` positives with its
own generator (seed + rank) and keeps its own replay-buffer shard, so the global batch is the configured
one. Every rank takes the divergence guard's decisions together; only rank 0 writes checkpoints, runs
the callbacks and shows progress.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ebm.checkpoint import CheckpointError, assert_finite_state, load_checkpoint, save_checkpoint
from ebm.distributed import process_group_context
from ebm.losses import NonFiniteLossError

Batch = Tensor | tuple[Tensor, ...]

# The parts of the training state each data-parallel rank has its own of: random streams, and the
# objective's replay-buffer shard and (adapted) sampler step size. The rest is the same on every rank.
_PER_RANK_STATE = ("objective", "generator", "torch_rng", "cuda_rng")


class ObjectiveStats(Protocol):
    """What the trainer reads from an objective's diagnostics: the two energies, and all as floats."""

    @property
    def energy_pos(self) -> Tensor: ...

    @property
    def energy_neg(self) -> Tensor: ...

    def as_floats(self) -> dict[str, float]: ...


class Objective(Protocol):
    def __call__(
        self,
        energy: nn.Module,
        batch: Any,
        /,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, ObjectiveStats]: ...

    def with_step_size(self, factor: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_RESUMABLE_CHANGES = frozenset({"steps", "device", "progress", "log_every", "checkpoint_every"})
"""The :class:`TrainConfig` fields a resumed run may set otherwise than the run that wrote its checkpoint.
A ``device`` of another type (cuda → cpu) is refused all the same: see :meth:`Trainer._check_same_device`."""

_CHECKPOINT_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "recoveries": int,
    "energy": dict,
    "optimizer": dict,
    "scheduler": dict,
    "history": list,
}
"""The entries every training checkpoint holds (besides each rank's ones), with their types."""

_RANK_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "objective": dict,
    "generator": Tensor,
    "torch_rng": Tensor,
}
"""The per-rank entries every training checkpoint holds: at the top level, or in each of its ``ranks``."""


def _plain(value: Any) -> Any:
    """Lists as tuples, so a config compares equal however its sequences were stored."""
    return tuple(_plain(v) for v in value) if isinstance(value, list | tuple) else value


class TrainingDivergedError(RuntimeError):
    """Training kept diverging after every allowed rollback; no diverged weights were written."""


class ChainsLagError(RuntimeError):
    """The lag guard fired (:attr:`TrainConfig.max_lag`): the sampler's chains lost the energy."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping knobs of a training run.

    Attributes:
        steps: total optimiser steps. A run resumed from a checkpoint may set another number (train N,
            resume to 2N); its learning-rate schedule keeps the length of the run that started it (the
            checkpoint stores it), so a longer run follows the original cosine to its end and then holds
            at ``lr * final_lr_fraction``, and a shorter one stops part-way down it.
        batch_size: positives per step (drawn with replacement by the seeded generator); under DDP,
            over all ranks together, each drawing ``batch_size / world_size``.
        lr: Adam learning rate (positive, finite); decays to ``lr * final_lr_fraction`` on a cosine after
            ``warmup_steps``, over the steps the run was started with (see ``steps``).
        betas: Adam betas, each in [0, 1); β₁ = 0 is the usual EBM choice (Du & Mordatch 2019).
        weight_decay: Adam's L2 penalty (finite, ≥ 0).
        grad_clip: clip the parameters' gradient to this global L2 norm (``None``: off).
        ema_decay: keep an exponential moving average of the weights (``None``: off).
        checkpoint_every: every this many steps, keep the state as the divergence guard's rollback point
            and, with a checkpoint path, write it atomically (0: only at the end).
        log_every: record metrics (a host sync) every this many steps.
        seed: seed of the generator that draws positives and negatives; rank r of a DDP run uses seed + r.
        device: ``"auto"`` (see :func:`resolve_device`) or a torch device name (``"cpu"``, ``"cuda:1"``).
            A checkpoint resumes only on a device of the type it was written on (its random streams are
            that type's).
        max_abs_energy: divergence guard; |E| above this on data or negatives counts as divergence.
        max_lag: lag guard (``None``: off). Short-run chains that keep up with the energy sit a little
            below the data in energy (E⁺ − E⁻ ≳ 0); when training sharpens the energy faster than the
            chains can follow, their states climb above the data, every update pushes them further up,
            and the replay buffer turns to texture (PCD's usual collapse). When an exponential average
            of E⁺ − E⁻ (decay ``lag_decay``) falls below −``max_lag`` the trainer rolls back to the last
            good state like a divergence, but multiplies only the learning rate by
            ``recovery_factor``: a smaller sampler step would make the chains lag more. With the guard
            on, a checkpoint is a rollback point only while that average is ≥ 0; while it is below, the
            checkpoint file keeps the last good state (the one a rollback would return to), so a
            restarted run resumes from there and replays the same steps; the final checkpoint, at
            ``steps``, holds the finished state.
        lag_decay: decay per step of the lag guard's average.
        max_recoveries: rollbacks allowed before :class:`TrainingDivergedError`.
        recovery_factor: after a rollback, sampler step size and learning rate are multiplied by this.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    final_lr_fraction: float = 1.0
    grad_clip: float | None = 10.0
    ema_decay: float | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    max_abs_energy: float = 1e3
    max_lag: float | None = None
    lag_decay: float = 0.98
    max_recoveries: int = 3
    recovery_factor: float = 0.5
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError(
                "steps ≥ 0, batch_size ≥ 1, log_every ≥ 1 and checkpoint_every ≥ 0 are required, got "
                f"{self.steps}, {self.batch_size}, {self.log_every}, {self.checkpoint_every}"
            )
        if not (self.lr > 0 and 0 < self.final_lr_fraction <= 1 and 0 < self.recovery_factor < 1):
            raise ValueError("lr > 0, 0 < final_lr_fraction ≤ 1 and 0 < recovery_factor < 1 are required")
        # An infinite lr passed ``lr > 0``: the first step made every weight NaN, and after the rollbacks
        # the run ended in a divergence error that advised a smaller sampler step.
        if not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive finite learning rate, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (Adam's β₁, β₂), got {self.betas}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError):
                raise ValueError(
                    "device must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1', "
                    f"got {self.device!r}"
                ) from None
        if self.max_lag is not None and not (self.max_lag > 0 and math.isfinite(self.max_lag)):
            raise ValueError(f"max_lag must be a positive finite energy or null, got {self.max_lag}")
        if not 0.0 <= self.lag_decay < 1.0:
            raise ValueError(f"lag_decay must lie in [0, 1), got {self.lag_decay}")
        # A negative clip norm would flip the gradient into ascent; a NaN one would pass every ``<`` test.
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive gradient norm or null, got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) or be null (no EMA), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.max_recoveries < 0:
            raise ValueError(f"max_recoveries must be ≥ 0, got {self.max_recoveries}")
        if not self.max_abs_energy > 0:  # NaN too: every |E| would then count as a divergence
            raise ValueError(f"max_abs_energy must be a positive energy, got {self.max_abs_energy}")


MetricsCallback = Callable[["Trainer", int, dict[str, float]], None]


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    recoveries: int = 0
    seconds: float = 0.0


def _wrong_entries(
    state: Mapping[str, Any], entries: Iterable[tuple[str, type | tuple[type, ...]]], rank: int | None = None
) -> list[str]:
    """What is missing from ``state`` or of the wrong type, among ``entries`` (key, type), in words."""
    missing = "" if rank is None else f" for rank {rank}"
    whose = "" if rank is None else f"rank {rank}'s "
    return [
        f"no {key!r} entry{missing}"
        if key not in state
        else f"{whose}{key!r} is a {type(state[key]).__name__}"
        for key, kind in entries
        if not isinstance(state.get(key), kind)
    ]


class Trainer:
    """Train ``energy`` on the rows of ``data`` with ``objective``.

    Args:
        energy: the model, already on the training device.
        objective: e.g. :class:`~ebm.losses.ContrastiveDivergence` (with its buffer on the same device).
        data: training set, shape ``(N, *event)``, or a tuple of tensors sharing their first dimension
            (``(images, labels)``); moved to the model's device once. Each step hands the objective a
            batch of the same structure.
        config: :class:`TrainConfig`.
        checkpoint_path: where checkpoints go; if the file exists, training resumes from it exactly.
        callbacks: called as ``callback(trainer, step, metrics)`` at every log step (side effects only;
            on rank 0 only under DDP).

    A resumed run may train longer or shorter than the run that wrote the checkpoint (``steps``); the
    learning-rate schedule keeps that run's length, which the checkpoint stores: past its end the rate
    holds at ``lr * final_lr_fraction``. The ``lr`` in the history is always the one the step used.

    Raises:
        ValueError: ``batch_size`` is not divisible by the number of data-parallel processes.
        CheckpointError: the file at ``checkpoint_path`` is no training checkpoint (a model file, or one
            with entries missing), or it was written by a different number of processes, on another
            type of device (cuda, cpu), or by a run with other training settings (anything but steps,
            device and reporting).
    """

    def __init__(
        self,
        energy: nn.Module,
        objective: Objective,
        data: Batch,
        config: TrainConfig,
        *,
        checkpoint_path: str | os.PathLike[str] | None = None,
        callbacks: Sequence[MetricsCallback] = (),
    ) -> None:
        self.energy = energy
        self.objective = objective
        self.config = config
        self.device = next(energy.parameters()).device
        self.data = (
            data.to(self.device) if isinstance(data, Tensor) else tuple(t.to(self.device) for t in data)
        )
        self.n_rows = self.data.shape[0] if isinstance(self.data, Tensor) else self.data[0].shape[0]
        if not isinstance(self.data, Tensor) and any(t.shape[0] != self.n_rows for t in self.data):
            raise ValueError(
                f"data tensors must share their first dimension, got {[t.shape for t in self.data]}"
            )
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.callbacks = list(callbacks)
        self.context = process_group_context()
        if config.batch_size % self.context.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the {self.context.world_size} "
                "data-parallel processes: each draws batch_size / world_size positives"
            )
        self.rank_batch_size = config.batch_size // self.context.world_size
        self.generator = torch.Generator(self.device).manual_seed(config.seed + self.context.rank)
        self.optimizer = torch.optim.Adam(
            energy.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        # The learning-rate schedule's length: the steps the run was started with, kept on resume.
        self.schedule_steps = config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = (
            AveragedModel(energy, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            if config.ema_decay is not None
            else None
        )
        self.step = 0
        self.recoveries = 0
        self.lag_average = 0.0  # the lag guard's average of E⁺ − E⁻
        self.history: list[dict[str, float]] = []
        self._last_good = self.state_dict()
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_state_dict(self._rank_state(load_checkpoint(self.checkpoint_path, self.device)))
            self._last_good = self.state_dict()
        # What the loss runs through: under DDP a wrapper whose backward averages the gradients over the
        # ranks (constructing it broadcasts rank 0's weights); otherwise the energy itself.
        self.loss_energy: nn.Module = energy
        if self.context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_energy = DistributedDataParallel(energy, device_ids=device_ids)

    @property
    def model(self) -> nn.Module:
        """The weights to evaluate and save: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.energy

    def _lr_factor(self, step: int) -> float:
        warmup, total = self.config.warmup_steps, self.schedule_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = self.config.final_lr_fraction
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def train_step(self) -> tuple[ObjectiveStats, Tensor]:
        """One optimiser step: positives, negatives and loss, divergence check, backward, clip, step, EMA.

        Raises:
            NonFiniteLossError: the loss or energies diverged (on any rank), before anything changed.
        """
        slots = torch.randint(
            self.n_rows, (self.rank_batch_size,), generator=self.generator, device=self.device
        )
        batch = self.data[slots] if isinstance(self.data, Tensor) else tuple(t[slots] for t in self.data)
        loss, stats = self._checked_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP this also averages the gradients over the ranks
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.energy.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            _update_ema(self.ema, self.energy)
        return stats, grad_norm

    def fit(self) -> TrainResult:
        """Train until ``config.steps``, checkpointing, logging and rolling back on divergence."""
        config = self.config
        quiet = not (config.progress and self.context.is_main)
        bar = tqdm(total=config.steps, initial=self.step, disable=quiet, desc="train", unit="step")
        start = time.perf_counter()
        while self.step < config.steps:
            log_now = self.step % config.log_every == 0 or self.step + 1 == config.steps
            # What this step uses, read before it: the step moves the lr on, and an adaptive sampler
            # (target_acceptance) its step size.
            settings = self._step_settings() if log_now else None
            try:
                stats, grad_norm = self.train_step()
                self._watch_lag(stats)
                checkpoint_due = config.checkpoint_every and (self.step + 1) % config.checkpoint_every == 0
                if checkpoint_due or self.step + 1 == config.steps:
                    self._check_weights()
            except (NonFiniteLossError, ChainsLagError) as err:
                self._recover(str(err), shrink_sampler=not isinstance(err, ChainsLagError))
                bar.n = self.step
                bar.refresh()
                continue
            metrics = self._metrics(stats, grad_norm, settings) if settings is not None else None
            self.step += 1
            bar.update(1)
            if metrics is not None:
                metrics["step"] = float(self.step)
                self.history.append(metrics)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("energy_pos", "energy_neg", "gap")})
                for callback in self.callbacks if self.context.is_main else ():
                    callback(self, self.step, metrics)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        return TrainResult(self.step, self.history, self.recoveries, time.perf_counter() - start)

    def _checked_loss(self, batch: Batch) -> tuple[Tensor, ObjectiveStats]:
        """The objective's loss, once every rank knows that it is finite and its energies bounded.

        Raises:
            NonFiniteLossError: on every rank if the loss or energies diverged on any; the decision is
                one all-reduce before the backward, since a rank that skipped it would leave the others
                waiting for its gradients forever.
        """
        failure: NonFiniteLossError | None = None
        try:
            loss, stats = self.objective(self.loss_energy, batch, generator=self.generator, step=self.step)
            self._check_energies(stats)
        except NonFiniteLossError as error:
            failure = error
        if self.context.any(failure is not None):
            raise failure or NonFiniteLossError(self.step, "loss or energies on another rank")
        return loss, stats

    def _step_settings(self) -> dict[str, float]:
        """The learning rate and sampler step size the next step will use."""
        settings = {"lr": float(self.optimizer.param_groups[0]["lr"])}
        objective_state = self.objective.state_dict()
        if "step_size" in objective_state:  # objectives without a sampler (exact ones) have none
            settings["sampler_step_size"] = float(objective_state["step_size"])
        return settings

    def _metrics(
        self, stats: ObjectiveStats, grad_norm: Tensor, settings: dict[str, float]
    ) -> dict[str, float]:
        """The step's diagnostics, with the ``settings`` read before it (:meth:`_step_settings`)."""
        metrics = stats.as_floats()
        metrics["param_grad_norm"] = float(grad_norm)
        metrics.update(settings)
        return self.context.mean(metrics)  # under DDP, over the ranks: the global batch's values

    def _check_energies(self, stats: ObjectiveStats) -> None:
        worst = float(torch.maximum(stats.energy_pos.abs(), stats.energy_neg.abs()))
        if not worst <= self.config.max_abs_energy:
            raise NonFiniteLossError(self.step, f"or exploding energies (|E| = {worst:.3g})")

    def _watch_lag(self, stats: ObjectiveStats) -> None:
        """The lag guard of :attr:`TrainConfig.max_lag` (one float per step; under DDP one vote)."""
        if self.config.max_lag is None:
            return
        decay, gap = self.config.lag_decay, float(stats.energy_pos - stats.energy_neg)
        self.lag_average = decay * self.lag_average + (1.0 - decay) * gap
        if self.context.any(self.lag_average < -self.config.max_lag):
            raise ChainsLagError(
                f"chains lagging the energy at step {self.step} (average E⁺ − E⁻ {self.lag_average:.3g} "
                f"below −max_lag = {-self.config.max_lag:g} on this or another rank)"
            )

    def _lag_healthy(self) -> bool:
        """Whether this state may be a rollback point: the lag guard is off, or the chains keep up (the
        average E⁺ − E⁻ is ≥ 0). A lag builds up over some hundred steps before it crosses −max_lag, and
        a rollback to a state already on the way there collapses again whatever the lr. Under DDP each
        rank has its own average, and the state is a rollback point only if it is on every rank (one
        vote), so that all ranks keep, and roll back to, the same step."""
        return self.config.max_lag is None or not self.context.any(self.lag_average < 0.0)

    def _check_weights(self) -> None:
        """Before weights are kept (checkpoint, end of training): a NaN model is never written."""
        finite = all(torch.isfinite(p).all() for p in self.energy.parameters())
        if self.context.any(not finite):
            raise NonFiniteLossError(self.step, "weights after the optimiser step")

    def _recover(self, reason: str, *, shrink_sampler: bool = True) -> None:
        self.recoveries += 1
        lagging = not shrink_sampler  # the lag guard: a shorter sampler step would lag more
        # A Gibbs sampler's moves have no length: shrinking its step changes nothing, so only the lr is.
        sampler = getattr(self.objective, "sampler", None)
        shrink_sampler = shrink_sampler and getattr(sampler, "uses_step_size", True)
        if self.recoveries > self.config.max_recoveries:
            if lagging:
                smaller = "learning rates"
                advice = (
                    "a smaller lr, or longer chains (loss n_steps, max_steps) that keep up with the energy"
                )
            elif shrink_sampler:
                smaller, advice = "steps", "a smaller lr or sampler step size, or a larger alpha"
            else:
                smaller, advice = "learning rates", "a smaller lr or smaller initial weights"
            raise TrainingDivergedError(
                f"training diverged ({reason}) and {self.config.max_recoveries} rollbacks with smaller "
                f"{smaller} did not help; last good state is step {self._last_good['step']}"
                + (f", saved at {self.checkpoint_path}" if self.checkpoint_path else "")
                + f". Try {advice}."
            )
        recoveries = self.recoveries
        self.load_state_dict(copy.deepcopy(self._last_good))
        self.recoveries = recoveries
        shrink = self.config.recovery_factor
        if shrink_sampler:
            self.objective.with_step_size(shrink)
        for group in self.optimizer.param_groups:
            group["lr"] *= shrink
        self.scheduler.base_lrs = [base * shrink for base in self.scheduler.base_lrs]
        # The shrunk step sizes become part of the last good state, so the next rollback shrinks them
        # once more whether or not a checkpoint was written in between.
        self._last_good = self.state_dict()
        if self.context.is_main:
            shrunk = "sampler step and lr" if shrink_sampler else "lr"
            tqdm.write(f"rolled back to step {self.step} after {reason}; {shrunk} × {shrink:g}")

    def save_checkpoint(self) -> None:
        """Write the whole training state atomically; diverged weights are never written.

        Under DDP every rank calls this at the same step: rank 0 gathers each rank's own part of the
        state (random streams, replay-buffer shard, sampler step size) and alone writes the file.
        """
        state = self.state_dict()
        assert_finite_state(state["energy"], "a checkpoint")
        healthy = self._lag_healthy()
        if healthy:
            self._last_good = state
        if self.checkpoint_path is None:
            return
        if not healthy and self.step < self.config.steps:
            # A restarted run resumes from the file and takes it as its rollback point: while the chains
            # lag, the file keeps the last good state, from which the restarted run replays exactly the
            # steps this one took. The finished state is written as it is: nothing rolls back to it.
            state = self._last_good
        if self.context.is_distributed:
            ranks = self.context.gather(_to_cpu({key: state[key] for key in _PER_RANK_STATE if key in state}))
            state = {key: value for key, value in state.items() if key not in _PER_RANK_STATE}
            state["ranks"] = ranks
        if self.context.is_main:
            save_checkpoint(self.checkpoint_path, state)

    def _rank_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """This rank's training state in a checkpoint: the shared state plus the rank's own part."""
        self._check_training_checkpoint(saved)
        self._check_same_run(saved)
        world_size = int(saved.get("world_size", 1))
        if world_size != self.context.world_size:
            raise CheckpointError(
                f"{self.checkpoint_path} was written by a run of {world_size} process(es) and this run has "
                f"{self.context.world_size}; every rank's random streams and replay-buffer shard are part of "
                "the state, so resume it with the same number of processes or delete it to start afresh"
            )
        if world_size == 1:
            state = saved
        else:
            shared = {key: value for key, value in saved.items() if key != "ranks"}
            state = shared | saved["ranks"][self.context.rank]
        self._check_same_device(state)
        return state

    def _check_training_checkpoint(self, saved: dict[str, Any]) -> None:
        """Refuse a file that is no training checkpoint before anything in it is compared or loaded.

        A model file (:func:`~ebm.checkpoint.save_model`, a detector) passed as the checkpoint path was
        taken for a checkpoint of another run, and one with an entry missing failed with a ``KeyError``.
        """
        if "kind" in saved:
            raise CheckpointError(
                f"{self.checkpoint_path} is not a training checkpoint (it is a model file of kind "
                f"{saved['kind']!r}, which holds weights, not a run's training state); pass the checkpoint "
                "path of a training run, or a path with no file to start afresh"
            )
        entries = list(_CHECKPOINT_ENTRIES.items())
        world_size = saved.get("world_size", 1)  # checkpoints from before DDP have none
        ranks: Any = []
        if type(world_size) is not int or world_size < 1:
            raise CheckpointError(
                f"{self.checkpoint_path} is not a training checkpoint "
                f"(its 'world_size' is {world_size!r:.100}, not a number of processes)"
            )
        if world_size == 1:
            entries += _RANK_ENTRIES.items()
        else:  # each rank's own state lies in "ranks"
            ranks = saved.get("ranks")
            if not (
                isinstance(ranks, list)
                and len(ranks) == world_size
                and all(isinstance(r, dict) for r in ranks)
            ):
                raise CheckpointError(
                    f"{self.checkpoint_path} is not a training checkpoint of a run of {world_size} "
                    f"processes: its 'ranks' entry is {ranks!r:.100}, not a list of each rank's state"
                )
        problems = _wrong_entries(saved, entries)
        for index, rank in enumerate(ranks):
            problems += _wrong_entries(rank, _RANK_ENTRIES.items(), rank=index)
        if problems:
            raise CheckpointError(
                f"{self.checkpoint_path} is not a training checkpoint ({'; '.join(problems)}; it holds "
                f"{sorted(map(str, saved))}); pass the checkpoint path of a training run, or a path with no "
                "file to start afresh"
            )

    def _check_same_device(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written on another type of device than this run's (cuda → cpu).

        The random streams are a device type's own: a CUDA generator's state (seed and offset, 16 bytes)
        cannot be set on a CPU generator (5056 bytes) nor the other way round, so such a run cannot
        continue exactly. Another device of the same type (``cuda:0`` → ``cuda``) is fine. Checkpoints
        from before the device type was stored tell it by their generator state's size.
        """
        saved_type = state.get("device_type")
        saved_size = state["generator"].numel()
        if saved_type in (None, self.device.type) and saved_size == self.generator.get_state().numel():
            return
        if saved_type in (None, self.device.type):  # not stored, or not what the generator state says
            config = state.get("config")
            named = config.get("device") if isinstance(config, dict) else None
            if saved_size == torch.Generator().get_state().numel():
                saved_type = "cpu"
            elif "cuda_rng" in state:
                saved_type = "cuda"
            elif isinstance(named, str) and named not in ("auto", "cpu"):
                saved_type = str(named).partition(":")[0]
            else:
                saved_type = None
        written_on = f"a {saved_type!r} device" if saved_type is not None else "another type of device"
        raise CheckpointError(
            f"{self.checkpoint_path} was written by a run on {written_on} and this run is on "
            f"{self.device.type!r}; the random streams are part of the state and each type "
            "of device has its own, so a run resumes exactly only on the same kind of device: set "
            "train.device to match (on a machine that has one), or pass another checkpoint path (or "
            "delete it) to start afresh"
        )

    def _check_same_run(self, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint another run wrote: one with other training settings than this run's.

        Only what a resumed run may change is left out: how long it runs (``steps``: train N, resume to
        2N), where (``device``) and how it reports (``progress``, ``log_every``, ``checkpoint_every``).
        Anything else, a seed or a learning rate, would continue another run under this one's name.
        """
        before = saved.get("config")
        if not isinstance(before, dict):
            return
        now = asdict(self.config)
        differing = sorted(
            key
            for key in now.keys() | before.keys()
            if key not in _RESUMABLE_CHANGES and _plain(before.get(key)) != _plain(now.get(key))
        )
        if differing:
            changes = ", ".join(f"{key} {before.get(key)!r} → {now.get(key)!r}" for key in differing)
            raise CheckpointError(
                f"{self.checkpoint_path} was written by another run (its {changes}); resume it with the "
                "same training settings, or pass another checkpoint path (or delete it) to start afresh"
            )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "schedule_steps": self.schedule_steps,
            "device_type": self.device.type,
            "world_size": self.context.world_size,
            "recoveries": self.recoveries,
            "lag_average": self.lag_average,
            "config": asdict(self.config),
            "energy": self.energy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The run's own schedule length; checkpoints from before it was stored: the steps of the run that
        # wrote them, whose schedule set the learning rate the optimizer state holds.
        config = state.get("config")
        started_with = (
            config.get("steps", self.config.steps) if isinstance(config, dict) else self.config.steps
        )
        schedule_steps = state.get("schedule_steps")
        self.schedule_steps = int(schedule_steps if schedule_steps is not None else started_with)
        self.energy.load_state_dict(state["energy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint has no EMA weights but this run keeps an EMA")
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.recoveries = int(state["recoveries"])
        self.lag_average = float(state.get("lag_average", 0.0))  # older checkpoints have none
        self.history = list(state["history"])


def _update_ema(ema: AveragedModel, energy: nn.Module) -> None:
    """Average ``energy``'s weights into ``ema``, keeping the EMA's spectral norms its own.

    :class:`~torch.optim.swa_utils.AveragedModel` with ``use_buffers`` averages every buffer, spectral
    norm's power-iteration vectors u, v among them; an average of unit vectors is no unit vector, and in
    eval mode spectral norm divides by σ = uᵀ W v as they stand, so the EMA model came out mis-scaled
    (energies two orders of magnitude off the live model's). Those vectors are kept out of the average:
    after it, each takes back the EMA model's own u, v and one power-iteration step on the averaged
    weight, what a training-mode forward of the EMA model would do. They are buffers of the EMA model, so a
    checkpoint restores them and a resumed run continues exactly. Models without spectral norm: a plain
    ``update_parameters``.
    """
    norms = _spectral_norms(ema.module)
    own = [(u.clone(), v.clone()) for u, v, _ in norms]
    ema.update_parameters(energy)
    with torch.no_grad():
        for (u, v, power_step), (own_u, own_v) in zip(norms, own, strict=True):
            u.copy_(own_u)
            v.copy_(own_v)
            power_step()


def _spectral_norms(module: nn.Module) -> list[tuple[Tensor, Tensor, Callable[[], None]]]:
    """Every spectral norm in ``module``: its u and v buffers, and a power-iteration step on its current
    weight (in place). Both :func:`torch.nn.utils.parametrizations.spectral_norm` and the older
    hook-based :func:`torch.nn.utils.spectral_norm` are found."""
    found: list[tuple[Tensor, Tensor, Callable[[], None]]] = []
    for child in module.modules():
        if parametrize.is_parametrized(child):
            for entry in cast(nn.ModuleDict, child.parametrizations).values():
                chain = cast(parametrize.ParametrizationList, entry)
                for index, norm in enumerate(chain):
                    if isinstance(norm, _SpectralNorm) and hasattr(norm, "_u"):  # 1-D weights have none
                        found.append(
                            (
                                cast(Tensor, norm._u),
                                cast(Tensor, norm._v),
                                functools.partial(_parametrized_power_step, chain, index),
                            )
                        )
        for hook in child._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNorm):
                found.append(
                    (
                        cast(Tensor, getattr(child, hook.name + "_u")),
                        cast(Tensor, getattr(child, hook.name + "_v")),
                        functools.partial(_legacy_power_step, child, hook),
                    )
                )
    return found


def _parametrized_power_step(chain: parametrize.ParametrizationList, index: int) -> None:
    norm = cast(_SpectralNorm, chain[index])
    weight = chain.original
    for earlier in list(chain)[:index]:  # the spectral norm sees what the parametrizations before it give
        weight = earlier(weight)
    norm._power_method(norm._reshape_weight_to_matrix(weight), norm.n_power_iterations)


def _legacy_power_step(module: nn.Module, hook: LegacySpectralNorm) -> None:
    weight = hook.reshape_weight_to_matrix(getattr(module, hook.name + "_orig"))
    u, v = getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v")
    for _ in range(hook.n_power_iterations):
        v.copy_(nn.functional.normalize(torch.mv(weight.t(), u), dim=0, eps=hook.eps))
        u.copy_(nn.functional.normalize(torch.mv(weight, v), dim=0, eps=hook.eps))


def _to_cpu(state: Any) -> Any:
    """``state`` (nested dicts, lists and tuples) with every tensor on the CPU, to send it between ranks."""
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(value) for value in state)
    return state
