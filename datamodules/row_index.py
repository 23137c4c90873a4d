"""The lazy row index: what ordering needs (id, difficulty) and where each row lives, without reading the rows.

`build_index` reads, per parquet file, only the `id` and `difficulty` columns (a column read: the images are
never touched) and, per JSONL file, each line's id, difficulty and byte offset. `RowReader` then reads whole
rows on demand: a parquet row through its row group (`ParquetFile.read_row_group`, only the schema's columns),
a JSONL row by seeking to its line. Memory is the index (tens of bytes a row) plus the row groups being read;
nothing is cached. Rows whose id or difficulty is bad, and JSONL lines that are not objects, are skipped and
counted here, since ordering cannot place them; everything else is checked when the row is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datamodules.ordering import RowMeta
from datamodules.row_io import ColumnMap, iter_lines, parse_line
from datamodules.schema import BAD_LINE_KEY, RowLimits, Skip, SkipCounter, index_fields

log = logging.getLogger(__name__)
SLOW_ROW_GROUP = 2000  # rows; above this a served row reads many images' bytes it does not need


@dataclass
class RowIndex:
    """Rows in file order: file number, position in the file (parquet row / JSONL byte offset), id, difficulty."""

    files: list[Path]
    columns: ColumnMap
    plans: list[dict[str, Any]]  # per file: schema field -> file column(s)
    file_of: np.ndarray  # [N] int32
    pos_of: np.ndarray  # [N] int64
    ids: list[str]
    difficulty: list[int | None]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, positions: list[int] | range) -> RowIndex:
        """A sub-index (rank shard, row limit, rows that passed a full scan), in the given order."""
        pick = np.asarray(list(positions), dtype=np.int64)
        return RowIndex(self.files, self.columns, self.plans, self.file_of[pick], self.pos_of[pick],
                        [self.ids[i] for i in pick], [self.difficulty[i] for i in pick])

    def meta(self) -> list[RowMeta]:
        return [RowMeta(i, d) for i, d in zip(self.ids, self.difficulty, strict=True)]

    def base_dir(self, i: int) -> Path:
        return self.files[int(self.file_of[i])].parent


def build_index(files: list[Path], columns: ColumnMap, limits: RowLimits, counter: SkipCounter,
                limit: int | None = None) -> RowIndex:
    """Index the rows of `files` in order, up to `limit` indexed rows (files past it are never opened)."""
    file_of: list[np.ndarray] = []
    pos_of: list[np.ndarray] = []
    ids: list[str] = []
    levels: list[int | None] = []
    plans: list[dict[str, Any]] = []
    for f, path in enumerate(files):
        if limit is not None and len(ids) >= limit:
            break
        plan, rows = _index_parquet(path, columns, limits) if path.suffix == ".parquet" else \
            _index_jsonl(path, columns, limits)
        plans.append(plan)
        positions, file_ids, file_levels, skips = rows
        for skip in skips:
            counter.add(skip)
        keep = len(file_ids) if limit is None else min(len(file_ids), limit - len(ids))
        pos_of.append(np.asarray(positions[:keep], dtype=np.int64))
        file_of.append(np.full(keep, f, dtype=np.int32))
        ids += file_ids[:keep]
        levels += file_levels[:keep]
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))  # noqa: E731
    return RowIndex(list(files[: len(plans)]), columns, plans, cat(file_of, np.int32), cat(pos_of, np.int64),
                    ids, levels)


def _check_rows(rows, limits: RowLimits) -> tuple[list[int], list[str], list[int | None], list[Skip]]:
    """(positions, ids, levels, skips) of (position, raw row) pairs, through `index_fields`."""
    positions, ids, levels, skips = [], [], [], []
    for pos, raw in rows:
        got = index_fields(raw, limits)
        if isinstance(got, Skip):
            skips.append(got)
            continue
        positions.append(pos)
        ids.append(got[0])
        levels.append(got[1])
    return positions, ids, levels, skips


def _index_parquet(path: Path, columns: ColumnMap, limits: RowLimits):
    pf = pq.ParquetFile(path)
    plan = columns.plan(pf.schema_arrow.names, path)
    biggest = max((pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)), default=0)
    if biggest > SLOW_ROW_GROUP:
        log.warning("%s: row groups of up to %d rows; each served row reads its whole row group. Rewrite it with "
                    "pyarrow.parquet.write_table(..., row_group_size=100) (the HF hub's size for image sets) for "
                    "faster serving", path, biggest)
    wanted = {"id": plan["id"], **({"difficulty": plan["difficulty"]} if "difficulty" in plan else {})}
    table = pf.read(columns=list(wanted.values()))
    cols = {field: table.column(col) for field, col in wanted.items()}
    suspect = _suspect_rows(cols, limits)
    if suspect is None:  # id or difficulty of an unusual type: every row through index_fields
        rows = ({f: c[i].as_py() for f, c in cols.items()} for i in range(table.num_rows))
        return plan, _check_rows(enumerate(rows), limits)
    # the rows that pass the vectorised checks are valid as they are; the others go through index_fields
    good = pc.invert(suspect)
    positions = pc.indices_nonzero(good).to_numpy()
    ids = pc.utf8_trim_whitespace(cols["id"].filter(good)).to_pylist()
    levels = cols["difficulty"].filter(good).to_pylist() if "difficulty" in cols else [None] * len(ids)
    bad = pc.indices_nonzero(suspect).to_numpy()
    checked = _check_rows(((int(i), {f: c[int(i)].as_py() for f, c in cols.items()}) for i in bad), limits)
    if checked[0]:  # rows the quick checks doubted but index_fields accepts: merge in file order
        merged = sorted(zip([*positions.tolist(), *checked[0]], [*ids, *checked[1]], [*levels, *checked[2]],
                            strict=True))
        positions, ids, levels = [m[0] for m in merged], [m[1] for m in merged], [m[2] for m in merged]
    return plan, (list(positions), ids, levels, checked[3])


def _suspect_rows(cols: dict[str, Any], limits: RowLimits):
    """A boolean array marking rows whose id or difficulty may be bad (None when the column types need the
    row-by-row check: ids that are not strings, difficulties that are not integers)."""
    import pyarrow as pa

    ids = cols["id"]
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        return None
    suspect = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(ids)), 0), True)
    if "difficulty" in cols:
        level = cols["difficulty"]
        if not pa.types.is_integer(level.type):
            return None
        out_of_range = pc.or_(pc.less(level, limits.min_difficulty), pc.greater(level, limits.max_difficulty))
        suspect = pc.or_(suspect, pc.fill_null(out_of_range, False))
    return suspect


def _index_jsonl(path: Path, columns: ColumnMap, limits: RowLimits):
    """(plan, [(byte offset, {id, difficulty} or a bad-line row)]): one pass over the lines, keeping only what
    the index needs. The first object plays the header: a required column it lacks is missing from the file."""
    plan: dict[str, Any] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    for index, offset, line in iter_lines(path):
        row = parse_line(line, index)
        if row is None:
            continue
        if BAD_LINE_KEY not in row:
            row_plan = columns.plan(set(row), path, strict=plan is None)
            plan = plan or row_plan
            row = {k: v for k, v in ColumnMap.apply(row, row_plan).items() if k in ("id", "difficulty")}
        rows.append((offset, row))
    return plan or {}, _check_rows(rows, limits)


class RowReader:
    """Reads schema rows by index position, opening files lazily (handles are per process: not pickled)."""

    def __init__(self, index: RowIndex) -> None:
        self.files, self.plans, self.columns = index.files, index.plans, index.columns
        self._parquet: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parquet": {}}  # each DataLoader worker opens its own handles

    def read(self, refs: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Schema rows for (file number, position) pairs; rows sharing a parquet row group read it once."""
        out: list[dict[str, Any] | None] = [None] * len(refs)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for k, (f, pos) in enumerate(refs):
            if self.files[f].suffix == ".parquet":
                pf, starts = self._open(f)
                g = int(np.searchsorted(starts, pos, side="right")) - 1
                groups.setdefault((f, g), []).append((k, pos - int(starts[g])))
            else:
                out[k] = self._jsonl_row(f, pos)
        for (f, g), wanted in groups.items():
            pf, _ = self._open(f)
            plan = self.plans[f]
            table = pf.read_row_group(g, columns=ColumnMap.file_columns(plan))
            for k, offset in wanted:
                out[k] = ColumnMap.apply(table.slice(offset, 1).to_pylist()[0], plan)
        return out  # type: ignore[return-value]

    def _open(self, f: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if f not in self._parquet:
            pf = pq.ParquetFile(self.files[f])
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self._parquet[f] = (pf, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
        return self._parquet[f]

    def _jsonl_row(self, f: int, offset: int) -> dict[str, Any]:
        with self.files[f].open("rb") as fh:
            fh.seek(offset)
            row = parse_line(fh.readline(), -1) or {BAD_LINE_KEY: "blank line", "id": ""}
        if BAD_LINE_KEY in row:
            return row
        return ColumnMap.apply(row, self.columns.plan(set(row), self.files[f], strict=False))
