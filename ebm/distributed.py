"""Data-parallel training across processes: the launcher's environment in, one small context out.

``torchrun`` starts one process per rank and tells each who it is through ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_env` reads them and joins the
process group (NCCL with one GPU per process, ``cuda:LOCAL_RANK``, or gloo on CPU); run without
``torchrun`` (or with one process) it joins nothing and returns the single-process context, so the same
entry point serves both. :class:`~ebm.trainer.Trainer` asks :func:`process_group_context` whether a
group is up and, if so, trains under :class:`~torch.nn.parallel.DistributedDataParallel`.

Every collective here must be called by every rank in the same order, or the ranks deadlock; the
trainer only calls them at points all ranks reach together (every step, log steps, checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in a data-parallel run; the default is a single process.

    Attributes:
        rank: this process's index among all processes, 0 ≤ rank < world_size.
        world_size: how many processes train together.
        local_rank: this process's index on its machine (picks its GPU).
        device: the device the launcher gave this rank (``cuda:LOCAL_RANK`` or cpu); ``None`` for a
            single process, whose device comes from its own configuration.
        backend: ``"nccl"`` or ``"gloo"``; ``None`` without a process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank {self.rank} of {self.world_size}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and talks to MLflow."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank: one decision every rank takes together."""
        if not self.is_distributed:
            return flag
        votes = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return bool(votes.item() > 0)

    def mean(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Average float metrics over the ranks (one all-reduce), e.g. per-rank batch means for logging.

        Every rank must pass the same keys.
        """
        if not self.is_distributed:
            return dict(metrics)
        names = sorted(metrics)
        values = torch.tensor([metrics[name] for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(names, (values / self.world_size).tolist(), strict=True))

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's picklable ``value``, in rank order, on rank 0; ``None`` on the other ranks."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.is_distributed:
            dist.barrier()

    def destroy(self) -> None:
        """Leave the process group (a no-op for a single process)."""
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str = "auto", *, environ: Mapping[str, str] | None = None) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if there is one.

    With ``WORLD_SIZE > 1`` this initialises the default process group from the ``env://`` variables:
    NCCL with ``cuda:LOCAL_RANK`` (also made the current CUDA device) when ``device`` is ``"cuda"``, or
    ``"auto"`` with CUDA available; gloo on CPU otherwise. Without those variables it returns the
    single-process context and initialises nothing.

    Args:
        device: the run's configured device (``"auto"``, ``"cpu"``, ``"cuda"``, ...).
        environ: where to read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (default ``os.environ``). The
            rendezvous itself is torch's ``env://``, which reads ``MASTER_ADDR`` and ``MASTER_PORT`` from
            ``os.environ`` only (under ``torchrun`` it joins the launcher's store there).

    Raises:
        ValueError: a device with an explicit index under ``torchrun`` (each rank takes its own GPU).
    """
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if device not in ("auto", "cuda"):
            raise ValueError(
                f"under torchrun every rank takes cuda:LOCAL_RANK; set the device to 'cuda' or 'auto', "
                f"not {device!r}"
            )
        torch.cuda.set_device(local_rank)
        context = DistributedContext(rank, world_size, local_rank, torch.device("cuda", local_rank), "nccl")
    else:
        context = DistributedContext(rank, world_size, local_rank, torch.device("cpu"), "gloo")
    if not dist.is_initialized():
        dist.init_process_group(context.backend, rank=rank, world_size=world_size)
    return context


def process_group_context() -> DistributedContext:
    """The context of the process group this process has already joined; single-process if none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistributedContext()
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        device=device,
        backend=backend,
    )
