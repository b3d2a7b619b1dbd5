"""The standard detectors the EBM is measured against, behind one small interface.

Each baseline gets the same rows as the EBM with categories one-hot encoded (fitted on the training
rows) and is otherwise used with its library's defaults:

- ``iforest``: scikit-learn's ``IsolationForest`` (100 trees, 256 rows each); invariant to monotone
  rescaling of a column, so it needs no scaling;
- ``ecod``: ECOD (Li et al. 2022; empirical-CDF tail probabilities), rank-based, no scaling needed.
  It scores as PyOD's ``ECOD`` scores one test row, against the training rows plus that row alone:
  PyOD's own ``decision_function`` builds its ECDFs on the training rows *and the whole test set*, so a
  row's score depended on the other test rows, anomalies included;
- ``lof``: PyOD's LOF (20 neighbours, novelty mode) on standardised columns, since distances need a scale.

``fit_score(name, train, test, seed)`` fits on the training rows and returns the test rows' scores,
higher = more anomalous, as the EBM's ``decision_function``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

BASELINES = ("iforest", "ecod", "lof")


def one_hot(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Numeric matrices with every non-numeric column one-hot encoded over the training labels.

    ``test`` is read by column name in ``train``'s order (extra columns left out; a missing one is a
    ``KeyError``), as the detector reads its input: by position, a reordered frame mixed features up.
    """
    test = test[list(train.columns)]
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
    """Σ over columns of the larger tail's −log ECDF, and of both tails' for a column without skew.

    A test value x of a column with training values X₁…Xₙ has the tail probabilities
    (#{Xᵢ ≤ x} + 1)/(n + 1) and (#{Xᵢ ≥ x} + 1)/(n + 1): the ECDFs of the training rows and x itself.
    PyOD takes, per cell, the largest of the two tails' −log and of the tail the column's skewness
    points to, which is both tails' sum where the skewness is exactly 0 or undefined (a constant
    column); the skewness is the training rows'.
    """
    from scipy.stats import skew

    n = train.shape[0]
    ordered = np.sort(train, axis=0)
    scores = np.zeros(test.shape[0])
    with warnings.catch_warnings():  # a constant column's skewness is undefined (NaN), as said above
        warnings.simplefilter("ignore", RuntimeWarning)
        signs = np.sign(skew(train, axis=0))
    for j in range(train.shape[1]):
        at_most = np.searchsorted(ordered[:, j], test[:, j], side="right")
        at_least = n - np.searchsorted(ordered[:, j], test[:, j], side="left")
        left, right = -np.log((at_most + 1) / (n + 1)), -np.log((at_least + 1) / (n + 1))
        two_sided = left + right if not signs[j] > 0 and not signs[j] < 0 else np.maximum(left, right)
        scores += np.maximum(two_sided, np.maximum(left, right))
    return scores


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
