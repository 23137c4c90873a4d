"""`make demo`: the three-stage Skywork-R1V3 recipe on the embedded default, end to end, on CPU.

1. builds the tiny InternVL model and the synthetic data when missing (artifacts/);
2. runs cold-start SFT, GRPO and connector-only tuning, each `python -m app fit --config configs/tiny/<stage>.yaml`
   starting from the previous stage's export;
3. scores every stage's export on the held-out split and prints a table, with the TensorBoard command.

The data are the open counting tasks (count, two_images, arithmetic) at levels 1-3. The cold-start traces are
imperfect on purpose (`--trace-error-rate`, `--trace-error-kind`): half of them open with "Quick look." and their
listing misses the last matching object, so the boxed answer follows the short count; a policy error meant for RL to
find and fix from rewards alone (README, "Recipe evidence", says how far it does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from datamodules.synthetic import DIFFICULTIES, TASKS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "grpo", "connector")
# The demo's data (the README's "Recipe evidence" measures this choice against the full mix and other error kinds).
DEMO_TASKS = ("count", "two_images", "arithmetic")
DEMO_DIFFICULTIES = (1, 2, 3)
DEMO_ERROR_KIND = "hasty"


def ensure_assets(model_dir: Path, data_dir: Path, trace_error_rate: float, n_train: int, seed: int,
                  trace_error_kind: str = "count", tasks: Sequence[str] = TASKS,
                  difficulties: Sequence[int] = DIFFICULTIES) -> bool:
    """Create the tiny model and the data unless they exist already (data made with other error settings or
    another task mix is made again). Returns whether anything was (re)built."""
    from app.make_data import write_dataset, write_split
    from modules.tiny import make_tiny

    built = False
    if not (model_dir / "config.json").exists():
        print(f"building the tiny VLM in {model_dir}")
        make_tiny(model_dir, "internvl", seed=seed)
        built = True
    wanted = {"trace_error_rate": trace_error_rate, "trace_error_kind": trace_error_kind, "n_train": n_train,
              "tasks": list(tasks), "difficulties": list(difficulties)}
    meta = data_dir / "meta.json"
    if meta.exists():
        args = json.loads(meta.read_text()).get("args", {})
        legacy = {"tasks": list(TASKS), "difficulties": list(DIFFICULTIES)}  # made before the mix was an option
        had = {k: args.get(k, legacy.get(k)) for k in wanted}
        if had != wanted:  # e.g. data from an older demo, whose cold-start error was of another kind
            print(f"regenerating {data_dir}: it was made with {had}, this run asks for {wanted}")
            meta.unlink()
    if not meta.exists():
        print(f"generating synthetic data in {data_dir}")
        write_dataset(data_dir, n_train=n_train, n_val=600, seed=seed, trace_error_rate=trace_error_rate,
                      trace_error_kind=trace_error_kind, tasks=tasks, difficulties=difficulties)
        # stage 3 tunes on clean traces of other items (the paper: a separate multi-domain set)
        write_split(data_dir, "connector", 2000, seed, tasks=tasks, difficulties=difficulties)
        built = True
    return built


def clear_stages(out: Path, reason: str) -> None:
    """Remove the stages' folders under `out`, so that every stage runs again."""
    done = [stage for stage in STAGES if (out / stage).exists()]
    if done:
        print(f"{reason}: running every stage again (removing {out}/{{{','.join(done)}}})")
        for stage in done:
            shutil.rmtree(out / stage)


def run_stage(stage: str, model_path: Path, data_dir: Path, out: Path, overrides: list[str]) -> Path:
    """One `python -m app fit` in a child process (its progress bar shows); returns the stage's export.

    A stage whose export is already there (an earlier, interrupted `make demo`) is not run again: delete
    `<out>/<stage>` (or pass `--fresh`) to redo it."""
    export = out / stage / "export"
    if (export / "config.json").exists():
        print(f"\n=== stage {stage}: {export} exists, skipping (delete it, or pass --fresh, to run it again)", flush=True)
        return export
    train = "connector-*.parquet" if stage == "connector" else "train-*.parquet"
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / f"configs/tiny/{stage}.yaml"),
           "--model.init_args.model_path", str(model_path),
           "--data.train_files", str(data_dir / train), "--data.val_files", str(data_dir / "validation-*.parquet"),
           "--trainer.default_root_dir", str(out / stage), "--trainer.logger.init_args.save_dir", str(out / stage),
           *overrides]
    print(f"\n=== stage {stage}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return export


def score(exports: dict[str, Path], data_dir: Path, limit: int, samples: int) -> dict[str, dict]:
    """Greedy and sampled (temperature 1.0, `samples` each) held-out accuracy of each export."""
    from app.evaluate import evaluate
    from modules.loading import load_vlm

    results = {}
    for name, path in exports.items():
        model, processor = load_vlm(path)
        val = str(data_dir / "validation-*.parquet")
        greedy = evaluate(str(path), val, 1, 0.0, limit=limit, model=model, processor=processor)
        sampled = evaluate(str(path), val, samples, 1.0, limit=limit, model=model, processor=processor)
        results[name] = {"greedy": greedy, "sampled": sampled}
        print(f"scored {name}: greedy {greedy['accuracy']:.3f}, sampled {sampled['accuracy']:.3f}", flush=True)
    return results


def print_table(results: dict[str, dict], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Skywork-R1V3 recipe on the embedded default (held-out synthetic split)")
    for col in ("stage", "accuracy (greedy)", "accuracy (T=1)", "format rate", "mean length"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, r in results.items():
        g, s = r["greedy"], r["sampled"]
        table.add_row(name, f"{g['accuracy']:.3f} ± {g['accuracy_se']:.3f}", f"{s['accuracy']:.3f} ± {s['accuracy_se']:.3f}",
                      f"{g['format_rate']:.3f}", f"{g['response_length']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"TensorBoard: tensorboard --logdir {out}")


def main(argv: list[str] | None = None) -> None:
    from app.make_data import add_error_kind_argument, add_mix_arguments, check_mix_arguments

    ap = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="where the stages write logs, checkpoints and exports")
    ap.add_argument("--model-dir", default="artifacts/tiny-vlm")
    ap.add_argument("--data-dir", default="artifacts/data")
    ap.add_argument("--trace-error-rate", type=float, default=0.5,
                    help="share of cold-start traces with a deliberate error that RL can fix")
    add_error_kind_argument(ap, default=DEMO_ERROR_KIND)
    add_mix_arguments(ap, tasks=DEMO_TASKS, difficulties=DEMO_DIFFICULTIES)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--eval-limit", type=int, default=150, help="held-out items scored per stage")
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per item at temperature 1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="run every stage again, even those already exported")
    ap.add_argument("--steps", nargs=3, type=int, metavar=("SFT", "GRPO", "CONNECTOR"), default=None,
                    help="override the step budget of each stage")
    a = ap.parse_args(argv)
    t0 = time.time()
    out, model_dir, data_dir = Path(a.out), Path(a.model_dir), Path(a.data_dir)
    if a.fresh:
        clear_stages(out, "--fresh")
    check_mix_arguments(ap, a)
    if ensure_assets(model_dir, data_dir, a.trace_error_rate, a.n_train, a.seed, a.trace_error_kind, a.tasks,
                     a.difficulties):
        clear_stages(out, "the model or data changed")  # exports trained on what was just replaced
    exports, prev = {}, model_dir
    for i, stage in enumerate(STAGES):
        overrides = [f"--seed_everything={a.seed}"]
        if a.steps:
            overrides += ["--trainer.max_steps", str(a.steps[i])]
        prev = run_stage(stage, prev, data_dir, out, overrides)
        exports[stage] = prev
    results = score(exports, data_dir, a.eval_limit, a.eval_samples)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, out)
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
