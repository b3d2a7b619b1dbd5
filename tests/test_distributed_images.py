"""The image train stage under ``torchrun``: two gloo CPU ranks train JEM and its classifier as one process.

One fixture writes a tiny MNIST-format copy (ten classes, each a bright horizontal band at its own
height, over dim pixel noise), prepares it with the stage's own ``prepare``, and spawns two ranks as
``torchrun`` would describe them in the environment. Each rank runs an interrupted and resumed JEM run,
then ``python -m ebm.stages.images train`` with MLflow, and saves what it saw; the tests compare the
ranks with each other and rank 0's models with a one-process run of the same stage.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from paramfiles import quick_params
from test_distributed import (
    WORLD_SIZE,
    assert_same,
    become_rank,
    free_port,
    join_ranks,
    once_per_session,
)
from test_images_data import write_idx
from torch import Tensor

import ebm.stages.images
from ebm.checkpoint import load_model
from ebm.data.images import load_image_split
from ebm.distributed import DistributedContext, init_from_env
from ebm.evaluation.images import accuracy
from ebm.image_energies import ImageEnergy
from ebm.images import ImageRecipe, buffer_states, rank_share, train_image_energy
from ebm.stages.images import ImagePaths, ImagesParams, prepare, train
from ebm.trainer import Trainer

pytestmark = pytest.mark.xdist_group("ddp_images")

N_TRAIN, N_TEST, N_CLASSES = 400, 200, 10
RESUME_FROM_STEP = 4


def banded_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(n, 28, 28)`` images whose class k is a bright band on rows 2k + 4 and 2k + 5."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for row in (0, 1):
        images[np.arange(n), 2 * labels + 4 + row] += 180
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_banded_copy(folder: Path) -> None:
    """The four IDX files of an MNIST-family copy, as the prepare stage reads them."""
    folder.mkdir(parents=True)
    train_images, train_labels = banded_digits(N_TRAIN, seed=0)
    test_images, test_labels = banded_digits(N_TEST, seed=1)
    for name, array in (
        ("train-images-idx3-ubyte", train_images),
        ("train-labels-idx1-ubyte", train_labels),
        ("t10k-images-idx3-ubyte", test_images),
        ("t10k-labels-idx1-ubyte", test_labels),
    ):
        write_idx(folder / name, array, compress=True)


def stage_params(copy_dir: Path) -> dict[str, Any]:
    """``configs/quick.yaml`` on the banded copy, trained until every seed of one process classifies the
    test images (a generative weight of 0.3 lets the small CNN get there in 150 steps; at 1.0 some seeds
    did not), with 16 of the 32 positives a step run as chains. The JEM run checkpoints mid-way (a
    gather on every rank) and writes a buffer grid (on rank 0) between its steps' collectives."""
    raw = quick_params()
    images = raw["images"]
    images["data"].update(local_copy=str(copy_dir), n_validation=50, max_train=None, max_test=None)
    images["model"].update(channels=[8, 16, 16, 32], hidden=32)
    images["loss"].update(n_steps=5, buffer_size=64)
    images["jem"].update(generative_batch=16, generative_weight=0.3)
    images["train"].update(
        steps=150, batch_size=32, lr=1e-3, checkpoint_every=75, log_every=5, device="cpu", progress=False
    )
    images["grid_every"] = 75
    images["classifier"].update(steps=60, batch_size=32, lr=3e-3)
    return raw


# --- what each rank runs ---------------------------------------------------------------------------


def interrupt_and_resume(recipe: ImageRecipe, params: ImagesParams, folder: Path) -> dict[str, Any]:
    """A short JEM run checkpointing every 2 steps, and one resumed from its checkpoint at step 4."""
    split = load_image_split(folder / "project" / "data" / "images" / "fashion_mnist", "train")
    full_path, interrupted_path = folder / "full.ckpt", folder / "interrupted.ckpt"

    def keep_checkpoint_at_resume_step(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step == RESUME_FROM_STEP + 1:  # callbacks run before the checkpoint of their own step
            shutil.copyfile(full_path, interrupted_path)

    _, full, _ = train_image_energy(
        split.images,
        split.labels,
        params.spec(),
        recipe,
        checkpoint_path=full_path,
        callbacks=[keep_checkpoint_at_resume_step],
    )
    _, resumed, _ = train_image_energy(
        split.images, split.labels, params.spec(), recipe, checkpoint_path=interrupted_path
    )
    return {"full": full.state_dict(), "resumed": resumed.state_dict()}


def run_train_stage(rank: int, folder: Path) -> list[dict[str, Any]]:
    """``python -m ebm.stages.images train`` as ``torchrun`` runs it; returns what each of its training
    runs (JEM, then the classifier) left on this rank, and notes which ranks write files."""
    runs: list[dict[str, Any]] = []
    train_image_energy, save_model, torch_save = (
        ebm.stages.images.train_image_energy,
        ebm.stages.images.save_model,
        ebm.stages.images.torch_save,
    )

    def noting_train_image_energy(*args: Any, **kwargs: Any) -> tuple[ImageEnergy, Trainer, Any]:
        model, trainer, result = train_image_energy(*args, **kwargs)
        states = buffer_states(trainer)
        runs.append(
            {
                "energy": trainer.energy.state_dict(),
                "model": model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "history": result.history,
                "batch": trainer.rank_batch_size,
                "buffer": states.clone() if states is not None else None,
            }
        )
        return model, trainer, result

    def noting(write: Any) -> Any:
        def writer(*args: Any, **kwargs: Any) -> Any:
            (folder / "writers" / f"rank{rank}").touch()
            return write(*args, **kwargs)

        return writer

    ebm.stages.images.train_image_energy = noting_train_image_energy  # this process only
    ebm.stages.images.save_model, ebm.stages.images.torch_save = noting(save_model), noting(torch_save)
    root = folder / "project"
    ebm.stages.images.main(["train", "--params", str(folder / "params.yaml"), "--root", str(root)])
    return runs


def rank_worker(rank: int, port: int, folder: str, tracking_uri: str) -> None:
    become_rank(rank, port, tracking_uri)
    out = Path(folder)
    params = ImagesParams.from_params(yaml.safe_load((out / "params.yaml").read_text()))
    init_from_env("cpu")
    short = replace(params.recipe.train, steps=8, checkpoint_every=2, log_every=1)
    results = {"resume": interrupt_and_resume(replace(params.recipe, train=short), params, out)}
    results["stage"] = run_train_stage(rank, out)  # leaves the group
    torch.save(results, out / f"rank{rank}.pt")


# --- the spawned run and the single-process reference ----------------------------------------------


def spawn_ranks(folder: Path, mlflow_template_db: Path) -> None:
    write_banded_copy(folder / "copy")
    raw = stage_params(folder / "copy")
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    (folder / "writers").mkdir()
    prepare(ImagesParams.from_params(raw), ImagePaths(folder / "project"))
    shutil.copyfile(mlflow_template_db, folder / "mlflow.db")
    join_ranks(rank_worker, (free_port(), str(folder), f"sqlite:///{folder / 'mlflow.db'}"))


@pytest.fixture(scope="session")
def image_ranks(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The folder of one two-rank run of the image stage, made once per test session."""
    template = request.getfixturevalue("mlflow_template_db")
    return once_per_session(tmp_path_factory, "ddp_images", lambda folder: spawn_ranks(folder, template))


def rank_results(folder: Path) -> list[dict[str, Any]]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def held_out_figures(models: Path, test_images: Tensor, test_labels: Tensor) -> dict[str, float]:
    """Test accuracy and cross-entropy of the JEM energy and of the classifier saved in ``models``."""
    figures = {}
    for name in ("energy", "classifier"):
        model = load_model(models / f"{name}.pt")
        with torch.no_grad():
            figures[f"{name}_cross_entropy"] = float(F.cross_entropy(model.logits(test_images), test_labels))
        figures[f"{name}_accuracy"] = accuracy(model, test_images, test_labels)
    return figures


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ranks_keep_identical_weights(image_ranks: Path) -> None:
    first, second = rank_results(image_ranks)
    for index, name in enumerate(("JEM", "classifier")):
        for key in ("energy", "model", "optimizer", "history"):  # live and EMA weights, Adam, logged means
            assert_same(first["stage"][index][key], second["stage"][index][key], f"{name} {key}")
    for key in ("energy", "ema", "optimizer"):
        assert_same(first["resume"]["full"][key], second["resume"]["full"][key], f"resume {key}")


@pytest.mark.slow
def test_each_rank_takes_its_share_of_the_batch_and_the_replay_buffer(image_ranks: Path) -> None:
    first, second = rank_results(image_ranks)
    jem, classifier = first["stage"]
    assert jem["batch"] == classifier["batch"] == 32 // WORLD_SIZE
    assert jem["buffer"].shape[0] == second["stage"][0]["buffer"].shape[0] == 64 // WORLD_SIZE
    assert not torch.equal(jem["buffer"], second["stage"][0]["buffer"])  # each rank its own chains
    assert classifier["buffer"] is None


@pytest.mark.slow
def test_two_ranks_train_the_models_one_process_trains(image_ranks: Path, tmp_path: Path) -> None:
    single = ImagePaths(tmp_path)
    shutil.copytree(image_ranks / "project" / "data", single.data.parent)
    params = ImagesParams.from_params(yaml.safe_load((image_ranks / "params.yaml").read_text()))
    train(params, single)
    test = load_image_split(single.data / "fashion_mnist", "test")
    two_ranks = held_out_figures(image_ranks / "project" / "models" / "images", test.unit(), test.labels)
    one_process = held_out_figures(single.models, test.unit(), test.labels)

    print(f"two ranks: {two_ranks}\none process: {one_process}")
    # The runs share the global batch (32), buffer (64 chains) and chains per step (16) but not their
    # random numbers, so they agree only as two seeds of one process do. Over 12 seeds of one process
    # every model classified all 200 test images; the JEM energy's test cross-entropy lay in
    # [0.001, 0.046] nats and the classifier's in [0, 0.004], from log 10 = 2.30 untrained.
    for name in ("energy", "classifier"):
        assert two_ranks[f"{name}_accuracy"] == pytest.approx(one_process[f"{name}_accuracy"], abs=0.02)
    assert two_ranks["energy_cross_entropy"] == pytest.approx(one_process["energy_cross_entropy"], abs=0.05)
    assert two_ranks["classifier_cross_entropy"] == pytest.approx(
        one_process["classifier_cross_entropy"], abs=0.01
    )


@pytest.mark.slow
def test_a_checkpoint_resumes_exactly_on_every_rank(image_ranks: Path) -> None:
    for rank, result in enumerate(rank_results(image_ranks)):
        assert result["resume"]["resumed"]["step"] == 8
        assert_same(result["resume"]["full"], result["resume"]["resumed"], f"rank {rank}")


@pytest.mark.slow
def test_the_train_stage_writes_and_logs_on_rank_zero_only(image_ranks: Path) -> None:
    project = image_ranks / "project"
    assert sorted(path.name for path in (image_ranks / "writers").iterdir()) == ["rank0"]
    models = project / "models" / "images"
    assert sorted(path.name for path in models.iterdir()) == ["buffer.pt", "classifier.pt", "energy.pt"]
    assert load_model(models / "energy.pt")(torch.zeros(3, 1, 28, 28)).shape == (3,)
    # the whole buffer, every rank's shard in rank order, as the evaluate stage reads it
    saved = torch.load(models / "buffer.pt", weights_only=True)["states"]
    shards = [result["stage"][0]["buffer"] for result in rank_results(image_ranks)]
    assert torch.equal(saved, (torch.cat(shards).clamp(0, 1) * 255).round().to(torch.uint8))
    reports = project / "reports" / "images"
    assert (reports / "train.json").is_file() and (reports / "curves.csv").is_file()
    assert sorted(path.name for path in (reports / "grids").iterdir()) == [
        "buffer-000076.png",
        "buffer-000150.png",
    ]
    assert not list((project / "checkpoints" / "images").glob("*.ckpt"))  # removed once the model is out
    with sqlite3.connect(image_ranks / "mlflow.db") as db:
        (stage_runs,) = db.execute("SELECT COUNT(*) FROM runs WHERE name = 'train_images'").fetchone()
        (logged,) = db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'energy_noise'").fetchone()
    assert stage_runs == 1 and logged >= 2


def test_shares_that_do_not_divide_over_the_ranks_are_refused_before_any_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        ebm.stages.images, "process_group_context", lambda: DistributedContext(rank=0, world_size=2)
    )
    for section, key, value in (
        ("classifier", "batch_size", 33),  # before: refused only once the JEM run was over
        ("train", "batch_size", 33),
        ("loss", "buffer_size", 63),
        ("jem", "generative_batch", 15),
    ):
        raw = stage_params(tmp_path)
        raw["images"][section][key] = value
        with pytest.raises(ValueError, match=f"{section}.{key} {value} must be divisible by the 2"):
            train(ImagesParams.from_params(raw), ImagePaths(tmp_path / "no-data-needed"))


def test_each_rank_s_share_of_the_recipe_and_one_process_s_whole_recipe() -> None:
    recipe = ImagesParams.from_params(stage_params(Path("unused"))).recipe
    assert rank_share(recipe, 1) is recipe
    share = rank_share(recipe, 4)
    assert (share.loss.buffer_size, share.jem.generative_batch) == (16, 4)
    assert share.train == recipe.train  # the trainer shares out the batch
    classifier = replace(recipe, jem=replace(recipe.jem, generative_weight=0.0))
    assert rank_share(classifier, 3) is classifier  # no buffer, no chains: nothing to share out
