"""Reading prompt-schema data files (parquet, JSONL) row by row, before any validation.

`read_rows` yields (0-based row index, raw row dict) and raises `SchemaError` for a file that cannot be read
as the schema: an unknown suffix, or a missing required column (checked on the parquet schema, or on the
first JSON object of a JSONL file). A JSONL line that is not a JSON object does not stop the read: it yields
a row holding the parse error under `BAD_LINE_KEY` and the id `line N` (N 1-based, for error messages), which
`validate_row` turns into a `bad_json` skip. `iter_records` runs both over one file.

Files with their own column names are read through a `ColumnMap` (the DataModule's `columns:`): it renames the
file's columns to the schema's, takes a single `image` column as a one-image list, and gathers MMMU-style
`image_1` ... `image_K` columns into `images` in number order (empty cells left out).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
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

SCHEMA_FIELDS = ("id", "question", "answer", "images", "options", "question_type", "difficulty", "subject",
                 "solution")  # fmt: skip
_NUMBERED_IMAGE = re.compile(r"image_(\d+)$")


class ColumnMap:
    """Schema field -> the file's column, for files that name their columns their own way.

    `mapping` holds only the renamed fields, e.g. `{"question": "problem", "answer": "final_answer",
    "images": "image"}`; other fields keep their schema names. When a file has no `images` column (after the
    mapping), a single `image` column or numbered `image_1` ... `image_K` columns stand in for it.
    """

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self.mapping = dict(mapping or {})
        unknown = sorted(set(self.mapping) - set(SCHEMA_FIELDS))
        if unknown:
            raise ValueError(f"data.columns: unknown schema field(s) {unknown}; the fields are {list(SCHEMA_FIELDS)}")

    def plan(self, names: list[str] | set[str], path: Path, strict: bool = True) -> dict[str, Any]:
        """Schema field -> file column (or, for `images` from numbered columns, the list of them) for one file;
        raises `SchemaError` naming the file and the column when a required one is missing (`strict`)."""
        names = set(names)
        plan: dict[str, Any] = {f: self.source(f) for f in SCHEMA_FIELDS if self.source(f) in names}
        if "images" not in plan and "images" not in self.mapping:
            numbered = sorted((int(m.group(1)), c) for c in names if (m := _NUMBERED_IMAGE.match(c)))
            if "image" in names:
                plan["images"] = "image"
            elif numbered:
                plan["images"] = [c for _, c in numbered]
        for col in REQUIRED_COLUMNS if strict else ():
            if col not in plan:
                renamed = f" (data.columns maps it to {self.source(col)!r})" if col in self.mapping else ""
                extra = " or `image` / `image_1`.. columns" if col == "images" else ""
                raise SchemaError(f"{path}: missing required column {col!r}{renamed}{extra} (columns: {sorted(names)})")
        return plan

    def source(self, field: str) -> str:
        return self.mapping.get(field, field)

    @staticmethod
    def file_columns(plan: dict[str, Any]) -> list[str]:
        """The file columns a plan reads."""
        return [c for v in plan.values() for c in (v if isinstance(v, list) else [v])]

    @staticmethod
    def apply(raw: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
        """A raw file row as a schema row (numbered image cells that are empty are left out)."""
        if BAD_LINE_KEY in raw:
            return raw
        row = {f: raw.get(c) for f, c in plan.items() if not isinstance(c, list)}
        if isinstance(plan.get("images"), list):
            row["images"] = [raw[c] for c in plan["images"] if raw.get(c) is not None]
        return row


def read_rows(path: str | Path, columns: ColumnMap | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row index, schema row dict) from a `.parquet` or `.jsonl` file, checking the required columns first.

    JSONL lines are read as bytes and decoded as UTF-8 with `surrogateescape`, so a line with invalid bytes still
    yields a row (its strings carry lone surrogates, which `validate_row` reports as `bad_text_encoding`). A line
    that is not a JSON object yields `{"__bad_json__": message, "id": "line N"}`. Blank lines are ignored but keep their index.
    """
    p, columns = Path(path), columns or ColumnMap()
    if p.suffix == ".parquet":
        yield from _read_parquet(p, columns)
    elif p.suffix == ".jsonl":
        yield from _read_jsonl(p, columns)
    else:
        raise SchemaError(f"{p}: unknown data file type {p.suffix!r}; expected .parquet or .jsonl")


def _read_parquet(path: Path, columns: ColumnMap, batch_size: int = 256) -> Iterator[tuple[int, dict[str, Any]]]:
    pf = pq.ParquetFile(path)
    plan = columns.plan(pf.schema_arrow.names, path)
    index = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=ColumnMap.file_columns(plan)):
        for row in batch.to_pylist():
            yield index, ColumnMap.apply(row, plan)
            index += 1


def parse_line(line: bytes, index: int) -> dict[str, Any] | None:
    """One JSONL line as a raw row dict; None for a blank line; a `BAD_LINE_KEY` row for a line that is not an
    object."""
    text = line.decode("utf-8", errors="surrogateescape").strip()
    if not text:
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return {BAD_LINE_KEY: str(e), "id": f"line {index + 1}"}
    if not isinstance(row, dict):
        return {BAD_LINE_KEY: f"a JSON {type(row).__name__}, not an object", "id": f"line {index + 1}"}
    return row


def iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line index, byte offset, line bytes) of every line of a file."""
    offset = 0
    with path.open("rb") as f:
        for index, line in enumerate(f):
            yield index, offset, line
            offset += len(line)


def _read_jsonl(path: Path, columns: ColumnMap) -> Iterator[tuple[int, dict[str, Any]]]:
    checked = False
    for index, _, line in iter_lines(path):
        row = parse_line(line, index)
        if row is None:
            continue
        if BAD_LINE_KEY not in row:  # the first object plays the header: a column it lacks is missing from the file
            row = ColumnMap.apply(row, columns.plan(set(row), path, strict=not checked))
            checked = True
        yield index, row


def iter_records(
    path: str | Path, limits: RowLimits = RowLimits(), counter: SkipCounter | None = None,
    columns: ColumnMap | None = None,
) -> Iterator[PromptRecord]:
    """Valid records of one file; skipped rows go to `counter` (read `counter.summary()` afterwards)."""
    p = Path(path)
    for _, raw in read_rows(p, columns):
        result = validate_row(raw, p.parent, limits)
        if isinstance(result, Skip):
            if counter is not None:
                counter.add(result)
        else:
            yield result
