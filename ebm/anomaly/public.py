"""Public tabular anomaly benchmarks built offline, ADBench/ODDS-style, from scikit-learn's bundled data.

Each set takes a labelled classification dataset that ships inside scikit-learn (no download), keeps some
classes as the normal rows and downsamples the rest into a small anomaly class, then splits the rows
into a training part (unlabelled at fit time, anomalies included, as in ADBench's unsupervised setting)
and a test part, stratified. The downsampling and the split are redrawn for every seed.

========================  =========================================  ==========================
name                      normal rows                                anomalies
========================  =========================================  ==========================
``breast_cancer``         benign tumours (357)                       malignant, 5 % (ODDS *wbc*)
``wine``                  cultivars 1 and 2 (119)                    cultivar 0, 10 rows (ODDS *wine*)
``iris``                  setosa and virginica (100)                 versicolor, 5 %: between them
``digits``                digits 1–9 (1,617)                         digit 0, 5 % (ODDS *optdigits*)
``digits_one_class``      one digit, 0–9 by seed (~180)              the other digits, 5 %
``wine_one_class``        one cultivar, by seed (~59)                the other cultivars, 10 %
========================  =========================================  ==========================

The credit-card fraud file (``Time, V1…V28, Amount, Class``), when present, is loaded by
:func:`ebm.anomaly.transactions.load_creditcard` and joins the benchmark as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class AnomalySplit:
    """One seeded benchmark instance: float64 features, labels 1 = anomaly."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]


@dataclass(frozen=True)
class PublicSet:
    loader: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]
    normal_classes: Callable[[int], tuple[int, ...]]  # seed → classes kept as normal
    anomaly_fraction: float | None = None  # of the final set; or
    n_anomalies: int | None = None  # a fixed count


def _sklearn(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]:
    def load() -> tuple[np.ndarray, np.ndarray, list[str]]:
        bunch = getattr(sk_datasets, f"load_{name}")()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or [
            f"x{i}" for i in range(bunch.data.shape[1])
        ]
        return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), names

    return load


PUBLIC_SETS: dict[str, PublicSet] = {
    "breast_cancer": PublicSet(_sklearn("breast_cancer"), lambda seed: (1,), anomaly_fraction=0.05),
    "wine": PublicSet(_sklearn("wine"), lambda seed: (1, 2), n_anomalies=10),
    "iris": PublicSet(_sklearn("iris"), lambda seed: (0, 2), anomaly_fraction=0.05),
    "digits": PublicSet(_sklearn("digits"), lambda seed: tuple(range(1, 10)), anomaly_fraction=0.05),
    "digits_one_class": PublicSet(_sklearn("digits"), lambda seed: (seed % 10,), anomaly_fraction=0.05),
    "wine_one_class": PublicSet(_sklearn("wine"), lambda seed: (seed % 3,), anomaly_fraction=0.10),
}


def make_public_split(name: str, seed: int, *, test_size: float = 0.4) -> AnomalySplit:
    """Build set ``name`` for ``seed``: downsample the anomaly classes, then a stratified split."""
    if name not in PUBLIC_SETS:
        raise ValueError(f"unknown public set {name!r}; choose one of {sorted(PUBLIC_SETS)}")
    spec = PUBLIC_SETS[name]
    x, target, names = spec.loader()
    rng = np.random.default_rng(seed)
    normal = np.isin(target, spec.normal_classes(seed))
    n_normal = int(normal.sum())
    if spec.n_anomalies is not None:
        n_anomalies = spec.n_anomalies
    else:
        fraction = float(spec.anomaly_fraction or 0.05)
        n_anomalies = max(2, round(fraction * n_normal / (1 - fraction)))
    candidates = np.flatnonzero(~normal)
    chosen = rng.choice(candidates, size=min(n_anomalies, candidates.size), replace=False)
    rows = np.concatenate([np.flatnonzero(normal), chosen])
    labels = np.concatenate([np.zeros(n_normal, dtype=np.int64), np.ones(chosen.size, dtype=np.int64)])
    x_train, x_test, y_train, y_test = train_test_split(
        x[rows], labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return AnomalySplit(name, x_train, y_train, x_test, y_test, tuple(names))


# --- ADBench's four synthetic anomaly types on real normal rows ----------------------------------

ANOMALY_TYPES = ("local", "global", "dependency", "clustered")
TYPE_SOURCES: dict[str, tuple[str, tuple[int, ...]]] = {
    "breast_cancer": ("breast_cancer", (1,)),
    "wine": ("wine", (0, 1, 2)),
    "digits": ("digits", tuple(range(10))),
}


def make_typed_split(
    source: str, kind: str, seed: int, *, anomaly_fraction: float = 0.05, test_size: float = 0.4
) -> AnomalySplit:
    """Normal rows of ``source`` with synthetic anomalies of one ADBench type (Han et al. 2022, §3.2).

    - ``local``: normals and anomalies from a Gaussian mixture fitted to the real rows, the anomalies'
      covariances scaled by 5 (a wider version of the same clusters);
    - ``global``: anomalies uniform over the data's bounding box widened by 10 %;
    - ``dependency``: the real rows are normal, anomalies keep every column's marginal but none of the
      dependence (every column drawn from an independently chosen real row);
    - ``clustered``: anomalies form a tight cluster: one mixture component with its mean moved 5× as far
      from the data's centre.
    """
    from sklearn.mixture import GaussianMixture

    if kind not in ANOMALY_TYPES or source not in TYPE_SOURCES:
        raise ValueError(f"kind must be one of {ANOMALY_TYPES} and source one of {sorted(TYPE_SOURCES)}")
    set_name, normal_classes = TYPE_SOURCES[source]
    x_all, target, names = PUBLIC_SETS[set_name].loader()
    real = x_all[np.isin(target, normal_classes)]
    rng = np.random.default_rng(seed)
    n_normal = real.shape[0]
    n_anomalies = max(2, round(anomaly_fraction * n_normal / (1 - anomaly_fraction)))
    spread = real.std(axis=0)
    if kind in ("local", "clustered"):
        mixture = GaussianMixture(
            n_components=min(5, n_normal // 20 or 1),
            covariance_type="full",
            reg_covar=1e-3,
            random_state=seed,
        ).fit(real)
        normal, _ = mixture.sample(n_normal)
        if kind == "local":
            mixture.covariances_ = mixture.covariances_ * 5.0
            anomalies, _ = mixture.sample(n_anomalies)
        else:
            component = int(rng.integers(mixture.n_components))
            centre = real.mean(axis=0)
            mean = centre + 5.0 * (mixture.means_[component] - centre)
            covariance = mixture.covariances_[component] * 0.1 + 1e-3 * np.diag(spread**2 + 1e-12)
            anomalies = rng.multivariate_normal(mean, covariance, size=n_anomalies)
    elif kind == "global":
        normal = real
        low, high = real.min(axis=0), real.max(axis=0)
        pad = 0.05 * (high - low)
        anomalies = rng.uniform(low - pad, high + pad, size=(n_anomalies, real.shape[1]))
    else:
        normal = real
        rows = rng.integers(n_normal, size=(n_anomalies, real.shape[1]))
        anomalies = real[rows, np.arange(real.shape[1])]
    x = np.concatenate([normal, anomalies])
    labels = np.concatenate([np.zeros(len(normal), dtype=np.int64), np.ones(n_anomalies, dtype=np.int64)])
    x_train, x_test, y_train, y_test = train_test_split(
        x, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return AnomalySplit(f"{source}_{kind}", x_train, y_train, x_test, y_test, tuple(names))
