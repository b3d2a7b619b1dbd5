"""Atomic table writes: a temporary file in the destination folder, renamed over the target when complete."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ebm.anomaly.validation import file_format
from ebm.checkpoint import atomic_write


def atomic_table_write(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as CSV or Parquet (chosen by suffix); a failure leaves no file behind."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = file_format(path)
    arrow = pa.Table.from_pandas(table, preserve_index=False)

    def write(tmp: str) -> None:
        if kind == "parquet":
            pq.write_table(arrow, tmp)
        else:
            pacsv.write_csv(arrow, tmp, pacsv.WriteOptions(quoting_style="needed"))

    return atomic_write(path, write)
