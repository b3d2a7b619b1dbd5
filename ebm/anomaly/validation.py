"""Table schemas and validation: a file either passes whole or is rejected with a message that says where.

A :class:`TableSchema` names the feature columns (numeric and categorical), an optional label column
and the columns carried through to scored output. :func:`validate_frame` checks a frame against it
and raises :class:`ValidationError` naming the column, the kind of problem and the first bad rows
(1-based data rows, the header not counted), for:

- an empty file or a file with a header and no rows;
- duplicated header names;
- missing columns, and columns the schema does not know when ``extra="error"``;
- non-numeric values, NaN/empty cells and ±inf in numeric columns;
- empty cells in categorical columns; labels other than 0 and 1;
- in CSV files, bytes that are not UTF-8 and rows with more or fewer fields than the header (named by
  their line in the file).

Readers (:func:`read_table`, :func:`iter_table`) open CSV and Parquet files, check the header before
reading any data, and validate every chunk; callers write their outputs atomically, so a file that
fails anywhere leaves no output behind.
"""

from __future__ import annotations

import codecs
import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

MAX_ROWS_SHOWN = 5
CSV_BLOCK_BYTES = 1 << 24  # pyarrow's CSV block: a bad cell past the first block falls back mid-file


class ValidationError(ValueError):
    """A table does not match its schema; the message names the column and the first bad rows."""

    def __init__(self, message: str, *, column: str | None = None, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.column = column
        self.rows = tuple(int(r) for r in rows)


@dataclass(frozen=True)
class TableSchema:
    """What a table must hold.

    Attributes:
        numeric: numeric feature columns.
        categorical: categorical feature columns (labels, read as text).
        label: optional 0/1 anomaly label column (checked when present; required if ``label_required``).
        passthrough: columns copied to scored output as they are (ids, timestamps); optional in the input.
        extra: what to do with any other column: ``"ignore"`` it or raise (``"error"``).
        label_required: the label column must be present.
    """

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    label: str | None = None
    passthrough: tuple[str, ...] = ()
    extra: Literal["ignore", "error"] = "ignore"
    label_required: bool = False

    def __post_init__(self) -> None:
        names = [*self.features, *([self.label] if self.label else []), *self.passthrough]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"schema names columns {duplicated} more than once")
        if not self.features:
            raise ValueError("a schema needs at least one feature column")
        if self.extra not in ("ignore", "error"):
            raise ValueError(f"extra must be 'ignore' or 'error', got {self.extra!r}")

    @property
    def features(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    @property
    def known(self) -> tuple[str, ...]:
        return (*self.features, *([self.label] if self.label else []), *self.passthrough)


def _rows(mask: np.ndarray, offset: int) -> list[int]:
    return [int(i) + offset + 1 for i in np.flatnonzero(mask)[:MAX_ROWS_SHOWN]]


def _show(rows: Sequence[int], total: int) -> str:
    more = f" and {total - len(rows)} more" if total > len(rows) else ""
    return f"row{'s' if total > 1 else ''} {', '.join(map(str, rows))}{more}"


def _reject_rows(bad: np.ndarray, offset: int, column: str, message: str, *, suffix: str = "") -> None:
    """Raise a :class:`ValidationError` naming the first rows where ``bad`` holds, if any does:
    ``"{message} at rows 3, 7 and 2 more{suffix}"``."""
    if bad.any():
        rows = _rows(bad, offset)
        raise ValidationError(f"{message} at {_show(rows, int(bad.sum()))}{suffix}", column=column, rows=rows)


def check_header(columns: Sequence[str], schema: TableSchema, source: str = "input") -> None:
    """Duplicated, missing and (with ``extra="error"``) unknown columns, before any data is read."""
    names = [str(c) for c in columns]
    if not names or names == [""]:
        raise ValidationError(f"{source}: no header (the file is empty)")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValidationError(f"{source}: duplicated header name(s) {duplicated}", column=duplicated[0])
    required = [*schema.features, *([schema.label] if schema.label and schema.label_required else [])]
    missing = [c for c in required if c not in names]
    if missing:
        raise ValidationError(
            f"{source}: missing column(s) {missing}; the file has {names[:20]}", column=missing[0]
        )
    if schema.extra == "error":
        unknown = [c for c in names if c not in schema.known]
        if unknown:
            raise ValidationError(
                f"{source}: unexpected column(s) {unknown}; expected only {list(schema.known)}",
                column=unknown[0],
            )


def validate_frame(
    frame: pd.DataFrame, schema: TableSchema, *, source: str = "input", offset: int = 0
) -> pd.DataFrame:
    """Check ``frame`` against ``schema``; return the checked columns with numeric ones as float64.

    Args:
        frame: the table; cells may be strings (as read from CSV) or numbers.
        schema: what it must hold.
        source: how to name the table in messages (a file name).
        offset: rows before this chunk, so row numbers in messages count from the start of the file.

    Raises:
        ValidationError: naming the column and the first bad rows (1-based, header excluded).
    """
    check_header(list(frame.columns), schema, source)
    if len(frame) == 0 and offset == 0:
        raise ValidationError(f"{source}: the table has a header but no rows")
    out: dict[str, pd.Series] = {}
    for column in schema.numeric:
        out[column] = _numeric(frame[column], column, source, offset)
    for column in schema.categorical:
        values = frame[column]
        text = _category_text(values)
        blank = (text.str.strip() == "").to_numpy(dtype=bool, na_value=True)
        missing = values.isna().to_numpy() | blank
        _reject_rows(missing, offset, column, f"{source}: column {column!r} has empty values")
        out[column] = text
    if schema.label and schema.label in frame.columns:
        labels = _numeric(frame[schema.label], schema.label, source, offset)
        bad = ~np.isin(labels.to_numpy(), (0.0, 1.0))
        message = f"{source}: label column {schema.label!r} must hold 0 or 1; other values"
        _reject_rows(bad, offset, schema.label, message)
        out[schema.label] = labels.astype(np.int64)
    for column in schema.passthrough:
        if column in frame.columns:
            out[column] = frame[column]
    return pd.DataFrame(out, index=frame.index)


def _category_text(values: pd.Series) -> pd.Series:
    """Category labels as the text they are matched by. A code that is a whole number reads the same
    whether it came as an int, a float (after a join or ``fillna``: 5411.0) or text: ``"5411"``."""
    if isinstance(values.dtype, pd.ArrowDtype) and pd.api.types.is_string_dtype(values.dtype):
        return values  # Arrow strings stay as they are (no Python objects)
    if pd.api.types.is_float_dtype(values):
        present = values.dropna()  # missing labels are refused by the caller, whatever their text
        if ((present == present.round()) & (present.abs() < 2**53)).all():  # exact as integers
            return values.astype("Int64").astype(str)
    return values.astype(str)


def _numeric(values: pd.Series, column: str, source: str, offset: int) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        values = values.astype(np.float64)
    if pd.api.types.is_numeric_dtype(values):
        converted = values.astype(np.float64)
        not_numeric = np.zeros(len(values), dtype=bool)
    else:
        text = values.astype("string").str.strip()
        lowered = text.str.lower()
        # a bool column as text (pandas writes True/False to CSV, and object arrays hold Python bools)
        text = text.mask(lowered == "true", "1").mask(lowered == "false", "0")
        converted = pd.to_numeric(text, errors="coerce").astype(np.float64)
        blank = values.isna().to_numpy() | (text == "").fillna(True).to_numpy(dtype=bool)
        not_numeric = converted.isna().to_numpy() & ~blank
        lowered = text.str.lower().fillna("")
        not_numeric &= ~lowered.isin(["nan", "inf", "-inf", "+inf", "infinity", "-infinity"]).to_numpy()
    array = converted.to_numpy()
    if not_numeric.any():
        example = values.iloc[int(np.flatnonzero(not_numeric)[0])]
        message = f"{source}: column {column!r} has non-numeric values"
        _reject_rows(not_numeric, offset, column, message, suffix=f" (first: {str(example)[:40]!r})")
    for bad, what in ((np.isnan(array), "missing or NaN values"), (np.isinf(array), "infinite values")):
        _reject_rows(bad, offset, column, f"{source}: column {column!r} has {what}")
    return converted


# --- files ------------------------------------------------------------------------------------------


def file_format(path: str | os.PathLike[str]) -> Literal["csv", "parquet"]:
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".txt"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValidationError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")


def read_header(path: str | os.PathLike[str]) -> list[str]:
    """The column names of a CSV or Parquet file, as written (duplicates kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise ValidationError(f"{path.name}: the file is empty")
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        try:
            return [str(n) for n in pq.read_schema(path).names]
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise ValidationError(f"{path.name}: not a readable Parquet file ({err})") from err
    try:
        header, _ = _csv_header(path, "strict")
    except UnicodeDecodeError:  # text is decoded a block ahead of the parser: the bad byte may lie past it
        header, lines = _csv_header(path, "replace")
        error = _utf8_error(path)
        if error is not None and error[0] <= lines:
            raise ValidationError(error[1]) from None
    return header  # as written: the readers below match names exactly, spaces included


def _csv_header(path: Path, errors: str) -> tuple[list[str], int]:
    """The first record of a CSV file (a UTF-8 BOM dropped) and the number of lines it spans."""
    with open(path, newline="", encoding="utf-8-sig", errors=errors) as handle:
        reader = csv.reader(handle)
        try:
            return next(reader, []), reader.line_num
        except csv.Error as err:
            raise ValidationError(f"{path.name}: unreadable CSV header ({err})") from err


def _utf8_error(path: Path, block: int = 1 << 20) -> tuple[int, str] | None:
    """The line (1-based) of the first byte of ``path`` that is not UTF-8, with a message naming the
    file, the line and the bytes; ``None`` if the whole file is UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before, offset = 0, 0  # newlines and bytes in the blocks before this one
    with open(path, "rb") as handle:
        while True:
            data = handle.read(block)
            pending = decoder.getstate()[0]  # the start of a character cut by the end of the last block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:  # err.start counts from the start of ``pending``
                text = pending + data
                line = lines_before + text.count(b"\n", 0, err.start) + 1
                bad = text[err.start : err.end]
                where = offset - len(pending) + err.start
                return line, f"{path.name}: line {line} is not valid UTF-8 ({bad!r} at byte offset {where})"
            if not data:
                return None
            lines_before += data.count(b"\n")
            offset += len(data)


def _check_csv_records(path: Path) -> None:
    """Raise a :class:`ValidationError` naming the line of the first byte that is not UTF-8, or of the
    first row with more or fewer fields than the header. pandas would read the one as U+FFFD and fill
    the missing fields of a short row with empty cells (or take the first field of a long one for an
    index), so the slow path checks this first."""
    error = _utf8_error(path)
    if error is not None:
        raise ValidationError(error[1])
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        width, row, line = len(next(reader, [])), 0, reader.line_num
        try:
            for fields in reader:
                start, line = line + 1, reader.line_num
                if not fields:  # a blank line: skipped by both pyarrow and pandas, not a row
                    continue
                row += 1
                if len(fields) != width:
                    raise ValidationError(
                        f"{path.name}: malformed CSV: line {start} (row {row}) has {len(fields)} "
                        f"field{'s' if len(fields) != 1 else ''}; the header has {width}",
                        rows=[row],
                    )
        except csv.Error as err:
            raise ValidationError(f"{path.name}: malformed CSV at line {reader.line_num} ({err})") from err


def iter_table(
    path: str | os.PathLike[str], schema: TableSchema, *, chunk_rows: int = 262_144
) -> Iterator[pd.DataFrame]:
    """Validated chunks of a CSV or Parquet file (header checked before any data is read).

    Numeric feature columns come back as float64, categorical ones as text. Raises
    :class:`ValidationError` at the first bad chunk, naming the column and its rows in the file. Each
    chunk's ``attrs`` hold ``source`` (the file name) and ``offset`` (rows before it), so checks made
    later (the preprocessor's) can say where too.
    """
    path = Path(path)
    check_header(read_header(path), schema, path.name)
    wanted = [c for c in read_header(path) if c in schema.known]
    offset = 0
    for raw in _raw_chunks(path, wanted, schema, chunk_rows):
        chunk = validate_frame(raw, schema, source=path.name, offset=offset)
        chunk.attrs.update(source=path.name, offset=offset)
        yield chunk
        offset += len(raw)
    if offset == 0:
        raise ValidationError(f"{path.name}: the table has a header but no rows")


def read_table(path: str | os.PathLike[str], schema: TableSchema) -> pd.DataFrame:
    """A whole CSV or Parquet file, validated (see :func:`iter_table`)."""
    table = pd.concat(list(iter_table(path, schema)), ignore_index=True)
    table.attrs.clear()  # the chunks' row offsets; pyarrow would write them into a Parquet file's metadata
    return table


def _arrow_text(arrow_type: Any) -> pd.ArrowDtype | None:
    """Text columns stay Arrow strings in pandas (no Python objects: ~3× faster to read, check, encode
    and write back); every other type converts as usual."""
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.ArrowDtype(arrow_type)
    return None


def _raw_chunks(
    path: Path, columns: list[str], schema: TableSchema, chunk_rows: int
) -> Iterator[pd.DataFrame]:
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
                yield batch.to_pandas(types_mapper=_arrow_text)
        except (OSError, ValueError) as err:
            raise ValidationError(f"{path.name}: not a readable Parquet file ({err})") from err
        return
    yield from _csv_chunks(path, columns, schema, chunk_rows)


def _csv_chunks(
    path: Path, columns: list[str], schema: TableSchema, chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """Fast path: pyarrow's streaming CSV reader with float64 feature columns. A cell it cannot convert
    falls back to pandas reading everything as text from that chunk on, so the message names the row."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    numeric = [c for c in (*schema.numeric, *([schema.label] if schema.label else [])) if c in columns]
    text = [c for c in columns if c not in numeric]
    convert = pacsv.ConvertOptions(
        include_columns=columns,
        column_types={**{c: pa.float64() for c in numeric}, **{c: pa.string() for c in text}},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    rows_done = 0
    try:
        reader = pacsv.open_csv(path, read_options=read, convert_options=convert)
        for batch in reader:
            frame = batch.to_pandas(types_mapper=_arrow_text)
            for start in range(0, len(frame), chunk_rows):
                part = frame.iloc[start : start + chunk_rows]
                yield part
                rows_done += len(part)
        return
    except (pa.ArrowException, UnicodeDecodeError):
        pass
    # Slow path from the first row not yet handed out: text cells, so validate_frame can say where. It
    # reads from the top and drops the rows already handed out: ``skiprows`` would count lines of the
    # file, and blank lines and quoted line breaks are lines but not rows.
    _check_csv_records(path)
    header, drop = read_header(path), rows_done
    try:
        reader_text = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            chunksize=chunk_rows,
            encoding="utf-8-sig",
            on_bad_lines="error",
        )
        for chunk in reader_text:
            if list(chunk.columns) != header:
                raise ValidationError(f"{path.name}: malformed CSV (the header does not parse consistently)")
            if drop and drop >= len(chunk):
                drop -= len(chunk)
                continue
            yield chunk.iloc[drop:][columns].replace("", np.nan)
            drop = 0
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValidationError(f"{path.name}: malformed CSV ({err})") from err
