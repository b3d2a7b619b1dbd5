"""Smoke runs of every `ebm` command, as a user types them, on the quick recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ebm.cli import build_parser, main
from ebm.toy import Toy2DConfig

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quick.yaml")


def test_every_option_of_every_command_has_help_text() -> None:
    parser = build_parser()
    stack = [parser]
    seen = 0
    while stack:
        current = stack.pop()
        for action in current._actions:
            if action.dest == "help":
                continue
            if action.choices and isinstance(action.choices, dict):  # a subcommand table
                stack.extend(action.choices.values())
                continue
            assert action.help, f"{current.prog}: option {action.option_strings or action.dest} has no help"
            seen += 1
    assert seen > 20


def test_toy_train_help_states_the_recipe_s_own_defaults() -> None:
    recipe = Toy2DConfig()
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a.choices, dict)]
    (toy_commands,) = [a for a in commands.choices["toy"]._actions if isinstance(a.choices, dict)]
    helps = {a.dest: a.help for a in toy_commands.choices["train"]._actions}
    assert f"the recipe's, {recipe.train.steps})" in helps["steps"]
    assert f"the recipe's, {recipe.sampler.name})" in helps["sampler"]
    assert f"the recipe's, {recipe.sampler.step_size})" in helps["step_size"]


def test_console_script_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ebm.cli", "toy", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("train", "evaluate", "render", "classify"):
        assert command in result.stdout


@pytest.mark.slow
def test_train_evaluate_render_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "moons.pt"
    common = ["--dataset", "moons", "--params", QUICK]
    assert main(["toy", "train", *common, "--n-train", "1000", "--steps", "30", "--out", str(model)]) == 0
    assert model.is_file()
    metrics = tmp_path / "metrics.json"
    assert (
        main(["toy", "evaluate", *common, "--model", str(model), "--n-test", "1000", "--json", str(metrics)])
        == 0
    )
    values = json.loads(metrics.read_text())
    assert values["nll"] > values["entropy_floor"] - 0.1 and values["grid_resolution"] >= 128
    png = tmp_path / "moons.png"
    assert main(["toy", "render", *common, "--model", str(model), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model written to" in capsys.readouterr().out


def test_classify_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "decision.png"
    assert main(["toy", "classify", "--dataset", "moons", "--steps", "200", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    test_accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert test_accuracy > 0.9
    assert png.is_file()


def test_bad_input_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    assert main(["toy", "evaluate", "--model", str(missing), "--params", QUICK]) == 2
    assert f"no checkpoint at {missing}" in capsys.readouterr().err
    bad_params = tmp_path / "params.yaml"
    bad_params.write_text("toy:\n  train:\n    stepz: 3\n")
    assert main(["toy", "train", "--params", str(bad_params), "--out", str(tmp_path / "m.pt")]) == 2
    assert "toy.train.stepz" in capsys.readouterr().err
