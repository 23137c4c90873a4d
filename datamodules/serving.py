"""Serving rows from the lazy index: read, validate and decode when a batch is asked for, in the DataLoader worker.

`LazyPrompts` is the map-style dataset behind the training and validation loaders. `__getitems__` (what a
DataLoader calls with a whole batch of indices) reads the rows, validates them with `validate_row` (images are
decoded here) and, for a bad row, records a `Skip` and takes the next row of the index instead, so a training
batch stays full. Each process remembers the verdict on the bad rows it found (ids only, no data), so a bad row
is reported once and later passed over without a read. The replacement is a pure function of the data (the next valid row in index order that is not
already in the batch), so a replayed batch after a resume is the same batch. What serving skipped travels with
the batch (`PromptBatch.skipped`, `rows_read`) back to the main process, where `SkipMonitor` counts it under its
reason and stops the run once more than `max_skip_fraction` of the rows served so far were bad.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from datamodules.row_index import RowIndex, RowReader
from datamodules.schema import (
    RowLimits,
    Skip,
    SkipCounter,
    SkipFractionError,
    check_skip_fraction,
    validate_row,
)
from datamodules.types import PromptBatch, PromptRecord

log = logging.getLogger(__name__)


class ServedRows(list):
    """Records of one batch, plus what serving them took: the ids asked for, the skips, the rows read."""

    def __init__(self, requested: list[str]) -> None:
        super().__init__()
        self.requested = requested
        self.skipped: list[Skip] = []
        self.read = 0
        self.stream_state: Any = None  # streaming only: (worker id, stream state after the last row)


class LazyPrompts(Dataset):
    """Rows of a `RowIndex`, read and validated when served.

    Args:
        index: the rows (this rank's shard).
        limits: validation bounds.
        fill: replace a bad row by the next valid one (training: full batches); when False a bad row is dropped
            (validation: no row counted twice), unless the whole batch was bad.
    """

    def __init__(self, index: RowIndex, limits: RowLimits = RowLimits(), fill: bool = True) -> None:
        self.index, self.limits, self.fill = index, limits, fill
        self.reader = RowReader(index)
        self.known_bad: dict[int, Skip] = {}  # verdicts only (per process), so a bad row is read and reported once

    def __len__(self) -> int:
        return len(self.index)

    def load(self, indices: list[int]) -> list[PromptRecord | Skip]:
        """Read and validate rows (no replacement)."""
        refs = [(int(self.index.file_of[i]), int(self.index.pos_of[i])) for i in indices]
        raws = self.reader.read(refs)
        return [validate_row(raw, self.index.base_dir(i), self.limits) for i, raw in zip(indices, raws, strict=True)]

    def __getitem__(self, i: int) -> PromptRecord:
        rows = self.__getitems__([i])
        return rows[0]

    def __getitems__(self, indices: list[int]) -> ServedRows:
        out = ServedRows([self.index.ids[i] for i in indices])
        out.read = len(indices)
        taken = set(indices)
        fresh = [i for i in dict.fromkeys(indices) if i not in self.known_bad]
        loaded = dict(zip(fresh, self.load(fresh), strict=True))
        for k, i in enumerate(indices):
            got = self.known_bad.get(i) or loaded[i]
            if isinstance(got, Skip):
                self._bad(i, got, out)
                last_chance = k == len(indices) - 1 and not out
                got = self._next_valid(i, taken, out) if self.fill or last_chance else None
            if got is not None:
                out.append(got)
        return out

    def _bad(self, i: int, skip: Skip, out: ServedRows) -> None:
        """Report a bad row the first time this process finds it; later it is passed over without a read."""
        if i not in self.known_bad:
            self.known_bad[i] = skip
            out.skipped.append(skip)

    def _next_valid(self, i: int, taken: set[int], out: ServedRows) -> PromptRecord:
        """The next valid row after `i` in index order that is not in the batch (a pure function of the data)."""
        n = len(self.index)
        for step in range(1, n):
            j = (i + step) % n
            if (j in taken and len(taken) < n) or j in self.known_bad:
                continue
            out.read += 1
            got = self.load([j])[0]
            if isinstance(got, Skip):
                self._bad(j, got, out)
                continue
            taken.add(j)
            return got
        raise SkipFractionError(f"no valid row left to serve after row {self.index.ids[i]!r}: every row read was "
                                "bad. By reason: " + ", ".join(sorted({s.reason for s in self.known_bad.values()})))

    def records(self) -> RecordsView:
        return RecordsView(self)


class RecordsView(Sequence):
    """The dataset's rows as decoded records, read on access: iteration yields the valid rows in index order."""

    def __init__(self, data: LazyPrompts) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [r for r in (self.data.load([j])[0] for j in range(*i.indices(len(self)))) if not isinstance(r, Skip)]
        return self.data[i]

    def __iter__(self) -> Iterator[PromptRecord]:
        for start in range(0, len(self), 64):
            chunk = list(range(start, min(start + 64, len(self))))
            yield from (r for r in self.data.load(chunk) if not isinstance(r, Skip))


class ServingCollator:
    """Wraps the prompt collator: the batch also carries the ids asked for, the skips and the rows read."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, rows: list[PromptRecord]) -> PromptBatch:
        batch = self.collator(list(rows))
        batch.requested_ids = list(getattr(rows, "requested", batch.ids))
        batch.skipped = list(getattr(rows, "skipped", []))
        batch.rows_read = int(getattr(rows, "read", len(rows)))
        batch.stream_state = getattr(rows, "stream_state", None)
        return batch


class SkipMonitor:
    """Counts what serving skipped (main process) and stops the run past `max_fraction` of rows served so far.

    The check starts once enough rows were served for ten skips to be allowed (10 / max_fraction rows, or the
    whole split when it is smaller), so two neighbouring bad rows early on do not end a run that allows 1%.
    """

    def __init__(self, report: SkipCounter, max_fraction: float, source: str, rows: int) -> None:
        self.report, self.max_fraction, self.source = report, max_fraction, source
        self.served = SkipCounter()
        self.rows_read = 0
        self._seen: set[tuple[str, str]] = set()  # each DataLoader worker reports the bad rows it finds: count once
        self.min_rows = min(rows, math.ceil(10 / max_fraction)) if max_fraction > 0 else 1

    def record(self, batch: PromptBatch) -> None:
        for skip in getattr(batch, "skipped", []):
            if (skip.reason, skip.id) in self._seen:
                continue
            self._seen.add((skip.reason, skip.id))
            if self.served.counts.get(skip.reason, 0) < 3:
                log.warning("%s: skipped row %r when served (%s: %s)", self.source, skip.id, skip.reason, skip.detail)
            self.served.add(skip)
            self.report.add(skip)
        self.rows_read += int(getattr(batch, "rows_read", len(batch)))
        if self.served.total and self.rows_read >= self.min_rows:
            check_skip_fraction(self.served, self.rows_read, self.max_fraction,
                                source=f"{self.source} (rows served so far)")

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.served.counts), "rows_read": self.rows_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.rows_read = int(state.get("rows_read", 0))


class MonitoredLoader(DataLoader):
    """A DataLoader whose batches pass through a `SkipMonitor` in the main process as they are yielded."""

    def __init__(self, *args: Any, monitor: SkipMonitor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor

    def __iter__(self) -> Iterator[PromptBatch]:
        if hasattr(self.dataset, "begin_epoch"):  # a stream counts its epochs here, in the main process
            self.dataset.begin_epoch()
        for batch in super().__iter__():
            if self.monitor is not None:
                self.monitor.record(batch)
            yield batch
