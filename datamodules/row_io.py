"""Reading prompt-schema data files (parquet, JSONL) row by row, before any validation.

`read_rows` yields (0-based row index, raw row dict) and raises `SchemaError` for a file that cannot be read
as the schema: an unknown suffix, or a missing required column (checked on the parquet schema, or on the
first JSON object of a JSONL file). A JSONL line that is not a JSON object does not stop the read: it yields
a row holding the parse error under `BAD_LINE_KEY` and the id `line N` (N 1-based, for error messages), which
`validate_row` turns into a `bad_json` skip. `iter_records` runs both over one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from datamodules.schema import (
    BAD_LINE_KEY,
    REQUIRED_COLUMNS,
    RowLimits,
    SchemaError,
    Skip,
    SkipCounter,
    validate_row,
)
from datamodules.types import PromptRecord


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row index, raw row dict) from a `.parquet` or `.jsonl` file, checking the required columns first.

    JSONL lines are read as bytes and decoded as UTF-8 with `surrogateescape`, so a line with invalid bytes still
    yields a row (its strings carry lone surrogates, which `validate_row` reports as `bad_text_encoding`). A line
    that is not a JSON object yields `{"__bad_json__": message, "id": "line N"}`. Blank lines are ignored but keep their index.
    """
    p = Path(path)
    if p.suffix == ".parquet":
        yield from _read_parquet(p)
    elif p.suffix == ".jsonl":
        yield from _read_jsonl(p)
    else:
        raise SchemaError(f"{p}: unknown data file type {p.suffix!r}; expected .parquet or .jsonl")


def _require(columns: list[str] | set[str], path: Path) -> None:
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise SchemaError(f"{path}: missing required column {col!r} (columns: {sorted(columns)})")


def _read_parquet(path: Path, batch_size: int = 256) -> Iterator[tuple[int, dict[str, Any]]]:
    pf = pq.ParquetFile(path)
    _require(pf.schema_arrow.names, path)
    index = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    checked = False
    with path.open("rb") as f:
        for index, line in enumerate(f):
            text = line.decode("utf-8", errors="surrogateescape").strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield index, {BAD_LINE_KEY: str(e), "id": f"line {index + 1}"}
                continue
            if not isinstance(row, dict):
                yield (
                    index,
                    {BAD_LINE_KEY: f"a JSON {type(row).__name__}, not an object", "id": f"line {index + 1}"},
                )
                continue
            if not checked:  # the first object plays the header: a column it lacks is missing from the file
                _require(set(row), path)
                checked = True
            yield index, row


def iter_records(
    path: str | Path, limits: RowLimits = RowLimits(), counter: SkipCounter | None = None
) -> Iterator[PromptRecord]:
    """Valid records of one file; skipped rows go to `counter` (read `counter.summary()` afterwards)."""
    p = Path(path)
    for _, raw in read_rows(p):
        result = validate_row(raw, p.parent, limits)
        if isinstance(result, Skip):
            if counter is not None:
                counter.add(result)
        else:
            yield result
