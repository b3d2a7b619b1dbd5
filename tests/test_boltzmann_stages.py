"""The Boltzmann pipeline stages on tmp_path: params, the four stages through their CLI, MLflow runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from paramfiles import REPO, dotted_keys, quick_params
from stage_sources import assert_declared, executed_sources
from test_rbm import fashion_mnist_images, needs_fashion_mnist

import ebm.stages.boltzmann as stage_module
from ebm.boltzmann.rbm import BernoulliRBM
from ebm.boltzmann.structured import GridCRFEnergy
from ebm.checkpoint import load_model
from ebm.config import ConfigError
from ebm.stages.boltzmann import BoltzmannParams, main


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/quick.yaml"])
def test_params_files_build_the_boltzmann_configs_and_hold_every_key_dvc_reads(params_file: str) -> None:
    raw = yaml.safe_load((REPO / params_file).read_text())
    params = BoltzmannParams.from_params(raw)
    assert params.rbm.variants and all(cd.n_steps >= 1 for cd in params.rbm.variants.values())
    assert params.rbm.train.grad_clip is None and params.rbm.train.max_abs_energy >= 1e5
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = ("train_rbm", "evaluate_rbm", "train_structured", "evaluate_structured")
    read = {key for name in names for key in stages[name]["params"]}
    assert read <= dotted_keys(raw)
    assert {"boltzmann.rbm.train", "boltzmann.structured.inference"} <= read


def test_the_full_params_train_cd1_cd10_and_pcd_with_500_hidden_units() -> None:
    params = BoltzmannParams.from_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert params.rbm.n_hidden == 500
    assert {name: (cd.n_steps, cd.persistent) for name, cd in params.rbm.variants.items()} == {
        "cd1": (1, False),
        "cd10": (10, False),
        "pcd": (1, True),
    }


def test_a_typo_in_the_boltzmann_section_is_an_error_naming_it() -> None:
    raw = quick_params()
    raw["boltzmann"]["rbm"]["train"]["stpes"] = 3
    with pytest.raises(ConfigError, match=r"boltzmann\.rbm\.train\.stpes"):
        BoltzmannParams.from_params(raw)
    raw = quick_params()
    raw["boltzmann"]["rbm"]["variants"]["cd5"] = {"k": 5}
    with pytest.raises(ConfigError, match=r"boltzmann\.rbm\.variants\.cd5\.k"):
        BoltzmannParams.from_params(raw)
    raw = quick_params()
    raw["boltzmann"]["structured"]["inference"]["gibbs_burn_in"] = 1000
    with pytest.raises(ConfigError, match="gibbs_burn_in"):
        BoltzmannParams.from_params(raw)
    raw = quick_params()
    raw["boltzmann"]["gibbs"] = {}
    with pytest.raises(ConfigError, match=r"boltzmann\.gibbs"):
        BoltzmannParams.from_params(raw)


def write_prepared_splits(folder: Path, n_train: int, n_test: int) -> None:
    """Prepared splits in the format the prepare_images stage writes, holding real Fashion-MNIST images."""
    folder.mkdir(parents=True)
    for name, images in (
        ("train", fashion_mnist_images(n_train)),
        ("validation", fashion_mnist_images(20)),
        ("test", fashion_mnist_images(n_test, train=False)),
    ):
        n = images.shape[0]
        payload = {
            "images": images,
            "labels": torch.zeros(n, dtype=torch.int64),
            "source_indices": torch.arange(n),
        }
        torch.save(payload, folder / f"{name}.pt")


@needs_fashion_mnist
def test_the_four_stages_write_their_outs_and_log_to_the_boltzmann_experiment(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    from ebm.cli import main as ebm_main

    root = tmp_path / "project"
    write_prepared_splits(root / "data" / "images" / "fashion_mnist", n_train=400, n_test=100)
    raw = copy.deepcopy(quick_params())
    raw["boltzmann"]["binarize"]["seed"] = 3  # not the CLI's own default: it must read the model's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    real_ais = stage_module.ais_log_partition

    def uneven_weights(*args: Any, **kwargs: Any) -> Any:  # Ẑ − 3σ̂ ≤ 0: log of it is −inf by design
        return dataclasses.replace(real_ais(*args, **kwargs), log_partition_minus_3sd=-math.inf)

    monkeypatch.setattr(stage_module, "ais_log_partition", uneven_weights)

    stages = ("train_rbm", "evaluate_rbm", "train_structured", "evaluate_structured")
    for stage in stages:
        with executed_sources() as executed:
            main([stage, "--params", str(tmp_path / "params.yaml"), "--root", str(root)])
        assert_declared(stage, executed)

    reports = root / "reports" / "boltzmann"
    assert sorted(p.name for p in (root / "models" / "boltzmann" / "rbm").iterdir()) == ["cd1.pt", "pcd.pt"]
    assert isinstance(load_model(root / "models" / "boltzmann" / "rbm" / "pcd.pt"), BernoulliRBM)
    assert isinstance(load_model(root / "models" / "boltzmann" / "structured.pt"), GridCRFEnergy)

    train = json.loads((reports / "rbm_train.json").read_text())
    assert train["pcd"]["steps"] == 60 and train["pcd"]["persistent"] is True
    metrics = json.loads((reports / "rbm_metrics.json").read_text())
    assert metrics["n_test"] == 100
    for variant in ("cd1", "pcd"):
        result = metrics[variant]
        assert result["ais"]["log_partition_minus_3sd"] is None  # before: −inf failed write_json at the end
        assert abs(result["ais_minus_exact"]) < 0.1 + 5 * result["ais"]["standard_error"]
        exact_gap = result["test_log_likelihood"] - result["test_log_likelihood_exact"]
        assert exact_gap == pytest.approx(-result["ais_minus_exact"], abs=1e-6)  # LL = −F − log Z
        assert -784 * 0.7 < result["test_log_likelihood"] < 0 and result["test_log_likelihood_se"] > 0
    figures = sorted(p.name for p in (reports / "rbm_figures").iterdir())
    assert figures == [
        "cd1_reconstructions.png",
        "cd1_samples.png",
        "pcd_reconstructions.png",
        "pcd_samples.png",
    ]
    curve = (reports / "rbm_curves" / "cd1.csv").read_text().splitlines()
    assert curve[0].split(",")[-2] == "reconstruction_error" and len(curve) == 1 + 7

    structured = json.loads((reports / "structured_metrics.json").read_text())
    methods = structured["methods"]
    assert structured["table_order"][:2] == ["noisy_threshold", "independent"]
    assert set(structured["table_order"]) == set(methods) and "langevin" in methods
    # the pixel-wise reference thresholds the noisy input at the task's own mask threshold (0.25 here)
    from ebm.boltzmann.structured import segmentation_scores, split_state

    parsed = stage_module.BoltzmannParams.from_params(raw)
    x, truth = split_state(stage_module.structured_states(parsed, stage_module.BoltzmannPaths(root), "test"))
    threshold = parsed.structured.task.mask_threshold
    assert threshold != 0.5 and structured["n_test"] == len(x)
    accuracy, _ = segmentation_scores((x > threshold).float(), truth)
    assert methods["noisy_threshold"]["accuracy"] == pytest.approx(accuracy)
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in methods.values())
    assert sorted(p.name for p in (reports / "structured_figures").iterdir()) == [
        "examples.png",
        "inference_table.png",
    ]

    model = root / "models" / "boltzmann" / "rbm" / "cd1.pt"
    capsys.readouterr()
    ais = raw["boltzmann"]["rbm"]["evaluation"]["ais"]  # the stage's AIS settings and seed: its figures
    # no --data and no binarize options: the dataset and the draw (seed 3) come from the model file
    command = ["rbm", "loglik", "--model", str(model), "--max-test", "100"]
    monkeypatch.chdir(root)
    assert (
        ebm_main([*command, "--chains", str(ais["n_chains"]), "--temperatures", str(ais["n_temperatures"])])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"log Z (exact, by enumeration) = {metrics['cd1']['exact_log_partition']:.3f}" in printed
    assert f"test log-likelihood = {metrics['cd1']['test_log_likelihood']:.2f}" in printed
    assert ebm_main([*command[:-1], "60", "--chains", "8", "--temperatures", "10"]) == 0
    assert "nats per image (60 images)" in capsys.readouterr().out  # fewer than the split holds
    assert ebm_main(["rbm", "loglik", "--model", str(root / "models" / "boltzmann" / "structured.pt")]) == 2
    assert "not an RBM" in capsys.readouterr().err

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("boltzmann").experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert sorted(by_name) == sorted(stages) and all(r.info.status == "FINISHED" for r in runs)
    history = client.get_metric_history(by_name["train_rbm"].info.run_id, "pcd/reconstruction_error")
    assert len(history) >= 5
    evaluated = by_name["evaluate_rbm"].data.metrics
    assert {"cd1/test_log_likelihood", "cd1/ais/log_partition", "pcd/exact_log_partition"} <= set(evaluated)
    assert "methods/gibbs_marginals/accuracy" in by_name["evaluate_structured"].data.metrics
    artifacts = {
        a.path
        for a in client.list_artifacts(by_name["evaluate_structured"].info.run_id, "structured_figures")
    }
    assert artifacts == {"structured_figures/examples.png", "structured_figures/inference_table.png"}
    for stage, logged in (("train_rbm", "rbm/cd1.pt"), ("train_structured", "structured.pt")):
        path = client.download_artifacts(by_name[stage].info.run_id, logged, str(tmp_path / stage))
        assert Path(path).read_bytes() == (root / "models" / "boltzmann" / logged).read_bytes()


def test_a_missing_prepared_split_says_which_stage_to_run(tmp_path: Path) -> None:
    from ebm.stages.boltzmann import BoltzmannPaths, train_rbms

    params = BoltzmannParams.from_params(quick_params())
    with pytest.raises(FileNotFoundError, match="prepare_images"):
        train_rbms(params, BoltzmannPaths(tmp_path))


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        pytest.param("rbm.evaluation", "max_test", -3, id="rbm_max_test_negative"),
        pytest.param("rbm.evaluation", "max_test", 0, id="rbm_max_test_zero"),
        pytest.param("structured", "max_train", 0, id="structured_max_train_zero"),
        pytest.param("structured", "max_test", -1, id="structured_max_test_negative"),
    ],
)
def test_a_cap_on_the_images_below_one_is_an_error_naming_the_key(where: str, key: str, value: int) -> None:
    # images[:-3] scored all test images but the last three, and images[:0] trained on none, silently
    raw = quick_params()
    section = raw["boltzmann"]
    for part in where.split("."):
        section = section.setdefault(part, {})
    section[key] = value
    with pytest.raises(ConfigError) as raised:
        BoltzmannParams.from_params(raw)
    message = str(raised.value)
    assert f"boltzmann.{where}" in message and key in message and "≥ 1" in message and str(value) in message
    section[key] = None  # no cap: every image
    assert BoltzmannParams.from_params(raw) is not None


def test_a_failed_image_grid_write_keeps_the_previous_png_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.utils

    from ebm.stages.boltzmann import _save_grid

    path = tmp_path / "figures" / "cd1_samples.png"
    _save_grid(torch.rand(4, 1, 8, 8), path)
    previous = path.read_bytes()
    assert previous[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_mode & 0o777 == 0o644

    def disk_full_half_way(images: torch.Tensor, target: Any, **options: Any) -> None:
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torchvision.utils, "save_image", disk_full_half_way)
    with pytest.raises(OSError, match="No space left"):
        _save_grid(torch.rand(4, 1, 8, 8), path)

    assert path.read_bytes() == previous
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("where", "value", "complaint"),
    [
        pytest.param("rbm", None, "boltzmann.rbm must be a mapping, got None", id="rbm_null"),
        pytest.param("structured", [1], "boltzmann.structured must be a mapping", id="structured_list"),
        pytest.param(
            "rbm.weight_std", float("nan"), "boltzmann.rbm: weight_std must be a finite", id="nan_std"
        ),
        pytest.param("rbm.n_hidden", 0, "boltzmann.rbm: n_hidden must be ≥ 1", id="no_hidden"),
        # before: blamed on boltzmann.rbm.variants.cd1, whose recipe refused it later
        pytest.param("rbm.weight_std", 0.0, "boltzmann.rbm: weight_std must be a finite", id="zero_std"),
        pytest.param(
            "rbm.evaluation.exact_max_units", 30, "exact_max_units must lie in [0, 26]", id="too_many_units"
        ),
        pytest.param("rbm.evaluation.sample_steps", -1, "sample_steps ≥ 0", id="negative_steps"),
        pytest.param(
            "rbm.variants.pcd.n_chains",
            31,
            r"variants\.pcd: .* n_chains \(31\) must be at least the batch size \(32\)",
            id="fewer_chains_than_the_batch",
        ),
    ],
)
def test_bad_boltzmann_values_are_errors_naming_the_key_before_any_stage_runs(
    where: str, value: Any, complaint: str
) -> None:
    # before: raw TypeErrors, or torch's "normal expects std >= 0.0" after models/boltzmann/rbm was cleared
    raw = quick_params()
    *parents, key = where.split(".")
    section = raw["boltzmann"]
    for part in parents:
        section = section[part]
    section[key] = value
    with pytest.raises(ConfigError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        BoltzmannParams.from_params(raw)


def test_the_reconstruction_curve_stays_on_its_steps_through_a_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the callback's rows used to be matched to the history by position: a rollback discards history
    # rows but not the rows logged for them, and every value after it landed on another step
    import csv

    import ebm.stages.boltzmann as stages
    import ebm.trainer as trainer_module
    from ebm.stages.boltzmann import BoltzmannPaths, train_rbms

    folder = tmp_path / "data" / "images" / "fake"
    folder.mkdir(parents=True)
    images = (torch.rand(40, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels, indices = torch.zeros(40, dtype=torch.int64), torch.arange(40)
    torch.save({"images": images, "labels": labels, "source_indices": indices}, folder / "train.pt")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["images"]["data"]["dataset"] = "fake"
    rbm = raw["boltzmann"]["rbm"]
    rbm["n_hidden"] = 4
    rbm["variants"] = {"cd1": {"n_steps": 1, "persistent": False}}
    rbm["train"].update(steps=8, batch_size=8, checkpoint_every=4, log_every=1, progress=False)
    params = BoltzmannParams.from_params(raw)

    real_check, fired = trainer_module.Trainer._check_energies, []

    def diverge_once_at_step_6(self: Any, stats: Any) -> Any:
        if self.step == 6 and not fired:
            fired.append(True)
            raise trainer_module.NonFiniteLossError(self.step, "forced")
        return real_check(self, stats)

    measured: dict[int, float] = {}  # the last value measured at each step, as the curve should hold
    real_callback = stages._reconstruction_callback

    def recording_callback(probe: torch.Tensor, rows: list[dict[str, float]]) -> Any:
        inner = real_callback(probe, rows)

        def record(trainer: Any, step: int, metrics: dict[str, float]) -> None:
            inner(trainer, step, metrics)
            measured[step] = rows[-1]["reconstruction_error"]

        return record

    monkeypatch.setattr(trainer_module.Trainer, "_check_energies", diverge_once_at_step_6)
    monkeypatch.setattr(stages, "_reconstruction_callback", recording_callback)
    train_rbms(params, BoltzmannPaths(tmp_path))

    assert fired  # the rollback happened
    with open(tmp_path / "reports" / "boltzmann" / "rbm_curves" / "cd1.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(row["step"])) for row in rows] == list(range(1, 9))
    for row in rows:
        expected = measured[int(float(row["step"]))]
        assert float(row["reconstruction_error"]) == pytest.approx(expected, rel=1e-12)
