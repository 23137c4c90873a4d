"""`make bench-curriculum`: each curriculum strategy under the same GRPO budget and seeds, from the SFT stage.

For every strategy overlay in configs/curriculum/ and every seed: `python -m app fit --config configs/tiny/grpo.yaml
--config bench/grpo_lean.yaml --config configs/curriculum/<strategy>.yaml` from the cold-start export, then held-out
accuracy (temperature 1.0) per difficulty level, on "normal" (levels 1-3) and "hard" (4-5) items, and overall, with
the mean training reward of the last 10 steps. Prints mean ± standard deviation over seeds.

`staged` switches from normal to hard items halfway through the budget (`--staged-switch`, default steps // 2):
the shipped overlay's step-100 switch would never fire in a short run.

The prompts are the demo's tasks at every level, 1-5 (`artifacts/data-curriculum`, made when missing): the demo's
own data stop at level 3, so its cold start meets levels 4-5 here as the paper's "hard problems".

    python -m bench.curriculum [--sft runs/demo/sft/export] [--seeds 0 1 2] [--steps 30] [--limit 150]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.recipe import _fmt  # mean ± standard deviation over seeds, as in the recipe table

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("random", "easy_to_hard", "staged", "pass_rate")
NORMAL, HARD = ("1", "2", "3"), ("4", "5")


def overlay(strategy: str, steps: int, switch: int | None, out: Path) -> Path:
    """The strategy's shipped overlay; for `staged`, a copy whose switch step falls inside the budget."""
    src = ROOT / f"configs/curriculum/{strategy}.yaml"
    if strategy != "staged":
        return src
    text = src.read_text()
    if "switch_step: 100" not in text:
        raise SystemExit(f"{src}: expected `switch_step: 100` to rewrite for the benchmark budget")
    dst = out / "staged_overlay.yaml"
    dst.write_text(text.replace("switch_step: 100", f"switch_step: {switch if switch is not None else steps // 2}"))
    return dst


def train_reward(run_dir: Path, last: int = 10) -> float:
    """Mean `train/reward` over the last `last` logged steps (TensorBoard event files of the run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for f in glob.glob(str(run_dir / "**" / "events.out.tfevents*"), recursive=True):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        if "train/reward" in ea.Tags()["scalars"]:
            values += [(e.step, e.value) for e in ea.Scalars("train/reward")]
    values.sort()
    return statistics.mean(v for _, v in values[-last:]) if values else float("nan")


def ensure_data(data: Path, n_train: int = 10000, n_val: int = 600) -> None:
    """Make the five-level data when missing; refuse data without both normal and hard levels."""
    meta = data / "meta.json"
    if not meta.exists():
        from app.demo import DEMO_TASKS
        from app.make_data import write_dataset
        from datamodules.synthetic import DIFFICULTIES

        print(f"generating {data}: the demo's tasks {' '.join(DEMO_TASKS)} at levels 1-5", flush=True)
        write_dataset(data, n_train=n_train, n_val=n_val, seed=0, tasks=DEMO_TASKS, difficulties=DIFFICULTIES,
                      quiet=True)
    levels = {str(d) for d in json.loads(meta.read_text()).get("difficulties", NORMAL + HARD)}  # older: all levels
    if not (levels & set(NORMAL) and levels & set(HARD)):
        raise SystemExit(f"--data {data}: made with difficulty levels {sorted(levels)}; the benchmark compares normal "
                         f"({NORMAL[0]}-{NORMAL[-1]}) and hard ({HARD[0]}-{HARD[-1]}) items, so it needs both")


def run_one(strategy: str, seed: int, sft: Path, data: Path, steps: int, out: Path, limit: int,
            switch: int | None) -> dict:
    from app.evaluate import evaluate

    res_file = out / "eval.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--config", str(ROOT / "bench/grpo_lean.yaml"), "--config", str(overlay(strategy, steps, switch, out)),
           "--model.init_args.model_path", str(sft), "--data.train_files", str(data / "train-*.parquet"),
           "--trainer.max_steps", str(steps), "--seed_everything", str(seed), "--trainer.default_root_dir", str(out),
           "--trainer.logger.init_args.save_dir", str(out)]
    print(f"--- {strategy} seed {seed}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = evaluate(str(out / "export"), str(data / "validation-*.parquet"), samples=2, temperature=1.0, limit=limit)
    res["train_reward_last10"] = train_reward(out)
    res_file.write_text(json.dumps(res, indent=2))
    print(f"    held-out accuracy {res['accuracy']:.3f}, train reward {res['train_reward_last10']:.3f}", flush=True)
    return res


def _group(r: dict, levels: tuple[str, ...]) -> float:
    vals = [r["by_difficulty"][k] for k in levels if k in r["by_difficulty"]]
    return statistics.mean(vals) if vals else float("nan")


def table(results: dict[str, list[dict]], baseline: dict | None) -> str:
    levels = sorted({k for rs in results.values() for r in rs for k in r["by_difficulty"]})
    head = ["strategy", "overall", "normal (1-3)", "hard (4-5)", *(f"d{k}" for k in levels), "train reward"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    if baseline is not None:
        cells = [f"{baseline['accuracy']:.3f}", f"{_group(baseline, NORMAL):.3f}", f"{_group(baseline, HARD):.3f}",
                 *(f"{baseline['by_difficulty'].get(k, 0.0):.3f}" for k in levels), "-"]
        lines.append("| SFT start | " + " | ".join(cells) + " |")
    for s, rs in results.items():
        cells = [_fmt([r["accuracy"] for r in rs]), _fmt([_group(r, NORMAL) for r in rs]),
                 _fmt([_group(r, HARD) for r in rs]),
                 *(_fmt([r["by_difficulty"].get(k, 0.0) for r in rs]) for k in levels),
                 _fmt([r["train_reward_last10"] for r in rs])]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.curriculum", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="runs/demo/sft/export", help="cold-start export (run `make demo` first)")
    ap.add_argument("--data", default="artifacts/data-curriculum",
                    help="prompts with normal and hard levels (default: made when missing, the demo's tasks at 1-5)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--staged-switch", type=int, default=None, help="staged: switch step (default steps // 2)")
    ap.add_argument("--limit", type=int, default=150, help="held-out items scored (2 samples each, T=1)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--out", default="runs/bench-curriculum")
    a = ap.parse_args(argv)
    sft, data, out = Path(a.sft), Path(a.data), Path(a.out)
    if not (sft / "config.json").exists():
        raise SystemExit(f"--sft {sft}: no export there; run `make demo` (or the SFT stage) first")
    ensure_data(data)
    from app.evaluate import evaluate

    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "sft_eval.json"
    if not base_file.exists():
        base_file.write_text(json.dumps(evaluate(str(sft), str(data / "validation-*.parquet"), samples=2,
                                                 temperature=1.0, limit=a.limit), indent=2))
    baseline = json.loads(base_file.read_text())
    results = {s: [run_one(s, seed, sft, data, a.steps, out / s / f"seed{seed}", a.limit, a.staged_switch)
                   for seed in a.seeds] for s in a.strategies}
    md = table(results, baseline)
    (out / "summary.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
