"""`python -m app.make_data OUT_DIR`: write the synthetic visual-reasoning set as HF-style parquet shards.

Output (README "Data schema"): `OUT_DIR/train-00000-of-0000K.parquet` ..., `OUT_DIR/validation-00000-of-00001.parquet`
with the `images` column typed as a list of HF `Image` structs, and `OUT_DIR/meta.json` (counts per task and
difficulty, seed, arguments). The same arguments give byte-identical files: PNGs carry no metadata, rows depend only
on (seed, split, index), and meta.json has no timestamps or paths.

Example:
    python -m app.make_data data/synth --n-train 10000 --n-val 600 --seed 0 --trace-error-rate 0.3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value

from datamodules.synthetic import DIFFICULTIES, TASKS, TRACE_ERROR_KINDS, check_mix, generate_items

FEATURES = Features(
    {
        "id": Value("string"),
        "images": List(Image()),
        "question": Value("string"),
        "options": List(Value("string")),
        "answer": Value("string"),
        "question_type": Value("string"),
        "difficulty": Value("int32"),
        "subject": Value("string"),
        "solution": Value("string"),
        "meta": Value("string"),
    }
)
ROW_GROUP_SIZE = 100  # the HF hub's size for image sets: serving one row reads its whole row group (datamodules/row_index.py)


def shard_name(split: str, shard: int, n_shards: int) -> str:
    """HF hub naming: `train-00000-of-00004.parquet`."""
    return f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write schema rows to one parquet file whose schema metadata makes `datasets` decode `images` as PIL."""
    table = pa.Table.from_pylist(rows, schema=FEATURES.arrow_schema)
    pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, compression="snappy")


def _tally(rows: list[dict[str, Any]], stats: dict[str, Counter[str]]) -> None:
    for row in rows:
        stats["by_task"][row["subject"]] += 1
        stats["by_difficulty"][str(row["difficulty"])] += 1
        stats["by_task_difficulty"][f"{row['subject']}/{row['difficulty']}"] += 1
        stats["trace_errors"]["n"] += int(json.loads(row["meta"])["trace_error"])


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int,
    shard_size: int = 2000,
    image_size: int = 112,
    cell: int = 28,
    trace_error_rate: float = 0.0,
    n_shards: int | None = None,
    quiet: bool = False,
    trace_error_kind: str = "count",
    tasks: Sequence[str] = TASKS,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> dict[str, Any]:
    """Generate `n` rows of `split` shard by shard and write them; returns the split's stats for meta.json.

    Stale shards of the same split (`{split}-?????-of-?????.parquet`) in out_dir are removed first.
    n_shards: force the shard count (rows are spread evenly); by default ceil(n / shard_size).
    """
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob(f"{split}-?????-of-?????.parquet")):
        stale.unlink()
    k = n_shards or math.ceil(n / shard_size)
    bounds = [round(i * n / k) for i in range(k + 1)]
    stats: dict[str, Counter[str]] = {
        key: Counter() for key in ("by_task", "by_difficulty", "by_task_difficulty")
    }
    stats["trace_errors"] = Counter()
    files, t0 = [], time.perf_counter()
    for shard in range(k):
        rows = generate_items(
            bounds[shard + 1] - bounds[shard],
            seed,
            split,
            image_size,
            cell,
            trace_error_rate,
            start=bounds[shard],
            trace_error_kind=trace_error_kind,
            tasks=tasks,
            difficulties=difficulties,
        )
        name = shard_name(split, shard, k)
        write_rows(rows, out / name)
        _tally(rows, stats)
        files.append(name)
        if not quiet:
            rate = bounds[shard + 1] / max(time.perf_counter() - t0, 1e-9)
            print(
                f"{split}: {bounds[shard + 1]}/{n} items, shard {shard + 1}/{k}, {rate:.0f} items/s",
                flush=True,
            )
    return {
        "n": n,
        "files": files,
        "trace_error_rate": trace_error_rate,
        "trace_error_kind": trace_error_kind,
        "trace_errors": stats["trace_errors"]["n"],
        **{
            key: dict(sorted(stats[key].items()))
            for key in ("by_task", "by_difficulty", "by_task_difficulty")
        },
    }


def write_dataset(
    out_dir: str | Path,
    n_train: int = 10000,
    n_val: int = 600,
    seed: int = 0,
    image_size: int = 112,
    cell: int = 28,
    shard_size: int = 2000,
    trace_error_rate: float = 0.0,
    quiet: bool = False,
    trace_error_kind: str = "count",
    tasks: Sequence[str] = TASKS,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> dict[str, Any]:
    """Write train shards, one validation file and meta.json; returns the meta dict.

    Only train traces get slips (`trace_error_rate`); validation traces are always correct. `tasks` and
    `difficulties` restrict the mix of both splits (default: all five tasks at levels 1-5).
    """
    tasks, difficulties = check_mix(tasks, difficulties)
    args = {
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "image_size": image_size,
        "cell": cell,
        "shard_size": shard_size,
        "trace_error_rate": trace_error_rate,
        "trace_error_kind": trace_error_kind,
        "tasks": list(tasks),
        "difficulties": list(difficulties),
    }
    common = {"seed": seed, "image_size": image_size, "cell": cell, "quiet": quiet, "tasks": tasks,
              "difficulties": difficulties}
    splits = {
        "train": write_split(
            out_dir, "train", n_train, shard_size=shard_size, trace_error_rate=trace_error_rate,
            trace_error_kind=trace_error_kind, **common
        ),
        "validation": write_split(out_dir, "validation", n_val, n_shards=1, **common),
    }
    meta = {
        "generator": "datamodules.synthetic",
        "seed": seed,
        "args": args,
        "tasks": list(tasks),
        "difficulties": list(difficulties),
        "splits": splits,
    }
    (Path(out_dir) / "meta.json").write_text(
        json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return meta


def add_error_kind_argument(p: argparse.ArgumentParser, default: str = "count") -> None:
    """`--trace-error-kind`, shared by this CLI (default "count") and `app.demo` (its own default)."""
    p.add_argument("--trace-error-kind", choices=TRACE_ERROR_KINDS, default=default,
                   help="count: the listing misses an object (the box follows it); hasty: the same slip, in a trace "
                        "that opens with 'Quick look.'; answer: right reasoning, boxed answer off by two "
                        f"(default: {default})")


def add_mix_arguments(p: argparse.ArgumentParser, tasks: Sequence[str] = TASKS,
                      difficulties: Sequence[int] = DIFFICULTIES) -> None:
    """`--tasks` and `--difficulties`, shared by this CLI (default: the full mix) and `app.demo` (its own mix)."""
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(tasks), metavar="TASK",
                   help=f"synthetic tasks to generate, balanced, of {' '.join(TASKS)} (default: {' '.join(tasks)})")
    p.add_argument("--difficulties", nargs="+", type=int, choices=DIFFICULTIES, default=list(difficulties),
                   metavar="LEVEL", help="difficulty levels to generate, balanced, of 1-5 (default: "
                                         f"{' '.join(map(str, difficulties))})")


def check_mix_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """A usage error (exit 2) naming the flags when the parsed mix repeats a task or a level."""
    try:
        check_mix(a.tasks, a.difficulties)
    except ValueError as e:
        p.error(f"--tasks/--difficulties: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.make_data", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder for the parquet shards and meta.json")
    p.add_argument("--n-train", type=int, default=10000, help="train rows (default 10000)")
    p.add_argument("--n-val", type=int, default=600, help="validation rows (default 600)")
    p.add_argument("--seed", type=int, default=0, help="same seed and arguments give byte-identical files")
    p.add_argument("--image-size", type=int, default=112, help="image side in px (default 112)")
    p.add_argument(
        "--cell", type=int, default=28, help="grid cell side in px; one shape per cell (default 28)"
    )
    p.add_argument("--shard-size", type=int, default=2000, help="train rows per parquet shard (default 2000)")
    p.add_argument(
        "--trace-error-rate",
        type=float,
        default=0.0,
        help="fraction of train traces that miss one object, so their boxed answer is wrong (default 0.0)",
    )
    add_error_kind_argument(p)
    add_mix_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    check_mix_arguments(p, a)
    return a


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    a = parse_args(argv)
    t0 = time.perf_counter()
    meta = write_dataset(
        a.out_dir, a.n_train, a.n_val, a.seed, a.image_size, a.cell, a.shard_size, a.trace_error_rate, a.quiet,
        a.trace_error_kind, a.tasks, a.difficulties,
    )
    total = a.n_train + a.n_val
    dt = time.perf_counter() - t0
    if not a.quiet:
        n_files = sum(len(s["files"]) for s in meta["splits"].values())
        print(f"wrote {total} items in {n_files} files + meta.json to {a.out_dir} ({total / dt:.0f} items/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
