"""Scale-free preprocessing of tabular rows, fitted inside the detector and saved with it.

A row of raw columns (numbers and category labels) becomes a vector ``x`` of unit-free numbers:

1. **Log of amounts**: non-negative, strongly right-skewed columns (or the ones named in the config)
   become ``log(v + δ)``, ``δ`` 1 % of the column's median positive value: a purchase ten times (or a
   tenth of) the usual is as far out for a small spender as for a large one, and zeros form their own
   cluster instead of being clipped. (``log1p`` would squash everything below 1 in the column's units:
   on the synthetic transactions it cost 0.03 AUPRC on card-testing bursts of $0.50–$5.) A negative
   value met when scoring maps to the mirror image, ``2 log δ − log(δ − v)``: below every training value,
   and scored as unusual rather than refused.
2. **Categories**: the ``max_categories`` most frequent labels of a categorical column get one
   indicator column each; everything else, and any label never seen in training, one ``other``
   indicator.
3. **Robust scaling**: every column is centred on its median and divided by its robust scale
   (IQR / 1.349, which is σ for a Gaussian; else its standard deviation; else 1). Unlike a rank
   transform this keeps *how far* out a value is, which is what anomaly scores feed on (a
   rank-Gaussianised kNN lost 0.17 mean AUROC to this scaling on the public sets).

The transform is affine after step 2, so attributions of an energy of ``x`` pull back to the raw
columns exactly. Its state is tensors plus plain lists: it is saved inside ``weights_only`` files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import skew
from torch import Tensor

OTHER = "__other__"
MAX_ROBUST_UNITS = 1e6
"""Scaled values are clipped to ±this many robust scales, so any finite input (1e300 included) keeps a
finite score; such a row is still far beyond every threshold."""
LOG_OFFSET = 0.01
"""A log column ``v`` becomes ``log(v + δ)`` with ``δ = LOG_OFFSET · median of its positive values``."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw columns become ``x``.

    Attributes:
        log_columns: columns to log-transform (they must be ≥ 0); ``None``: every numeric
            column that is ≥ 0 with skewness above ``log_skew``.
        log_skew: the skewness above which a non-negative column counts as an amount.
        categorical_columns: columns holding labels; ``None``: every column of a non-numeric dtype.
        max_categories: indicator columns kept per categorical column (the rest pool into ``other``).
    """

    log_columns: tuple[str, ...] | None = None
    log_skew: float = 2.0
    categorical_columns: tuple[str, ...] | None = None
    max_categories: int = 16

    def __post_init__(self) -> None:
        if self.max_categories < 1:
            raise ValueError(f"max_categories must be ≥ 1, got {self.max_categories}")


def _category_codes(values: pd.Series, levels: Sequence[str]) -> np.ndarray:
    """Position of each value's label in ``levels``, −1 for any other label."""
    if isinstance(values.dtype, pd.ArrowDtype):  # Arrow strings from the file readers: no Python objects
        import pyarrow as pa
        import pyarrow.compute as pc

        found = pc.index_in(pa.array(values), value_set=pa.array(list(levels), type=pa.string()))
        return np.asarray(found.fill_null(-1), dtype=np.int64)
    return np.asarray(pd.Index(list(levels)).get_indexer(values.astype(str)), dtype=np.int64)


def _log_amount(values: np.ndarray, offset: float, out: np.ndarray) -> None:
    """``log(v + δ)`` for ``v ≥ 0`` and its mirror image ``2 log δ − log(δ − v)`` below 0, into ``out``.

    The two meet at 0 with the same slope ``1/δ``, so the map is smooth and increasing on the whole line. A
    negative value in a column that held none in training (a refund among purchases) lands below every
    training value, as many log units out as its size says, and the detector scores it as unusual; it is
    neither refused nor clamped to 0 (which would score −1e9 like 0).
    """
    np.log(np.abs(values) + offset, out=out)
    negative = values < 0
    if negative.any():
        out[negative] = 2.0 * np.log(offset) - out[negative]


class TabularPreprocessor:
    """Fitted map from raw columns to robust-scaled features (see the module docstring).

    Attributes (after :meth:`fit`):
        columns: the raw input columns, in order.
        categorical: the categorical ones, with their kept labels (the last is ``other``).
        log_columns: numeric columns that are log-transformed, with their offsets ``δ`` in ``log_offsets``.
        encoded_names: one name per output column (``amount``, ``category=grocery``, …).
        encoded_source: for each output column, the index of the raw column it comes from.
        center, scale: the robust centring and scaling of each output column, shape ``(C,)``.
    """

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        self.config = config or PreprocessConfig()
        self.columns: list[str] = []
        self.categorical: dict[str, list[str]] = {}
        self.log_columns: list[str] = []
        self.log_offsets: dict[str, float] = {}
        self.encoded_names: list[str] = []
        self.encoded_source: list[int] = []
        self.center = torch.empty(0, dtype=torch.float64)
        self.scale = torch.empty(0, dtype=torch.float64)

    @property
    def is_fitted(self) -> bool:
        return bool(self.columns)

    @property
    def n_features(self) -> int:
        """Width of the output."""
        return len(self.encoded_names)

    def fit(self, frame: pd.DataFrame) -> TabularPreprocessor:
        """Learn columns, log flags, category labels and the robust scaling from a validated frame."""
        if len(frame) < 2:
            raise ValueError(f"fitting needs at least 2 rows, got {len(frame)}")
        config = self.config
        frame = frame.rename(columns=str)
        self.columns = list(frame.columns)
        categorical = (
            list(config.categorical_columns)
            if config.categorical_columns is not None
            else [c for c in self.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        )
        unknown = sorted(set(categorical) - set(self.columns))
        if unknown:
            raise ValueError(f"categorical columns {unknown} are not among the columns {self.columns}")
        self.categorical = {}
        for column in categorical:
            counts = frame[column].astype(str).value_counts()
            kept = sorted(counts.index.tolist(), key=lambda v: (-counts[v], v))[: config.max_categories]
            self.categorical[column] = [*kept, OTHER]
        numeric = [c for c in self.columns if c not in self.categorical]
        self.log_columns = self._pick_log_columns(frame, numeric)
        self.log_offsets = {}
        for column in self.log_columns:
            values = frame[column].to_numpy(np.float64)
            positive = values[values > 0]
            self.log_offsets[column] = float(LOG_OFFSET * np.median(positive)) if positive.size else 1.0
        encoded = self._encode(frame)  # (N, C)
        q25, median, q75 = np.quantile(encoded, [0.25, 0.5, 0.75], axis=0)
        scale = (q75 - q25) / 1.349
        std = encoded.std(axis=0)
        scale = np.where(scale > 0, scale, np.where(std > 0, std, 1.0))
        self.center = torch.as_tensor(median, dtype=torch.float64)
        self.scale = torch.as_tensor(scale, dtype=torch.float64)
        return self

    def _pick_log_columns(self, frame: pd.DataFrame, numeric: Sequence[str]) -> list[str]:
        config = self.config
        if config.log_columns is not None:
            chosen = list(config.log_columns)
            missing = sorted(set(chosen) - set(numeric))
            if missing:
                raise ValueError(f"log columns {missing} are not numeric columns of {list(numeric)}")
            negative = [c for c in chosen if (frame[c].to_numpy(np.float64) < 0).any()]
            if negative:
                raise ValueError(f"log columns must be ≥ 0; {negative} hold negative values")
            return chosen
        chosen = []
        for column in numeric:
            values = frame[column].to_numpy(np.float64)
            if values.min() >= 0 and np.ptp(values) > 0 and skew(values) > config.log_skew:
                chosen.append(column)
        return chosen

    def _encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw frame → numeric matrix (N, C): logs applied, categories as indicator columns."""
        frame = frame.rename(columns=str)
        widths = [len(self.categorical[c]) if c in self.categorical else 1 for c in self.columns]
        encoded = np.zeros((len(frame), sum(widths)))  # (N, C), filled column by column
        names: list[str] = []
        sources: list[int] = []
        start = 0
        for index, (column, width) in enumerate(zip(self.columns, widths, strict=True)):
            if column in self.categorical:
                levels = self.categorical[column]
                codes = _category_codes(frame[column], levels[:-1])
                codes[codes < 0] = width - 1  # unseen labels: the "other" indicator
                encoded[np.arange(len(frame)), start + codes] = 1.0
                names += [f"{column}={level}" for level in levels]
            else:
                values = frame[column].to_numpy(np.float64)
                if column in self.log_columns:
                    _log_amount(values, self.log_offsets[column], out=encoded[:, start])
                else:
                    encoded[:, start] = values
                names.append(column)
            sources += [index] * width
            start += width
        self.encoded_names, self.encoded_source = names, sources
        return encoded

    def transform(self, frame: pd.DataFrame, dtype: torch.dtype = torch.float32) -> Tensor:
        """Raw frame → robust-scaled features (N, C). A negative value in a log-transformed column maps
        to the mirror image of the log (see :func:`_log_amount`), so it scores far out, not as an error."""
        if not self.is_fitted:
            raise RuntimeError("the preprocessor is not fitted; call fit() first")
        encoded = self._encode(frame)
        encoded -= self.center.numpy()
        encoded /= self.scale.numpy()
        np.clip(encoded, -MAX_ROBUST_UNITS, MAX_ROBUST_UNITS, out=encoded)
        return torch.from_numpy(encoded).to(dtype)

    def state_dict(self) -> dict[str, Any]:
        if not self.is_fitted:
            raise RuntimeError("the preprocessor is not fitted; call fit() first")
        return {
            "columns": list(self.columns),
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "log_columns": list(self.log_columns),
            "log_offsets": dict(self.log_offsets),
            "encoded_names": list(self.encoded_names),
            "encoded_source": list(self.encoded_source),
            "center": self.center.clone(),
            "scale": self.scale.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> TabularPreprocessor:
        self.columns = [str(c) for c in state["columns"]]
        self.categorical = {str(k): [str(v) for v in vs] for k, vs in state["categorical"].items()}
        self.log_columns = [str(c) for c in state["log_columns"]]
        self.log_offsets = {str(k): float(v) for k, v in state["log_offsets"].items()}
        self.encoded_names = [str(c) for c in state["encoded_names"]]
        self.encoded_source = [int(i) for i in state["encoded_source"]]
        self.center = state["center"].to(torch.float64)
        self.scale = state["scale"].to(torch.float64)
        return self
