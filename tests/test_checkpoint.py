"""Checkpoints and model files: code-free loading, clear errors, atomic writes, no NaN on disk."""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ebm.checkpoint import (
    FILE_MODE,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_model,
    run_fingerprint,
    save_checkpoint,
    save_model,
    torch_save,
    write_json,
    write_report_json,
)
from ebm.energies import MLPEnergy, MLPEnergyConfig
from ebm.losses import ContrastiveDivergence
from ebm.samplers import MALA, ReplayBuffer, UniformBox
from ebm.trainer import TrainConfig, Trainer

PLAIN_LEAVES = (torch.Tensor, int, float, str, bool, type(None))


def tiny_energy(*, spectral_norm: bool = False) -> MLPEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16), spectral_norm=spectral_norm))


def tiny_trainer(checkpoint_path: Path) -> Trainer:
    """A PCD run with an EMA, so the checkpoint holds every kind of state the trainer keeps."""
    data = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
    buffer = ReplayBuffer(64, UniformBox((2,), -3.0, 3.0), generator=torch.Generator().manual_seed(2))
    objective = ContrastiveDivergence(MALA(step_size=0.05), n_steps=2, buffer=buffer)
    config = TrainConfig(steps=3, batch_size=16, ema_decay=0.9, log_every=1, progress=False)
    return Trainer(tiny_energy(), objective, data, config, checkpoint_path=checkpoint_path)


def leaves(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every non-container value in nested dicts, lists and tuples, with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str | int), f"{where}: key {key!r} is not plain data"
            yield from leaves(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from leaves(item, f"{where}[{index}]")
    else:
        yield where, value


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_trainer_checkpoint_loads_code_free_and_holds_only_tensors_and_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    tiny_trainer(path).fit()

    state = torch.load(path, weights_only=True)

    assert state["format_version"] == 1
    assert state["step"] == 3
    assert {"energy", "ema", "optimizer", "scheduler", "objective", "generator", "history"} <= set(state)
    assert torch.equal(state["energy"]["net.0.weight"], load_checkpoint(path)["energy"]["net.0.weight"])
    for where, value in leaves(state):
        assert isinstance(value, PLAIN_LEAVES), f"{where} holds a {type(value).__name__}"
    assert files_in(tmp_path) == ["run.ckpt"]


def test_model_file_loads_code_free_and_holds_only_tensors_and_plain_data(tmp_path: Path) -> None:
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)

    payload = torch.load(path, weights_only=True)

    assert payload["kind"] == "mlp_energy"
    assert payload["config"] == {
        "in_features": 2,
        "widths": [16, 16],
        "spectral_norm": False,
        "fourier_features": 0,
        "fourier_scale": 1.0,
        "fourier_seed": 0,
        "activation": "silu",
    }
    for where, value in leaves(payload):
        assert isinstance(value, PLAIN_LEAVES), f"{where} holds a {type(value).__name__}"


class ArbitraryObject:
    """A class outside torch's weights-only allow-list."""

    def __init__(self) -> None:
        self.value = 3


class TouchesFileWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for a payload that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def write_text(path: Path) -> None:
    path.write_text("step: 3\n")


def write_random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def write_bare_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def write_other_format_version(path: Path) -> None:
    torch.save({"format_version": 999, "step": 3}, path)


def write_arbitrary_object(path: Path) -> None:
    torch.save({"format_version": 1, "step": 3, "extra": ArbitraryObject()}, path)


def write_raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"format_version": 1, "extra": ArbitraryObject()}, protocol=2))


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        pytest.param(None, "no checkpoint at", id="missing"),
        pytest.param(write_text, "not a readable ebm checkpoint", id="text"),
        pytest.param(write_random_bytes, "not a readable ebm checkpoint", id="random_bytes"),
        pytest.param(write_bare_tensor, "not an ebm checkpoint", id="bare_tensor"),
        pytest.param(write_other_format_version, "format version 1", id="other_format_version"),
        pytest.param(write_arbitrary_object, "not a readable ebm checkpoint", id="pickled_object"),
        pytest.param(write_raw_pickle, "not a readable ebm checkpoint", id="raw_pickle"),
    ],
)
def test_load_checkpoint_errors_name_the_file(tmp_path: Path, write: Any, fragment: str) -> None:
    path = tmp_path / "run.ckpt"
    if write is not None:
        write(path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert fragment in str(raised.value)


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)


def test_loading_a_malicious_file_runs_no_code(tmp_path: Path) -> None:
    path, marker = tmp_path / "model.pt", tmp_path / "code-ran"
    torch.save({"format_version": 1, "kind": "mlp_energy", "payload": TouchesFileWhenUnpickled(marker)}, path)

    with pytest.raises(CheckpointError, match="not a readable ebm checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_file_and_no_temp_file_when_the_writer_raises(
    tmp_path: Path, exception: type[BaseException]
) -> None:
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"old checkpoint")

    def half_write_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of a new")
        raise exception("disk full")

    with pytest.raises(exception, match="disk full"):
        atomic_write(path, half_write_then_fail)

    assert path.read_bytes() == b"old checkpoint"
    assert files_in(tmp_path) == ["run.ckpt"]


def _fail_halfway(*args: Any, **kwargs: Any) -> None:
    """A stand-in for ``torch.save`` / ``Path.write_text`` that writes half a file, then fails."""
    target = args[0] if isinstance(args[0], Path) else args[1]  # path.write_text(text), torch.save(obj, file)
    if isinstance(target, Path):
        with open(target, "wb") as file:
            file.write(b"half of a new")
    else:
        target.write(b"half of a new")
        target.flush()
    raise OSError("disk full")


@pytest.mark.parametrize(
    ("writer", "patched"),
    [
        ("write_json", (Path, "write_text")),
        ("write_report_json", (Path, "write_text")),
        ("torch_save", (torch, "save")),
        ("save_checkpoint", (torch, "save")),
        ("save_model", (torch, "save")),
    ],
)
def test_every_writer_keeps_the_old_file_when_a_write_fails_halfway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, patched: tuple[Any, str]
) -> None:
    """The refusals above happen before any byte is written; this is the failure after some are: each
    public writer must go through :func:`atomic_write`, not open its target."""
    path = tmp_path / "out.file"
    path.write_bytes(b"the old file")
    write = {
        "write_json": lambda: write_json(path, {"loss": 1.0}),
        "write_report_json": lambda: write_report_json(path, {"loss": 1.0}),
        "torch_save": lambda: torch_save({"w": torch.zeros(2)}, path),
        "save_checkpoint": lambda: save_checkpoint(path, {"step": 1, "w": torch.zeros(2)}),
        "save_model": lambda: save_model(path, tiny_energy(), kind="mlp_energy", config=tiny_energy().config),
    }[writer]
    monkeypatch.setattr(*patched, _fail_halfway)

    with pytest.raises(OSError, match="disk full"):
        write()

    assert path.read_bytes() == b"the old file"
    assert files_in(tmp_path) == ["out.file"]


def test_atomic_write_replaces_the_file_and_makes_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folder" / "run.ckpt"
    written = atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"first"))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"second"))

    assert written == path
    assert path.read_bytes() == b"second"
    assert files_in(path.parent) == ["run.ckpt"]


def test_atomic_write_gives_the_file_the_mode_the_other_writers_give_not_mkstemp_s_0600(
    tmp_path: Path,
) -> None:
    # save_figure and atomic_table_write chmod their temporary files to 0644: models, data and reports
    # are for everyone who reads the repository, whatever the writer and the process's umask
    from ebm.anomaly.io import atomic_table_write
    from ebm.plots import new_figure, save_figure

    written = {
        "atomic_write": atomic_write(tmp_path / "m.json", lambda tmp: Path(tmp).write_text("{}")),
        "torch_save": torch_save({"x": torch.zeros(2)}, tmp_path / "t.pt"),
        "save_figure": save_figure(new_figure(1, 1), tmp_path / "f.png"),
        "atomic_table_write": atomic_table_write(pd.DataFrame({"a": [1]}), tmp_path / "t.csv"),
    }
    modes = {name: oct(path.stat().st_mode & 0o777) for name, path in written.items()}
    assert modes == {name: oct(FILE_MODE) for name in written}
    assert FILE_MODE == 0o644


def test_atomic_write_gives_the_temporary_file_the_suffix_asked_for(tmp_path: Path) -> None:
    # a writer that picks the file format from the name (PIL, torchvision's save_image) needs ".png"
    seen: list[str] = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_bytes(b"png")

    atomic_write(tmp_path / "grid.png", write)
    atomic_write(tmp_path / "grid.png", write, suffix=".tmp.png")

    assert seen[0].endswith(".tmp") and seen[1].endswith(".tmp.png")
    assert all(Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".grid.png.") for tmp in seen)
    assert files_in(tmp_path) == ["grid.png"]


def test_the_same_tensors_saved_twice_give_the_same_bytes(tmp_path: Path) -> None:
    # DVC compares outputs by hash: a rerun stage that writes the same tensors must not look changed.
    payload = {"images": torch.arange(12, dtype=torch.uint8).view(3, 4), "labels": torch.tensor([0, 1, 2])}
    first = torch_save(payload, tmp_path / "train.pt").read_bytes()
    second = torch_save(payload, tmp_path / "train.pt").read_bytes()
    save_model(tmp_path / "a.pt", tiny_energy(), kind="mlp_energy", config=tiny_energy().config)
    model_a = (tmp_path / "a.pt").read_bytes()
    save_model(tmp_path / "a.pt", tiny_energy(), kind="mlp_energy", config=tiny_energy().config)

    assert first == second
    assert (tmp_path / "a.pt").read_bytes() == model_a
    assert torch.equal(torch.load(tmp_path / "train.pt", weights_only=True)["images"], payload["images"])


def test_save_checkpoint_round_trips_nested_plain_state(tmp_path: Path) -> None:
    state = {"step": 4, "nested": {"weights": torch.arange(6.0).view(2, 3), "betas": (0.0, 0.9)}, "n": None}
    save_checkpoint(tmp_path / "state.ckpt", state)

    loaded = load_checkpoint(tmp_path / "state.ckpt")

    assert loaded["step"] == 4 and loaded["n"] is None
    assert loaded["nested"]["betas"] == (0.0, 0.9)
    assert torch.equal(loaded["nested"]["weights"], state["nested"]["weights"])


@pytest.mark.parametrize("spectral_norm", [False, True], ids=["plain", "spectral_norm"])
def test_save_model_load_model_round_trip_gives_identical_energies_in_eval_mode(
    tmp_path: Path, spectral_norm: bool
) -> None:
    energy = tiny_energy(spectral_norm=spectral_norm)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    energy(x)  # in training mode spectral norm runs a power iteration and updates its buffers
    energy.eval()
    metadata = {"steps": 10, "betas": (0.0, 0.9), "data": "two_moons"}
    path = save_model(
        tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config, metadata=metadata
    )

    loaded = load_model(path)

    assert isinstance(loaded, MLPEnergy)
    assert not any(module.training for module in loaded.modules())
    assert loaded.config == energy.config
    with torch.no_grad():
        assert torch.equal(loaded(x), energy(x))
    assert load_checkpoint(path)["metadata"] == {"steps": 10, "betas": [0.0, 0.9], "data": "two_moons"}


def test_a_relu_energy_reloads_as_relu_and_an_older_file_without_the_key_as_silu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    relu = MLPEnergy(MLPEnergyConfig(widths=(16, 16), activation="relu")).eval()
    loaded = load_model(save_model(tmp_path / "relu.pt", relu, kind="mlp_energy", config=relu.config))
    assert isinstance(loaded, MLPEnergy) and isinstance(loaded.net[1], torch.nn.ReLU)
    x = 3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), relu(x))
    older = {"in_features": 2, "widths": (16, 16), "spectral_norm": False}  # written before the key existed
    silu = MLPEnergy(MLPEnergyConfig(widths=(16, 16))).eval()
    loaded = load_model(save_model(tmp_path / "old.pt", silu, kind="mlp_energy", config=older))
    assert isinstance(loaded, MLPEnergy) and isinstance(loaded.net[1], torch.nn.SiLU)


def test_save_model_accepts_a_config_mapping(tmp_path: Path) -> None:
    energy = tiny_energy().eval()
    config = {"in_features": 2, "widths": (16, 16), "spectral_norm": False}
    loaded = load_model(save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=config))
    x = torch.randn(8, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), energy(x))


def test_save_model_rejects_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model kind 'resnet'.*mlp_energy"):
        save_model(tmp_path / "model.pt", tiny_energy(), kind="resnet", config={})
    assert files_in(tmp_path) == []


def test_load_model_rejects_a_file_of_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"step": 3})  # a training checkpoint is not a model file
    with pytest.raises(CheckpointError, match="unknown kind None") as raised:
        load_model(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_save_model_refuses_non_finite_weights_and_keeps_the_old_file(
    tmp_path: Path, bad_value: float
) -> None:
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    old_bytes = path.read_bytes()
    with torch.no_grad():
        energy.net[2].weight[0, 0] = bad_value

    with pytest.raises(CheckpointError, match=r"refusing to write .*'net\.2\.weight'"):
        save_model(path, energy, kind="mlp_energy", config=energy.config)

    assert path.read_bytes() == old_bytes
    assert files_in(tmp_path) == ["model.pt"]


def test_trainer_refuses_to_checkpoint_non_finite_weights_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    trainer = tiny_trainer(path)
    trainer.fit()
    old_bytes = path.read_bytes()
    with torch.no_grad():
        trainer.energy.net[0].bias[1] = float("nan")

    with pytest.raises(CheckpointError, match="holds NaN"):
        trainer.save_checkpoint()

    assert path.read_bytes() == old_bytes
    assert files_in(tmp_path) == ["run.ckpt"]


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    # a crash after the rename but before the data reach the disk would leave an empty file under the name
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "out.txt", lambda tmp: Path(tmp).write_text("whole"))
    assert events == ["fsync", "replace", "fsync"]
    assert (tmp_path / "out.txt").read_text() == "whole"


def rewrite_model_file(path: Path, change: Any) -> None:
    """Load the model file's payload raw, let ``change`` edit it, and write it back."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch_save(payload, path)


def set_config_key(payload: dict[str, Any], key: str, value: Any) -> None:
    payload["config"][key] = value


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        pytest.param(
            lambda p: set_config_key(p, "foo", 1), ["unknown key(s) ['config.foo']"], id="extra_config_key"
        ),
        pytest.param(
            lambda p: set_config_key(p, "in_features", 2.5), ["config.in_features"], id="config_value_type"
        ),
        pytest.param(lambda p: p.pop("config"), ["no 'config' entry"], id="missing_config"),
        pytest.param(lambda p: p.pop("state_dict"), ["no 'state_dict' entry"], id="missing_state_dict"),
        pytest.param(
            lambda p: p.update(config=[1, 2]), ["'config' must be a dict", "list"], id="config_list"
        ),
        pytest.param(
            lambda p: p.update(state_dict=[1]), ["'state_dict' must be a dict"], id="state_dict_list"
        ),
        pytest.param(
            lambda p: p["state_dict"].update({"net.0.weight": [1.0]}),
            ["'net.0.weight' must be a tensor"],
            id="state_dict_entry_not_a_tensor",
        ),
        pytest.param(  # before: AttributeError 'int' object has no attribute 'startswith'
            lambda p: p["state_dict"].update({0: torch.zeros(1)}),
            ["state_dict key 0 must be a str", "int"],
            id="state_dict_key_not_a_str",
        ),
        pytest.param(
            lambda p: set_config_key(p, "widths", [8, 16]),
            ["weights do not fit", "size mismatch", "net.0.weight"],
            id="weights_of_another_shape",
        ),
        pytest.param(
            lambda p: p["state_dict"].pop("net.0.bias"),
            ["weights do not fit", "Missing key", "net.0.bias"],
            id="missing_weight",
        ),
    ],
)
def test_load_model_errors_name_the_file_and_the_key(
    tmp_path: Path, change: Any, fragments: list[str]
) -> None:
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    rewrite_model_file(path, change)

    with pytest.raises(CheckpointError) as raised:
        load_model(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("kind", [["mlp_energy"], {"name": "mlp_energy"}], ids=["list", "dict"])
def test_load_model_refuses_a_kind_that_is_no_name(tmp_path: Path, kind: Any) -> None:
    # before: a list or dict as the kind raised TypeError: unhashable type
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    rewrite_model_file(path, lambda payload: payload.update(kind=kind))

    with pytest.raises(CheckpointError) as raised:
        load_model(path)

    assert str(raised.value).startswith(f"{path} holds a model of unknown kind {kind!r}; known: [")


def test_load_model_chains_the_builder_s_error(tmp_path: Path) -> None:
    from ebm.config import ConfigError

    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    rewrite_model_file(path, lambda p: set_config_key(p, "foo", 1))

    with pytest.raises(CheckpointError) as raised:
        load_model(path)

    assert isinstance(raised.value.__cause__, ConfigError)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_load_model_refuses_a_file_with_non_finite_weights(tmp_path: Path, bad_value: float) -> None:
    # save_model never writes such a file, but one edited, corrupted or written elsewhere must not be used
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    rewrite_model_file(path, lambda p: p["state_dict"]["net.2.weight"].__setitem__((0, 0), bad_value))

    with pytest.raises(
        CheckpointError, match=r"refusing to load .*'net\.2\.weight'.*NaN or infinite"
    ) as raised:
        load_model(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), None], ids=["str", "device", "none"])
def test_load_model_accepts_a_cpu_map_location(tmp_path: Path, map_location: Any) -> None:
    energy = tiny_energy().eval()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)

    loaded = load_model(path, map_location=map_location)

    assert {t.device for t in [*loaded.parameters(), *loaded.buffers()]} == {torch.device("cpu")}
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x), energy(x))


@pytest.mark.parametrize(
    ("map_location", "moved_to"),
    [
        pytest.param("cpu", torch.device("cpu"), id="str"),
        pytest.param(torch.device("cpu"), torch.device("cpu"), id="device"),
        pytest.param(None, None, id="none"),
        pytest.param({"cuda:0": "cpu"}, None, id="dict"),
        pytest.param(lambda storage, _location: storage, None, id="callable"),
    ],
)
def test_load_model_moves_the_model_to_the_device_map_location_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, map_location: Any, moved_to: torch.device | None
) -> None:
    # the builder makes parameters on the CPU and load_state_dict copies into them in place, so without
    # an explicit .to(device) the model came back on the CPU whatever map_location said
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    calls: list[Any] = []
    real_to = torch.nn.Module.to

    def recording_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        calls.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)

    loaded = load_model(path, map_location=map_location)

    assert calls == ([] if moved_to is None else [moved_to])
    assert isinstance(loaded, MLPEnergy) and not loaded.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("map_location", ["cuda", torch.device("cuda")], ids=["str", "device"])
def test_load_model_puts_the_model_on_the_gpu_map_location_names(tmp_path: Path, map_location: Any) -> None:
    energy = tiny_energy().eval()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)

    loaded = load_model(path, map_location=map_location)

    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cuda"}
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(x.cuda()).cpu(), energy(x), atol=1e-5)


def test_a_benchmark_report_writes_a_failed_figure_as_null_and_names_it(tmp_path: Path) -> None:
    # json.dumps wrote a bare NaN token, which strict JSON readers refuse for the whole file
    path = tmp_path / "reports" / "bench.json"
    report = {"rows": [{"ms": 1.5}, {"ms": float("nan")}], "ratio": np.float32("inf"), "n": np.int64(3)}
    with pytest.warns(UserWarning, match=r"rows\[1\]\.ms, ratio; written as null"):
        missing = write_report_json(path, report)
    assert missing == ["rows[1].ms", "ratio"]
    assert json.loads(path.read_text()) == {"rows": [{"ms": 1.5}, {"ms": None}], "ratio": None, "n": 3}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_a_benchmark_report_that_cannot_be_written_leaves_the_previous_one(tmp_path: Path) -> None:
    # write_text truncated the previous good report before a failed or killed write
    path = tmp_path / "bench.json"
    write_report_json(path, {"figure": 1.0})
    with pytest.raises(TypeError):
        write_report_json(path, {"figure": object()})
    assert json.loads(path.read_text()) == {"figure": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


# --- only what a weights_only load accepts is written ----------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "config_extra", "where", "kind"),
    [
        ({"data": Path("x.npz")}, {}, "metadata['data']", "pathlib."),
        (
            {"runs": [{"ok": 1}, {"scores": np.zeros(3)}]},
            {},
            "metadata['runs'][1]['scores']",
            "numpy.ndarray",
        ),
        ({"by_seed": {0: 0.9}}, {}, "metadata['by_seed'] has the key 0", "int"),
        ({}, {"source": Path("x.npz")}, "config['source']", "pathlib."),
        ({}, {"weights": {3: 0.5}}, "config['weights'] has the key 3", "int"),
    ],
    ids=["path", "array", "int_key", "config_path", "config_int_key"],
)
def test_save_model_refuses_what_load_model_would_refuse_and_keeps_the_old_file(
    tmp_path: Path, metadata: dict[str, Any], config_extra: dict[str, Any], where: str, kind: str
) -> None:
    # before: written, replacing a good model file with one load_model refused
    energy = tiny_energy()
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=energy.config)
    before = path.read_bytes()
    config = {**dataclasses.asdict(energy.config), **config_extra}

    with pytest.raises(TypeError) as raised:
        save_model(path, energy, kind="mlp_energy", config=config, metadata=metadata)

    assert str(raised.value).startswith(where) and kind in str(raised.value)
    assert path.read_bytes() == before and files_in(tmp_path) == ["model.pt"]
    load_model(path)


def test_save_model_stores_numpy_scalars_as_python_values(tmp_path: Path) -> None:
    # before: written as NumPy objects, which the weights_only load of load_model refused
    energy = tiny_energy()
    metadata = {"auroc": np.float64(0.93), "rows": np.int64(7), "ok": np.bool_(True), "cols": ("a", "b")}
    config = {**dataclasses.asdict(energy.config), "in_features": np.int64(2)}
    path = save_model(tmp_path / "model.pt", energy, kind="mlp_energy", config=config, metadata=metadata)

    load_model(path)
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"] == {"auroc": 0.93, "rows": 7, "ok": True, "cols": ["a", "b"]}
    assert [type(v) for v in payload["metadata"].values()] == [float, int, bool, list]
    assert type(payload["config"]["in_features"]) is int


def test_save_checkpoint_refuses_what_a_weights_only_load_would_refuse_and_keeps_the_old_file(
    tmp_path: Path,
) -> None:
    path = save_checkpoint(tmp_path / "run.ckpt", {"step": 1})
    before = path.read_bytes()
    for state, where, kind in [
        ({"config": {"data": Path("x.npz")}}, "state['config']['data']", "pathlib."),
        ({"history": [{"auc": np.zeros(2)}]}, "state['history'][0]['auc']", "numpy.ndarray"),
        ({"fn": len}, "state['fn']", "builtin_function_or_method"),
        ({"counts": collections.Counter(a=1)}, "state['counts']", "collections.Counter"),
    ]:
        with pytest.raises(TypeError) as raised:
            save_checkpoint(path, state)
        assert str(raised.value).startswith(where) and kind in str(raised.value), raised.value
    assert path.read_bytes() == before and files_in(tmp_path) == ["run.ckpt"]


def test_save_checkpoint_stores_numpy_scalars_as_python_values_and_keeps_the_rest(tmp_path: Path) -> None:
    module_state = tiny_energy().state_dict()  # an OrderedDict with the modules' versions as _metadata
    state = {
        "config": {"lr": np.float64(1e-3), "betas": (np.float32(0.5), 0.9), "name": np.str_("run")},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"params": [0]}]},
        "energy": module_state,
        "leaves": [torch.Size([2, 3]), torch.float16, torch.device("cpu"), b"x", 1j, None, {1, 2}],
    }
    save_checkpoint(tmp_path / "run.ckpt", state)

    loaded = load_checkpoint(tmp_path / "run.ckpt")  # weights_only: a NumPy scalar would be refused
    assert loaded["config"] == {"lr": 1e-3, "betas": (0.5, 0.9), "name": "run"}
    assert [type(v) for v in loaded["config"].values()] == [float, tuple, str]
    assert loaded["leaves"] == state["leaves"] and torch.equal(
        loaded["optimizer"]["state"][0]["step"], torch.tensor(3.0)
    )
    assert state["config"]["lr"].dtype == np.float64  # the caller's state is left as it was
    assert loaded["energy"]._metadata == module_state._metadata  # type: ignore[attr-defined]


def test_a_trainer_whose_config_holds_numpy_numbers_writes_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    # before: the config's np.float64 went into the checkpoint, and the resumed run could not read it
    path = tmp_path / "run.ckpt"
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    config = TrainConfig(steps=2, batch_size=16, lr=np.float64(1e-3), log_every=1, progress=False)

    def trainer(steps: int) -> Trainer:
        buffer = ReplayBuffer(32, UniformBox((2,), -3.0, 3.0), generator=torch.Generator().manual_seed(2))
        objective = ContrastiveDivergence(MALA(step_size=0.05), n_steps=2, buffer=buffer)
        return Trainer(
            tiny_energy(), objective, data, dataclasses.replace(config, steps=steps), checkpoint_path=path
        )

    trainer(2).fit()
    assert type(load_checkpoint(path)["config"]["lr"]) is float
    assert trainer(4).step == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_write_json_refuses_a_non_finite_number_and_keeps_the_old_file(tmp_path: Path, bad: float) -> None:
    # before: written as a bare NaN or Infinity token, which strict JSON readers refuse
    path = write_json(tmp_path / "metrics.json", {"auroc": 0.9})
    with pytest.raises(ValueError, match=r"metrics.json: Out of range float"):
        write_json(path, {"auroc": {"set": bad}})
    assert json.loads(path.read_text()) == {"auroc": 0.9} and files_in(tmp_path) == ["metrics.json"]


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """Opening a model, buffer or sample file never runs code: every ``torch.load`` in ``ebm/`` passes
    ``weights_only=True`` literally (a missing keyword means the default, which torch has changed before)."""
    package = Path(__file__).resolve().parents[1] / "ebm"
    unsafe, seen = [], 0
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "load" or not (
                isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            ):
                continue
            seen += 1
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(f"{source.relative_to(package.parent)}:{node.lineno}")
    assert seen >= 5, f"found only {seen} torch.load calls: is the scan still looking at the package?"
    assert unsafe == [], f"torch.load without weights_only=True at {unsafe}"


def test_a_run_fingerprint_changes_with_any_setting_or_data_byte_and_not_with_key_order() -> None:
    """Checkpoints are named by it: the same run must find its own, another run (other data, other
    settings) must not resume it."""
    settings, data = {"lr": 0.01, "steps": 100}, b"training points"
    name = run_fingerprint(settings, data)
    assert run_fingerprint({"steps": 100, "lr": 0.01}, data) == name
    assert run_fingerprint(settings, b"training pointz") != name
    assert run_fingerprint(settings, data, b"more") != name
    assert run_fingerprint({**settings, "lr": 0.02}, data) != name
    assert len(name) == 12 and int(name, 16) >= 0
