"""Smoke runs of every `ebm` command, as a user types them, on the quick recipe."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ebm.cli import build_parser, main
from ebm.toy import Toy2DConfig

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quick.yaml")


def test_every_option_of_every_command_has_help_text_stating_its_default() -> None:
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
            optional = action.option_strings and not action.required and action.nargs != 0
            # before: eight options (--dataset, --out, --device, ...) never said what they default to
            assert not optional or "default" in action.help, (
                f"{current.prog} {action.option_strings[0]}: no default"
            )
            seen += 1
    assert seen > 20


def test_toy_train_help_states_the_recipe_s_own_defaults() -> None:
    recipe = Toy2DConfig()
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a.choices, dict)]
    (toy_commands,) = [a for a in commands.choices["toy"]._actions if isinstance(a.choices, dict)]
    helps = {a.dest: a.help for a in toy_commands.choices["train"]._actions}
    assert f"the recipe's, {recipe.train.steps})" in helps["steps"]
    assert f"the recipe's, {recipe.polish.steps})" in helps["polish_steps"]
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
    printed = capsys.readouterr().out
    assert "model written to" in printed
    assert "polished for 20 in" in printed  # configs/quick.yaml's toy.polish.steps


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


@pytest.mark.parametrize(
    ("argv", "option", "minimum"),
    [
        pytest.param(
            ["rbm", "loglik", "--model", "m.pt", "--max-test", "-1"], "--max-test", 1, id="max_test_neg"
        ),
        pytest.param(
            ["rbm", "loglik", "--model", "m.pt", "--max-test", "0"], "--max-test", 1, id="max_test_zero"
        ),
        pytest.param(["rbm", "loglik", "--model", "m.pt", "--chains", "1"], "--chains", 2, id="chains_one"),
        pytest.param(
            ["rbm", "loglik", "--model", "m.pt", "--temperatures", "2"],
            "--temperatures",
            3,
            id="temperatures",
        ),
        pytest.param(["toy", "train", "--n-train", "-100"], "--n-train", 5, id="toy_n_train"),
        pytest.param(["toy", "train", "--polish-steps", "-1"], "--polish-steps", 0, id="polish_steps"),
        pytest.param(
            ["toy", "evaluate", "--model", "m.pt", "--n-train", "4"], "--n-train", 5, id="eval_n_train"
        ),
        pytest.param(["toy", "evaluate", "--model", "m.pt", "--n-test", "1"], "--n-test", 2, id="toy_n_test"),
        pytest.param(["toy", "classify", "--n-test", "-1"], "--n-test", 1, id="classify_n_test"),
        pytest.param(["toy", "classify", "--steps", "0"], "--steps", 1, id="classify_steps"),
        pytest.param(
            ["score", "--model", "m.pt", "--input", "a.csv", "--output", "b.csv", "--chunk-rows", "0"],
            "--chunk-rows",
            1,
            id="chunk_rows",
        ),
        pytest.param(
            ["rbm", "loglik", "--model", "m.pt", "--max-test", "1.5"], "--max-test", 1, id="not_whole"
        ),
    ],
)
def test_counts_below_their_minimum_are_a_usage_error_naming_the_option(
    argv: list[str], option: str, minimum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--max-test -1` used to slice test[:-1] and score all images but the last, silently; `classify
    # --steps 0` reported an untrained model's accuracy; `--temperatures 2` and `--n-test 1` failed deep
    # inside with messages that named no option
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and f"whole number ≥ {minimum}" in err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(
            ["toy", "train", "--steps", "1", "--n-train", "64", "--out", "{folder}"], id="train_out"
        ),
        pytest.param(["toy", "evaluate", "--model", "m.pt", "--json", "{folder}"], id="evaluate_json"),
        pytest.param(["toy", "render", "--model", "m.pt", "--out", "{file}/x.png"], id="render_under_a_file"),
        pytest.param(
            ["toy", "classify", "--steps", "1", "--out", "{file}/x.png"], id="classify_under_a_file"
        ),
        pytest.param(["anomaly", "fit", "--data", "d.csv", "--out", "{folder}"], id="anomaly_fit_out"),
        pytest.param(
            ["score", "--model", "m.pt", "--input", "a.csv", "--output", "b.csv", "--histogram", "{folder}"],
            id="score_histogram",
        ),
    ],
)
def test_an_output_path_that_cannot_be_a_file_is_refused_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `toy train --out <folder>` trained the whole model, then failed to save it with a traceback
    folder, file = tmp_path / "outputs", tmp_path / "model.pt"
    folder.mkdir()
    file.write_bytes(b"a model")
    argv = [a.format(folder=folder, file=file) for a in argv]
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "is a folder" in err or "is a file, so" in err
    assert file.read_bytes() == b"a model" and list(folder.iterdir()) == []


def test_classify_help_names_every_labelled_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    from ebm.classify2d import LABELLED_2D

    with pytest.raises(SystemExit):
        build_parser().parse_args(["toy", "classify", "--help"])
    shown = capsys.readouterr().out
    assert all(name in shown for name in LABELLED_2D)


@pytest.mark.parametrize("value", ["null", "[a]"])
def test_a_toy_section_that_is_not_a_mapping_is_an_error_naming_it(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # null ended in a TypeError traceback; a list in "dictionary update sequence element #0 ..."
    params = tmp_path / "params.yaml"
    params.write_text(f"toy: {value}\n")
    assert (
        main(["toy", "train", "--params", str(params), "--steps", "1", "--out", str(tmp_path / "m.pt")]) == 2
    )
    assert "toy must be a mapping" in capsys.readouterr().err


def test_a_negative_top_k_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # --top-k -2 was taken as 0: no reason columns, exit code 0
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(
            ["score", "--model", "m.pt", "--input", "a.csv", "--output", "b.csv", "--top-k", "-2"]
        )
    assert raised.value.code == 2
    assert "argument --top-k" in capsys.readouterr().err
    args = build_parser().parse_args(
        ["score", "--model", "m.pt", "--input", "a.csv", "--output", "b.csv", "--top-k", "0"]
    )
    assert args.top_k == 0


def test_counts_of_one_or_more_are_accepted() -> None:
    args = build_parser().parse_args(["rbm", "loglik", "--model", "m.pt", "--max-test", "1", "--chains", "3"])
    assert (args.max_test, args.chains) == (1, 3)


@pytest.fixture(scope="module")
def anomaly_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny detector fitted through the CLI, and the test rows it is evaluated and scored on."""
    folder = tmp_path_factory.mktemp("anomaly")
    data, model = folder / "tx.parquet", folder / "detector.pt"
    assert (
        main(["anomaly", "generate", "--out", str(data), "--customers", "40", "--days", "3", "--split"]) == 0
    )
    fit = ["anomaly", "fit", "--data", str(folder / "tx-train.parquet"), "--out", str(model)]
    assert main([*fit, "--label", "is_fraud", "--members", "1", "--steps", "5"]) == 0
    return {"model": model, "test": folder / "tx-test.parquet"}


def evaluate_command(files: dict[str, Path]) -> list[str]:
    """``ebm anomaly evaluate`` of the fixture's detector on its test rows."""
    return ["anomaly", "evaluate", "--model", str(files["model"]), "--data", str(files["test"])]


@pytest.mark.parametrize("suffix", [".pq", ".PARQUET", ".parquet", ".csv"])
def test_score_histogram_reads_the_output_in_the_format_it_was_written(
    tmp_path: Path, anomaly_files: dict[str, Path], suffix: str
) -> None:
    # .pq and upper-case suffixes are Parquet to score_file; the histogram read them back as CSV
    output, png = tmp_path / f"scored{suffix}", tmp_path / "histogram.png"
    command = ["score", "--model", str(anomaly_files["model"]), "--input", str(anomaly_files["test"])]
    assert main([*command, "--output", str(output), "--no-progress", "--histogram", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_json_write_keeps_the_previous_report_whole(
    tmp_path: Path,
    anomaly_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"previous": "good run"}')
    real_write_text = Path.write_text

    def disk_full_half_way(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name == report.name or self.name.startswith(f".{report.name}."):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_half_way)
    assert (
        main([*evaluate_command(anomaly_files), "--label", "is_fraud", "--json", str(report)]) == 2
    )  # an error, not a traceback
    assert "ebm: error: [Errno 28] No space left on device" in capsys.readouterr().err

    assert json.loads(report.read_text()) == {"previous": "good run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file left behind
    monkeypatch.undo()
    assert main([*evaluate_command(anomaly_files), "--label", "is_fraud", "--json", str(report)]) == 0
    assert "auroc" in json.loads(report.read_text())


def test_langevin_from_the_command_line_drops_the_recipe_s_mala_only_mode_jumps() -> None:
    args = build_parser().parse_args(["toy", "train", "--sampler", "langevin", "--step-size", "0.01"])
    from ebm.cli import _toy_recipe

    sampler = _toy_recipe(args).sampler
    assert Toy2DConfig().sampler.jump_every is not None  # else this test tests nothing
    assert (sampler.name, sampler.step_size, sampler.jump_every, sampler.jump_grid_bins) == (
        "langevin",
        0.01,
        None,
        None,
    )
    assert type(sampler.build()).__name__ == "Langevin"  # before: "jump_every needs … mala"


def test_resume_never_picks_up_another_run_s_checkpoint(tmp_path: Path) -> None:
    # before: every --resume run wrote and read OUT.ckpt, so a rings run after a finished moons run trained
    # zero steps and saved the moons weights labelled 'rings'
    import torch

    from ebm.checkpoint import load_model

    out = tmp_path / "m.pt"
    common = ["--params", QUICK, "--n-train", "300", "--steps", "20", "--out", str(out), "--resume"]
    assert main(["toy", "train", "--dataset", "moons", *common]) == 0
    moons = load_model(out).state_dict()
    assert not list(tmp_path.glob("*.ckpt")), "a finished run leaves no checkpoint to resume"
    assert main(["toy", "train", "--dataset", "rings", "--seed", "7", *common]) == 0
    rings = load_model(out).state_dict()
    assert any(not torch.equal(moons[name], rings[name]) for name in moons)


def test_evaluate_and_render_load_the_model_on_the_device_they_are_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: --device was accepted and ignored (the model always came back on the CPU), even --device bogus
    model = tmp_path / "moons.pt"
    common = ["--dataset", "moons", "--params", QUICK, "--n-train", "300"]
    assert main(["toy", "train", *common, "--steps", "5", "--out", str(model)]) == 0
    for command in (["evaluate", "--n-test", "300"], ["render", "--out", str(tmp_path / "r.png")]):
        assert main(["toy", *command, *common, "--model", str(model), "--device", "bogus"]) == 2
        assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # evaluate and render train nothing: --steps is not theirs
        build_parser().parse_args(["toy", "render", "--model", str(model), "--steps", "3"])


def test_a_negative_sampling_length_is_an_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: toy.sampling.n_steps: -5 ran no step and scored the uniform starting noise as samples
    import yaml

    params = yaml.safe_load(Path(QUICK).read_text())
    params["toy"]["sampling"]["n_steps"] = -5
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    assert main(["toy", "render", "--dataset", "moons", "--params", str(bad), "--model", "m.pt"]) == 2
    assert "toy.sampling: need n_samples ≥ 1 and n_steps ≥ 0" in capsys.readouterr().err


def test_anomaly_fit_on_a_text_column_suggests_declaring_it_categorical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "table.csv"
    table.write_text("amount,city\n" + "".join(f"{i % 7 + 0.5},{'xyz'[i % 3]}\n" for i in range(40)))
    assert (
        main(["anomaly", "fit", "--data", str(table), "--out", str(tmp_path / "d.pt"), "--members", "0"]) == 2
    )
    assert "column 'city' has non-numeric values" in (err := capsys.readouterr().err)
    assert "name it with --categorical" in err and not (tmp_path / "d.pt").exists()


# --- every option reaches the work it names -------------------------------------------------------------
# Each test stops the command where it hands its settings on, and reads them there: a flag parsed and then
# dropped (or a seed left at its default, which the smoke runs above all use) shows here, not at all there.


class Handed(Exception):
    """Raised by a stand-in to stop a command once it has handed its settings on."""


def test_toy_train_trains_with_the_steps_seed_and_points_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import ebm.toy
    from ebm.cli import _toy_data

    seen: dict[str, Any] = {}

    def train_energy(x_train: Any, recipe: Any, **_: Any) -> Any:
        seen.update(x_train=x_train, recipe=recipe)
        raise Handed

    monkeypatch.setattr(ebm.toy, "train_energy", train_energy)
    with pytest.raises(Handed):
        main(["toy", "train", "--dataset", "rings", "--n-train", "50", "--steps", "17", "--seed", "5"])
    assert (seen["recipe"].train.steps, seen["recipe"].train.seed) == (17, 5)
    assert seen["recipe"].polish == Toy2DConfig().polish
    assert torch.equal(seen["x_train"], _toy_data("rings", 50, 5))
    assert not torch.equal(seen["x_train"], _toy_data("rings", 50, 0))
    with pytest.raises(Handed):
        main(["toy", "train", "--n-train", "50", "--polish-steps", "0"])
    assert seen["recipe"].polish.steps == 0


def test_toy_evaluate_and_render_sample_with_the_seed_given_and_write_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import torch

    import ebm.cli
    import ebm.toy
    from ebm.energies import MLPEnergy, MLPEnergyConfig
    from ebm.evaluation.density2d import DensityReport

    energy = MLPEnergy(MLPEnergyConfig(in_features=2, widths=(8,)))
    monkeypatch.setattr(ebm.cli, "_load_on_device", lambda args, recipe: energy)
    report = DensityReport(**{f.name: i + 1 for i, f in enumerate(dataclasses.fields(DensityReport))})
    seeds: list[int] = []

    def evaluate_energy(*_: Any, seed: int, **__: Any) -> Any:
        seeds.append(seed)
        return report, None

    def sample_energy(*_: Any, generator: torch.Generator, **__: Any) -> torch.Tensor:
        seeds.append(generator.initial_seed())
        return torch.zeros(10, 2)

    monkeypatch.setattr(ebm.toy, "evaluate_energy", evaluate_energy)
    monkeypatch.setattr(ebm.toy, "sample_energy", sample_energy)
    metrics, png = tmp_path / "metrics.json", tmp_path / "heatmap.png"
    common = ["--dataset", "moons", "--model", str(tmp_path / "unused.pt"), "--n-train", "50", "--seed", "9"]
    assert main(["toy", "evaluate", *common, "--n-test", "50", "--json", str(metrics)]) == 0
    assert main(["toy", "render", *common, "--out", str(png)]) == 0
    assert seeds == [9, 9]
    assert json.loads(metrics.read_text()) == dataclasses.asdict(report)  # every figure, gap and MMD too


def test_toy_classify_trains_for_the_steps_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import ebm.classify2d

    seen: list[Any] = []

    def train_classifier(x: Any, y: Any, config: Any) -> Any:
        seen.append(config)
        raise Handed

    monkeypatch.setattr(ebm.classify2d, "train_classifier", train_classifier)
    with pytest.raises(Handed):
        main(["toy", "classify", "--dataset", "moons", "--n-train", "50", "--steps", "7"])
    assert seen[0].steps == 7


def test_anomaly_fit_fits_with_the_seed_it_is_given(
    anomaly_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebm.anomaly.detector import EnergyAnomalyDetector

    seeds: list[int] = []

    def fit(self: EnergyAnomalyDetector, x: Any, *_: Any, **__: Any) -> Any:
        seeds.append(self.config.seed)
        raise Handed

    monkeypatch.setattr(EnergyAnomalyDetector, "fit", fit)
    fit_command = ["anomaly", "fit", "--data", str(anomaly_files["test"]), "--label", "is_fraud"]
    with pytest.raises(Handed):
        main([*fit_command, "--seed", "4"])
    assert seeds == [4]


def test_ebm_pipeline_hands_its_stages_to_the_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.pipeline

    handed: list[list[str]] = []
    monkeypatch.setattr(flows.pipeline, "main", lambda argv: handed.append(argv))
    assert main(["pipeline", "--stages", "train_toy", "evaluate_toy"]) == 0
    assert main(["pipeline"]) == 0
    assert handed == [["--stages", "train_toy", "evaluate_toy"], []]


def test_anomaly_generate_split_writes_earlier_rows_to_train_and_later_ones_to_test(tmp_path: Path) -> None:
    import pandas as pd

    out = tmp_path / "tx.parquet"
    assert (
        main(["anomaly", "generate", "--out", str(out), "--customers", "30", "--days", "2", "--split"]) == 0
    )
    table, train, test = (pd.read_parquet(tmp_path / f"tx{part}.parquet") for part in ("", "-train", "-test"))
    assert len(train) + len(test) == len(table) and len(train) and len(test)
    assert set(train.transaction_id).isdisjoint(test.transaction_id)
    assert train.timestamp.max() <= test.timestamp.min()


def test_anomaly_evaluate_writes_every_metric_it_prints(
    tmp_path: Path, anomaly_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    from ebm.anomaly.metrics import DetectionMetrics

    report = tmp_path / "metrics.json"
    assert main([*evaluate_command(anomaly_files), "--label", "is_fraud", "--json", str(report)]) == 0
    values = json.loads(report.read_text())
    assert set(values) == {field.name for field in dataclasses.fields(DetectionMetrics)}
    printed = capsys.readouterr().out
    assert all(f"{name:>20}: {value:.4f}" in printed for name, value in values.items())


def test_score_hands_on_its_chunk_size_reasons_and_top_k(
    tmp_path: Path, anomaly_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ebm.anomaly.scoring

    seen: dict[str, Any] = {}

    def score_file(detector: Any, source: Path, output: Path, **options: Any) -> Any:
        seen.update(options)
        raise Handed

    monkeypatch.setattr(ebm.anomaly.scoring, "score_file", score_file)
    command = ["score", "--model", str(anomaly_files["model"]), "--input", str(anomaly_files["test"])]
    options = ["--chunk-rows", "5", "--top-k", "1", "--reasons", "all"]
    with pytest.raises(Handed):
        main([*command, "--output", str(tmp_path / "scored.csv"), *options])
    assert (seen["chunk_rows"], seen["top_k"], seen["reasons"]) == (5, 1, "all")


def test_the_score_histogram_draws_the_scores_and_flags_written(
    tmp_path: Path, anomaly_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import pandas as pd

    import ebm.anomaly.explain

    drawn: list[Any] = []
    monkeypatch.setattr(
        ebm.anomaly.explain,
        "plot_score_histogram",
        lambda scores, flags, threshold, path: drawn.append((scores, flags, threshold)) or path,
    )
    scored = tmp_path / "scored.csv"
    command = ["score", "--model", str(anomaly_files["model"]), "--input", str(anomaly_files["test"])]
    assert main([*command, "--output", str(scored), "--histogram", str(tmp_path / "h.png")]) == 0
    written = pd.read_csv(scored)
    ((scores, flags, _),) = drawn
    np.testing.assert_array_equal(scores, written.anomaly_score.to_numpy())
    np.testing.assert_array_equal(flags, written.is_anomaly.to_numpy())
    assert flags.sum() > 0  # else a histogram with no flags would pass
