"""`make bench-sharding`: per-rank memory of DDP vs FSDP2 on 2 CPU processes, next to the estimator's figure.

    python -m bench.sharding_memory [--size small] [--steps 2] [--out artifacts/bench/sharding]

Builds the `--size` tiny VLM (modules/tiny.py) and a synthetic SFT set, then runs 2-process SFT fits with
`strategy: ddp` and with FSDP2 (`modules.sharding.FSDP2Strategy`). Just before the last optimizer step each
rank measures the bytes of the tensors it holds itself (a DTensor's local shard): parameters, gradients and
optimizer states, plus the process's peak RSS (which also counts Python, torch and activations). The table
puts them next to `modules.memory.estimate_memory` for the same run (fp32, AdamW, 2 ranks), and the ratio
FSDP2 / DDP, which should be about one half for the states.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from lightning import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 ** 2
STRATEGIES = ("ddp", "fsdp2")


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes this process holds for `t` (a DTensor's local shard only)."""
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class MeasureStates(Callback):
    def __init__(self, out: Path, at_step: int):
        self.out, self.at_step = out, at_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != self.at_step:
            return
        params = list(pl_module.policy.parameters())
        opt_states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        row = {"rank": trainer.global_rank, "params": sum(local_bytes(p) for p in params),
               "grads": sum(local_bytes(p.grad) for p in params), "optimizer": sum(local_bytes(v) for v in opt_states),
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


def worker(strategy: str, model: str, data: str, out: Path, steps: int) -> None:
    from datamodules.vlm_datamodule import VLMDataModule
    from modules.sft_module import SFTModule
    from modules.sharding import FSDP2Strategy

    out.mkdir(parents=True, exist_ok=True)
    module = SFTModule(model_path=model, lr=1e-4, warmup_ratio=0.0)
    dm = VLMDataModule(train_files=f"{data}/train-*.parquet", mode="sft", batch_size=1, processor_path=model,
                       max_length=1024)
    trainer = Trainer(accelerator="cpu", devices=2, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      strategy=FSDP2Strategy() if strategy == "fsdp2" else "ddp",
                      callbacks=[MeasureStates(out, steps - 1)])
    trainer.fit(module, datamodule=dm)


def estimate(model: Path, strategy: str) -> dict[str, float]:
    from modules.memory import estimate_memory

    est = estimate_memory(model, world_size=2, strategy=strategy, precision="32-true", optimizer="adamw",
                          rollout_batch=1, prompt_len=256, response_len=0, mode="sft", gpu_memory_gb=1e9)
    return {"params": est.weights, "grads": est.grads, "optimizer": est.optimizer}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sharding_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="artifacts/bench/sharding")
    ap.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.worker:
        return worker(a.worker, a.model, a.data, out / a.worker, a.steps)

    from app.make_data import write_dataset
    from modules.tiny import make_tiny

    model = out / f"model-{a.size}"
    if not (model / "config.json").exists():
        make_tiny(model, size=a.size, seed=0)
    data = out / "data"
    if not any(data.glob("train-*.parquet")):
        write_dataset(data, n_train=16, n_val=4, quiet=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = {}
    for strategy in STRATEGIES:
        print(f"running {strategy} on 2 processes ...", flush=True)
        cmd = [sys.executable, "-m", "bench.sharding_memory", "--worker", strategy, "--model", str(model),
               "--data", str(data), "--out", str(out), "--steps", str(a.steps)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{strategy} run failed:\n{proc.stderr[-3000:]}")
        rows[strategy] = [json.loads((out / strategy / f"rank{r}.json").read_text()) for r in range(2)]
    print(table(model, a.size, rows))


def table(model: Path, size: str, rows: dict[str, list[dict]]) -> str:
    keys = ("params", "grads", "optimizer")
    lines = [f"per-rank memory, tiny VLM --size {size}, 2 CPU processes (gloo), fp32 AdamW, MiB",
             f"{'strategy':<9}{'rank':>5}{'params':>9}{'grads':>9}{'optim':>9}{'states':>9}{'estimate':>10}"
             f"{'peak RSS':>10}", "-" * 70]
    states = {}
    for strategy, ranks in rows.items():
        est = estimate(model, strategy)
        for r in ranks:
            total = sum(r[k] for k in keys)
            states.setdefault(strategy, []).append(total)
            lines.append(f"{strategy:<9}{r['rank']:>5}" + "".join(f"{r[k] / MIB:>9.2f}" for k in keys)
                         + f"{total / MIB:>9.2f}{sum(est.values()) / MIB:>10.2f}{r['peak_rss'] / MIB:>10.0f}")
    ratio = max(states["fsdp2"]) / max(states["ddp"])
    lines += ["-" * 70, f"FSDP2 / DDP states per rank (largest rank): {ratio:.3f}  (ideal 0.5; "
              "estimate: ddp grads x2 for DDP's bucket copies, fsdp2 params + 2 gathered blocks)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
