"""`mlflow models serve` with the registered champion: JSON in, scores out, 4xx on malformed requests.

One server per session (starting one takes seconds): the tests share it and leave it running between them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebm.anomaly.transactions import FEATURES, NUMERIC_FEATURES


@dataclasses.dataclass(frozen=True)
class Server:
    url: str
    rows: list[dict[str, Any]]
    log: Path

    def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.url}/invocations", data=body, headers={"Content-Type": content_type}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            return error.code, parsed if isinstance(parsed, dict) else {
                "message": text.decode(errors="replace")
            }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[Server]:
    """A tiny detector registered in a fresh store and served as ``@champion`` on a free loopback port."""
    import mlflow

    from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector
    from ebm.anomaly.registry import register_detector
    from ebm.anomaly.transactions import TransactionsConfig, generate_transactions

    folder = tmp_path_factory.mktemp("serving")
    shutil.copyfile(mlflow_template_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    table = generate_transactions(TransactionsConfig(n_customers=60, days=3, warmup_days=3, n_regions=4))
    config = DetectorConfig(n_members=1, widths=(8,), grid_size=128)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3))
    EnergyAnomalyDetector(config).fit(table[FEATURES]).save(folder / "detector.pt")
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # the registry functions use the global store, as a stage does
    try:
        register_detector(
            folder / "detector.pt", table[FEATURES].head(3), metric_name="auprc", metric_value=0.5
        )
    finally:
        # Unset, not set back to the URI it resolved to: a global URI would pin later tests' stores, which
        # come from MLFLOW_TRACKING_URI (the mlflow_tracking_uri fixture).
        mlflow.set_tracking_uri(None)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        *(sys.executable, "-m", "mlflow", "models", "serve"),
        *("-m", "models:/ebm-anomaly-detector@champion", "--env-manager", "local"),
        *("-h", "127.0.0.1", "-p", str(port), "--workers", "1"),
    ]
    log = folder / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)  # polling a port that is not open yet; nothing to wait on instead
        rows = json.loads(table[FEATURES].head(2).to_json(orient="records"))
        yield Server(url, rows, log)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already gone; the tests that needed it have said so
        process.wait(timeout=30)


def _assert_refused(server: Server, body: bytes, content_type: str = "application/json") -> None:
    status, answer = server.post(body, content_type)
    assert 400 <= status < 500, (body[:200], status, answer)
    assert answer.get("message") or answer.get("error_code"), answer


@pytest.mark.slow
def test_server_scores_json_and_answers_malformed_requests_with_4xx(server: Server) -> None:
    status, body = server.post(json.dumps({"dataframe_records": server.rows}).encode())
    assert status == 200
    predictions = body["predictions"]
    assert len(predictions) == 2 and {"anomaly_score", "is_anomaly", "reason_1"} <= set(predictions[0])
    assert all(math.isfinite(p["anomaly_score"]) for p in predictions)

    row = server.rows[0]
    for body_bytes in (
        b"{not json",
        b"",
        json.dumps({"dataframe_records": [{**row, "amount": "twelve"}]}).encode(),
        json.dumps({"dataframe_records": [{k: v for k, v in row.items() if k != "hour"}]}).encode(),
        json.dumps({"dataframe_records": []}).encode(),
        json.dumps({"something": 1}).encode(),
        json.dumps({"dataframe_records": [{**row, "amount": None}]}).encode(),
        json.dumps({"dataframe_records": [row], "params": {"top_k": "many"}}).encode(),
    ):
        _assert_refused(server, body_bytes)
    status, _ = server.post(b"a,b\n1,2\n", content_type="text/plain")
    assert 400 <= status < 500
    _assert_refused(server, b"amount,hour\n1,2\n", content_type="text/csv")
    status, body = server.post(json.dumps({"dataframe_records": server.rows}).encode())
    assert status == 200 and len(body["predictions"]) == 2  # still alive


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
cell_values = st.one_of(
    st.none(),
    st.floats(allow_nan=False),  # JSON has no NaN; the big and the infinite-looking ones are plain numbers
    st.integers(-(10**20), 10**20),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(["NaN", "Infinity", "-1e400", "1e400", "grocery", ""]),
)


VALID_ROWS = [
    {**dict.fromkeys(NUMERIC_FEATURES, 1.0), "amount": 42.5, "hour": 13.25, "category": "grocery"},
    {**dict.fromkeys(NUMERIC_FEATURES, 0.0), "amount": 3.0, "hour": 2.5, "category": "travel"},
]


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Requests close to a good one: each row a valid row with some cells changed, dropped or added."""
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        row = dict(draw(st.sampled_from(VALID_ROWS)))
        for column in draw(st.lists(st.sampled_from([*FEATURES, "extra"]), max_size=3)):
            action = draw(st.sampled_from(["change", "drop"]))
            if action == "drop":
                row.pop(column, None)
            else:
                row[column] = draw(cell_values)
        rows.append(row)
    key = draw(st.sampled_from(["dataframe_records", "dataframe_split", "inputs", "instances"]))
    payload: Any = rows
    if key == "dataframe_split":
        columns = draw(st.permutations(FEATURES))
        payload = {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}
    body: dict[str, Any] = {key: payload}
    if draw(st.booleans()):
        body["params"] = {"top_k": draw(st.one_of(st.integers(-5, 50), st.text(max_size=3), st.none()))}
    return body


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        near_valid_bodies().map(lambda b: json.dumps(b).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
    )
)
def test_the_live_server_answers_every_malformed_body_with_4xx_or_a_score_per_row(
    server: Server, body: bytes
) -> None:
    status, answer = server.post(body)
    if status == 200:
        predictions = answer["predictions"]
        assert isinstance(predictions, list) and predictions
        assert all(math.isfinite(p["anomaly_score"]) and p["is_anomaly"] in (0, 1) for p in predictions)
    else:
        assert 400 <= status < 500, (body[:300], status, answer, server.log.read_text()[-2000:])
        assert answer.get("message") or answer.get("error_code"), answer


# --- registry policy and the logged model, in process ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_detector_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fitted detector saved once for the registry tests (a few training steps: seconds)."""
    from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector

    config = DetectorConfig(n_members=1, widths=(8,), grid_size=64)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3))
    detector = EnergyAnomalyDetector(config).fit(_tiny_table()[FEATURES])
    return detector.save(tmp_path_factory.mktemp("tiny") / "det.pt")


def _variant(path: Path, folder: Path, shift: float) -> Path:
    """The same detector with another threshold: another content hash, hence another model version."""
    from ebm.anomaly.detector import EnergyAnomalyDetector

    detector = EnergyAnomalyDetector.load(path)
    detector.threshold_ += shift
    return detector.save(folder / f"det_{shift:g}.pt")


@functools.cache
def _tiny_table() -> Any:
    from ebm.anomaly.transactions import TransactionsConfig, generate_transactions

    return generate_transactions(TransactionsConfig(n_customers=40, days=3, warmup_days=3, n_regions=3))


def _example(rows: int = 3) -> Any:
    return _tiny_table()[FEATURES].head(rows).reset_index(drop=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_register_detector_refuses_a_non_finite_metric_before_logging_anything(
    tiny_detector_path: Path, mlflow_tracking_uri: str, value: float
) -> None:
    import mlflow

    from ebm.anomaly.registry import register_detector

    assert mlflow.get_tracking_uri() == mlflow_tracking_uri
    with pytest.raises(ValueError, match=rf"metric 'auprc' of {tiny_detector_path}.*non-finite"):
        register_detector(tiny_detector_path, _example(), metric_name="auprc", metric_value=value)
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    assert client.search_registered_models() == [] and client.search_logged_models(["0"]) == []


@pytest.mark.slow
def test_the_champion_moves_only_against_a_finite_value_of_the_same_metric(
    tiny_detector_path: Path, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    import mlflow

    from ebm.anomaly.registry import register_detector

    assert mlflow.get_tracking_uri() == mlflow_tracking_uri
    client = mlflow.MlflowClient(mlflow_tracking_uri)
    name, example = "policy", _example()

    def champion() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    first = register_detector(
        tiny_detector_path, example, metric_name="auprc", metric_value=0.5, model_name=name
    )
    assert first.alias_moved and champion() == "1"

    # The metric changed (anomaly.register.metric): v1 has no validation_auroc, so no comparison is possible.
    other = register_detector(
        _variant(tiny_detector_path, tmp_path, 1.0),
        example,
        metric_name="auroc",
        metric_value=0.9,
        model_name=name,
    )
    assert (
        other.version == "2" and not other.alias_moved and other.champion_version == "1" and champion() == "1"
    )
    assert "kept champion v1: it has no validation_auroc tag" in other.decision
    assert client.get_model_version(name, "2").tags["champion_decision"] == other.decision

    # A champion whose stored value is not finite (stored before the check) is not comparable either.
    client.set_model_version_tag(name, "1", "validation_auprc", "nan")
    third_path = _variant(tiny_detector_path, tmp_path, 2.0)
    third = register_detector(third_path, example, metric_name="auprc", metric_value=0.9, model_name=name)
    assert third.version == "3" and not third.alias_moved and champion() == "1"
    assert "validation_auprc='nan', not a finite number" in third.decision

    # Once the champion carries a finite value again, the better version takes over.
    client.set_model_version_tag(name, "1", "validation_auprc", "0.5")
    again = register_detector(third_path, example, metric_name="auprc", metric_value=0.9, model_name=name)
    assert again.reused and again.version == "3" and again.alias_moved and champion() == "3"

    # A tie keeps the champion: moving the alias needs a strictly better value.
    tie_path = _variant(tiny_detector_path, tmp_path, 3.0)
    tie = register_detector(tie_path, example, metric_name="auprc", metric_value=0.9, model_name=name)
    assert tie.version == "4" and not tie.alias_moved and champion() == "3"
    assert "kept champion v3: its auprc 0.9000 ≥ v4's 0.9000" in tie.decision


@pytest.mark.slow
def test_the_logged_model_lists_tqdm_and_takes_float64_numbers_in_process(
    tiny_detector_path: Path, mlflow_tracking_uri: str
) -> None:
    """``ebm.trainer`` imports tqdm, so the model's environment needs it; int64 columns must be cast first."""
    import mlflow

    from ebm.anomaly.registry import register_detector

    assert mlflow.get_tracking_uri() == mlflow_tracking_uri
    example = _example(4)
    outcome = register_detector(tiny_detector_path, example, metric_name="auprc", metric_value=0.5)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(outcome.model_uri)).read_text().split()
    assert {"tqdm", "torch", "pandas", "pyyaml"} <= set(requirements)

    model = mlflow.pyfunc.load_model(outcome.model_uri)
    numeric = [c for c in NUMERIC_FEATURES if c in example.columns]
    floats = example.astype(dict.fromkeys(numeric, "float64"))
    assert len(model.predict(floats)) == 4
    as_int64 = floats.assign(**{numeric[0]: floats[numeric[0]].round().astype("int64")})
    with pytest.raises(mlflow.exceptions.MlflowException, match="int64 to float64"):
        model.predict(as_int64)
    assert len(model.predict(as_int64.astype({numeric[0]: "float64"}))) == 4  # the documented remedy

    # before: top_k 20 silently gave 10 pairs, -1 none; the declared output says nothing of either
    n_features = len(FEATURES)
    widest = model.predict(floats, params={"top_k": n_features})
    assert f"reason_{n_features}" in widest.columns and "reason_1" not in model.predict(
        floats, params={"top_k": 0}
    )
    for bad in (n_features + 1, -1):
        with pytest.raises(
            mlflow.exceptions.MlflowException, match=f"top_k must be a whole number from 0 to {n_features}"
        ):
            model.predict(floats, params={"top_k": bad})


@pytest.mark.parametrize("entry", ["register_detector", "log_detector_model"])
def test_registry_entry_points_switch_telemetry_off_themselves(
    entry: str, mlflow_tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called directly (not from a stage or flow), each sets the offline switches before MLflow starts."""
    from ebm.anomaly.pyfunc import log_detector_model
    from ebm.anomaly.registry import register_detector
    from ebm.checkpoint import CheckpointError
    from ebm.offline import OFFLINE_ENV

    for switch in OFFLINE_ENV:
        monkeypatch.delenv(switch, raising=False)
    missing = tmp_path / "missing.pt"  # fails right after the switches are set, before any model is logged
    with pytest.raises(CheckpointError, match="no checkpoint"):
        if entry == "register_detector":
            register_detector(missing, _example(), metric_name="auprc", metric_value=0.5)
        else:
            log_detector_model(missing, _example())
    assert {switch: os.environ.get(switch) for switch in OFFLINE_ENV} == OFFLINE_ENV
