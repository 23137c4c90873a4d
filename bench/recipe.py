"""`make bench-recipe`: the three-stage recipe over several seeds; mean and spread of each stage's figures.

Runs `app.demo` once per seed (same tiny model and data, different training seeds), then prints a table of held-out
accuracy (greedy and temperature 1.0) and format rate after each stage: mean ± standard deviation over seeds.

    python -m bench.recipe [--seeds 0 1 2] [--out runs/bench-recipe] [--eval-limit 300] [--eval-samples 4]
                           [any other `python -m app.demo` option]

Options it does not know go to every seed's `app.demo` (e.g. `--trace-error-kind count`, `--steps 400 40 60`), so a
variant of the recipe is benchmarked the same way; use a fresh `--out` (and `--data-dir`) for each variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from app.demo import STAGES
from app.demo import main as demo_main


def _fmt(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def summarise(results: list[dict]) -> str:
    lines = ["| stage | accuracy (greedy) | accuracy (T=1) | format rate | seeds |", "|---|---|---|---|---|"]
    for stage in STAGES:
        rows = [r[stage] for r in results if stage in r]
        lines.append(f"| {stage} | {_fmt([r['greedy']['accuracy'] for r in rows])} | "
                     f"{_fmt([r['sampled']['accuracy'] for r in rows])} | "
                     f"{_fmt([r['greedy']['format_rate'] for r in rows])} | {len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench-recipe")
    ap.add_argument("--eval-limit", type=int, default=300, help="held-out items scored per stage (the demo: 150)")
    ap.add_argument("--eval-samples", type=int, default=4,
                    help="samples per item at temperature 1.0 (the demo: 2); 150 x 2 misled (README)")
    a, demo_args = ap.parse_known_args(argv)
    results = []
    for seed in a.seeds:
        out = Path(a.out) / f"seed{seed}"
        if not (out / "results.json").exists():
            demo_main(["--out", str(out), "--seed", str(seed), "--eval-limit", str(a.eval_limit),
                       "--eval-samples", str(a.eval_samples), *demo_args])
        results.append(json.loads((out / "results.json").read_text()))
    table = summarise(results)
    (Path(a.out) / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
