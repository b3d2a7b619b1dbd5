"""Batch scoring of CSV and Parquet files: streamed in chunks, validated, written atomically.

:func:`score_file` reads the input in chunks of ``chunk_rows`` (pyarrow's CSV reader or Parquet row
batches), validates every chunk against the detector's columns, scores it under
``torch.inference_mode`` (plus one backward pass for attributions) and appends the result to a
temporary file next to the destination. Only when the whole input has passed is the temporary file
renamed over the destination; a file that fails validation anywhere, or any other error, leaves no
output (and no half-written file) behind.

Output columns: every input column that is not a feature (ids, timestamps, labels) as it came in (from a
Parquet input with its type; from a CSV, which has no types, as the text in the file, so a Parquet
output of a CSV input holds them as strings), then
``anomaly_score`` (higher = more anomalous), ``is_anomaly`` (0/1 against the detector's threshold) and,
with ``top_k > 0``, ``reason_1 … reason_k`` / ``contribution_1 … contribution_k``: the raw columns that
pushed the score up most and by how much (see :mod:`ebm.anomaly.explain`), for the flagged rows by
default (``reasons="all"`` for every row: one more backward pass over everything, about half the
throughput). An input column that is not a feature but carries one of these names (a scored file fed
back in, say) is refused with :class:`~ebm.anomaly.validation.ValidationError` before anything is written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from ebm.anomaly.detector import BATCH_ROWS, EnergyAnomalyDetector
from ebm.anomaly.explain import reference_row, score_and_attribute, to_raw_columns, top_attributions
from ebm.anomaly.validation import TableSchema, ValidationError, file_format, iter_table, read_header
from ebm.checkpoint import atomic_write


@dataclass(frozen=True)
class ScoreSummary:
    """What one scoring run did."""

    rows: int
    flagged: int
    seconds: float
    output: Path

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


Reasons = Literal["flagged", "all", "none"]


def score_frame(
    detector: EnergyAnomalyDetector, frame: pd.DataFrame, *, top_k: int = 3, reasons: Reasons = "flagged"
) -> pd.DataFrame:
    """Scores, flags and the top-``k`` reasons for a validated frame holding the detector's features.

    Args:
        reasons: which rows get reasons: the ``flagged`` ones (an alert needs them; one backward pass
            over the flagged rows only), ``all`` rows, or ``none``. Other rows get an empty reason and
            a NaN contribution.
    """
    if reasons not in ("flagged", "all", "none"):
        raise ValueError(f"reasons must be 'flagged', 'all' or 'none', got {reasons!r}")
    energy = detector._check_fitted()
    features = detector.feature_names_in_
    x = detector.preprocessor.transform(frame[features])
    with torch.inference_mode():
        scores = torch.cat(
            [energy(x[start : start + BATCH_ROWS]) for start in range(0, max(len(x), 1), BATCH_ROWS)]
        )
    scores_np = scores.double().numpy()
    flags = scores_np > detector.threshold_
    out: dict[str, Any] = {"anomaly_score": scores_np, "is_anomaly": flags.astype(np.int64)}
    if top_k > 0 and reasons != "none":
        rows = np.arange(len(x)) if reasons == "all" else np.flatnonzero(flags)
        k = min(top_k, len(features))
        # Reasons as categories over "" (no reason) and the feature names: a small integer per cell, so a
        # million-row chunk's reason columns cost what its numbers do, in memory and in the written file.
        categories = pd.Index(["", *features])
        codes = np.zeros((len(x), k), dtype=np.int32)
        values = np.full((len(x), k), np.nan)
        # measured from a typical row (numbers at their medians, each category at its commonest level),
        # not from all zeros, which for one-hot categories is a row with no category at all
        reference = reference_row(detector.preprocessor, energy)
        for start in range(0, len(rows), BATCH_ROWS):
            chosen = rows[start : start + BATCH_ROWS]
            _, attributions = score_and_attribute(energy, x[torch.from_numpy(chosen)], reference=reference)
            raw = to_raw_columns(attributions, detector.preprocessor.encoded_source, len(features))
            top_names, top_values = top_attributions(raw, features, k)
            codes[chosen] = np.stack([categories.get_indexer(names) for names in top_names], axis=1)
            values[chosen] = np.stack(top_values, axis=1)
        for rank in range(k):
            out[f"reason_{rank + 1}"] = pd.Categorical.from_codes(codes[:, rank], categories=categories)
            out[f"contribution_{rank + 1}"] = values[:, rank]
    return pd.DataFrame(out, index=frame.index)


def output_columns(n_features: int, *, top_k: int = 3, reasons: Reasons = "flagged") -> list[str]:
    """The names of the columns :func:`score_frame` returns for a detector with ``n_features`` features."""
    k = min(top_k, n_features) if top_k > 0 and reasons != "none" else 0
    ranks = [name for rank in range(1, k + 1) for name in (f"reason_{rank}", f"contribution_{rank}")]
    return ["anomaly_score", "is_anomaly", *ranks]


def score_file(
    detector: EnergyAnomalyDetector,
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    chunk_rows: int = 262_144,
    top_k: int = 3,
    reasons: Reasons = "flagged",
    progress: bool = True,
) -> ScoreSummary:
    """Score every row of ``source`` into ``destination`` (CSV or Parquet by suffix), atomically.

    Raises:
        ValidationError: the input does not hold the detector's columns or has bad values (the message
            names the column and the first bad rows), or a column that is not a feature has the name of
            an output column (``anomaly_score``, ``is_anomaly``, ``reason_k``, ``contribution_k``);
            nothing is written.
        FileNotFoundError: no input file.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    detector._check_fitted()
    source, destination = Path(source), Path(destination)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
    out_format = file_format(destination)
    if destination.resolve() == source.resolve():
        raise ValidationError(f"refusing to overwrite the input {source} with its scores")
    assert detector.schema is not None
    header = read_header(source)
    features = set(detector.feature_names_in_)
    passthrough = tuple(dict.fromkeys(c for c in header if c not in features))
    outputs = set(output_columns(len(features), top_k=top_k, reasons=reasons))
    clashes = [c for c in passthrough if c in outputs]
    if clashes:
        raise ValidationError(
            f"{source}: input column(s) {', '.join(map(repr, clashes))} would collide with the output "
            "column(s) of the same name; rename or drop them (is this an already scored file?)",
            column=clashes[0],
        )
    schema = TableSchema(
        numeric=detector.schema.numeric, categorical=detector.schema.categorical, passthrough=passthrough
    )
    total = pq.ParquetFile(source).metadata.num_rows if file_format(source) == "parquet" else None
    counts = {"rows": 0, "flagged": 0}
    start = time.perf_counter()

    def write(tmp: str) -> None:
        writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
        arrow_schema: pa.Schema | None = None
        bar = tqdm(
            total=total, unit="rows", unit_scale=True, desc=f"score {source.name}", disable=not progress
        )
        try:
            for chunk in iter_table(source, schema, chunk_rows=chunk_rows):
                scored = score_frame(detector, chunk, top_k=top_k, reasons=reasons)
                table = pa.Table.from_pandas(
                    pd.concat([chunk[list(passthrough)], scored], axis=1), preserve_index=False
                )
                if writer is None:
                    arrow_schema = table.schema
                    writer = (
                        pq.ParquetWriter(tmp, arrow_schema)
                        if out_format == "parquet"
                        else pacsv.CSVWriter(tmp, arrow_schema)
                    )
                writer.write_table(table if table.schema == arrow_schema else table.cast(arrow_schema))
                counts["rows"] += len(chunk)
                counts["flagged"] += int(scored["is_anomaly"].sum())
                bar.update(len(chunk))
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    atomic_write(destination, write)
    return ScoreSummary(counts["rows"], counts["flagged"], time.perf_counter() - start, destination)
