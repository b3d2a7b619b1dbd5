"""The standard detectors the EBM is measured against, behind one small interface.

Each baseline gets the same rows as the EBM with categories one-hot encoded (fitted on the training
rows) and is otherwise used with its library's defaults:

- ``iforest``: scikit-learn's ``IsolationForest`` (100 trees, 256 rows each); invariant to monotone
  rescaling of a column, so it needs no scaling;
- ``ecod``: PyOD's ECOD (empirical-CDF tail probabilities), rank-based, no scaling needed;
- ``lof``: PyOD's LOF (20 neighbours, novelty mode) on standardised columns, since distances need a scale.

``fit_score(name, train, test, seed)`` fits on the training rows and returns the test rows' scores,
higher = more anomalous, as the EBM's ``decision_function``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

BASELINES = ("iforest", "ecod", "lof")


def one_hot(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Numeric matrices with every non-numeric column one-hot encoded over the training labels."""
    categorical = [c for c in train.columns if not pd.api.types.is_numeric_dtype(train[c])]
    if not categorical:
        return train.to_numpy(np.float64), test.to_numpy(np.float64)
    levels = {c: sorted(train[c].astype(str).unique()) for c in categorical}

    def encode(frame: pd.DataFrame) -> np.ndarray:
        blocks = [frame.drop(columns=categorical).to_numpy(np.float64)]
        for column in categorical:
            codes = pd.Categorical(frame[column].astype(str), categories=levels[column]).codes
            blocks.append((codes[:, None] == np.arange(len(levels[column]))).astype(np.float64))
        return np.concatenate(blocks, axis=1)

    return encode(train), encode(test)


def _iforest(train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.ensemble import IsolationForest

    return -IsolationForest(random_state=seed).fit(train).score_samples(test)


def _ecod(train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    from pyod.models.ecod import ECOD

    return np.asarray(ECOD().fit(train).decision_function(test), dtype=np.float64)


def _lof(train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    from pyod.models.lof import LOF

    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return np.asarray(
        LOF().fit((train - mean) / std).decision_function((test - mean) / std), dtype=np.float64
    )


_FITTERS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "iforest": _iforest,
    "ecod": _ecod,
    "lof": _lof,
}


def fit_score(
    name: str, train: pd.DataFrame | np.ndarray, test: pd.DataFrame | np.ndarray, seed: int = 0
) -> np.ndarray:
    """Fit baseline ``name`` on ``train``; return the scores of ``test`` (higher = more anomalous)."""
    if name not in _FITTERS:
        raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    train_frame = train if isinstance(train, pd.DataFrame) else pd.DataFrame(np.asarray(train))
    test_frame = test if isinstance(test, pd.DataFrame) else pd.DataFrame(np.asarray(test))
    x_train, x_test = one_hot(train_frame, test_frame)
    return _FITTERS[name](x_train, x_test, seed)
