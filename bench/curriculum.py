"""`make bench-curriculum`: each curriculum strategy under the same GRPO budget and seeds, from the SFT stage.

For every strategy overlay in configs/curriculum/ and every seed: `python -m app fit --config configs/tiny/grpo.yaml
--config configs/curriculum/<strategy>.yaml` from the cold-start export, then held-out accuracy (temperature 1.0)
per difficulty level and overall. Prints mean ± standard deviation over seeds.

    python -m bench.curriculum [--sft runs/demo/sft/export] [--seeds 0 1 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("random", "easy_to_hard", "staged", "pass_rate")


def run_one(strategy: str, seed: int, sft: Path, data: Path, steps: int, out: Path, limit: int) -> dict:
    from app.evaluate import evaluate

    res_file = out / "eval.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--config", str(ROOT / f"configs/curriculum/{strategy}.yaml"), "--model.init_args.model_path", str(sft),
           "--data.train_files", str(data / "train-*.parquet"), "--data.val_files", str(data / "validation-*.parquet"),
           "--trainer.max_steps", str(steps), "--seed_everything", str(seed), "--trainer.default_root_dir", str(out),
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = evaluate(str(out / "export"), str(data / "validation-*.parquet"), samples=2, temperature=1.0, limit=limit)
    res_file.write_text(json.dumps(res, indent=2))
    return res


def _fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.curriculum", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="runs/demo/sft/export", help="cold-start export (run `make demo` first)")
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--out", default="runs/bench-curriculum")
    a = ap.parse_args(argv)
    sft, data = Path(a.sft), Path(a.data)
    if not (sft / "config.json").exists():
        raise SystemExit(f"--sft {sft}: no export there; run `make demo` (or the SFT stage) first")
    results = {s: [run_one(s, seed, sft, data, a.steps, Path(a.out) / s / f"seed{seed}", a.limit) for seed in a.seeds]
               for s in a.strategies}
    levels = sorted({k for rs in results.values() for r in rs for k in r["by_difficulty"]})
    lines = ["| strategy | overall | " + " | ".join(f"difficulty {k}" for k in levels) + " |",
             "|---" * (len(levels) + 2) + "|"]
    for s, rs in results.items():
        cells = [_fmt([r["accuracy"] for r in rs])] + [_fmt([r["by_difficulty"].get(k, 0.0) for r in rs]) for k in levels]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
