"""`make bench-data`: the DataModule's set-up time, peak memory and serving speed on two data-set sizes.

Writes (once, reused later) parquet data sets in the README's schema under `artifacts/bench-data/rows-<N>/`:
5,000-row shards with HF-hub-sized row groups (100 rows), one realistic image per row (JPEG and PNG figures of
500-1000 px, 30-110 KB each; a few distinct encodings are written over and over to keep generation fast).
Then, for each size, in a fresh process: `VLMDataModule(mode="rl").setup("fit")` (index + pre-flight on 64
rows), then `--batches` training batches served through the real loader and collator (rows read, validated,
decoded, chat-formatted and preprocessed by the tiny InternVL processor), then the dataset alone on random
batches (read + validate + decode, no processor). Prints, side by side: set-up seconds,
peak RSS of the process (and of its loader workers), rows/s served, and the ratios of the larger size to the
smaller. Targets (issue 24): peak RSS within 10% between sizes, set-up under 10 s for the larger.

    python -m bench.data_pipeline [--sizes 2000 50000] [--batches 40] [--batch-size 8] [--workers 0]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "bench-data"
SHARD_ROWS = 5000
ROW_GROUP = 100


def _figures() -> list[bytes]:
    """Eight encoded figures: JPEG photos-with-diagram and PNG line drawings, 500-1000 px on a side."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for k, (w, h) in enumerate([(1000, 800), (960, 720), (800, 600), (640, 640), (1000, 560), (720, 960),
                                (600, 500), (880, 880)]):
        base = np.linspace(40 + 20 * k, 220, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
        base += rng.normal(0, 6, (h, w, 3)).astype(np.float32)  # sensor-like noise: realistic JPEG sizes
        img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80))
            r = int(rng.integers(20, 80))
            draw.ellipse((x, y, x + r, y + r), outline=(0, 0, 0), width=3, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            draw.line((x, y, int(rng.integers(0, w)), int(rng.integers(0, h))), fill=(0, 0, 0), width=2)
        buf = io.BytesIO()
        if k % 4 == 3:  # a line drawing as PNG
            img = img.convert("L").point(lambda v: 255 if v > 120 else 0).convert("RGB")
            img.save(buf, format="PNG", optimize=True)
        else:
            img.save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def ensure_data(n_rows: int) -> Path:
    """`artifacts/bench-data/rows-<N>/` (written once; a `done` file marks a complete set)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.make_data import FEATURES, shard_name

    folder = OUT / f"rows-{n_rows}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    figures = _figures()
    n_shards = (n_rows + SHARD_ROWS - 1) // SHARD_ROWS
    t0 = time.perf_counter()
    for s in range(n_shards):
        ids = range(s * SHARD_ROWS, min(n_rows, (s + 1) * SHARD_ROWS))
        rows = [{
            "id": f"bench-{i:07d}", "images": [{"bytes": figures[i % len(figures)], "path": None}],
            "question": f"<image>\nHow many circles are in the figure? (item {i})", "options": [],
            "answer": str(12 + i % 5), "question_type": "open", "difficulty": 1 + i % 5, "subject": "counting",
            "solution": None, "meta": None,
        } for i in ids]
        table = pa.Table.from_pylist(rows, schema=FEATURES.arrow_schema)
        pq.write_table(table, folder / shard_name("train", s, n_shards), row_group_size=ROW_GROUP)
        print(f"  wrote shard {s + 1}/{n_shards} of {folder.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (folder / "done").write_text(str(n_rows))
    return folder


def ensure_model() -> Path:
    from modules.tiny import make_tiny

    folder = OUT / "tiny-internvl"
    if not (folder / "config.json").exists():
        make_tiny(folder, "internvl", seed=0)
    return folder


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(data: Path, model: Path, batches: int, batch_size: int, workers: int) -> dict:
    """One size, in this (fresh) process: set-up, then `batches` batches served."""
    import lightning  # noqa: F401  (imports first: the baseline is the process before any data is touched)
    import transformers  # noqa: F401

    from datamodules.vlm_datamodule import VLMDataModule

    dm = VLMDataModule(str(data / "train-*.parquet"), processor_path=str(model), mode="rl", batch_size=batch_size,
                       max_prompt_length=4096, num_workers=workers, seed=0)
    dm._processor()  # the processor is the model's; load it before timing the data
    baseline = _rss_mb()
    preflight, timed = dm.preflight, {}

    def timed_preflight(data):
        t = time.perf_counter()
        preflight(data)
        timed["preflight_s"] = time.perf_counter() - t

    dm.preflight = timed_preflight
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    after_setup = _rss_mb()
    loader = dm.train_dataloader()
    t0, rows = time.perf_counter(), 0
    for k, batch in enumerate(loader):
        if k == 0:
            t0 = time.perf_counter()  # workers start on the first batch: time the steady state
        else:
            rows += len(batch)
        dm.batch_server.mark_consumed(batch.requested_ids)  # as in training: the served FIFO stays short
        if k >= batches:
            break
    rows_s = rows / (time.perf_counter() - t0)
    dataset, rng = dm.datasets["train"], random.Random(0)
    t0 = time.perf_counter()
    for _ in range(batches // 2):  # the data path alone (read + validate + decode), without the processor
        dataset.__getitems__(rng.sample(range(len(dataset)), batch_size))
    read_s = (batches // 2) * batch_size / (time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rows": len(dm.datasets["train"]), "files": len(list(data.glob("train-*.parquet"))),
            "setup_s": setup_s, "preflight_s": timed["preflight_s"], "read_s": read_s, "baseline_mb": baseline, "after_setup_mb": after_setup, "peak_mb": peak,
            "worker_peak_mb": children, "rows_s": rows_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.measure:
        print("RESULT " + json.dumps(measure(Path(a.measure), ensure_model(), a.batches, a.batch_size, a.workers)))
        return
    ensure_model()  # built once, before the measuring processes race to build it
    results = {}
    for n in a.sizes:
        data = ensure_data(n)
        cmd = [sys.executable, "-m", "bench.data_pipeline", "--measure", str(data), "--batches", str(a.batches),
               "--batch-size", str(a.batch_size), "--workers", str(a.workers)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"measuring {data} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[n] = json.loads(line[len("RESULT "):])
    _print(results, a)


def _print(results: dict[int, dict], a: argparse.Namespace) -> None:
    sizes = sorted(results)
    print(f"\nVLMDataModule(mode='rl'), {a.batch_size} rows a batch, {a.workers} loader workers, "
          f"{a.batches} batches served (one image of 500-1000 px a row)")
    head = f"{'rows':>8} {'files':>6} {'set-up s':>9} {'(pre-flight)':>13} {'RSS before MB':>14} " \
           f"{'after set-up':>13} {'peak RSS MB':>12} {'worker peak':>12} {'served rows/s':>14} {'read rows/s':>12}"
    print(head)
    for n in sizes:
        r = results[n]
        print(f"{r['rows']:>8} {r['files']:>6} {r['setup_s']:>9.2f} {r['preflight_s']:>13.2f} "
              f"{r['baseline_mb']:>14.0f} {r['after_setup_mb']:>13.0f} {r['peak_mb']:>12.0f} "
              f"{r['worker_peak_mb']:>12.0f} {r['rows_s']:>14.1f} {r['read_s']:>12.1f}")
    print("served: through the loader and the processor (what a step waits for); read: rows read, validated and "
          "decoded by the dataset alone; pre-flight: the part of set-up that encodes 64 prompts")
    if len(sizes) > 1:
        lo, hi = results[sizes[0]], results[sizes[-1]]
        print(f"ratio {sizes[-1]} / {sizes[0]} rows: peak RSS x{hi['peak_mb'] / lo['peak_mb']:.3f} "
              f"(target <= 1.10), set-up x{hi['setup_s'] / lo['setup_s']:.2f} (larger: {hi['setup_s']:.2f} s, "
              f"target < 10 s), rows/s x{hi['rows_s'] / lo['rows_s']:.2f}")


if __name__ == "__main__":
    main()
