"""Re-run checkpoint selection offline on the figures a fit recorded.

    python -m app.select_checkpoint RUN_DIR [--acc-tolerance 0.02] [--spike-factor 1.5] [--spike-window 5]
                                            [--out FILE]

RUN_DIR is the folder holding ``selection.json`` (the logger's log_dir, written by
``callbacks.checkpoint_selection.CheckpointSelectionCallback``), or the file itself. The candidates' figures
are read back, ``callbacks.selection.select_checkpoint`` runs with the given knobs, a table is printed and
the result is written to ``--out`` (default ``RUN_DIR/selection-rerun.json``; the original is kept).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from callbacks.selection import CheckpointCandidate, select_checkpoint, write_selection_json

FIELDS = ("path", "step", "critical_entropy", "val_accuracy", "mean_entropy")


def read_candidates(path: Path) -> list[CheckpointCandidate]:
    """Candidates from a selection.json (null figures, written for NaN, become NaN again)."""
    rows = json.loads(path.read_text())["candidates"]

    def num(x: float | None) -> float:
        return math.nan if x is None else float(x)

    return [
        CheckpointCandidate(path=r["path"], step=int(r["step"]), critical_entropy=num(r["critical_entropy"]),
                            val_accuracy=num(r["val_accuracy"]),
                            mean_entropy=None if r.get("mean_entropy") is None else float(r["mean_entropy"]))
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="folder with selection.json, or the file")
    parser.add_argument("--acc-tolerance", type=float, default=0.02)
    parser.add_argument("--spike-factor", type=float, default=1.5)
    parser.add_argument("--spike-window", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    source = args.run_dir if args.run_dir.is_file() else args.run_dir / "selection.json"
    if not source.exists():
        parser.error(f"{source} not found (is CheckpointSelectionCallback in the run's callbacks?)")
    picked, report = select_checkpoint(read_candidates(source), args.acc_tolerance, args.spike_factor,
                                       args.spike_window)
    print(f"{'step':>8}  {'crit_H':>8}  {'val_acc':>8}  {'mean_H':>8}  status")
    for r in report:
        figs = [r["critical_entropy"], r["val_accuracy"], r["mean_entropy"]]
        cells = "  ".join(f"{'-' if x is None or not math.isfinite(x) else format(x, '.4g'):>8}" for x in figs)
        print(f"{r['step']:>8}  {cells}  {r['status']}: {r['reason']}")
    out = write_selection_json(args.out or source.parent / "selection-rerun.json", picked, report)
    print(f"picked: {picked.path if picked else None}\nwritten: {out}")
    return 0 if picked else 1


if __name__ == "__main__":
    raise SystemExit(main())
