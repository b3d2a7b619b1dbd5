"""The trainer: exact resume after a kill, the divergence guard, seeding, config checks and metrics."""

from __future__ import annotations

import dataclasses
import math
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from objectives import WrappedObjective
from torch import Tensor, nn

import ebm.trainer
from ebm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_model
from ebm.config import ConfigError, from_dict
from ebm.energies import MLPEnergy, MLPEnergyConfig
from ebm.losses import CDStats, ContrastiveDivergence
from ebm.samplers import MALA, Langevin, ReplayBuffer, UniformBox
from ebm.trainer import TrainConfig, Trainer, TrainingDivergedError, resolve_device

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- exact resume ----------------------------------------------------------------------------------

HALF_STEPS, TOTAL_STEPS, CHECKPOINT_EVERY = 12, 24, 4

# The run a user would launch: PCD with a replay buffer, MALA negatives, an EMA and a learning-rate
# warm-up that spans the first checkpoint. ``--block-after-checkpoint`` makes the callback block at the
# first log step after a checkpoint exists, so the kill always lands mid-run, past that checkpoint.
RUN_SCRIPT = f"""
import sys
import threading
from pathlib import Path

import torch

from ebm.energies import MLPEnergy, MLPEnergyConfig
from ebm.losses import ContrastiveDivergence
from ebm.samplers import MALA, ReplayBuffer, UniformBox
from ebm.trainer import TrainConfig, Trainer


def build_trainer(checkpoint_path, *, steps, callbacks=()):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16)))
    data_rng = torch.Generator().manual_seed(1)
    data = torch.randn(256, 2, generator=data_rng) * torch.tensor([1.0, 0.5]) + torch.tensor([0.5, -1.0])
    proposal = UniformBox((2,), low=-3.0, high=3.0)
    buffer = ReplayBuffer(128, proposal, reinit_prob=0.1, generator=torch.Generator().manual_seed(2))
    objective = ContrastiveDivergence(MALA(step_size=0.05), n_steps=5, alpha=0.1, buffer=buffer)
    config = TrainConfig(
        steps=steps, batch_size=32, lr=5e-3, warmup_steps=8, ema_decay=0.9,
        checkpoint_every={CHECKPOINT_EVERY}, log_every=3, seed=7, device="cpu", progress=False,
    )
    return Trainer(energy, objective, data, config, checkpoint_path=checkpoint_path, callbacks=callbacks)


def block_after_first_checkpoint(trainer, step, metrics):
    if trainer.checkpoint_path.exists():
        threading.Event().wait()


if __name__ == "__main__":
    torch.set_num_threads(1)
    path = Path(sys.argv[1])
    block = sys.argv[2:] == ["--block-after-checkpoint"]
    callbacks = [block_after_first_checkpoint] if block else []
    trainer = build_trainer(path, steps={TOTAL_STEPS}, callbacks=callbacks)
    print(f"starting at step {{trainer.step}}", flush=True)
    trainer.fit()
"""

# The global RNG state is saved for code that uses it, but it is no part of the trained state and
# differs between the pytest process and a script.
NOT_COMPARED = {"torch_rng", "format_version"}


@pytest.fixture(scope="module")
def run_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "train_run.py"
    path.write_text(textwrap.dedent(RUN_SCRIPT))
    return path


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread, as in the script, so in-process results match it bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_trainer(run_script: Path, checkpoint_path: Path | None, *, steps: int) -> Trainer:
    script = runpy.run_path(str(run_script), run_name="train_run")
    return script["build_trainer"](checkpoint_path, steps=steps)


@pytest.fixture(scope="module")
def uninterrupted_state(run_script: Path) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build_trainer(run_script, None, steps=TOTAL_STEPS)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert trainer.step == TOTAL_STEPS
    return trainer.state_dict()


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts, lists and tensors equal exactly: same keys, dtypes, shapes and bits."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), where
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert set(actual) - NOT_COMPARED == set(expected) - NOT_COMPARED, where
        for key in set(expected) - NOT_COMPARED:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for index, (item, expected_item) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(item, expected_item, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the training process exited early with {process.returncode}"
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.02)


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    run_script: Path, uninterrupted_state: dict[str, Any], tmp_path: Path
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    command = [sys.executable, str(run_script), str(checkpoint)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with (tmp_path / "killed.log").open("wb") as log:
        process = subprocess.Popen([*command, "--block-after-checkpoint"], stdout=log, stderr=log, env=env)
        try:
            wait_until(checkpoint.exists, process, timeout=120)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(checkpoint)["step"] == CHECKPOINT_EVERY  # killed mid-run, after one checkpoint

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    assert resumed.returncode == 0, resumed.stderr
    assert f"starting at step {CHECKPOINT_EVERY}" in resumed.stdout
    final = load_checkpoint(checkpoint)
    assert final["step"] == TOTAL_STEPS
    assert_identical(final, uninterrupted_state)
    assert sorted(os.listdir(tmp_path)) == ["killed.log", "run.ckpt"]  # no temporary file left behind


def test_fit_resumes_from_its_checkpoint_in_process(
    run_script: Path, uninterrupted_state: dict[str, Any], tmp_path: Path, single_thread: None
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    build_trainer(run_script, checkpoint, steps=HALF_STEPS).fit()

    resumed = build_trainer(run_script, checkpoint, steps=TOTAL_STEPS)
    assert resumed.step == HALF_STEPS
    resumed.fit()

    state = resumed.state_dict()
    # The first fit logs its own last step, so the histories differ by that one entry.
    for key in ("energy", "ema", "optimizer", "scheduler", "objective", "generator", "step", "config"):
        assert_identical(state[key], uninterrupted_state[key], key)
    assert_identical(load_checkpoint(checkpoint)["energy"], uninterrupted_state["energy"], "saved energy")


class LegacySpectralNormEnergy(nn.Module):
    """An MLP energy with the older, hook-based :func:`torch.nn.utils.spectral_norm`."""

    def __init__(self) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Linear(2, 16)), nn.SiLU(), sn(nn.Linear(16, 16)), nn.SiLU(), sn(nn.Linear(16, 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


def spectral_norm_trainer(
    steps: int, checkpoint_path: Path | None = None, *, legacy: bool = False
) -> Trainer:
    """A small PCD run of a spectrally normalised energy with an EMA."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = (
            LegacySpectralNormEnergy()
            if legacy
            else MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16), spectral_norm=True))
        )
    config = small_config(steps=steps, ema_decay=0.9, checkpoint_every=4, seed=7)
    return Trainer(energy, pcd_objective(), gaussian_data(), config, checkpoint_path=checkpoint_path)


def singular_vectors(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Spectral norm's (u, v) of every layer, from either implementation's buffers."""
    buffers = dict(model.named_buffers())
    return [
        (buffers[name], buffers[name[:-1] + "v"]) for name in buffers if name.endswith(("._u", ".weight_u"))
    ]


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "hook"])
def test_the_ema_of_a_spectrally_normalised_energy_keeps_unit_singular_vectors(legacy: bool) -> None:
    # Averaging spectral norm's u, v with the weights left them of norm ≈ 0.73 after 20 steps, so the
    # eval-mode EMA model divided its weights by σ ≈ 0.5 too small: layers of spectral norm 2.2, not 1.
    trainer = spectral_norm_trainer(20, legacy=legacy)
    trainer.fit()
    ema = trainer.model.eval()
    vectors = singular_vectors(ema)
    assert len(vectors) == 3
    for u, v in vectors:
        assert float(u.norm()) == pytest.approx(1.0, abs=1e-5)
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        ema(torch.zeros(1, 2))  # the hook-based one sets its layers' weight on a forward
        for layer in (m for m in ema.modules() if isinstance(m, nn.Linear)):
            # one power-iteration step per update, as the live model takes per forward: close to 1
            assert float(torch.linalg.matrix_norm(layer.weight, 2)) == pytest.approx(1.0, abs=0.1)
    # the EMA's own vectors, not copies of the live model's
    live = singular_vectors(trainer.energy)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(vectors, live, strict=True))


@pytest.mark.parametrize("spectral_norm", [False, True], ids=["plain", "spectral_norm"])
def test_each_ema_weight_is_decay_times_its_old_value_plus_the_rest_times_the_new_weight(
    spectral_norm: bool,
) -> None:
    decay = 0.9
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16), spectral_norm=spectral_norm))
    trainer = Trainer(energy, pcd_objective(), gaussian_data(), small_config(ema_decay=decay))
    assert trainer.ema is not None
    ema = trainer.ema.module

    def weights(module: nn.Module) -> dict[str, Tensor]:
        # with spectral norm, the parameters are each layer's ``parametrizations.weight.original``
        return {name: p.detach().clone() for name, p in module.named_parameters()}

    trainer.train_step()
    # The first update starts the average at the stepped weights (AveragedModel copies them).
    first_weights = weights(trainer.energy)
    assert_identical(weights(ema), first_weights, "ema after one step")
    assert any(name.endswith("original") for name in first_weights) == spectral_norm

    old_ema = weights(ema)
    trainer.train_step()
    new_weights = weights(trainer.energy)
    for name, new_ema in weights(ema).items():
        assert not torch.equal(new_weights[name], first_weights[name]), f"{name} did not train"
        expected = decay * old_ema[name] + (1 - decay) * new_weights[name]
        torch.testing.assert_close(new_ema, expected, msg=f"{name} is off the EMA formula")


def test_a_spectrally_normalised_ema_run_resumes_exactly(tmp_path: Path, single_thread: None) -> None:
    uninterrupted = spectral_norm_trainer(12)
    uninterrupted.fit()
    checkpoint = tmp_path / "run.ckpt"
    spectral_norm_trainer(8, checkpoint).fit()

    resumed = spectral_norm_trainer(12, checkpoint)
    assert resumed.step == 8
    resumed.fit()

    expected, state = uninterrupted.state_dict(), resumed.state_dict()
    for key in ("energy", "ema", "optimizer", "objective", "generator", "step"):
        assert_identical(state[key], expected[key], key)


def test_resuming_an_ema_run_from_a_checkpoint_without_ema_fails(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    small_trainer(small_config(steps=2), checkpoint_path=checkpoint).fit()
    with pytest.raises(CheckpointError, match=r"written by another run .*ema_decay None → 0\.9"):
        small_trainer(small_config(steps=4, ema_decay=0.9), checkpoint_path=checkpoint)


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(tmp_path: Path) -> None:
    # before: any checkpoint at the path was loaded; another seed or learning rate continued that run
    checkpoint = tmp_path / "run.ckpt"
    small_trainer(small_config(steps=2), checkpoint_path=checkpoint).fit()
    for other in ({"seed": 5}, {"lr": 0.5}, {"betas": (0.5, 0.9)}):
        with pytest.raises(CheckpointError, match=f"another run .*{next(iter(other))}"):
            small_trainer(small_config(steps=4, **other), checkpoint_path=checkpoint)
    longer = small_config(steps=4, log_every=1, checkpoint_every=1)
    resumed = small_trainer(longer, checkpoint_path=checkpoint)
    assert resumed.step == 2  # longer, and reporting more often: the same run, resumed


# --- small runs for the remaining tests ------------------------------------------------------------


def gaussian_data(n: int = 256) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + torch.tensor([1.0, -1.0])


def small_energy() -> MLPEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16)))


def pcd_objective(step_size: float = 0.1) -> ContrastiveDivergence:
    buffer = ReplayBuffer(64, UniformBox((2,), -3.0, 3.0), generator=torch.Generator().manual_seed(2))
    return ContrastiveDivergence(Langevin(step_size=step_size), n_steps=3, alpha=0.1, buffer=buffer)


def small_config(**overrides: Any) -> TrainConfig:
    defaults: dict[str, Any] = {"steps": 12, "batch_size": 32, "lr": 1e-2, "log_every": 1, "progress": False}
    return TrainConfig(**{**defaults, **overrides})


def small_trainer(config: TrainConfig, objective: Any = None, **kwargs: Any) -> Trainer:
    return Trainer(small_energy(), objective or pcd_objective(), gaussian_data(), config, **kwargs)


def energy_weights(trainer: Trainer) -> dict[str, Tensor]:
    return trainer.energy.state_dict()


def test_same_seed_gives_the_same_weights_and_another_seed_different_ones() -> None:
    first = small_trainer(small_config(seed=3))
    second = small_trainer(small_config(seed=3))
    other = small_trainer(small_config(seed=4))
    for trainer in (first, second, other):
        trainer.fit()

    assert_identical(energy_weights(second), energy_weights(first))
    assert any(
        not torch.equal(energy_weights(other)[name], weight) for name, weight in energy_weights(first).items()
    )


@pytest.mark.parametrize("grad_clip", [None, 1e-3])
def test_grad_clip_caps_the_gradient_norm_the_optimiser_steps_with(grad_clip: float | None) -> None:
    """Adam's steps barely change when every gradient is scaled alike, so the weights cannot show a
    clip; the gradient the optimiser is handed can. Unclipped, it is far above 1e-3."""
    trainer = small_trainer(small_config(steps=3, grad_clip=grad_clip))
    norms: list[float] = []
    step = trainer.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for p in trainer.energy.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step  # type: ignore[method-assign]
    trainer.fit()
    assert len(norms) == 3
    if grad_clip is None:
        assert min(norms) > 100 * 1e-3
    else:
        assert max(norms) <= grad_clip * (1 + 1e-5)


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine_to_its_floor() -> None:
    trainer = small_trainer(small_config(steps=10, lr=1e-2, warmup_steps=3, final_lr_fraction=0.1))
    result = trainer.fit()

    def expected(step: int) -> float:  # the step counted from 0, as the schedule counts it
        if step < 3:
            return 1e-2 * (step + 1) / 3
        return 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 7)))

    assert [entry["lr"] for entry in result.history] == pytest.approx([expected(s) for s in range(10)])


def test_load_state_dict_restores_torch_s_global_random_stream() -> None:
    """Code outside the trainer's own generator (a user's objective, dropout) draws from torch's global
    stream; a resumed run must draw what the uninterrupted one would."""
    trainer = small_trainer(small_config())
    with torch.random.fork_rng():
        state = trainer.state_dict()
        expected = torch.rand(8)
        torch.rand(100)  # the stream moves on, as it does in the steps after a checkpoint
        trainer.load_state_dict(state)
        assert torch.equal(torch.rand(8), expected)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps": -1},
        {"batch_size": 0},
        {"log_every": 0},
        {"checkpoint_every": -1},
        {"lr": 0.0},
        {"lr": -1e-3},
        {"lr": math.nan},
        {"final_lr_fraction": 0.0},
        {"final_lr_fraction": 1.5},
        {"recovery_factor": 0.0},
        {"recovery_factor": 1.0},
    ],
    ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()),
)
def test_train_config_rejects_invalid_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="required"):
        TrainConfig(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"grad_clip": -1.0},  # clip_grad_norm_ would flip the gradient: ascent
        {"grad_clip": 0.0},
        {"grad_clip": math.nan},
        {"ema_decay": 1.5},
        {"ema_decay": 1.0},
        {"ema_decay": -0.1},
        {"ema_decay": math.nan},
        {"warmup_steps": -3},
        {"max_recoveries": -1},
        {"max_abs_energy": math.nan},
        {"max_abs_energy": 0.0},
        {"max_abs_energy": -5.0},
    ],
    ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()),
)
def test_train_config_names_the_field_of_an_invalid_value(overrides: dict[str, Any]) -> None:
    (field_name, value), *_ = overrides.items()
    with pytest.raises(ValueError, match=rf"^{field_name} must .*got {value}$"):
        TrainConfig(**overrides)


def test_train_config_accepts_the_edges_of_its_ranges() -> None:
    TrainConfig(grad_clip=None, ema_decay=0.0, warmup_steps=0, max_recoveries=0, max_abs_energy=math.inf)
    TrainConfig(grad_clip=1e-6, ema_decay=0.9999)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # an infinite lr made every weight NaN, and three rollbacks later blamed the sampler step size
        ({"lr": math.inf}, "lr must be a positive finite learning rate, got inf"),
        ({"betas": (1.5, 0.9)}, "betas must be two numbers in [0, 1) (Adam's β₁, β₂), got (1.5, 0.9)"),
        ({"betas": (0.0, 1.0)}, "betas must be two numbers in [0, 1) (Adam's β₁, β₂), got (0.0, 1.0)"),
        ({"betas": (-0.1, 0.9)}, "betas must be two numbers in [0, 1) (Adam's β₁, β₂), got (-0.1, 0.9)"),
        ({"betas": (0.0, math.nan)}, "betas must be two numbers in [0, 1) (Adam's β₁, β₂), got (0.0, nan)"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number ≥ 0, got -1.0"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number ≥ 0, got inf"),
        ({"weight_decay": math.nan}, "weight_decay must be a finite number ≥ 0, got nan"),
        *(
            (
                {"device": name},
                f"device must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1', got {name!r}",
            )
            for name in ("gpu", "cuda:x", "", "Auto")
        ),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_train_config_refuses_bad_optimiser_and_device_settings_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        TrainConfig(**overrides)
    assert str(raised.value) == message
    with pytest.raises(ConfigError) as raised:  # as a params file's train section
        from_dict(
            TrainConfig, {key: list(v) if key == "betas" else v for key, v in overrides.items()}, "train"
        )
    assert str(raised.value) == f"train: {message}"


def test_train_config_refuses_betas_that_are_not_two_numbers() -> None:
    with pytest.raises(ValueError, match=r"^betas must be two numbers in \[0, 1\) .*got \(0\.9,\)$"):
        TrainConfig(betas=(0.9,))  # type: ignore[arg-type]


def test_train_config_accepts_the_optimiser_and_device_settings_in_range() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert TrainConfig(device=device).device == device  # a name is checked, not the machine
    TrainConfig(betas=(0.0, 0.0), weight_decay=0.0)
    TrainConfig(betas=(0.9, 0.999), weight_decay=1e-4, lr=10.0)


def test_zero_steps_is_a_valid_run(tmp_path: Path) -> None:
    result = small_trainer(small_config(steps=0), checkpoint_path=tmp_path / "run.ckpt").fit()
    assert result.steps == 0 and result.history == []
    assert load_checkpoint(tmp_path / "run.ckpt")["step"] == 0


DOCUMENTED_METRICS = {
    "energy_pos",
    "energy_neg",
    "gap",
    "sampler_grad_norm",
    "acceptance_rate",
    "sampler_steps",
    "lr",
    "param_grad_norm",
    "step",
}


def test_metrics_history_has_the_documented_keys_and_callbacks_run_at_log_steps() -> None:
    calls: list[tuple[int, int, dict[str, float]]] = []

    def record(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        calls.append((step, trainer.step, metrics))

    mala = ContrastiveDivergence(MALA(step_size=0.05), n_steps=3)
    trainer = small_trainer(small_config(steps=10, log_every=4), mala, callbacks=[record])
    result = trainer.fit()

    logged_steps = [1, 5, 9, 10]  # every 4th step from the first, and the last
    assert [entry["step"] for entry in result.history] == logged_steps
    assert [step for step, _, _ in calls] == logged_steps
    assert [trainer_step for _, trainer_step, _ in calls] == logged_steps
    assert [metrics for _, _, metrics in calls] == result.history
    for entry in result.history:
        assert DOCUMENTED_METRICS <= set(entry)
        assert all(isinstance(value, float) and math.isfinite(value) for value in entry.values())
        assert entry["gap"] == pytest.approx(entry["energy_pos"] - entry["energy_neg"], abs=1e-6)
        assert 0.0 <= entry["acceptance_rate"] <= 1.0
        assert entry["param_grad_norm"] > 0.0
        assert entry["lr"] == pytest.approx(1e-2)


def test_the_progress_bar_shows_the_step_count_and_the_energies_of_each_log_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = small_trainer(small_config(steps=4, log_every=2, progress=True)).fit()

    frames = capsys.readouterr().err.split("\r")  # the bar redraws in place, one frame after another
    assert frames[-1].startswith("train") and "4/4" in frames[-1]
    assert [entry["step"] for entry in result.history] == [1, 3, 4]
    for entry in result.history:  # each log step redraws the bar with that step's count and energies
        shown = [f"{int(entry['step'])}/4"] + [
            f"{name}={entry[name]:.3g}" for name in ("energy_pos", "energy_neg", "gap")
        ]
        assert any(all(part in frame for part in shown) for frame in frames), (shown, frames)


def test_learning_rate_warms_up_then_decays_on_a_cosine() -> None:
    config = small_config(steps=12, warmup_steps=4, final_lr_fraction=0.1)
    lrs = [entry["lr"] for entry in small_trainer(config).fit().history]

    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-2)
    assert lrs[0] < 0.75e-2 and 1 <= peak <= 4
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1])  # warm-up
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True)  # cosine decay
    # the last step (index 11) used lr · (f + (1 − f)·½(1 + cos(π·7/8))), just above lr · f at the end
    assert lrs[-1] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))))


def record_lr_used(trainer: Trainer) -> list[float]:
    """The learning rate of each optimiser step, as the optimiser reads it when it steps."""
    used: list[float] = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: used.append(optimizer.param_groups[0]["lr"])
    )
    return used


def test_a_longer_resumed_run_keeps_its_schedule_and_logs_the_lr_it_used(tmp_path: Path) -> None:
    # before: the resumed run's schedule was recomputed for the new steps, so its first step used the
    # old schedule's rate while the history logged the new one's, and the rate then jumped back up
    checkpoint = tmp_path / "run.ckpt"
    config = small_config(steps=8, final_lr_fraction=0.1, checkpoint_every=4)
    first = small_trainer(config, checkpoint_path=checkpoint)
    first_used = record_lr_used(first)
    first.fit()
    resumed = small_trainer(dataclasses.replace(config, steps=16), checkpoint_path=checkpoint)
    resumed_used = record_lr_used(resumed)
    assert resumed.step == 8
    resumed.fit()

    assert [entry["lr"] for entry in first.history] == first_used
    assert [entry["lr"] for entry in resumed.history[8:]] == resumed_used  # what each step used
    lrs = first_used + resumed_used
    assert lrs == sorted(lrs, reverse=True)  # the 8-step cosine, then held: never back up
    assert resumed_used == pytest.approx([1e-2 * 0.1] * 8)  # the original schedule's end, held
    assert load_checkpoint(checkpoint)["schedule_steps"] == 8


def test_a_checkpoint_without_its_schedule_length_resumes_on_its_run_s_schedule(tmp_path: Path) -> None:
    # older checkpoints do not store the schedule's length: the steps of the run that wrote them set it
    checkpoint = tmp_path / "run.ckpt"
    config = small_config(steps=8, final_lr_fraction=0.1, checkpoint_every=4)
    small_trainer(config, checkpoint_path=checkpoint).fit()
    state = load_checkpoint(checkpoint)
    del state["schedule_steps"], state["format_version"]
    save_checkpoint(checkpoint, state)

    resumed = small_trainer(dataclasses.replace(config, steps=12), checkpoint_path=checkpoint)
    used = record_lr_used(resumed)
    resumed.fit()

    assert resumed.schedule_steps == 8
    assert [entry["lr"] for entry in resumed.history[8:]] == used == pytest.approx([1e-3] * 4)


class StepSizeRecorder(WrappedObjective):
    """An objective that notes the sampler step size each call's chains run with."""

    def __init__(self, inner: ContrastiveDivergence) -> None:
        super().__init__(inner)
        self.used: list[float] = []

    def __call__(
        self,
        energy: nn.Module,
        x_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, CDStats]:
        self.used.append(self.step_size)
        return self.inner(energy, x_pos, generator=generator, step=step)


def test_the_logged_sampler_step_size_is_the_one_the_step_s_chains_used() -> None:
    # before: it was read after the step, when adaptive MALA had already set the next step's size
    buffer = ReplayBuffer(64, UniformBox((2,), -3.0, 3.0), generator=torch.Generator().manual_seed(2))
    mala = ContrastiveDivergence(MALA(step_size=0.05), n_steps=2, buffer=buffer, target_acceptance=0.3)
    objective = StepSizeRecorder(mala)
    history = small_trainer(small_config(steps=4), objective).fit().history

    assert len(set(objective.used)) == 4  # the step size adapted at every step
    assert [entry["sampler_step_size"] for entry in history] == objective.used


# --- the divergence guard --------------------------------------------------------------------------


class BlowsUpObjective(WrappedObjective):
    """Contrastive divergence whose loss and data energy become ``blowup`` whenever ``blows_up(step,
    sampler step size)`` says so: NaN for non-finite energies, a huge number for exploding ones."""

    def __init__(
        self, inner: ContrastiveDivergence, blows_up: Callable[[int, float], bool], blowup: float = math.nan
    ):
        super().__init__(inner)
        self.blows_up = blows_up
        self.blowup = blowup
        self.blown_up_at: list[int] = []

    def __call__(
        self,
        energy: nn.Module,
        x_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, CDStats]:
        loss, stats = self.inner(energy, x_pos, generator=generator, step=step)
        assert step is not None
        if self.blows_up(step, self.step_size):
            self.blown_up_at.append(step)
            loss, stats = self.blow_up(loss, stats)
        return loss, stats

    def blow_up(self, loss: Tensor, stats: CDStats) -> tuple[Tensor, CDStats]:
        # a NaN loss also turns the weights NaN at the optimiser step
        return loss * self.blowup, dataclasses.replace(stats, energy_pos=stats.energy_pos + self.blowup)


class PoisonsGradientsObjective(BlowsUpObjective):
    """The loss and energies stay finite, but the gradient is NaN: √0 has an infinite slope, and ∞ · 0 is
    NaN. Only the weights show it."""

    def blow_up(self, loss: Tensor, stats: CDStats) -> tuple[Tensor, CDStats]:
        return loss + torch.sqrt(0.0 * loss), stats  # the value is unchanged; d/dθ is NaN


def test_weights_gone_non_finite_at_the_last_step_are_rolled_back_not_returned() -> None:
    """No checkpoint falls due at the last step (10 is no multiple of 4): the final check alone sees it."""
    objective = PoisonsGradientsObjective(pcd_objective(0.1), lambda step, eta: step == 9 and eta > 0.06)
    trainer = small_trainer(small_config(steps=10, checkpoint_every=4, recovery_factor=0.5), objective)
    result = trainer.fit()
    assert objective.blown_up_at == [9] and result.recoveries == 1 and result.steps == 10
    for name, tensor in trainer.energy.state_dict().items():
        assert torch.isfinite(tensor).all(), name


@pytest.fixture
def written_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every state the trainer writes to disk, each checked for NaN and infinities as it is written."""
    written: list[dict[str, Any]] = []
    save = ebm.trainer.save_checkpoint

    def save_finite_only(path: Path, state: dict[str, Any]) -> Path:
        for name, tensor in finite_checked_tensors(state):
            assert torch.isfinite(tensor).all(), f"a checkpoint with non-finite {name} was written"
        written.append(state)
        return save(path, state)

    monkeypatch.setattr(ebm.trainer, "save_checkpoint", save_finite_only)
    return written


def finite_checked_tensors(state: Any, where: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(state, Tensor):
        if state.is_floating_point():
            yield where, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from finite_checked_tensors(value, f"{where}.{key}")
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            yield from finite_checked_tensors(value, f"{where}[{index}]")


@pytest.mark.parametrize("blowup", [math.nan, 1e9], ids=["nan", "exploding"])
def test_divergence_rolls_back_shrinks_step_sizes_and_finishes(
    blowup: float, tmp_path: Path, written_checkpoints: list[dict[str, Any]]
) -> None:
    # Energies blow up from step 6 on while the sampler step is above 0.06; one rollback to the
    # checkpoint at step 4 halves it (0.1 → 0.05) and training completes.
    objective = BlowsUpObjective(pcd_objective(0.1), lambda step, eta: step >= 6 and eta > 0.06, blowup)
    config = small_config(steps=12, lr=1e-2, ema_decay=0.9, checkpoint_every=4, recovery_factor=0.5)
    trainer = small_trainer(config, objective, checkpoint_path=tmp_path / "run.ckpt")
    clean = small_trainer(config, BlowsUpObjective(pcd_objective(0.1), lambda step, eta: False, blowup))
    clean.fit()

    result = trainer.fit()

    assert result.steps == trainer.step == 12
    assert result.recoveries == trainer.recoveries == 1
    assert objective.blown_up_at == [6]
    assert objective.step_size == pytest.approx(0.05)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert trainer.scheduler.base_lrs == pytest.approx([5e-3])
    assert [entry["step"] for entry in result.history] == list(range(1, 13))  # rolled-back steps dropped
    assert result.history[:4] == clean.history[:4]  # up to the last good state
    for entry in result.history[4:]:
        assert entry["lr"] == pytest.approx(5e-3)
        assert entry["sampler_step_size"] == pytest.approx(0.05)
    assert trainer.ema is not None
    final_weights = {"energy": trainer.energy.state_dict(), "ema": trainer.ema.state_dict()}
    for name, tensor in finite_checked_tensors(final_weights):
        assert torch.isfinite(tensor).all(), name
    assert sorted({state["step"] for state in written_checkpoints}) == [4, 8, 12]
    saved = load_checkpoint(tmp_path / "run.ckpt")
    assert saved["recoveries"] == 1 and saved["objective"]["step_size"] == pytest.approx(0.05)
    # the optimizer rolled back with the weights: Adam counts the 12 kept steps, not the 2 undone ones too
    adam_steps = {float(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {12.0}


@pytest.mark.parametrize("checkpoint_every", [0, 5], ids=["no_checkpoint_between", "checkpoint_between"])
def test_each_rollback_shrinks_step_sizes_by_the_factor_once(
    checkpoint_every: int, written_checkpoints: list[dict[str, Any]]
) -> None:
    # Two one-off blow-ups; with checkpoint_every=5 a checkpoint (already holding the once-shrunk
    # step sizes) is written between them. Either way two rollbacks mean a factor 0.5² overall.
    pending = {7, 13}

    def blows_up_once_at_7_and_13(step: int, eta: float) -> bool:
        if step in pending:
            pending.remove(step)
            return True
        return False

    objective = BlowsUpObjective(pcd_objective(0.1), blows_up_once_at_7_and_13, math.nan)
    trainer = small_trainer(small_config(steps=16, checkpoint_every=checkpoint_every), objective)

    result = trainer.fit()

    assert result.recoveries == 2 and result.steps == 16
    assert objective.step_size == pytest.approx(0.1 * 0.25)
    assert trainer.scheduler.base_lrs == pytest.approx([1e-2 * 0.25])
    assert result.history[-1]["lr"] == pytest.approx(1e-2 * 0.25)


def test_persistent_divergence_raises_after_max_recoveries_and_never_writes_nan(
    tmp_path: Path, written_checkpoints: list[dict[str, Any]]
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    objective = BlowsUpObjective(pcd_objective(0.1), lambda step, eta: step >= 6, math.nan)
    config = small_config(steps=12, ema_decay=0.9, checkpoint_every=4, max_recoveries=2)
    trainer = small_trainer(config, objective, checkpoint_path=checkpoint)

    with pytest.raises(TrainingDivergedError) as raised:
        trainer.fit()

    message = str(raised.value)
    assert "non-finite" in message and "at step 6" in message
    assert "2 rollbacks with smaller steps" in message and "sampler step size" in message
    assert "last good state is step 4" in message
    assert str(checkpoint) in message
    assert objective.blown_up_at == [6, 6, 6]  # the first try and one per rollback
    assert objective.step_size == pytest.approx(0.1 * 0.25)
    assert [state["step"] for state in written_checkpoints] == [4]
    saved = load_checkpoint(checkpoint)
    assert saved["step"] == 4
    for name, tensor in finite_checked_tensors(saved):
        assert torch.isfinite(tensor).all(), name
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]


def test_a_sampler_step_far_too_big_ends_in_training_diverged_error(
    tmp_path: Path, written_checkpoints: list[dict[str, Any]]
) -> None:
    # Langevin chains thrown ~1e12 away give energies far above max_abs_energy; halving the step
    # three times does not bring them back, so the run stops without writing anything.
    objective = ContrastiveDivergence(Langevin(step_size=1e12), n_steps=3)
    checkpoint = tmp_path / "run.ckpt"
    trainer = small_trainer(
        small_config(checkpoint_every=1, max_recoveries=3), objective, checkpoint_path=checkpoint
    )

    with pytest.raises(TrainingDivergedError, match=r"exploding energies .* 3 rollbacks"):
        trainer.fit()

    assert trainer.recoveries == 4
    assert objective.sampler.step_size == pytest.approx(1e12 * 0.5**3)
    assert written_checkpoints == []
    assert not checkpoint.exists()


# --- the lag guard ---------------------------------------------------------------------------------


class LagsObjective(BlowsUpObjective):
    """Contrastive divergence whose reported negatives sit ``lag(step)`` above their true energy: E⁺ − E⁻
    is +1 (chains that keep up) where the lag is 0, and lower by the lag elsewhere; the loss is untouched."""

    def __init__(self, inner: ContrastiveDivergence, lag: Callable[[int], float]):
        super().__init__(inner, lambda step, eta: False, 0.0)
        self.lag = lag
        self.lagged_at: list[int] = []

    def __call__(
        self,
        energy: nn.Module,
        x_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, CDStats]:
        loss, stats = self.inner(energy, x_pos, generator=generator, step=step)
        assert step is not None
        lag = self.lag(step)
        if lag:
            self.lagged_at.append(step)
        energy_neg = stats.energy_pos - 1.0 + lag
        return loss, dataclasses.replace(stats, energy_neg=energy_neg, gap=stats.energy_pos - energy_neg)


def once(steps: set[int], lag: float) -> Callable[[int], float]:
    """A lag at each of ``steps`` the first time training gets there, none on the way back."""
    pending = set(steps)

    def lag_at(step: int) -> float:
        if step in pending:
            pending.discard(step)
            return lag
        return 0.0

    return lag_at


def test_lagging_chains_roll_back_and_shrink_only_the_learning_rate(tmp_path: Path) -> None:
    # E⁺ − E⁻ = −4 at step 6 of the first pass: with decay 0.5 the average falls to about −1.5 < −1;
    # one rollback to step 4 halves the lr and keeps the sampler step.
    objective = LagsObjective(pcd_objective(0.1), once({6}, 5.0))
    config = small_config(steps=12, lr=1e-2, checkpoint_every=4, max_lag=1.0, lag_decay=0.5)
    trainer = small_trainer(config, objective, checkpoint_path=tmp_path / "run.ckpt")

    result = trainer.fit()

    assert objective.lagged_at == [6]
    assert result.steps == 12 and result.recoveries == 1
    assert objective.step_size == pytest.approx(0.1)  # shorter steps would only lag more
    assert trainer.scheduler.base_lrs == pytest.approx([5e-3])
    assert [entry["step"] for entry in result.history] == list(range(1, 13))
    assert result.history[5]["lr"] == pytest.approx(5e-3)  # step 6 again, after the rollback
    saved = load_checkpoint(tmp_path / "run.ckpt")
    assert saved["recoveries"] == 1 and saved["lag_average"] == pytest.approx(1.0, abs=1e-3)

    unguarded = LagsObjective(pcd_objective(0.1), lambda step: 5.0 if step == 6 else 0.0)
    quiet = small_trainer(small_config(steps=12, lr=1e-2, checkpoint_every=4), unguarded)
    assert quiet.fit().recoveries == 0  # max_lag None: the same lag passes unnoticed


def test_a_state_already_lagging_is_never_the_rollback_point() -> None:
    # A slow lag (E⁺ − E⁻ = −0.5 from step 5) keeps the average between −1 and 0 when the checkpoint at
    # step 8 is taken; the jump at step 10 fires the guard, and training rolls back to step 4.
    def slow_then_sudden(step: int) -> float:
        return 0.0 if step < 5 else 1.5 if step < 10 else 20.0

    objective = LagsObjective(pcd_objective(0.1), slow_then_sudden)
    config = small_config(steps=12, checkpoint_every=4, max_lag=1.0, lag_decay=0.5, max_recoveries=1)
    trainer = small_trainer(config, objective)
    with pytest.raises(TrainingDivergedError, match="last good state is step 4"):
        trainer.fit()
    assert objective.lagged_at[:6] == [5, 6, 7, 8, 9, 10] and objective.lagged_at[6] == 5  # back to 4


class Killed(Exception):
    """Stands in for a kill: raised by a callback, it ends fit() without the final checkpoint."""


def test_a_run_killed_while_the_chains_lag_resumes_from_the_last_good_state(tmp_path: Path) -> None:
    # A slow lag from step 5 (E⁺ − E⁻ = −0.5) makes the checkpoint at step 8 unhealthy; a sudden one at
    # step 10, only at the first lr, fires the guard and rolls back to step 4, after which the run
    # finishes at half the lr. Killed just after the step-8 checkpoint, the run must resume from the
    # state it would roll back to, step 4, not from step 8, and then end exactly as without the kill.
    def lagging_run(path: Path, callbacks: list[Any] | None = None) -> Trainer:
        objective = LagsObjective(pcd_objective(0.1), lambda step: 0.0)
        config = small_config(steps=16, checkpoint_every=4, max_lag=1.0, lag_decay=0.5, ema_decay=0.9)
        trainer = small_trainer(config, objective, checkpoint_path=path, callbacks=callbacks or [])

        def lag(step: int) -> float:
            first_lr = trainer.optimizer.param_groups[0]["lr"] > 6e-3
            return 20.0 if step >= 10 and first_lr else 1.5 if step >= 5 else 0.0

        objective.lag = lag
        return trainer

    uninterrupted = lagging_run(tmp_path / "full.ckpt")
    assert uninterrupted.fit().recoveries == 1

    def kill_after_the_step_8_checkpoint(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step == 9:
            raise Killed

    checkpoint = tmp_path / "killed.ckpt"
    with pytest.raises(Killed):
        lagging_run(checkpoint, [kill_after_the_step_8_checkpoint]).fit()
    saved = load_checkpoint(checkpoint)
    assert saved["step"] == 4 and saved["lag_average"] >= 0  # the step-8 state was lagging

    resumed = lagging_run(checkpoint)
    assert resumed.step == 4
    assert resumed.fit().recoveries == 1

    assert_identical(resumed.state_dict(), uninterrupted.state_dict())
    assert_identical(load_checkpoint(checkpoint), load_checkpoint(tmp_path / "full.ckpt"))
    assert load_checkpoint(checkpoint)["step"] == 16  # the finished state, lagging or not


def test_lagging_chains_that_never_catch_up_end_in_training_diverged_error() -> None:
    objective = LagsObjective(pcd_objective(0.1), lambda step: 5.0 if step >= 3 else 0.0)
    config = small_config(steps=12, checkpoint_every=2, max_lag=1.0, lag_decay=0.5, max_recoveries=2)
    with pytest.raises(TrainingDivergedError, match="chains lagging the energy") as raised:
        small_trainer(config, objective).fit()
    message = str(raised.value)  # the lag guard only shrank the lr: its advice is not "a smaller step"
    assert "2 rollbacks with smaller learning rates" in message and "longer chains" in message
    assert "sampler step size" not in message


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"max_lag": 0.0}, "max_lag"), ({"max_lag": math.inf}, "max_lag"), ({"lag_decay": 1.0}, "lag_decay")],
)
def test_lag_guard_rejects_bad_settings(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


# --- what the checkpoint path may hold -------------------------------------------------------------


def test_a_model_file_is_refused_as_a_checkpoint_naming_its_kind(tmp_path: Path) -> None:
    # before: taken for another run's checkpoint, with a diff of every config key of both
    path = save_model(tmp_path / "model.pt", small_energy(), kind="mlp_energy", config=small_energy().config)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as raised:
        small_trainer(small_config(steps=2), checkpoint_path=path)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a training checkpoint (it is a model file of kind 'mlp_energy'")
    assert "another run" not in message
    assert path.read_bytes() == before


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (drop("energy"), "no 'energy' entry"),  # before: KeyError 'energy'
        (drop("generator"), "no 'generator' entry"),
        (drop("history"), "no 'history' entry"),
        (lambda state: state.update(optimizer=[1, 2]), "'optimizer' is a list"),
        (lambda state: state.update(world_size=2), "its 'ranks' entry is None"),
    ],
    ids=["energy", "generator", "history", "optimizer_list", "two_ranks_without_ranks"],
)
def test_a_checkpoint_missing_an_entry_is_refused_naming_it(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], problem: str
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    small_trainer(small_config(steps=2), checkpoint_path=checkpoint).fit()
    state = load_checkpoint(checkpoint)
    del state["format_version"]
    change(state)
    save_checkpoint(checkpoint, state)
    before = checkpoint.read_bytes()

    with pytest.raises(CheckpointError) as raised:
        small_trainer(small_config(steps=4), checkpoint_path=checkpoint)
    message = str(raised.value)
    assert message.startswith(f"{checkpoint} is not a training checkpoint") and problem in message
    assert checkpoint.read_bytes() == before


CUDA_GENERATOR_STATE = torch.zeros(16, dtype=torch.uint8)
"""What ``torch.Generator("cuda").get_state()`` holds (seed and offset): 16 bytes, a CPU one 5056."""


@pytest.mark.parametrize("stored", [True, False], ids=["device_type_stored", "older_checkpoint"])
def test_a_checkpoint_from_another_type_of_device_is_refused_naming_both(
    tmp_path: Path, stored: bool
) -> None:
    # before: RuntimeError "Expected a CPUGeneratorImplState of size 5056 but found ... 16", unexplained.
    # A run on device "auto" wrote this on a GPU machine; it is resumed on one without a GPU.
    checkpoint = tmp_path / "run.ckpt"
    small_trainer(small_config(steps=2, device="auto"), checkpoint_path=checkpoint).fit()
    state = load_checkpoint(checkpoint)
    del state["format_version"]
    state.update(generator=CUDA_GENERATOR_STATE, cuda_rng=CUDA_GENERATOR_STATE, device_type="cuda")
    if not stored:
        del state["device_type"]  # checkpoints from before it was stored: told by the generator's state
    save_checkpoint(checkpoint, state)

    with pytest.raises(CheckpointError) as raised:
        small_trainer(small_config(steps=4, device="auto"), checkpoint_path=checkpoint)
    message = str(raised.value)
    assert message.startswith(
        f"{checkpoint} was written by a run on a 'cuda' device and this run is on 'cpu'"
    )
    assert "resumes exactly only on the same kind of device" in message and "train.device" in message


def test_the_checkpoint_stores_the_device_type_and_resumes_on_another_device_of_it(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    small_trainer(small_config(steps=2, device="auto"), checkpoint_path=checkpoint).fit()
    assert load_checkpoint(checkpoint)["device_type"] == "cpu"
    assert small_trainer(small_config(steps=4, device="cpu:0"), checkpoint_path=checkpoint).step == 2


def cuda_trainer(device: str, steps: int, checkpoint_path: Path) -> Trainer:
    """:func:`small_trainer` with the energy, data, buffer and generators on ``device``."""
    on = torch.device(device)
    buffer = ReplayBuffer(
        64, UniformBox((2,), -3.0, 3.0), generator=torch.Generator(on).manual_seed(2), device=on
    )
    objective = ContrastiveDivergence(Langevin(step_size=0.1), n_steps=3, alpha=0.1, buffer=buffer)
    config = small_config(steps=steps, device=device)
    return Trainer(small_energy().to(on), objective, gaussian_data(), config, checkpoint_path=checkpoint_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_checkpoint_resumes_on_any_cuda_device_name_and_not_on_the_cpu(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    cuda_trainer("cuda:0", 2, checkpoint).fit()
    assert load_checkpoint(checkpoint)["device_type"] == "cuda"
    resumed = cuda_trainer("cuda", 4, checkpoint)  # the same type of device: resumes
    assert resumed.step == 2
    resumed.fit()
    with pytest.raises(CheckpointError, match="on a 'cuda' device and this run is on 'cpu'"):
        cuda_trainer("cpu", 6, checkpoint)
