"""Batch scoring, explanations and the command line: outputs match the detector, failures leave nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector
from ebm.anomaly.explain import attribute, plot_score_histogram, score_and_attribute, to_raw_columns
from ebm.anomaly.scoring import output_columns, score_file, score_frame
from ebm.anomaly.transactions import (
    FEATURES,
    TransactionsConfig,
    generate_transactions,
    write_table,
)
from ebm.anomaly.validation import ValidationError
from ebm.cli import main as ebm_main


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return generate_transactions(TransactionsConfig(n_customers=120, days=6, warmup_days=6, n_regions=5))


@pytest.fixture(scope="module")
def detector(table: pd.DataFrame) -> EnergyAnomalyDetector:
    config = DetectorConfig(n_members=1, widths=(16, 16), grid_size=256)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=10, batch_size=64))
    return EnergyAnomalyDetector(config).fit(table[FEATURES])


@pytest.fixture
def files(table: pd.DataFrame, tmp_path: Path) -> dict[str, Path]:
    return {suffix: write_table(table, tmp_path / f"input.{suffix}") for suffix in ("csv", "parquet")}


@pytest.mark.parametrize(("source", "target"), [("csv", "csv"), ("parquet", "parquet"), ("csv", "parquet")])
def test_scored_file_matches_the_detector_row_for_row(
    detector: EnergyAnomalyDetector, table: pd.DataFrame, files: dict[str, Path], source: str, target: str
) -> None:
    out = files[source].with_name(f"scored.{target}")
    summary = score_file(detector, files[source], out, chunk_rows=97, reasons="all", progress=False)
    scored = pd.read_parquet(out) if target == "parquet" else pd.read_csv(out, keep_default_na=False)
    assert summary.rows == len(table) == len(scored)
    np.testing.assert_allclose(scored.anomaly_score, detector.decision_function(table[FEATURES]), rtol=1e-6)
    assert (scored.is_anomaly == (scored.anomaly_score > detector.threshold_)).all()
    assert summary.flagged == scored.is_anomaly.sum()
    assert scored.transaction_id.astype(int).tolist() == table.transaction_id.tolist()  # ids carried over
    assert set(scored.reason_1) <= set(FEATURES) and (scored.contribution_1 >= scored.contribution_2).all()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["input.csv", "input.parquet", out.name])


def test_reasons_go_to_flagged_rows_by_default(
    detector: EnergyAnomalyDetector, table: pd.DataFrame, files: dict[str, Path]
) -> None:
    out = files["parquet"].with_name("scored.parquet")
    score_file(detector, files["parquet"], out, progress=False)
    scored = pd.read_parquet(out)
    flagged = scored.is_anomaly == 1
    assert flagged.any() and (~flagged).any()
    assert set(scored.reason_1[flagged]) <= set(FEATURES) and scored.contribution_1[flagged].notna().all()
    assert (scored.reason_1[~flagged] == "").all() and scored.contribution_1[~flagged].isna().all()


def test_a_bad_row_late_in_the_file_leaves_no_output_and_keeps_an_old_one(
    detector: EnergyAnomalyDetector, table: pd.DataFrame, tmp_path: Path
) -> None:
    broken = table.astype({"amount": object})
    broken.loc[len(broken) - 3, "amount"] = "12,50"
    source = tmp_path / "broken.csv"
    broken.to_csv(source, index=False)
    target = tmp_path / "scored.csv"
    with pytest.raises(ValidationError, match=rf"'amount'.*row {len(broken) - 2}"):
        score_file(detector, source, target, chunk_rows=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.csv"]  # no output, no temporary file
    target.write_text("previous results\n")
    with pytest.raises(ValidationError):
        score_file(detector, source, target, chunk_rows=64, progress=False)
    assert target.read_text() == "previous results\n"


def test_scoring_refuses_to_overwrite_its_input(
    detector: EnergyAnomalyDetector, files: dict[str, Path]
) -> None:
    with pytest.raises(ValidationError, match="overwrite"):
        score_file(detector, files["csv"], files["csv"], progress=False)


@pytest.mark.parametrize("column", ["anomaly_score", "is_anomaly", "reason_1", "contribution_3"])
def test_an_input_column_named_like_an_output_column_is_refused_before_writing(
    detector: EnergyAnomalyDetector, table: pd.DataFrame, tmp_path: Path, column: str
) -> None:
    source = write_table(table.assign(**{column: 1.0}), tmp_path / "scored_before.parquet")
    target = tmp_path / "scored.csv"
    target.write_text("previous results\n")
    with pytest.raises(
        ValidationError, match=rf"scored_before\.parquet: input column\(s\) '{column}'"
    ) as caught:
        score_file(detector, source, target, progress=False)
    assert caught.value.column == column
    assert target.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.csv", "scored_before.parquet"]


def test_output_columns_name_what_score_frame_returns_and_only_those_collide(
    detector: EnergyAnomalyDetector, table: pd.DataFrame, tmp_path: Path
) -> None:
    frame = detector.validate(table[FEATURES].head(20))
    for top_k, reasons in ((3, "all"), (0, "all"), (2, "none"), (50, "flagged")):
        scored = score_frame(detector, frame, top_k=top_k, reasons=reasons)
        assert list(scored.columns) == output_columns(len(FEATURES), top_k=top_k, reasons=reasons)
    source = write_table(table.head(50).assign(reason_1="old"), tmp_path / "input.csv")
    out = tmp_path / "scored.parquet"
    score_file(detector, source, out, top_k=0, progress=False)  # no reason columns: nothing collides
    assert (pd.read_parquet(out).reason_1 == "old").all()


def test_integrated_gradients_add_up_to_the_score_above_the_median_row(
    detector: EnergyAnomalyDetector, table: pd.DataFrame
) -> None:
    energy = detector.energy
    assert energy is not None
    x = detector.transform(table[FEATURES].head(64)).double()
    energy = energy.double()
    attributions = attribute(energy, x, method="integrated_gradients", n_steps=256)
    with torch.no_grad():
        gap = energy(x) - energy(torch.zeros_like(x[:1]))
    assert torch.allclose(attributions.sum(1), gap, atol=0.02 * gap.abs().max().item())
    scores, fast = score_and_attribute(energy, x)
    assert torch.allclose(scores, energy(x).detach())
    assert torch.allclose(fast, attribute(energy, x, method="gradient_x_input"))
    energy.float()


def test_indicator_columns_are_summed_into_their_category() -> None:
    attributions = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    raw = to_raw_columns(attributions, [0, 1, 1, 1], 2)
    assert raw.tolist() == [[1.0, 9.0]]


def test_histogram_is_written_as_png(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    path = plot_score_histogram(scores, scores > 2, 2.0, tmp_path / "h.png", labels=scores > 2.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_generate_fit_evaluate_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tx.parquet"
    assert (
        ebm_main(["anomaly", "generate", "--out", str(data), "--customers", "60", "--days", "3", "--split"])
        == 0
    )
    train, test = tmp_path / "tx-train.parquet", tmp_path / "tx-test.parquet"
    model = tmp_path / "detector.pt"
    fit = ["anomaly", "fit", "--data", str(train), "--out", str(model), "--label", "is_fraud"]
    assert ebm_main([*fit, "--members", "1", "--steps", "5"]) == 0
    report = tmp_path / "report.json"
    evaluate = ["anomaly", "evaluate", "--model", str(model), "--data", str(test), "--label", "is_fraud"]
    assert ebm_main([*evaluate, "--json", str(report)]) == 0
    assert "auroc" in report.read_text()
    out, png = tmp_path / "scored.csv", tmp_path / "hist.png"
    score = ["score", "--model", str(model), "--input", str(test), "--output", str(out), "--no-progress"]
    assert ebm_main([*score, "--histogram", str(png)]) == 0
    assert "rows/s" in capsys.readouterr().out and png.exists()
    assert (
        ebm_main(
            ["score", "--model", str(model), "--input", str(tmp_path / "absent.csv"), "--output", str(out)]
        )
        == 2
    )
