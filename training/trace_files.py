"""Reading logged tables (parquet, CSV, JSONL) in chunks, with prompt ids and texts as text.

Prompt ids are labels, not numbers: `7`, `007`, `7.0` and `1e2` are four prompts, and `NA`,
`nan` or `NULL` are ids like any other. So the id and text columns are read as the text that
was written (CSV as strings, JSON numbers with their spelling), and `as_labels` turns a column
an id into an int only when it is an integer written plainly (`7`, never `007`), which loses
nothing; the column is int64 when every id is. Tables are read in chunks of `chunk_rows`, so a reader never holds the whole file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("prompt_id", "prompt")  # labels and prompt texts: never parsed as numbers
DEFAULT_CHUNK_ROWS = 1 << 18  # rows per chunk: a few tens of MB whatever the file's size
FORMATS = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
_PLAIN_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,17})")  # spelled as str(int(x)) would spell it; fits int64


class TableError(ValueError):
    """A table that cannot be read; the message names the file and what is wrong."""


def iter_table(path: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The table at `path` in chunks of at most `chunk_rows` rows (a `_row` column numbers them)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise TableError(f"{path}: unknown format {suffix!r}; use .parquet, .csv or .jsonl")
    reader = {".parquet": _parquet_chunks, ".csv": _csv_chunks}.get(suffix, _jsonl_chunks)
    first = 0
    try:
        for chunk in reader(path, chunk_rows):
            chunk.index = pd.RangeIndex(first, first + len(chunk))
            first += len(chunk)
            yield chunk
    except TableError:
        raise
    except UnicodeDecodeError as error:
        raise TableError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of a block)") from None
    except Exception as error:  # the parsers' own errors (truncated parquet, bad quoting, ...)
        raise TableError(f"{path} could not be read as {suffix[1:]}: {' '.join(str(error).split())}") from None


def read_table(path: Path) -> pd.DataFrame:
    chunks = list(iter_table(path))
    return pd.concat(chunks) if len(chunks) > 1 else chunks[0] if chunks else pd.DataFrame()


def table_columns(path: Path) -> list[str]:
    """The column names of a table, read from its header (its first chunk for JSONL)."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as error:
            raise TableError(f"{path} could not be read as parquet: {' '.join(str(error).split())}") from None
    return list(next(iter_table(path, chunk_rows=1000), pd.DataFrame()).columns)


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if file.metadata.num_rows == 0:
        yield file.schema_arrow.empty_table().to_pandas()
        return
    for batch in file.iter_batches(batch_size=chunk_rows):
        yield batch.to_pandas()


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    header = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    text = {c: str for c in TEXT_COLUMNS if c in header}
    # keep_default_na=False: `NA`, `nan`, `NULL` are ids (and empty cells are caught by the checks)
    yield from pd.read_csv(path, dtype=text, keep_default_na=False, chunksize=chunk_rows, encoding="utf-8")


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    records: list = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TableError(f"{path}: line {number} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:  # numbers keep their spelling (ids); counts are checked as numbers later
                record = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)
            except json.JSONDecodeError as error:
                raise TableError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise TableError(f"{path}: line {number} is not a JSON object")
            records.append(record)
            if len(records) >= chunk_rows:
                yield pd.DataFrame.from_records(records)
                records = []
    if records or not path.stat().st_size:
        yield pd.DataFrame.from_records(records)


def as_labels(values: pd.Series, source: str, column: str = "prompt_id") -> pd.Series:
    """Ids as labels: int64 when every one is a plainly written integer, else their text."""
    if pd.api.types.is_bool_dtype(values):
        raise TableError(f"{source}: column {column!r} holds booleans; ids are labels (text or integers)")
    if pd.api.types.is_integer_dtype(values):
        return values.astype(np.int64)
    if pd.api.types.infer_dtype(values, skipna=False) != "string":
        values = values.map(lambda v: _one_label(v, source, column, values))
    empty = (values.str.len() == 0).to_numpy()
    if empty.any():
        row = values.index[int(np.flatnonzero(empty)[0])]
        raise TableError(f"{source}: column {column!r} is empty at row {row}")
    plain = values.str.fullmatch(_PLAIN_INTEGER.pattern).to_numpy(dtype=bool)
    if plain.all():
        return values.astype(np.int64)
    out = values.astype(object)
    if plain.any():  # each label on its own (not per column), so a chunked read labels alike
        out[plain] = [int(v) for v in values[plain]]
    return out


def _one_label(value, source: str, column: str, values: pd.Series) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise TableError(f"{source}: column {column!r} holds bytes that are not UTF-8 text "
                             f"({value[:16]!r})") from None
    if isinstance(value, (bool, np.bool_)) or value is None or (isinstance(value, float) and value != value):
        what = "a boolean" if isinstance(value, (bool, np.bool_)) else "a missing value"
        raise TableError(f"{source}: column {column!r} holds {what}; ids are labels (text or integers)")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # a float id keeps its value's spelling: 7.0 stays apart from 7
    raise TableError(f"{source}: column {column!r} holds a {type(value).__name__}; ids are labels (text or integers)")
