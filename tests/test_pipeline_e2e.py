"""The real pipeline, end to end, on the ``quick`` params in a scratch git + DVC copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from netguard import GuardedProcesses

REPO = Path(__file__).resolve().parents[1]


def _scratch_copy(tmp_path: Path) -> Path:
    """The project's tracked files, with configs/quick.yaml as params.yaml, committed in a new repo."""
    root = tmp_path / "project"
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    shutil.copyfile(REPO / "configs" / "quick.yaml", root / "params.yaml")
    identity = ["-c", "user.name=ebm-tests", "-c", "user.email=ebm-tests@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "scratch"]):
        subprocess.run(["git", *identity, *args], cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.slow
def test_quick_pipeline_runs_every_stage_then_skips_them_and_dvc_agrees(
    tmp_path: Path, prefect_harness: None, mlflow_template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dvc.repo import Repo

    from flows.pipeline import pipeline

    root = _scratch_copy(tmp_path)
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")  # skip the store's one-off migration
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    first = pipeline(project_root=str(root))

    stages = [outcome.stage for outcome in first.stages]
    toy_stages = ["prepare_toy", "train_toy", "evaluate_toy", "render_toy"]
    assert [stage for stage in stages if stage.endswith("_toy")] == toy_stages
    assert [stage for stage in stages if stage.endswith("_images")] == [
        "prepare_images",
        "train_images",
        "evaluate_images",
        "render_images",
    ]
    boltzmann_stages = ["train_rbm", "evaluate_rbm", "train_structured", "evaluate_structured"]
    assert [stage for stage in stages if stage in boltzmann_stages] == boltzmann_stages
    assert {outcome.outcome for outcome in first.stages} == {"ran"}
    rbm_metrics = json.loads((root / "reports" / "boltzmann" / "rbm_metrics.json").read_text())
    assert abs(rbm_metrics["cd1"]["ais_minus_exact"]) < 1.0  # the quick RBM is small enough to enumerate
    lock = (root / "dvc.lock").read_text()
    assert all(f"{stage}:" in lock for stage in stages)
    metrics = json.loads((root / "reports" / "toy" / "metrics.json").read_text())
    assert set(metrics) == {"8gaussians", "moons"}
    for values in metrics.values():
        assert values["nll"] > values["entropy_floor"] - 0.05  # no model beats the truth by more than noise
    assert (root / "reports" / "toy" / "heatmaps.png").stat().st_size > 10_000
    assert sorted(p.name for p in (root / "models" / "toy").iterdir()) == ["8gaussians.pt", "moons.pt"]

    import mlflow

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("toy2d").experiment_id])
    assert sorted(run.data.tags["dvc_stage"] for run in runs) == sorted(toy_stages)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == head
        assert run.data.tags["prefect_flow_run_id"]
        assert run.data.params["toy.train.steps"] == "100"
    train_run = next(run for run in runs if run.data.tags["dvc_stage"] == "train_toy")
    assert "moons/energy_pos" in train_run.data.metrics
    assert len(client.get_metric_history(train_run.info.run_id, "moons/energy_pos")) > 5

    anomaly_stages = [f"{step}_anomaly" for step in ("prepare", "train", "evaluate", "render", "register")]
    assert [stage for stage in stages if stage.endswith("_anomaly")] == anomaly_stages
    registration = json.loads((root / "reports" / "anomaly" / "registration.json").read_text())
    assert registration["version"] == "1" and registration["alias_moved"]
    assert (root / "reports" / "anomaly" / "energy_histogram.png").stat().st_size > 5_000
    assert (root / "reports" / "anomaly" / "curves.png").stat().st_size > 10_000  # ROC and PR
    champion = client.get_model_version_by_alias("ebm-anomaly-detector", "champion")
    assert str(champion.version) == "1" and champion.tags["model_hash"] == registration["model_hash"]
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    rows = pd.read_parquet(root / "data" / "anomaly" / "test.parquet").head(4)
    scored = mlflow.pyfunc.load_model("models:/ebm-anomaly-detector@champion").predict(rows)
    assert len(scored) == 4 and "anomaly_score" in scored
    from flows.pipeline import where_results_are

    closing = where_results_are(root, first)  # what `python -m flows.pipeline` prints last
    assert "models:/ebm-anomaly-detector@champion (version 1; this run: v1 is the first champion" in closing

    second = pipeline(project_root=str(root))
    assert {outcome.outcome for outcome in second.stages} == {"skipped"}
    with Repo(str(root)) as repo:
        assert repo.status() == {}

    # By hand, as a user goes on: every command and the stages it runs under the network guard, without
    # the offline switches the flow sets (the project's .dvc/config and the stage entry points must do)
    guarded = GuardedProcesses(tmp_path)
    dvc = partial(guarded.run, str(Path(sys.executable).parent / "dvc"), cwd=root)
    assert _stages_run(dvc("repro")) == []
    _dvc_commands_a_user_runs_next(root, dvc)
    assert guarded.refused == []
    assert guarded.guarded_processes >= 10  # eight dvc commands and the two stages the experiment ran


def _stages_run(output: str) -> list[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` output says it ran, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


def _dvc_commands_a_user_runs_next(root: Path, dvc: Callable[..., str]) -> None:
    """An experiment on one parameter, the plots, and a push and pull through the local remote."""
    # toy.sampling is read by evaluate_toy alone; render_toy draws what evaluate_toy writes, so it follows
    ran = _stages_run(dvc("exp", "run", "-S", "toy.sampling.n_steps=120"))
    assert ran == ["evaluate_toy", "render_toy"], ran
    shown = json.loads(dvc("exp", "show", "--json"))
    experiments = [
        exp["data"]
        for commit in shown
        for branch in commit.get("experiments") or []
        for exp in branch.get("revs", [])
    ]
    assert any(
        data["params"]["params.yaml"]["data"]["toy"]["sampling"]["n_steps"] == 120 for data in experiments
    ), shown
    assert "n_steps: 120" in (root / "params.yaml").read_text()  # the workspace holds the experiment

    # PNG plots are copied next to the HTML page, so they can be looked at without its CDN-hosted viewer
    dvc("plots", "show", "-o", "plots_out")
    copied = sorted(path.name for path in (root / "plots_out").rglob("*.png"))  # named after their paths
    for plot in ("reports_toy_heatmaps.png", "reports_anomaly_energy_histogram.png"):
        assert any(name.endswith(plot) for name in copied), (plot, copied)
    plots = json.loads(dvc("plots", "show", "--json"))["data"]  # what a script or IDE reads instead
    for plot in ("reports/toy/heatmaps.png", "reports/anomaly/roc", "reports/anomaly/pr"):
        assert any(name.startswith(plot) for name in plots), (plot, sorted(plots))

    model = root / "models" / "toy" / "moons.pt"
    before = model.read_bytes()
    dvc("push")
    shutil.rmtree(root / ".dvc" / "cache")
    for out in ("data", "models"):
        shutil.rmtree(root / out)
    dvc("pull")
    assert model.read_bytes() == before
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        assert repo.status() == {}
    assert _stages_run(dvc("repro")) == []
