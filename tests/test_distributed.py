"""Data parallelism: two gloo processes on CPU train like one process with the same global batch.

One fixture spawns two ranks on a free loopback port, as ``torchrun`` would describe them in the
environment, and runs six short jobs in them: the 2D recipe on moons (for the comparison with one
process), an interrupted and resumed run, a run whose loss diverges on one rank only, one whose loss
turns NaN on one rank inside an objective that runs a collective (the chain-length controller), a
chain-length controller fed a different gap on each rank, and the train stage's entry point with
MLflow. Each rank saves what it saw; the tests compare.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing
import yaml
from objectives import WrappedObjective
from torch import Tensor, nn

import ebm.stages.toy
from ebm.checkpoint import CheckpointError, load_checkpoint, load_model
from ebm.config import to_dict
from ebm.data.toy2d import make_toy_dataset
from ebm.distributed import DistributedContext, init_from_env
from ebm.energies import MLPEnergy, MLPEnergyConfig, seed_linear_layers_
from ebm.evaluation.density2d import grid_log_partition, nll
from ebm.losses import CDConfig, CDStats, ContrastiveDivergence, NonFiniteLossError
from ebm.samplers import MALA, ReplayBuffer, SamplerConfig, SamplerStats, UniformBox
from ebm.stages.toy import ToyParams, ToyPaths
from ebm.toy import PolishConfig, Toy2DConfig, train_energy
from ebm.trainer import Objective, TrainConfig, Trainer

# One spawn of the ranks serves every test here: keep them on one xdist worker (`make test` runs
# `--dist loadgroup`); the fixture also makes sure that there is one spawn when they are not.
pytestmark = pytest.mark.xdist_group("ddp")

WORLD_SIZE = 2
JOIN_TIMEOUT_S = 300  # a deadlocked collective would otherwise hang the test run

# The 2D recipe at the settings of configs/quick.yaml (written out, so that the calibration below stays
# put) with a 4× larger batch, 256 positives per rank, for 300 steps: long enough to gain ≈ 1.1 nats of
# test NLL over the untrained model, and the larger batch narrows the seed-to-seed spread of that NLL,
# against which the two-rank run is compared.
RECIPE = Toy2DConfig(
    model=MLPEnergyConfig(in_features=2, widths=(32, 32)),
    sampler=SamplerConfig(name="mala", step_size=0.05),
    loss=CDConfig(n_steps=5, offset_weight=1.0, buffer_size=1000, reinit_prob=0.05),
    train=TrainConfig(
        steps=300,
        batch_size=512,
        lr=3e-3,
        warmup_steps=10,
        final_lr_fraction=0.05,
        ema_decay=0.99,
        checkpoint_every=0,
        log_every=50,
        device="cpu",
        progress=False,
    ),
    polish=PolishConfig(steps=20, resolution=64, batch_size=512),  # the ranks average its gradient too
)
RESUME_FROM_STEP, RESUME_TOTAL_STEPS = 8, 16


def moons_split() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    dataset = make_toy_dataset("moons")
    return dataset.sample(2000, generator=generator), dataset.sample(2000, generator=generator)


def moons_nll(energy: nn.Module, x_test: Tensor) -> float:
    """Exact test NLL, log Z by quadrature on a 256² grid (the same grid for every model compared)."""
    return nll(energy, x_test, grid_log_partition(energy, make_toy_dataset("moons").bounds, 256))


# --- what each rank runs ---------------------------------------------------------------------------


def small_objective(rank: int) -> ContrastiveDivergence:
    """PCD with MALA and an adapted step size; each rank's buffer starts from its own noise."""
    generator = torch.Generator().manual_seed(100 + rank)
    buffer = ReplayBuffer(64, UniformBox((2,), -3.0, 3.0), generator=generator)
    return ContrastiveDivergence(MALA(0.05), n_steps=3, alpha=0.1, buffer=buffer, target_acceptance=0.6)


def small_trainer(
    rank: int,
    checkpoint_path: Path | None = None,
    *,
    objective: Objective | None = None,
    steps: int = RESUME_TOTAL_STEPS,
) -> Trainer:
    """A small run with an EMA and a warm-up: every kind of state the trainer keeps."""
    energy = seed_linear_layers_(
        MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16))), generator=torch.Generator().manual_seed(0)
    )
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
    config = TrainConfig(
        steps=steps,
        batch_size=32,
        lr=5e-3,
        warmup_steps=4,
        ema_decay=0.9,
        checkpoint_every=4,
        log_every=1,
        seed=7,
        device="cpu",
        progress=False,
    )
    objective = objective or small_objective(rank)
    return Trainer(energy, objective, data, config, checkpoint_path=checkpoint_path)


class DivergesOnce(WrappedObjective):
    """Contrastive divergence whose loss is found non-finite once, at ``step``, after its forward pass."""

    def __init__(self, inner: ContrastiveDivergence, *, step: int) -> None:
        super().__init__(inner)
        self.step, self.pending = step, True

    def __call__(
        self,
        energy: nn.Module,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, CDStats]:
        loss, stats = self.inner(energy, x, generator=generator, step=step)
        if self.pending and step == self.step:
            self.pending = False
            raise NonFiniteLossError(step, "contrastive-divergence loss")
        return loss, stats


def train_recipe_on_moons() -> dict[str, Any]:
    x_train, _ = moons_split()
    shares: dict[str, int] = {}

    def note_this_ranks_share(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if any(name.startswith("polish/") for name in metrics):
            return  # the polish after PCD: no buffer to share
        assert isinstance(trainer.objective, ContrastiveDivergence) and trainer.objective.buffer is not None
        shares.update(batch=trainer.rank_batch_size, buffer=trainer.objective.buffer.capacity)

    model, result = train_energy(
        x_train, RECIPE, bounds=make_toy_dataset("moons").bounds, callbacks=[note_this_ranks_share]
    )
    return {"model": model.state_dict(), "history": result.history, "shares": shares}


def interrupt_and_resume(rank: int, folder: Path) -> dict[str, Any]:
    """A full run, and a second one resumed from the first one's checkpoint at ``RESUME_FROM_STEP``."""
    full_path, interrupted_path = folder / "full.ckpt", folder / "interrupted.ckpt"

    def keep_checkpoint_at_resume_step(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step == RESUME_FROM_STEP + 1:  # callbacks run before the checkpoint of their own step
            shutil.copyfile(full_path, interrupted_path)

    full = small_trainer(rank, full_path)
    full.callbacks = [keep_checkpoint_at_resume_step]
    full.fit()
    resumed = small_trainer(rank, interrupted_path)
    resumed_from = resumed.step
    resumed.fit()
    return {"full": full.state_dict(), "resumed": resumed.state_dict(), "resumed_from": resumed_from}


def diverge_on_one_rank(rank: int) -> dict[str, Any]:
    """Rank 1's loss diverges at step 6 (after the checkpoint at 4); rank 0's does not."""
    objective: Objective = small_objective(rank)
    if rank == 1:
        objective = DivergesOnce(small_objective(rank), step=6)
    trainer = small_trainer(rank, objective=objective, steps=12)
    result = trainer.fit()
    return {"energy": trainer.energy.state_dict(), "recoveries": result.recoveries, "steps": result.steps}


class NaNOnce(nn.Module):
    """``inner``'s energies, NaN in its ``at``-th training-mode forward (counting from 0) if ``at`` is set.

    The trainer runs one training-mode forward per step, the loss's (the chains run in eval mode), so
    the loss turns NaN inside the objective at step ``at``, once.
    """

    def __init__(self, inner: nn.Module, at: int | None) -> None:
        super().__init__()
        self.inner, self.at, self.forwards = inner, at, 0

    def forward(self, x: Tensor) -> Tensor:
        energies = self.inner(x)
        if self.training:
            self.forwards += 1
            if self.at is not None and self.forwards == self.at + 1:
                return energies * torch.nan
        return energies


def diverge_inside_an_adaptive_objective(rank: int) -> dict[str, Any]:
    """Rank 1's loss turns NaN inside the objective at step 6 while ``max_steps`` adapts the chain length,
    which takes an all-reduce in the objective: rank 1 must join it before it raises, or it meets the
    other rank's all-reduce in the trainer's vote and the process group aborts."""
    energy = NaNOnce(
        seed_linear_layers_(
            MLPEnergy(MLPEnergyConfig(in_features=2, widths=(8,))), generator=torch.Generator().manual_seed(0)
        ),
        at=6 if rank == 1 else None,
    )
    buffer = ReplayBuffer(
        64, UniformBox((2,), -3.0, 3.0), generator=torch.Generator().manual_seed(100 + rank)
    )
    objective = ContrastiveDivergence(MALA(0.05), n_steps=2, max_steps=6, alpha=0.1, buffer=buffer)
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
    config = TrainConfig(steps=10, batch_size=32, checkpoint_every=4, device="cpu", progress=False)
    result = Trainer(energy, objective, data, config).fit()
    return {
        "energy": energy.inner.state_dict(),
        "recoveries": result.recoveries,
        "steps": result.steps,
        "objective": {key: objective.state_dict()[key] for key in ("n_steps", "gap_average", "step_size")},
    }


def run_train_stage(rank: int, params_file: Path, root: Path, writers: Path) -> None:
    """``python -m ebm.stages.toy train`` as ``torchrun`` runs it, noting which ranks write a model file."""
    save_model = ebm.stages.toy.save_model

    def noting_save_model(*args: Any, **kwargs: Any) -> Path:
        (writers / f"rank{rank}").touch()
        return save_model(*args, **kwargs)

    ebm.stages.toy.save_model = noting_save_model  # this process only
    ebm.stages.toy.main(["train", "--params", str(params_file), "--root", str(root)])


class ShiftedNegatives:
    """A sampler whose negatives sit ``offset`` from where they start; notes each chain length asked."""

    def __init__(self, offset: float) -> None:
        self.offset, self.step_size, self.lengths = offset, 0.1, []

    def run(
        self, energy: Any, x0: Tensor, n_steps: int, *, generator: Any = None
    ) -> tuple[Tensor, SamplerStats]:
        self.lengths.append(n_steps)
        zero = torch.zeros(())
        return x0 + self.offset, SamplerStats(grad_norm=zero, acceptance_rate=zero, final_energy=zero)


def controller_lengths(rank: int) -> list[int]:
    """Chain lengths of a ``max_steps`` controller whose negatives lag on rank 0 only (E⁺ − E⁻ = −9
    there, 0 on rank 1): one process seeing both halves of the batch would grow its chains."""
    from ebm.energies import GaussianEnergy

    sampler = ShiftedNegatives(offset=3.0 if rank == 0 else 0.0)
    cd = ContrastiveDivergence(sampler, n_steps=4, max_steps=9, lag_threshold=0.5, lag_decay=0.5)  # type: ignore[arg-type]
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2))
    for _ in range(8):
        cd(energy, torch.zeros(32, 2))
    return sampler.lengths


def become_rank(rank: int, port: int, tracking_uri: str) -> None:
    """Give this spawned process torchrun's environment for ``rank`` of :data:`WORLD_SIZE` on loopback."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MLFLOW_TRACKING_URI=tracking_uri,
    )
    torch.set_num_threads(1)


def rank_worker(rank: int, port: int, folder: str, tracking_uri: str) -> None:
    become_rank(rank, port, tracking_uri)
    out = Path(folder)
    context = init_from_env("cpu")
    assert (context.rank, context.world_size, context.backend) == (rank, WORLD_SIZE, "gloo")
    results = {
        "moons": train_recipe_on_moons(),
        "resume": interrupt_and_resume(rank, out),
        "divergence": diverge_on_one_rank(rank),
        "adaptive_divergence": diverge_inside_an_adaptive_objective(rank),
        "controller": controller_lengths(rank),
        "mean": context.mean({"rank": float(rank), "one": 1.0}),  # the logged metrics' reduction
    }
    run_train_stage(rank, out / "params.yaml", out / "project", out / "writers")  # leaves the group
    torch.save(results, out / f"rank{rank}.pt")


# --- the spawned run and the single-process reference ----------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_stage_project(folder: Path) -> None:
    """A project with the moons data prepared and a params file for a short train stage."""
    recipe = dataclasses.replace(RECIPE, train=dataclasses.replace(RECIPE.train, steps=20, log_every=5))
    toy = {"datasets": ["moons"], "n_train": 500, "n_test": 500, **to_dict(recipe)}
    (folder / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "toy": toy}))
    (folder / "writers").mkdir()
    params = ToyParams.from_params(yaml.safe_load((folder / "params.yaml").read_text()))
    ebm.stages.toy.prepare(params, ToyPaths(folder / "project"))


def join_ranks(worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Run ``worker(rank, *args)`` on ``WORLD_SIZE`` spawned processes and wait for all of them.

    Fails the test, with the rank's traceback, if a rank raised, and kills the ranks if they outlast
    ``JOIN_TIMEOUT_S`` (a collective that one rank never reached).
    """
    processes = torch.multiprocessing.spawn(worker, args=args, nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not processes.join(timeout=5):  # raises, with the rank's traceback, if a rank failed
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {JOIN_TIMEOUT_S} s: a collective deadlocked?")


def spawn_ranks(folder: Path, mlflow_template_db: Path) -> None:
    """Run :func:`rank_worker` on two spawned ranks, which save what they saw in ``folder``."""
    write_stage_project(folder)
    shutil.copyfile(mlflow_template_db, folder / "mlflow.db")
    join_ranks(rank_worker, (free_port(), str(folder), f"sqlite:///{folder / 'mlflow.db'}"))


def once_per_session(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]
) -> Path:
    """The folder ``name`` that ``make(folder)`` filled, made once per test session.

    A module's tests are one xdist group, but with pytest 9 xdist 3.8 no longer keeps a group on one
    worker, so they can land on both: the first worker to get here makes the folder while the other
    waits on the lock, then reads the same folder (the xdist recipe for once-per-session fixtures).
    """
    base = tmp_path_factory.getbasetemp()
    under_xdist = "PYTEST_XDIST_WORKER" in os.environ
    shared = base.parent if under_xdist else base  # the parent is the whole xdist session's
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed try left
            folder.mkdir()
            make(folder)
            (folder / "done").touch()
    return folder


@pytest.fixture(scope="session")
def ranks(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The folder of one two-rank run, made once per test session."""
    template = request.getfixturevalue("mlflow_template_db")
    return once_per_session(tmp_path_factory, "ddp", lambda folder: spawn_ranks(folder, template))


def rank_results(folder: Path) -> list[dict[str, Any]]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested dicts, lists, tensors and plain values."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for index, (item_a, item_b) in enumerate(zip(a, b, strict=True)):
            assert_same(item_a, item_b, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ranks_keep_identical_weights(ranks: Path) -> None:
    first, second = rank_results(ranks)
    assert_same(first["moons"]["model"], second["moons"]["model"], "moons model")
    assert_same(first["moons"]["history"], second["moons"]["history"], "logged metrics")  # rank means
    assert_same(first["resume"]["full"]["energy"], second["resume"]["full"]["energy"], "energy")
    assert_same(first["resume"]["full"]["ema"], second["resume"]["full"]["ema"], "EMA")
    assert_same(first["resume"]["full"]["optimizer"], second["resume"]["full"]["optimizer"], "optimizer")


@pytest.mark.slow
def test_every_rank_runs_the_chain_length_of_the_ranks_average_gap(ranks: Path) -> None:
    first, second = rank_results(ranks)
    # mean gap −4.5 on both ranks: past the dead band from the first step, +1 per step up to 9
    assert first["controller"] == second["controller"] == [4, 5, 6, 7, 8, 9, 9, 9]


def test_every_rank_logs_the_mean_over_the_ranks_not_the_sum(ranks: Path) -> None:
    first, second = rank_results(ranks)
    assert first["mean"] == second["mean"] == {"rank": 0.5, "one": 1.0}


@pytest.mark.slow
def test_each_rank_takes_its_share_of_the_batch_and_the_replay_buffer(ranks: Path) -> None:
    first, second = rank_results(ranks)
    assert first["moons"]["shares"] == {"batch": 512 // WORLD_SIZE, "buffer": 1000 // WORLD_SIZE}
    assert second["moons"]["shares"] == {}  # callbacks run on rank 0 only


@pytest.mark.slow
def test_two_ranks_learn_the_density_one_process_learns(ranks: Path) -> None:
    x_train, x_test = moons_split()
    model = MLPEnergy(RECIPE.model)
    model.load_state_dict(rank_results(ranks)[0]["moons"]["model"])
    single, _ = train_energy(x_train, RECIPE, bounds=make_toy_dataset("moons").bounds)
    untrained = seed_linear_layers_(MLPEnergy(RECIPE.model), generator=torch.Generator().manual_seed(0))

    nll_ddp, nll_single = moons_nll(model, x_test), moons_nll(single, x_test)
    nll_untrained = moons_nll(untrained, x_test)

    print(f"test NLL: two ranks {nll_ddp:.4f}, one process {nll_single:.4f}, untrained {nll_untrained:.4f}")
    # The two runs see the same global batch of 512 but different random numbers (each rank draws its
    # positives, buffer chains and MALA noise from its own stream), so they can agree only in
    # distribution, as two seeds of one process do. Over 8 seeds of one process this recipe's test NLL
    # has σ = 0.027 nats, and no two seeds differ by more than 0.09; 0.1 nats allows as much, and is a
    # tenth of what training gains over the untrained model.
    assert nll_ddp == pytest.approx(nll_single, abs=0.1)
    assert nll_untrained - nll_ddp > 0.8


@pytest.mark.slow
def test_a_checkpoint_resumes_exactly_on_every_rank(ranks: Path) -> None:
    for rank, result in enumerate(rank_results(ranks)):
        assert result["resume"]["resumed_from"] == RESUME_FROM_STEP
        assert_same(result["resume"]["full"], result["resume"]["resumed"], f"rank {rank}")


@pytest.mark.slow
def test_the_checkpoint_holds_every_ranks_own_streams_and_buffer_shard(ranks: Path) -> None:
    saved = load_checkpoint(ranks / "full.ckpt")
    assert saved["world_size"] == WORLD_SIZE and saved["step"] == RESUME_TOTAL_STEPS
    assert not {"objective", "generator", "torch_rng"} & set(saved)  # per rank, under "ranks"
    first, second = saved["ranks"]
    assert not torch.equal(first["generator"], second["generator"])
    assert not torch.equal(first["objective"]["buffer"]["states"], second["objective"]["buffer"]["states"])


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_fails_clearly(ranks: Path) -> None:
    with pytest.raises(CheckpointError, match=r"written by a run of 2 process\(es\) and this run has 1"):
        small_trainer(0, ranks / "full.ckpt")


@pytest.mark.slow
def test_a_divergence_on_one_rank_rolls_every_rank_back(ranks: Path) -> None:
    first, second = (result["divergence"] for result in rank_results(ranks))
    assert first["recoveries"] == second["recoveries"] == 1
    assert first["steps"] == second["steps"] == 12
    assert_same(first["energy"], second["energy"], "energy after the rollback")


@pytest.mark.slow
def test_a_nan_inside_an_objective_with_a_collective_rolls_every_rank_back(ranks: Path) -> None:
    first, second = (result["adaptive_divergence"] for result in rank_results(ranks))
    assert first["recoveries"] == second["recoveries"] == 1
    assert first["steps"] == second["steps"] == 10
    assert_same(first["energy"], second["energy"], "energy after the rollback")
    # the chain-length controller averaged over both ranks, and the rollback restored it on both
    assert first["objective"]["n_steps"] == second["objective"]["n_steps"]
    assert first["objective"]["gap_average"] == second["objective"]["gap_average"]


@pytest.mark.slow
def test_the_train_stage_writes_and_logs_on_rank_zero_only(ranks: Path) -> None:
    project = ranks / "project"
    assert sorted(path.name for path in (ranks / "writers").iterdir()) == ["rank0"]
    assert [path.name for path in (project / "models" / "toy").iterdir()] == ["moons.pt"]
    assert load_model(project / "models" / "toy" / "moons.pt")(torch.zeros(3, 2)).shape == (3,)
    assert (project / "reports" / "toy" / "train.json").is_file()
    assert not list((project / "checkpoints" / "toy").glob("*.ckpt"))  # removed once the model is out
    with sqlite3.connect(ranks / "mlflow.db") as db:
        (stage_runs,) = db.execute("SELECT COUNT(*) FROM runs WHERE name = 'train_toy'").fetchone()
    assert stage_runs == 1


def test_without_torchrun_there_is_one_process_and_no_process_group() -> None:
    context = init_from_env("cpu", environ={})
    assert context == DistributedContext() and context.is_main and not context.is_distributed
    assert not torch.distributed.is_initialized()
    assert context.any(True) and not context.any(False)
    assert context.mean({"gap": 0.5}) == {"gap": 0.5} and context.gather(3) == [3]
    trainer = small_trainer(0)
    assert trainer.loss_energy is trainer.energy and trainer.rank_batch_size == 32


def test_a_replay_buffer_that_does_not_split_evenly_over_the_ranks_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # before: 255 chains over 2 ranks silently became 2 × 127, and 1 chain over 2 ranks failed as
    # "buffer_size must be ≥ 1, got 0", a value nobody had set
    import ebm.toy

    monkeypatch.setattr(ebm.toy, "process_group_context", lambda: DistributedContext(rank=0, world_size=2))
    config = Toy2DConfig()
    for size in (255, 1):
        odd = dataclasses.replace(config, loss=dataclasses.replace(config.loss, buffer_size=size))
        with pytest.raises(ValueError, match=f"loss.buffer_size {size} must be divisible by the 2"):
            train_energy(torch.zeros(10, 2), odd, bounds=(-4.0, 4.0))


@pytest.mark.parametrize(
    ("family", "stage"),
    [
        ("toy", "evaluate"),
        ("images", "evaluate"),
        ("images", "render"),
        ("anomaly", "train"),
        ("boltzmann", "train_rbm"),
    ],
)
def test_stages_that_join_no_process_group_refuse_torchrun(
    family: str,
    stage: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # before: each of torchrun's processes ran the whole stage, wrote the same outs and logged its own run
    import importlib

    stages = importlib.import_module(f"ebm.stages.{family}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exited:
        stages.main([stage, "--root", str(tmp_path)])
    assert exited.value.code == 2 and "not under torchrun (2 processes)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
