"""scripts/mlflow_ui_screenshot.py: `mlflow server` serves the stage runs; headless Chromium renders them.

Skipped where Chromium is not installed (Debian: ``apt-get install -y chromium``).
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    path = REPO / "scripts" / "mlflow_ui_screenshot.py"
    spec = importlib.util.spec_from_file_location("mlflow_ui_screenshot", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ui = _load_script()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ui.find_chromium() is None, reason="headless Chromium not installed (apt-get install -y chromium)"
    ),
]


def _assert_rendered(png: Path) -> None:
    """A PNG of the window's size that holds a page, not a blank or single-colour screen."""
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)  # (H, W, channels), floats in [0, 1]
    assert pixels.shape[1] == ui.WINDOW[0]
    assert pixels[..., :3].std() > 0.05


def test_ui_serves_the_stage_runs_with_their_tags_and_chromium_renders_them(
    tmp_path: Path, mlflow_tracking_uri: str
) -> None:
    from ebm.tracking import start_run

    params = {"seed": 0, "toy": {"train": {"steps": 3, "lr": 0.003}}}
    for stage in ("prepare_toy", "train_toy"):
        with start_run(
            project_root=tmp_path, experiment="toy2d", stage=stage, params=params, run_name=stage
        ) as run:
            for step in range(3):
                run.log_metrics({"moons/energy_pos": 1.0 / (step + 1)}, step=step)
    out, run_out = tmp_path / "shots" / "toy2d.png", tmp_path / "shots" / "train.png"

    with ui.mlflow_server(mlflow_tracking_uri) as base:
        shot = ui.capture(base, "toy2d", "train_toy", out, run_out)
        served = ui.api(base, "runs/search", {"experiment_ids": [shot["experiment_id"]]})["runs"]
        train = ui.api(base, "runs/get", run_id=shot["run_id"])["run"]
        history = ui.api(base, "metrics/get-history", run_id=shot["run_id"], metric_key="moons/energy_pos")
        view = "?workflowType=machine_learning"
        listed = ui.rendered_text(f"{base}/#/experiments/{shot['experiment_id']}{view}")
        shown = ui.rendered_text(
            f"{base}/#/experiments/{shot['experiment_id']}/runs/{shot['run_id']}{view}", window=ui.RUN_WINDOW
        )
        with pytest.raises(LookupError, match="no experiment 'mnist'"):
            ui.capture(base, "mnist", None, tmp_path / "none.png", tmp_path / "none-run.png")

    _assert_rendered(out)
    _assert_rendered(run_out)
    assert sorted(run["info"]["run_name"] for run in served) == ["prepare_toy", "train_toy"]
    assert {run["info"]["status"] for run in served} == {"FINISHED"}
    tags = {tag["key"]: tag["value"] for tag in train["data"]["tags"]}
    assert tags["dvc_stage"] == "train_toy"
    assert {"git_commit", "dvc_deps"} <= set(tags)
    assert {param["key"]: param["value"] for param in train["data"]["params"]}["toy.train.steps"] == "3"
    assert [metric["step"] for metric in history["metrics"]] == [0, 1, 2]
    # what the pictures show, read as text: both runs listed, the run's page with its tags and params
    assert "prepare_toy" in listed and "train_toy" in listed, listed[:2000]
    for word in ("train_toy", "dvc_stage", "git_commit", "toy.train.steps", "moons/energy_pos"):
        assert word in shown, (word, shown[:3000])
