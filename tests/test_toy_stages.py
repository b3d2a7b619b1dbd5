"""The 2D stages in one process on tiny params: their outs, and the code each runs against its DVC deps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from paramfiles import quick_params
from stage_sources import assert_declared, executed_sources

from ebm.evaluation.density2d import DensityReport


@pytest.mark.slow
def test_each_stage_writes_its_outs_and_runs_only_code_its_deps_declare(
    tmp_path: Path, mlflow_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebm.stages.toy import ToyParams, main

    raw = quick_params()
    raw["toy"].update(datasets=["moons"], n_train=500, n_test=500)
    raw["toy"]["train"].update(steps=20, checkpoint_every=10, log_every=5)
    raw["toy"]["sampling"].update(n_samples=100, n_steps=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    root = tmp_path / "project"
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    import ebm.plots

    drawn: list[Any] = []
    grid = ebm.plots.plot_density_grid
    monkeypatch.setattr(
        ebm.plots, "plot_density_grid", lambda panels, **kw: drawn.extend(panels) or grid(panels, **kw)
    )

    for stage in ("prepare", "train", "evaluate", "render"):
        with executed_sources() as executed:
            main([stage, "--params", str(tmp_path / "params.yaml"), "--root", str(root)])
        assert_declared(f"{stage}_toy", executed)

    metrics = json.loads((root / "reports" / "toy" / "metrics.json").read_text())
    assert set(metrics) == {"moons"} and metrics["moons"]["nll"] > metrics["moons"]["entropy_floor"] - 0.5
    # every figure of the report (MMD, the KDE baseline, log Z and its grid), each a number
    assert set(metrics["moons"]) == {field.name for field in dataclasses.fields(DensityReport)}
    assert metrics["moons"]["gap"] == pytest.approx(
        metrics["moons"]["nll"] - metrics["moons"]["entropy_floor"]
    )
    assert (root / "models" / "toy" / "moons.pt").is_file()
    assert any((root / "reports" / "toy").glob("*.png"))
    trained = json.loads((root / "reports" / "toy" / "train.json").read_text())["moons"]
    assert set(trained) == {"train_seconds", "steps", "recoveries", "final_gap", "polish_steps"}
    assert (trained["steps"], trained["polish_steps"]) == (20, raw["toy"]["polish"]["steps"])
    assert not list(root.rglob("*.ckpt")), "a finished stage leaves neither PCD's nor the polish's checkpoint"
    curve = (root / "reports" / "toy" / "curves" / "moons.csv").read_text().splitlines()
    steps = [float(row.split(",")[0]) for row in curve[1:]]
    assert steps == [1, 6, 11, 16, 20]  # every 5th step from the first, and the last
    (panel,) = drawn  # the heatmap figure: the truth beside the model, the data, samples and figures
    assert panel.name == "moons" and panel.true_log_prob is not None
    assert panel.data is not None and len(panel.data) == 500 and panel.samples is not None
    assert (panel.nll, panel.gap) == (metrics["moons"]["nll"], metrics["moons"]["gap"])

    import mlflow

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    (train_run,) = client.search_runs(
        [client.get_experiment_by_name("toy2d").experiment_id], "tags.dvc_stage = 'train_toy'"
    )
    assert (
        "lag_threshold" not in raw["toy"]["loss"]
    )  # a default the params file leaves out, logged all the same
    assert train_run.data.params["toy.loss.lag_threshold"] == str(
        ToyParams.from_params(raw).recipe.loss.lag_threshold
    )
    logged = client.download_artifacts(train_run.info.run_id, "models/moons.pt", str(tmp_path / "logged"))
    assert Path(logged).read_bytes() == (root / "models" / "toy" / "moons.pt").read_bytes()

    data = np.load(root / "data" / "toy" / "moons.npz")  # prepare draws from the params' seed
    raw["seed"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    main(["prepare", "--params", str(tmp_path / "params.yaml"), "--root", str(root)])
    reseeded = np.load(root / "data" / "toy" / "moons.npz")
    assert set(data.files) == set(reseeded.files) and not any(
        np.array_equal(data[k], reseeded[k]) for k in data.files
    )


@pytest.mark.slow
def test_a_train_stage_killed_halfway_leaves_no_partial_file_and_its_rerun_resumes_to_the_same_model(
    tmp_path: Path, mlflow_tracking_uri: str
) -> None:
    from ebm.checkpoint import load_checkpoint, load_model
    from ebm.stages.toy import main

    raw = quick_params()
    raw["toy"].update(datasets=["moons"], n_train=500, n_test=100)
    raw["toy"]["train"].update(steps=400, checkpoint_every=50, log_every=10)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for root in (killed, whole):
        main(["prepare", "--params", str(params), "--root", str(root)])

    stage = [sys.executable, "-m", "ebm.stages.toy", "train", "--params", str(params), "--root", str(killed)]
    one_thread = os.environ | {"OMP_NUM_THREADS": "1"}  # as this process computes: the same floats
    process = subprocess.Popen(stage, env=one_thread, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "checkpoints" / "toy").glob("moons-*.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the end"
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()

    # whatever the kill interrupted, no file is half there: the model is absent, what was written is whole;
    # a write the kill cut short can only have left its hidden temporary file, which nothing reads
    (checkpoint,) = (killed / "checkpoints" / "toy").glob("moons-*.ckpt")
    assert not (killed / "models" / "toy" / "moons.pt").exists(), "killed too late: the model was out"
    hidden = [path.name for path in killed.rglob(".*") if path.is_file()]
    assert all(".tmp" in name for name in hidden), hidden  # atomic_write: .<name>.<random>.tmp[.ext]
    assert set(np.load(killed / "data" / "toy" / "moons.npz").files) == {"train", "test"}
    resumed_from = load_checkpoint(checkpoint)["step"]
    assert 50 <= resumed_from < 400

    main(["train", "--params", str(params), "--root", str(killed)])  # the stage's rerun: the same command
    main(["train", "--params", str(params), "--root", str(whole)])  # never interrupted

    assert not checkpoint.exists()
    rerun_state = load_model(killed / "models" / "toy" / "moons.pt").state_dict()
    whole_state = load_model(whole / "models" / "toy" / "moons.pt").state_dict()
    assert rerun_state.keys() == whole_state.keys()
    assert all(torch.equal(rerun_state[key], whole_state[key]) for key in whole_state)
    import mlflow

    client = mlflow.MlflowClient(mlflow_tracking_uri)
    finished_training = "tags.dvc_stage = 'train_toy' and attributes.status = 'FINISHED'"
    runs = client.search_runs([client.get_experiment_by_name("toy2d").experiment_id], finished_training)
    first_steps = sorted(
        min(m.step for m in client.get_metric_history(run.info.run_id, "moons/energy_pos")) for run in runs
    )
    assert first_steps[0] == 1 and first_steps[1] > resumed_from  # the rerun went on from the checkpoint
