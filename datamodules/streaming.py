"""`streaming: true`: training rows read through `datasets`' streaming `IterableDataset`, never indexed.

For data that is not local or does not fit on disk (local files or an `hf://` path the user can read; `datasets`
does the reading). The stream is shuffled with a seeded buffer (`shuffle_buffer` rows; a new order each epoch),
split per rank (`datasets.distributed.split_dataset_by_node`) and per DataLoader worker (`datasets` hands each
worker its own files), validated row by row as it is served (a bad row is skipped, counted and the batch filled
from the next rows), and cut into full batches here. Each batch carries the stream's `state_dict()` after its last
row; the DataModule keeps the state of the last consumed batch of each worker and a resumed run starts every
worker's stream there. `datasets` does not save a shuffle buffer: the rows in it at the checkpoint are not served
again in that epoch (exact with `shuffle_buffer: 0`).

Curriculum: a stream has no index to order, so only the random order (the shuffle buffer) is served; the
DataModule refuses an index-based strategy (easy_to_hard, staged, pass_rate) at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from datamodules.row_io import ColumnMap
from datamodules.schema import RowLimits, SchemaError, Skip, validate_row
from datamodules.serving import ServedRows
from datamodules.types import PromptRecord

FORMATS = {".parquet": "parquet", ".jsonl": "json"}


def stream_files(spec: str | list[str]) -> list[str]:
    """Remote paths (`hf://datasets/...`, any `scheme://`) as given, for `datasets` to resolve; local ones
    expanded like the indexed path's (folders, globs)."""
    from datamodules.vlm_datamodule import expand_files

    specs = [spec] if isinstance(spec, str) else list(spec)
    return [f for s in specs for f in ([s] if "://" in s else [str(p) for p in expand_files(s)])]


def open_stream(files: list[str]) -> Any:
    """The files as one streaming `datasets.IterableDataset`, images left undecoded (bytes and paths)."""
    from datasets import load_dataset

    kinds = {FORMATS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise SchemaError(f"streaming reads one kind of file at a time (.parquet or .jsonl), got "
                          f"{sorted({Path(f).suffix for f in files})} in {files[:4]}")
    stream = load_dataset(kinds.pop(), data_files=list(files), split="train", streaming=True)
    return stream.decode(False)  # validate_row decodes, so a corrupt image is a counted skip, not a crash


class StreamingPrompts(IterableDataset):
    """Full batches of validated records (as `ServedRows`) from a shuffled, rank- and worker-sharded stream.

    Args:
        files: the training files, local paths or `hf://`-style URLs (one format; for JSONL, image paths resolve
            against the first file's folder).
        columns: the DataModule's column mapping.
        batch_size: rows per batch.
        seed: shuffle seed (the epoch is added by `datasets`).
        shuffle_buffer: rows in the shuffle buffer; 0 reads the files in order.
        rank, world_size: this process's place among the ranks.
    """

    def __init__(self, files: list[str], columns: ColumnMap, batch_size: int, seed: int, shuffle_buffer: int,
                 rank: int = 0, world_size: int = 1, limits: RowLimits = RowLimits()) -> None:
        from datasets.distributed import split_dataset_by_node

        self.files, self.columns, self.batch_size, self.limits = [str(f) for f in files], columns, batch_size, limits
        self.base_dir = Path(self.files[0]).parent
        stream = open_stream(self.files)
        names = list(stream.features) if stream.features is not None else None
        self.plan = columns.plan(names, Path(self.files[0])) if names is not None else None  # JSON: per row
        if shuffle_buffer > 0:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.epoch, self._started = 0, False
        self.resume: dict[int, dict] = {}  # worker id -> stream state after its last consumed batch

    def begin_epoch(self) -> None:
        """Called (in the main process) each time the loader is iterated: a new epoch after the first."""
        if self._started:
            self.epoch += 1
            self.resume = {}
        self._started = True

    def _row(self, raw: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan or self.columns.plan(set(raw), Path(self.files[0]), strict=False)
        return ColumnMap.apply(raw, plan)

    def __iter__(self) -> Iterator[ServedRows]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self.stream.set_epoch(self.epoch)
        if worker in self.resume:
            self.stream.load_state_dict(self.resume[worker])
        out = ServedRows([])
        for raw in self.stream:
            out.read += 1
            got = validate_row(self._row(raw), self.base_dir, self.limits)
            if isinstance(got, Skip):
                out.skipped.append(got)
                continue
            out.append(got)
            if len(out) == self.batch_size:
                out.requested = [r.id for r in out]
                out.stream_state = (worker, self.stream.state_dict())
                yield out
                out = ServedRows([])

    def records(self, n: int = 64) -> list[PromptRecord]:
        """The first `n` valid rows of the files, in file order (pre-flight sample, probe prompts)."""
        out: list[PromptRecord] = []
        for raw in open_stream(self.files):
            got = validate_row(self._row(raw), self.base_dir, self.limits)
            if not isinstance(got, Skip):
                out.append(got)
            if len(out) >= n:
                break
        return out
