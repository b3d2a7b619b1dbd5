"""Fuzzing: malformed files and request bodies get a clear error, never a crash or partial output."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import string
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector
from ebm.anomaly.scoring import score_file
from ebm.anomaly.validation import ValidationError, read_table

COLUMNS = ["amount", "hour", "category"]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
THOROUGH = settings(FUZZ, max_examples=1500)


@pytest.fixture(scope="module")
def detector_file(detector: EnergyAnomalyDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return detector.save(tmp_path_factory.mktemp("fuzz") / "detector.pt")


@pytest.fixture(scope="module")
def detector() -> EnergyAnomalyDetector:
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "amount": np.exp(rng.normal(3, 1, 300)),
            "hour": rng.uniform(0, 24, 300),
            "category": rng.choice(["a", "b"], 300),
        }
    )
    config = DetectorConfig(n_members=1, widths=(8,), grid_size=64)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3, batch_size=32))
    return EnergyAnomalyDetector(config).fit(rows)


cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(
        ["", "nan", "inf", "-inf", "NULL", "1e999", "1,5", '"3"', " 7 ", "a", "b", "\u00e9", "0x10"]
    ),
    st.text(alphabet=string.printable, max_size=6),
)
headers = st.one_of(
    st.just(COLUMNS),
    st.permutations(COLUMNS).map(list),
    st.lists(st.sampled_from([*COLUMNS, "id", "label", ""]), min_size=0, max_size=5),
)


@st.composite
def csv_texts(draw: st.DrawFn) -> str:
    header = draw(headers)
    n_rows = draw(st.integers(0, 12))
    lines = [",".join(header)]
    for _ in range(n_rows):
        width = draw(st.one_of(st.just(len(header)), st.integers(0, len(header) + 2)))
        lines.append(",".join(draw(cells) for _ in range(width)))
    ending = draw(st.sampled_from(["\n", "\r\n", ""]))
    return ending.join(lines) + ending


files = st.one_of(csv_texts().map(str.encode), st.binary(max_size=300))


def check_loader(data: bytes) -> None:
    from ebm.anomaly.validation import TableSchema

    schema = TableSchema(numeric=("amount", "hour"), categorical=("category",))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.csv"
        path.write_bytes(data)
        try:
            table = read_table(path, schema)
        except ValidationError as error:
            assert str(error)  # a message, never an empty error
            return
        assert len(table) > 0
        assert np.isfinite(table[["amount", "hour"]].to_numpy(dtype=np.float64)).all()
        assert table["category"].map(lambda v: isinstance(v, str) and v.strip() != "").all()


def check_scoring(detector: EnergyAnomalyDetector, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "input.csv", Path(folder) / "scored.csv"
        source.write_bytes(data)
        try:
            summary = score_file(detector, source, target, chunk_rows=4, progress=False)
        except ValidationError:
            assert sorted(p.name for p in Path(folder).iterdir()) == ["input.csv"]  # nothing left behind
            return
        scored = pd.read_csv(target)
        assert len(scored) == summary.rows > 0 and np.isfinite(scored.anomaly_score).all()


def check_score_command(detector_file: Path, data: bytes) -> None:
    """``ebm score``: exit 0 with every row scored, or exit 2 with a message naming the file and no output."""
    from ebm.cli import main as ebm_main

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "input.csv", Path(folder) / "scored.parquet"
        source.write_bytes(data)
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            command = ["score", "--model", str(detector_file), "--input", str(source)]
            code = ebm_main([*command, "--output", str(target), "--chunk-rows", "5", "--no-progress"])
        if code != 0:
            assert code == 2 and errors.getvalue().startswith("ebm: error: input.csv"), errors.getvalue()
            assert sorted(p.name for p in Path(folder).iterdir()) == ["input.csv"]
            return
        scored = pd.read_parquet(target)
        assert len(scored) > 0 and np.isfinite(scored.anomaly_score).all()


records = st.lists(
    st.dictionaries(
        st.sampled_from([*COLUMNS, "extra"]),
        st.one_of(
            st.none(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(),
            st.text(max_size=4),
            st.booleans(),
            st.lists(st.integers(), max_size=2),
        ),
    ),
    max_size=4,
)
bodies = st.one_of(
    records, st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.integers(), st.text()
)


def check_request(detector: EnergyAnomalyDetector, body: Any) -> None:
    from mlflow.exceptions import MlflowException

    from ebm.anomaly.mlflow_model import DetectorModel

    model = DetectorModel()
    model.detector = detector
    try:
        frame = pd.DataFrame(body) if isinstance(body, list) else body
    except (ValueError, TypeError):
        return  # not even a table: the server's JSON parser answers 400 before the model is called
    try:
        out = model.predict(SimpleNamespace(artifacts={}), frame)
    except MlflowException as error:
        assert error.get_http_status_code() == 400 and error.message
        return
    assert len(out) == len(frame) and all(math.isfinite(v) for v in out.anomaly_score)


@FUZZ
@given(data=files)
def test_loader_accepts_only_valid_tables(data: bytes) -> None:
    check_loader(data)


@FUZZ
@given(data=files)
def test_scoring_either_writes_every_row_or_nothing(detector: EnergyAnomalyDetector, data: bytes) -> None:
    check_scoring(detector, data)


@FUZZ
@given(data=files)
def test_the_score_command_either_writes_every_row_or_says_what_is_wrong(
    detector_file: Path, data: bytes
) -> None:
    check_score_command(detector_file, data)


@FUZZ
@given(body=bodies)
def test_model_requests_fail_with_400_or_score_every_row(detector: EnergyAnomalyDetector, body: Any) -> None:
    check_request(detector, body)


@pytest.mark.slow
@THOROUGH
@given(data=files, body=bodies)
def test_thousands_of_malformed_inputs(
    detector: EnergyAnomalyDetector, detector_file: Path, data: bytes, body: Any
) -> None:
    check_loader(data)
    check_scoring(detector, data)
    check_score_command(detector_file, data)
    check_request(detector, body)
