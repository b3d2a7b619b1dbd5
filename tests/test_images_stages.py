"""Image pipeline stages end to end on tiny files in the real formats, the CLI with MLflow, the benchmark."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from paramfiles import REPO, dotted_keys, quick_params
from stage_sources import assert_declared, executed_sources
from test_images_data import write_cifar_copy, write_mnist_copy

import ebm
from ebm.checkpoint import write_json
from ebm.config import ConfigError
from ebm.evaluation.curves import write_curve_csv
from ebm.evaluation.images import bits_per_dim
from ebm.jem import dequantise
from ebm.stages.images import ImagePaths, ImagesParams, evaluate, main, prepare, render, train


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/quick.yaml"])
def test_params_files_build_the_image_configs_and_hold_every_key_dvc_reads(params_file: str) -> None:
    raw = yaml.safe_load((REPO / params_file).read_text())
    params = ImagesParams.from_params(raw)
    assert params.spec().image_shape == (1, 28, 28)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    read = {
        key for name, stage in stages.items() if name.endswith("_images") for key in stage.get("params", [])
    }
    assert read and read <= dotted_keys(raw)


def test_a_typo_in_the_images_section_is_an_error_naming_it() -> None:
    raw = quick_params()
    raw["images"]["train"]["stpes"] = 3
    with pytest.raises(ConfigError, match=r"images\.train\.stpes"):
        ImagesParams.from_params(raw)
    raw = quick_params()
    raw["images"]["evaluation"]["ood_score"] = "likelihood"
    with pytest.raises(ConfigError, match="grad_norm"):
        ImagesParams.from_params(raw)


def colour_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 CIFAR-shaped images whose class (0, 1, 2) is their dominant colour channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 80, (n, 3, 32, 32))
    images[np.arange(n), labels] += 150
    return images.astype(np.uint8), labels


def tiny_cifar_params(copy_dir: Path) -> dict[str, Any]:
    raw = quick_params()
    images = raw["images"]
    images["data"].update(dataset="cifar10", local_copy=str(copy_dir), n_validation=20, max_train=None)
    images["model"].update(architecture="resnet32", width=4, blocks_per_stage=1, spectral_norm=True)
    images["train"].update(steps=30, batch_size=16, lr=0.01, log_every=5, checkpoint_every=10)
    images["loss"].update(n_steps=2, buffer_size=64)
    images["buffer_init"] = "uniform"  # ten 3072×3072 Cholesky factors would triple this test's time
    images["classifier"].update(steps=20, batch_size=16)
    images["evaluation"].update(n_buffer_samples=32, n_noise_samples=8, n_restore=4, ood_score="grad_norm")
    images["evaluation"]["ais"].update(n_chains=4, n_temperatures=5)
    images["sampling"].update(n_steps=3, buffer_steps=2, inpaint_steps=2, denoise_steps=2, batch_size=16)
    return raw


@pytest.mark.slow
def test_the_cifar10_path_runs_end_to_end_from_pickle_batches_to_a_loadable_model(tmp_path: Path) -> None:
    pixels, labels = colour_classes(5 * 24 + 40, seed=0)
    write_cifar_copy(tmp_path / "copy", per_batch=24, n_test=40, images=pixels, labels=labels)
    params = ImagesParams.from_params(tiny_cifar_params(tmp_path / "copy"))
    paths = ImagePaths(tmp_path / "project")

    manifest = prepare(params, paths)
    train_metrics = train(params, paths)
    metrics = evaluate(params, paths)
    figures = render(params, paths)

    assert manifest["dataset"] == "cifar10" and manifest["splits"]["train"]["count"] == 100
    assert manifest["official_checksums"] is False
    assert train_metrics["steps"] == 30 and train_metrics["recoveries"] == 0
    assert sorted(p.name for p in paths.models.iterdir()) == ["buffer.pt", "classifier.pt", "energy.pt"]
    assert (paths.reports / "grids").is_dir() and any((paths.reports / "grids").iterdir())
    assert metrics["accuracy"] > 0.6  # three colour classes (chance: 1/3), learnt in 30 steps
    assert all(
        0.0 <= value <= 1.0 for row in metrics["ood_auroc_by_score"].values() for value in row.values()
    )
    assert np.isfinite(metrics["fd_buffer_samples"]) and metrics["fd_real_floor"] >= 0
    assert metrics["ood_auroc"] == metrics["ood_auroc_by_score"]["grad_norm"]  # images.evaluation.ood_score
    # every FD has a floor of its own sample size (an FD estimate is biased upwards by ~1/n)
    n_validation = manifest["splits"]["validation"]["count"]
    assert metrics["n_fd_matched"] == min(metrics["n_buffer_samples"], n_validation)
    assert metrics["n_fd_small"] == min(metrics["n_noise_samples"], n_validation)
    assert np.isfinite(metrics["fd_buffer_samples_matched"]) and metrics["fd_real_floor_small"] >= 0
    # FD tells sets apart: uniform noise (the uniform proposal's draws) sits far above real images' floor
    assert metrics["fd_proposal_draws"] > 2 * metrics["fd_real_floor_small"] > 0
    assert np.isfinite(metrics["ais"]["log_partition"]) and metrics["ais"]["standard_error"] >= 0
    assert set(metrics["restoration"]) == {
        "inpaint_psnr_before",
        "inpaint_psnr_after",
        "denoise_psnr_before",
        "denoise_psnr_after",
    }
    assert {p.name for p in figures} == {
        "samples_buffer.png",
        "samples_noise.png",
        "samples_proposal.png",
        "proposal_draws.png",
        "inpainting.png",
        "denoising.png",
        "curves.png",
        "ood_roc.png",
    }
    # the ROC curves of the headline score (grad_norm here) against every OOD set, the AUROCs' own
    ood_roc = {p.stem: pd.read_csv(p) for p in (paths.reports / "ood_roc").iterdir()}
    assert set(ood_roc) == set(metrics["ood_auroc_by_score"]["grad_norm"])
    for name, table in ood_roc.items():
        assert list(table.columns) == ["ood_set", "fpr", "tpr"] and set(table["ood_set"]) == {name}
        assert table["fpr"].is_monotonic_increasing and table["tpr"].is_monotonic_increasing
        area = np.trapezoid(table["tpr"], table["fpr"])
        assert area == pytest.approx(metrics["ood_auroc_by_score"]["grad_norm"][name], abs=1e-3)
    model = ebm.load_model(paths.models / "energy.pt")
    x = torch.from_numpy(pixels[-40:]).float() / 255
    assert model.energy(x).shape == (40,)
    # bits/dim scores the test pixels dequantised as in training, (k + u) / 256, not the lattice k / 255
    with torch.no_grad():
        draws = torch.stack(
            [
                model.energy(
                    dequantise(torch.from_numpy(pixels[-40:]), generator=torch.Generator().manual_seed(s))
                )
                for s in range(20)
            ]
        )
    assert abs(metrics["mean_energy_test_dequantised"] - float(draws.mean())) < 5 * float(draws.mean(1).std())
    assert metrics["test_bits_per_dim_ais"] == pytest.approx(
        bits_per_dim(metrics["mean_energy_test_dequantised"], metrics["ais"]["log_partition"], 3 * 32 * 32)
    )
    assert (model.classify(x) == torch.from_numpy(labels[-40:])).float().mean() == metrics["accuracy"]


@pytest.mark.slow
def test_the_stage_cli_logs_each_stage_to_the_images_experiment(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    write_mnist_copy(tmp_path / "copy", n_train=300, n_test=60)
    raw = quick_params()
    raw["images"]["data"].update(local_copy=str(tmp_path / "copy"), n_validation=50, max_test=None)
    raw["images"]["train"].update(steps=10, checkpoint_every=5)
    raw["images"]["classifier"].update(steps=5)
    raw["images"]["evaluation"].update(max_test=None, n_buffer_samples=32, n_noise_samples=8, n_restore=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads

    for stage in ("prepare", "train", "evaluate", "render"):
        with executed_sources() as executed:
            main([stage, "--params", str(tmp_path / "params.yaml"), "--root", str(root)])
        assert_declared(f"{stage}_images", executed)

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("images").experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(
        f"{s}_images" for s in ("prepare", "train", "evaluate", "render")
    )
    assert all(run.info.status == "FINISHED" for run in runs)
    by_name = {run.info.run_name: run for run in runs}
    assert by_name["prepare_images"].data.metrics["train_count"] == 250
    assert by_name["prepare_images"].data.params["images.data.dataset"] == "fashion_mnist"
    history = client.get_metric_history(by_name["train_images"].info.run_id, "energy_noise")
    assert len(history) >= 2
    evaluated = by_name["evaluate_images"].data.metrics
    assert {"accuracy", "ood_auroc/uniform_noise", "ais/log_partition", "fd_real_floor"} <= set(evaluated)
    metrics = json.loads((root / "reports" / "images" / "metrics.json").read_text())
    assert metrics["n_test"] == 60 and metrics["dataset"] == "fashion_mnist"
    logged = {a.path for a in client.list_artifacts(by_name["evaluate_images"].info.run_id, "ood_roc")}
    assert logged == {f"ood_roc/{name}.csv" for name in metrics["ood_auroc_by_score"]["energy"]}
    figures = {a.path for a in client.list_artifacts(by_name["render_images"].info.run_id, "figures")}
    assert "figures/ood_roc.png" in figures
    for model in ("energy.pt", "classifier.pt"):  # the trained models, in the training run
        logged_model = client.download_artifacts(
            by_name["train_images"].info.run_id, f"models/{model}", str(tmp_path / "logged")
        )
        assert Path(logged_model).read_bytes() == (root / "models" / "images" / model).read_bytes()


@pytest.mark.slow
def test_the_benchmark_prints_every_figure_beside_its_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = importlib.util.spec_from_file_location("images_benchmark", REPO / "benchmarks" / "images.py")
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

    write_mnist_copy(tmp_path / "copy", n_train=200, n_test=40)
    raw = copy.deepcopy(quick_params())
    raw["images"]["data"].update(local_copy=str(tmp_path / "copy"), n_validation=40)
    raw["images"]["evaluation"].update(n_buffer_samples=32, n_noise_samples=8, n_restore=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    arguments = ["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path / "run")]
    benchmark.main(
        [*arguments, "--json", str(tmp_path / "b.json"), "--steps", "6", "--classifier-steps", "4"]
    )

    out = capsys.readouterr().out
    for figure in ("JEM test accuracy", "AUROC vs uniform noise", "AUROC vs sklearn digits", "FD floor"):
        assert figure in out
    payload = json.loads((tmp_path / "b.json").read_text())
    bars = {row["figure"]: row["bar"] for row in payload["figures"]}
    assert bars["JEM test accuracy"] == "≥ 0.9000" and bars["training minutes (JEM)"] == "≤ 45.0"
    assert payload["train"]["steps"] == 6


@pytest.mark.parametrize("value", [-2, 0, 1, True])
def test_an_evaluation_cap_below_two_is_an_error_naming_the_key(value: Any) -> None:
    # test images[:-2] dropped the last two, and n_test = -2 reached metrics.json
    raw = quick_params()
    raw["images"]["evaluation"]["max_test"] = value
    with pytest.raises(ConfigError) as raised:
        ImagesParams.from_params(raw)
    message = str(raised.value)
    assert "images.evaluation" in message and "max_test" in message and str(value) in message


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("images.sampling.n_steps", -200, "images.sampling: n_steps"),
        ("images.sampling.denoise_steps", -10, "images.sampling: denoise_steps"),
        ("images.sampling.inpaint_steps", -1, "images.sampling: inpaint_steps"),
        ("images.sampling.batch_size", 0, "images.sampling: batch_size"),
        ("images.sampling.denoise_std", -0.3, "images.sampling: denoise_std"),
        ("images.evaluation.n_buffer_samples", -2, "images.evaluation: n_buffer_samples"),
        ("images.evaluation.n_noise_samples", 0, "images.evaluation: n_noise_samples"),
        # one sample passed the checks and failed the Fréchet distance after the whole evaluation
        (
            "images.evaluation.n_buffer_samples",
            1,
            "images.evaluation: n_buffer_samples must be a whole number ≥ 2",
        ),
        ("images.data.n_validation", 1, "images.data.n_validation must be ≥ 2"),
        ("images.data.max_test", 1, "images.data.max_test must be ≥ 2"),
        ("images.jem.generative_weight", 0.0, "images.jem.generative_weight: 0 trains a plain classifier"),
        ("images.evaluation.n_restore", -3, "images.evaluation: n_restore"),
        ("images.classifier.batch_size", 0, "images.classifier: batch_size"),
        ("images.classifier.steps", 0, "images.classifier: steps"),
        ("images.classifier.lr", 0.0, "images.classifier: lr"),
        ("images.grid_every", 0, "images: grid_every"),
        ("images.sampler.name", "mala", "images.sampler: sampler 'mala' takes no ['noise_scale'"),
        # quick.yaml's sampler is langevin, which has no Metropolis step for a jump (mala with jumps:
        # the recipe refuses them for images, test_images_recipe.py)
        ("images.sampler.jump_every", 5, "images.sampler: jump_every needs the Metropolis-adjusted sampler"),
    ],
)
def test_a_setting_the_stages_would_ignore_or_fail_on_late_is_an_error_naming_the_key(
    key: str, value: Any, named: str
) -> None:
    # Each was accepted as read, then ran no steps, sliced off samples, or failed after the JEM training
    # (sampler name mala: with quick.yaml's langevin noise_scale, grad_clip and clamp).
    raw = quick_params()
    *parents, name = key.split(".")
    section = raw
    for parent in parents:
        section = section[parent]
    section[name] = value
    with pytest.raises(ConfigError) as raised:
        ImagesParams.from_params(raw)
    assert named in str(raised.value)


def test_buffer_init_uniform_weight_without_class_gaussians_is_an_error() -> None:
    raw = quick_params()
    raw["images"].update(buffer_init="uniform", buffer_init_uniform_weight=0.5)
    with pytest.raises(ConfigError, match="images: buffer_init_uniform_weight"):
        ImagesParams.from_params(raw)
    raw["images"]["buffer_init_uniform_weight"] = 0.2  # the default: nothing set that is ignored
    ImagesParams.from_params(raw)


def test_the_fd_classifier_trains_without_the_jem_runs_lag_guard() -> None:
    # It runs no chains: its gap E(data) − E(noise) goes negative as it learns, and the guard rolled it
    # back until the run raised TrainingDivergedError, after the whole JEM training.
    raw = quick_params()
    raw["images"]["train"]["max_lag"] = 0.5
    params = ImagesParams.from_params(raw)
    assert params.recipe.train.max_lag == 0.5
    classifier = params.classifier_recipe()
    assert classifier.train.max_lag is None and classifier.jem.generative_weight == 0.0


def test_a_failed_render_keeps_the_previous_pngs_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    paths = ImagePaths(tmp_path)
    samples, figures = paths.reports / "samples", paths.reports / "figures"
    samples.mkdir(parents=True)
    grids = {name: torch.rand(8, 1, 6, 6) for name in ("buffer", "noise", "proposal", "start")}
    torch.save(grids, samples / "generated.pt")
    rows = ("original", "masked", "inpainted", "noisy", "denoised")
    torch.save({row: torch.rand(8, 1, 6, 6) for row in rows}, samples / "restoration.pt")
    figures.mkdir()
    (figures / "samples_noise.png").write_bytes(b"the previous run's grid")
    import torchvision.utils

    real_save_image = torchvision.utils.save_image

    def disk_full_on_the_noise_grid(images: torch.Tensor, path: Any, **options: Any) -> None:
        if "samples_noise" in Path(path).name:
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        real_save_image(images, path, **options)

    monkeypatch.setattr(torchvision.utils, "save_image", disk_full_on_the_noise_grid)
    with pytest.raises(OSError, match="No space left"):
        render(ImagesParams.from_params(quick_params()), paths)

    assert (figures / "samples_noise.png").read_bytes() == b"the previous run's grid"
    assert (figures / "samples_buffer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written before
    assert sorted(p.name for p in figures.iterdir()) == ["samples_buffer.png", "samples_noise.png"]


def write_render_inputs(paths: ImagePaths) -> None:
    """What the render stage reads, as train and evaluate write it, with tiny images and two OOD sets."""
    samples = paths.reports / "samples"
    samples.mkdir(parents=True)
    grids = {name: torch.rand(8, 1, 6, 6) for name in ("buffer", "noise", "proposal", "start")}
    torch.save(grids, samples / "generated.pt")
    rows = ("original", "masked", "inpainted", "noisy", "denoised")
    torch.save({row: torch.rand(8, 1, 6, 6) for row in rows}, samples / "restoration.pt")
    curve = {"step": [0, 5], "energy_pos": [0, 1], "energy_neg": [0, 2], "energy_noise": [1, 3]}
    pd.DataFrame({**curve, "accuracy": [0.1, 0.5], "cross_entropy": [2.0, 1.0]}).to_csv(
        paths.reports / "curves.csv", index=False
    )
    write_curve_csv(
        paths.reports / "ood_roc" / "uniform_noise.csv",
        {"ood_set": "uniform_noise", "fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0]},
    )
    write_curve_csv(
        paths.reports / "ood_roc" / "inverted.csv",
        {"ood_set": "inverted", "fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.7, 1.0]},
    )
    aurocs = {"uniform_noise": 1.0, "inverted": 0.6}
    write_json(
        paths.reports / "metrics.json", {"ood_score": "energy", "ood_auroc_by_score": {"energy": aurocs}}
    )


def test_render_draws_the_ood_roc_curves_the_evaluate_stage_wrote(tmp_path: Path) -> None:
    paths = ImagePaths(tmp_path)
    write_render_inputs(paths)

    figures = render(ImagesParams.from_params(quick_params()), paths)

    assert paths.reports / "figures" / "ood_roc.png" in figures
    assert (paths.reports / "figures" / "ood_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_names_the_ood_roc_file_it_cannot_read(tmp_path: Path) -> None:
    paths = ImagePaths(tmp_path)
    write_render_inputs(paths)
    (paths.reports / "ood_roc" / "inverted.csv").write_text("ood_set,fpr,tpr\ninverted,0.0,nan\n")
    with pytest.raises(ValueError, match=r"ood_roc/inverted\.csv: the columns 'fpr' and 'tpr' hold NaN"):
        render(ImagesParams.from_params(quick_params()), paths)
    for stale in (paths.reports / "ood_roc").iterdir():
        stale.unlink()
    with pytest.raises(ValueError, match=r"ood_roc: no OOD ROC curves"):
        render(ImagesParams.from_params(quick_params()), paths)


def test_class_gaussians_with_a_class_of_one_image_names_the_class_and_the_keys() -> None:
    # before: "every class needs at least two samples to fit its covariance", with no class or key
    from ebm.images import ImageRecipe, buffer_proposal

    images = torch.rand(5, 1, 4, 4)
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError) as raised:
        buffer_proposal(ImageRecipe(buffer_init="class_gaussians"), (1, 4, 4), images=images, labels=labels)
    message = str(raised.value)
    assert "class 2: 1" in message and "images.data.max_train" in message and "images.buffer_init" in message
