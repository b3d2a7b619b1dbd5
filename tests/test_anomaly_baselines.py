"""The baselines the detector is measured against: each test row is scored against the training rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ebm.anomaly.baselines import BASELINES, fit_score


def rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "amount": rng.lognormal(3.0, 1.0, n),
            "hour": rng.integers(0, 24, n),
            "flag": rng.integers(0, 2, n),
            "constant": np.ones(n),
            "category": rng.choice(["food", "travel", "online"], n),
        }
    )


@pytest.mark.parametrize("name", BASELINES)
def test_a_rows_score_does_not_depend_on_the_other_test_rows(name: str) -> None:
    # PyOD's ECOD built its ECDFs on the training rows and the whole test set: the same 10 rows scored
    # up to 0.65 apart with and without 40 others
    train, test = rows(300, seed=0), rows(50, seed=1)
    alone = fit_score(name, train, test.iloc[:10], seed=0)
    together = fit_score(name, train, test, seed=0)[:10]
    np.testing.assert_allclose(alone, together, rtol=1e-12, atol=1e-12)


def test_ecod_scores_each_row_as_pyod_scores_that_row_alone() -> None:
    from pyod.models.ecod import ECOD

    from ebm.anomaly.baselines import one_hot

    train, test = one_hot(rows(300, seed=2), rows(25, seed=3))
    fitted = ECOD().fit(train)
    expected = np.array([fitted.decision_function(test[i : i + 1])[0] for i in range(len(test))])
    np.testing.assert_allclose(fit_score("ecod", train, test), expected, rtol=1e-12)


def test_ecod_puts_values_beyond_both_training_tails_highest() -> None:
    train = pd.DataFrame({"x": np.arange(100.0)})
    scores = fit_score("ecod", train, pd.DataFrame({"x": [-5.0, 50.0, 200.0]}))
    assert scores[0] > scores[1] and scores[2] > scores[1]
    assert scores[0] == pytest.approx(np.log(101.0))  # no training value at or below -5: (0 + 1)/(n + 1)


@pytest.mark.parametrize("name", BASELINES)
def test_test_columns_are_read_by_name_not_by_position(name: str) -> None:
    # before: a reordered test frame, or one with an extra column, mixed the features up silently
    train, test = rows(300, 0), rows(40, 1)
    expected = fit_score(name, train, test)
    reordered = test[test.columns[::-1]].assign(extra=7.0)
    np.testing.assert_allclose(fit_score(name, train, reordered), expected)


@pytest.mark.parametrize("name", BASELINES)
def test_higher_means_more_anomalous_for_every_baseline(name: str) -> None:
    """The detector's convention, which scikit-learn's ``score_samples`` reverses: rows far outside the
    training cloud, in a numeric column or by an unseen category, score above every typical row."""
    train, typical = rows(300, seed=0), rows(40, seed=1)
    outliers = typical.iloc[:3].copy()
    outliers["amount"] = [1e5, 3e5, 1e6]  # the training amounts' 99.9th percentile is ~500
    outliers["hour"] = [47, 60, 99]
    scores = fit_score(name, train, pd.concat([typical, outliers], ignore_index=True), seed=0)
    assert scores[-3:].min() > scores[:-3].max()
