"""GRPO step time against the bare floor, with and without prompt sharing (issues: GRPO module, shared prompt).

Floor = Hugging Face `generate` of B*G responses (prompt copied G times) + one forward/backward and an
optimiser step over the same tokens. Ours = a real Lightning `fit` step of GRPOModule (rollout, rewards,
advantages, log-probs, loss, backward, step), timed by a callback. Tiny InternVL, 4 prompts, 64-token
responses (EOS disabled so every response has the same length), fp32, 2 threads. Each configuration runs in its
own process (clean peak memory) and measures its own floor in alternation with its steps, so the ratio compares
like with like on a noisy machine. Prints medians.

    python -m bench.grpo_step [--groups 8 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _assets(tmp: Path) -> tuple[Path, Path]:
    from app.make_data import write_dataset
    from modules.tiny import make_tiny

    model = make_tiny(tmp / "model", "internvl", seed=0)
    write_dataset(tmp / "data", n_train=64, n_val=4, seed=0, quiet=True)
    return model, tmp / "data"


def floor_step(model, batch, g: int, new_tokens: int, opt) -> float:
    """generate (prompt copied G times) + forward/backward/step over the same tokens; seconds."""
    import torch

    from modules.policy import expand_batch

    t0 = time.perf_counter()
    ids, mask, vision = expand_batch(batch, g)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **vision, do_sample=True, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
    full_mask = torch.ones_like(out)
    full_mask[:, : ids.shape[1]] = mask
    logits = model(input_ids=out, attention_mask=full_mask, **vision).logits[:, ids.shape[1] - 1:-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, out[:, ids.shape[1]:, None]).mean()
    (-logp).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_config(g: int, share: bool, steps: int, threads: int, bf16: bool = False) -> dict:
    """One configuration in this process: median step time of ours and of the floor, peak RSS."""
    import torch
    from lightning import Callback, Trainer

    from datamodules.vlm_datamodule import VLMDataModule
    from modules.grpo_module import GRPOModule
    from modules.loading import load_vlm
    from modules.rollout import HFRolloutEngine

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    model_dir, data_dir = _assets(tmp)
    engine = HFRolloutEngine(max_new_tokens=64, share_prompt=share)
    engine.eos_ids = lambda: []  # fixed-length responses: equal work in every configuration
    module = GRPOModule(str(model_dir), group_size=g, rollout=engine, share_prompt=share, lr=1e-5,
                        autocast_bf16=bf16)
    data = VLMDataModule(str(data_dir / "train-*.parquet"), processor_path=str(model_dir), batch_size=4)
    floor_model, _ = load_vlm(model_dir)
    floor_opt = torch.optim.AdamW(floor_model.parameters(), lr=1e-5)
    times: dict[str, list[float]] = {"ours": [], "floor": []}

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx > 0:  # a floor step between ours, on the same batch
                times["floor"].append(floor_step(floor_model, batch, g, 64, floor_opt))
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx > 0:  # the first step warms up
                times["ours"].append(time.perf_counter() - self.t)

    trainer = Trainer(accelerator="cpu", max_steps=steps + 1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
                      use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    ours, floor = statistics.median(times["ours"]), statistics.median(times["floor"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"G": g, "share": share, "bf16": bf16, "ours_s": ours, "floor_s": floor, "ratio": ours / floor,
            "peak_rss_mb": peak_mb}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.grpo_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also measure bf16 autocast (reported separately)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    a = ap.parse_args(argv)
    if a.one:
        g, share, bf16 = json.loads(a.one)
        print("RESULT " + json.dumps(run_config(g, share, a.steps, a.threads, bf16)))
        return
    configs = [(g, s, False) for g in a.groups for s in (True, False)]
    if a.bf16:
        configs += [(g, True, True) for g in a.groups]
    rows = []
    for cfg in configs:
        proc = subprocess.run([sys.executable, "-m", "bench.grpo_step", "--one", json.dumps(cfg), "--steps",
                               str(a.steps), "--threads", str(a.threads)], cwd=ROOT, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"configuration {cfg} failed")
        rows.append(json.loads(line[0][7:]))
        r = rows[-1]
        print(f"G={r['G']:>2} share={str(r['share']):5} bf16={str(r['bf16']):5}  step {r['ours_s']:.3f}s  "
              f"floor {r['floor_s']:.3f}s  ratio {r['ratio']:.2f}x  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| G | prompt sharing | bf16 | step (s, median) | floor (s, median) | step / floor | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {'on' if r['share'] else 'off'} | {'on' if r['bf16'] else 'off'} | {r['ours_s']:.3f} | "
              f"{r['floor_s']:.3f} | {r['ratio']:.2f}x | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
