"""The synthetic transactions: seeded, labelled, causal features, each fraud pattern visible; loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ebm.anomaly.public import ANOMALY_TYPES, PUBLIC_SETS, TYPE_SOURCES, make_public_split, make_typed_split
from ebm.anomaly.transactions import (
    CREDITCARD_FEATURES,
    FRAUD_TYPES,
    NUMERIC_FEATURES,
    TransactionsConfig,
    generate_transactions,
    load_creditcard,
    load_table,
    split_by_time,
    write_table,
)
from ebm.anomaly.validation import ValidationError

SMALL = TransactionsConfig(n_customers=300, days=8, warmup_days=8, n_regions=6, fraud_rate=0.2, seed=3)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return generate_transactions(SMALL)


def test_same_seed_same_table_other_seed_other_table(table: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(table, generate_transactions(SMALL))
    other = generate_transactions(
        TransactionsConfig(n_customers=300, days=8, warmup_days=8, n_regions=6, seed=4)
    )
    assert len(other) != len(table) or not np.allclose(other.amount, table.amount)


def test_labels_match_fraud_types_and_every_pattern_occurs(table: pd.DataFrame) -> None:
    assert set(table.fraud_type.unique()) == {"", *FRAUD_TYPES}
    assert ((table.fraud_type != "") == (table.is_fraud == 1)).all()
    assert 0.002 < table.is_fraud.mean() < 0.1
    assert table.timestamp.is_monotonic_increasing
    assert table.transaction_id.is_unique


def test_features_are_in_range(table: pd.DataFrame) -> None:
    assert table[list(NUMERIC_FEATURES)].notna().all().all()
    assert (table[list(NUMERIC_FEATURES)] >= 0).all().all()
    assert table.hour.between(0, 24).all()
    assert table.hour_deviation.between(0, 12).all()
    assert table.category_share.between(0, 1).all()
    assert set(table.new_merchant.unique()) <= {0.0, 1.0}


def test_each_fraud_pattern_shows_in_the_features_it_is_defined_by(table: pd.DataFrame) -> None:
    legit = table[table.is_fraud == 0]

    def median(kind: str, column: str) -> float:
        return float(table.loc[table.fraud_type == kind, column].median())

    assert median("card_testing", "amount") < 5 < legit.amount.median()
    assert median("card_testing", "txns_last_hour") >= 3 > legit.txns_last_hour.quantile(0.99) - 1
    assert median("large_amount", "amount_to_customer_avg") > 10 * legit.amount_to_customer_avg.median()
    assert median("geo_jump", "distance_from_home_km") > 300 > legit.distance_from_home_km.median()
    assert table.loc[table.fraud_type == "geo_jump", "speed_kmh"].max() > 1000  # the jump itself
    assert 1 <= median("odd_hours", "hour") <= 5
    assert median("new_merchant", "category_share") < 0.05 and median("new_merchant", "new_merchant") == 1


def test_new_merchant_marks_the_first_purchase_of_a_card_at_a_merchant(table: pd.DataFrame) -> None:
    first = ~table.sort_values("timestamp", kind="stable").duplicated(["customer_id", "merchant_id"])
    # The warm-up history is dropped, so "first in the table" can be a merchant seen before: only ⊆ holds.
    assert (table.new_merchant[~first.sort_index()] == 0).all()


def test_split_by_time_puts_earlier_rows_first(table: pd.DataFrame) -> None:
    train, test = split_by_time(table, 0.6)
    assert len(train) + len(test) == len(table)
    assert train.timestamp.max() <= test.timestamp.min()


def test_split_by_time_puts_a_timestamp_at_the_cut_on_one_side_only() -> None:
    table = pd.DataFrame({"timestamp": [0, 1, 1, 1, 2], "row": range(5)})  # the 0.6 quantile is 1, a tie
    train, test = split_by_time(table, 0.6)
    assert train.row.tolist() == [0, 1, 2, 3] and test.row.tolist() == [4]


@pytest.mark.parametrize("fraction", [0.3, 0.8])
def test_split_by_time_trains_on_the_fraction_asked_for(table: pd.DataFrame, fraction: float) -> None:
    train, _ = split_by_time(table, fraction)
    assert len(train) / len(table) == pytest.approx(fraction, abs=0.01)


def test_the_warm_up_only_builds_history_and_is_not_in_the_table(table: pd.DataFrame) -> None:
    # timestamps count seconds from the end of the warm-up: a warm-up row kept would be negative
    assert table.timestamp.min() >= 0 and table.timestamp.max() < (SMALL.days + 1) * 86_400
    assert (table.minutes_since_prev < 24 * 60 * 30).mean() > 0.9  # most cards had a warm-up purchase


def test_history_features_use_only_the_card_s_earlier_purchases() -> None:
    """On three purchases of one card: the amount against the geometric mean of the *earlier* amounts,
    the hour against the earlier hours; a feature that saw the row itself would differ."""
    from types import SimpleNamespace

    from ebm.anomaly.transactions import _history_features

    events = pd.DataFrame(
        {
            "customer": [0, 0, 0],
            "time_h": [1.0, 27.0, 53.0],  # 01:00, 03:00, 05:00 on three days
            "x": [0.0, 3.0, 3.0],
            "y": [0.0, 4.0, 4.0],
            "merchant": [5, 6, 5],
            "category": [0, 1, 0],
            "amount": [10.0, 20.0, 40.0],
            "fraud_type": ["", "", ""],
        }
    )
    features = _history_features(events, SimpleNamespace(home_xy=np.zeros((1, 2))))  # type: ignore[arg-type]
    np.testing.assert_allclose(features.amount_to_customer_avg, [1.0, 2.0, 40.0 / np.sqrt(10.0 * 20.0)])
    np.testing.assert_allclose(features.hour_deviation, [0.0, 2.0, 3.0], atol=1e-9)  # 05:00 vs 01:00–03:00
    np.testing.assert_allclose(features.km_from_prev, [0.0, 5.0, 0.0])
    np.testing.assert_allclose(features.minutes_since_prev[1:], [26 * 60, 26 * 60])
    np.testing.assert_allclose(features.new_merchant, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(features.category_share, [0.0, 0.0, 0.5])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_and_load_round_trip(table: pd.DataFrame, tmp_path: Path, suffix: str) -> None:
    path = write_table(table, tmp_path / f"t{suffix}")
    features, labels = load_table(path, numeric=NUMERIC_FEATURES, categorical=("category",), label="is_fraud")
    assert labels is not None and (labels == table.is_fraud.to_numpy()).all()
    np.testing.assert_allclose(features.amount.to_numpy(), table.amount.to_numpy())
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_creditcard_reads_the_public_schema_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(20, len(CREDITCARD_FEATURES))), columns=list(CREDITCARD_FEATURES))
    frame["Class"] = (np.arange(20) % 10 == 0).astype(int)
    frame.to_csv(tmp_path / "creditcard.csv", index=False)
    features, labels = load_creditcard(tmp_path / "creditcard.csv")
    assert list(features.columns) == list(CREDITCARD_FEATURES) and labels.sum() == 2
    frame.drop(columns="V7").to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(ValidationError, match="V7"):
        load_creditcard(tmp_path / "broken.csv")


@pytest.mark.parametrize("name", sorted(PUBLIC_SETS))
def test_public_sets_are_seeded_and_hold_few_anomalies(name: str) -> None:
    split = make_public_split(name, seed=1)
    again = make_public_split(name, seed=1)
    np.testing.assert_array_equal(split.x_train, again.x_train)
    labels = np.r_[split.y_train, split.y_test]
    assert 0.03 < labels.mean() < 0.12
    assert split.x_train.shape[1] == split.x_test.shape[1] == len(split.feature_names)


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_typed_anomalies_are_built_for_every_kind(kind: str) -> None:
    split = make_typed_split("wine", kind, seed=0)
    assert np.isfinite(split.x_train).all() and 0.03 < np.r_[split.y_train, split.y_test].mean() < 0.08


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "digits_one_class"])
def test_public_split_labels_each_row_by_its_class_and_stratifies(name: str) -> None:
    spec = PUBLIC_SETS[name]
    x_all, target, _ = spec.loader()
    for seed in (0, 1, 2):
        normal_classes = spec.normal_classes(seed)
        row_is_normal = {
            row.tobytes(): bool(np.isin(t, normal_classes)) for row, t in zip(x_all, target, strict=True)
        }
        split = make_public_split(name, seed=seed)
        for x, y in ((split.x_train, split.y_train), (split.x_test, split.y_test)):
            assert [row_is_normal[row.tobytes()] for row in x] == list(y == 0)  # each row keeps its class
        n_anomalies = int(split.y_train.sum() + split.y_test.sum())
        n_test = len(split.y_test)
        expected = n_anomalies * n_test / (n_test + len(split.y_train))
        assert abs(split.y_test.sum() - expected) <= 1  # stratified: the anomaly share of both halves


def test_typed_anomalies_have_the_shape_their_kind_names() -> None:
    x_all, target, _ = PUBLIC_SETS["wine"].loader()
    real = x_all[np.isin(target, TYPE_SOURCES["wine"][1])]
    low, high = real.min(axis=0), real.max(axis=0)

    def anomalies(kind: str) -> np.ndarray:
        split = make_typed_split("wine", kind, seed=0)
        return np.r_[split.x_train[split.y_train == 1], split.x_test[split.y_test == 1]]

    uniform = anomalies("global")  # over the bounding box widened by 5 % a side
    pad = 0.05 * (high - low)
    assert ((uniform >= low - pad) & (uniform <= high + pad)).all()
    assert ((uniform < low) | (uniform > high)).any(axis=1).mean() > 0.3
    shuffled = anomalies("dependency")  # every value from the real column, rows broken up
    for column in range(real.shape[1]):
        assert np.isin(shuffled[:, column], real[:, column]).all()
    real_rows = {row.tobytes() for row in real}
    assert sum(row.tobytes() in real_rows for row in shuffled) == 0
