"""ROC and precision–recall curves of a detector's scores, thinned for plotting, and their CSV files.

A curve of a test set of ``n`` rows has up to ``n`` points: too many for a CSV that DVC draws or a reader
opens. :func:`thin_curve` keeps at most ``max_points`` of them, chosen by distance travelled along the
curve rather than by index, so its steep parts (few scores, long steps) and its flat ones keep their
shape, and both endpoints stay. The areas under the curves are computed from the scores, never from the
thinned points; the thinned ROC curve's trapezoid area stays within ``1e-3`` of the exact AUROC (the
bound is derived in :func:`thin_curve`).

Conventions: label 1 is the positive class and a higher score means "more positive" (an anomaly for
the anomaly detector; an in-distribution image for the image model's OOD scores).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from ebm.checkpoint import atomic_write

MAX_CURVE_POINTS = 1000
"""Points per curve written to a CSV file: enough for every pixel of a figure, small enough to read."""


def thin_curve(
    x: ArrayLike, y: ArrayLike, max_points: int = MAX_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of the polyline ``(x, y)``, its first and last ones included.

    The polyline's length ``L`` (in the L1 norm, ``Σ |Δx| + |Δy|``) is cut into ``b = max_points // 2``
    equal pieces; each piece keeps the first and last of its points. So every chord between two kept
    points is either one of the original segments (exact) or spans a path shorter than ``L / b`` inside
    one piece. For a monotone curve in the unit square (ROC: ``L ≤ 2``) the area between a chord and the
    staircase it replaces is at most ``Δx · Δy / 2 ≤ (Δx + Δy)² / 8``, so the trapezoid area of the thinned
    curve is within ``L² / (8 b) ≤ 1 / (2 b)`` of the original one: ``1e-3`` for 1,000 points.

    Raises:
        ValueError: ``x`` and ``y`` are not 1-D of one length, or ``max_points < 4``.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {xs.shape} and {ys.shape}")
    if max_points < 4:
        raise ValueError(f"max_points must be ≥ 4 (two per piece, both ends kept), got {max_points}")
    if len(xs) <= max_points:
        return xs.copy(), ys.copy()
    travelled = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(xs)) + np.abs(np.diff(ys)))])
    keep = np.zeros(len(xs), dtype=bool)
    keep[[0, -1]] = True
    if travelled[-1] > 0:
        pieces = max_points // 2
        piece = np.minimum((travelled / travelled[-1] * pieces).astype(np.int64), pieces - 1)
        first = np.flatnonzero(np.diff(piece)) + 1  # (≤ pieces − 1,) the first point of each new piece
        keep[first] = True
        keep[first - 1] = True  # the last point of the piece before
    return xs[keep], ys[keep]


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got the values {np.unique(y)[:5].tolist()}")
    if y.size == 0 or y.min() == y.max():
        raise ValueError(f"labels must hold both classes, 0 and 1, to draw a curve; got only {np.unique(y)}")
    if bad := int((~np.isfinite(s)).sum()):
        raise ValueError(f"{bad} of {s.size} scores are NaN or infinite")
    return y.astype(np.int64), s


def roc_points(
    labels: ArrayLike, scores: ArrayLike, *, max_points: int = MAX_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve, false- and true-positive rates from ``(0, 0)`` to ``(1, 1)``, thinned.

    Raises:
        ValueError: labels other than 0/1, a single class, a NaN or infinite score, or lengths that differ.
    """
    y, s = _checked(labels, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=True)  # corners only: collinear points say nothing
    return thin_curve(fpr, tpr, max_points)


def pr_points(
    labels: ArrayLike, scores: ArrayLike, *, max_points: int = MAX_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The precision–recall curve by rising recall, from ``(0, 1)`` to ``(1, positive rate)``, thinned.

    Raises:
        ValueError: as :func:`roc_points`.
    """
    y, s = _checked(labels, scores)
    precision, recall, _ = precision_recall_curve(y, s, drop_intermediate=True)
    return thin_curve(recall[::-1], precision[::-1], max_points)


@dataclass(frozen=True)
class DetectionCurves:
    """ROC and precision–recall curves of one score (thinned), with the exact areas from the scores.

    ``positive_rate`` is the share of positives: the precision of a detector that guesses, the no-skill
    line of the precision–recall panel.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    auroc: float
    auprc: float
    positive_rate: float


def detection_curves(
    labels: ArrayLike, scores: ArrayLike, *, max_points: int = MAX_CURVE_POINTS
) -> DetectionCurves:
    """Both curves of ``scores`` against ``labels``, AUROC and AUPRC (scikit-learn's average precision).

    Raises:
        ValueError: as :func:`roc_points`.
    """
    y, s = _checked(labels, scores)
    fpr, tpr = roc_points(y, s, max_points=max_points)
    recall, precision = pr_points(y, s, max_points=max_points)
    return DetectionCurves(
        fpr=fpr,
        tpr=tpr,
        recall=recall,
        precision=precision,
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        positive_rate=float(y.mean()),
    )


def write_curve_csv(
    path: str | os.PathLike[str], columns: Mapping[str, Sequence[float] | np.ndarray | str]
) -> Path:
    """Write one curve as CSV atomically: a column per key, a string value repeated on every row.

    ``{"model": "ebm", "fpr": fpr, "tpr": tpr}`` writes ``model,fpr,tpr`` rows (numbers in full precision).

    Raises:
        ValueError: the array columns differ in length.
    """
    arrays = {name: np.asarray(values) for name, values in columns.items() if not isinstance(values, str)}
    lengths = {len(values) for values in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(
            f"{path}: the curve's columns differ in length: { {k: len(v) for k, v in arrays.items()} }"
        )
    (n_rows,) = lengths
    table = {
        name: [values] * n_rows if isinstance(values, str) else [repr(float(v)) for v in arrays[name]]
        for name, values in columns.items()
    }

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(table)
            writer.writerows(zip(*table.values(), strict=True))

    return atomic_write(path, write, suffix=".tmp.csv")


def write_curve_folder(
    folder: str | os.PathLike[str], tables: Mapping[str, Mapping[str, Sequence[float] | np.ndarray | str]]
) -> None:
    """One ``<name>.csv`` per entry of ``tables`` in ``folder`` (:func:`write_curve_csv`), and no other:
    CSV files of names no longer in ``tables`` (a baseline or OOD set dropped from the params) are removed,
    so a DVC plot of the folder shows only this run's curves."""
    folder = Path(folder)
    for stale in folder.glob("*.csv") if folder.is_dir() else ():
        if stale.stem not in tables:
            stale.unlink()
    for name, columns in tables.items():
        write_curve_csv(folder / f"{name}.csv", columns)


def read_curve_csv(path: str | os.PathLike[str], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and ``y`` columns of a curve written by :func:`write_curve_csv`.

    Raises:
        ValueError: a column is missing or a value is not a finite number; the message names the file.
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or x not in rows[0] or y not in rows[0]:
        found = list(rows[0]) if rows else "no rows"
        raise ValueError(f"{path}: a curve needs the columns {x!r} and {y!r}, found {found}")
    try:
        xs = np.array([float(row[x]) for row in rows])
        ys = np.array([float(row[y]) for row in rows])
    except (TypeError, ValueError) as err:  # TypeError: a short row, whose missing cells read as None
        raise ValueError(f"{path}: {err}") from None
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError(f"{path}: the columns {x!r} and {y!r} hold NaN or infinite values")
    return xs, ys
