"""GRPO steps on fixed prompts, on one process or sharded with FSDP2 over N CPU processes; figures to a file.

    python -m tests.integration.sharded_steps MODEL DATA OUT --devices 2 [--steps 2] [--prompts 4]

Step s serves the global prompts [s*P, (s+1)*P) of DATA's training rows; with N ranks, rank r serves the r-th
contiguous slice of them, so one process and N processes train on the same prompts. Each prompt's G responses
are sampled on their own, from a generator seeded by the prompt id and the step, so they do not depend on which
rank (or batch) the prompt lands in. OUT (written by rank 0) holds the logged (global) metrics of every step and
the full weights after the last one, gathered from the shards; every rank writes OUT.pushed.rank<R>, the
(name, full tensor) pairs the vLLM engine would push.
"""

from __future__ import annotations

import argparse
import zlib

import torch
from lightning import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader

from datamodules.types import Rollouts
from modules.grpo_module import GRPOModule
from modules.grpo_steps import select_prompts
from modules.losses import KLPenalty
from modules.rewards import AccuracyReward, FormatReward
from modules.rollout import HFRolloutEngine
from modules.sharding import FSDP2Strategy, full_state_dict
from modules.vllm_engine import push_stream
from tests.integration.fault_helpers import OddLengthReward

METRICS = ("train/loss", "train/grad_norm", "train/reward", "train/rollout_entropy", "train/response_length",
           "train/response_length_max", "train/clip_frac")


class PerPromptSeededEngine(HFRolloutEngine):
    """HF sampling, one prompt at a time, seeded by (prompt id, call): responses independent of the batching."""

    calls = 0

    def generate(self, model, batch, group_size, temperature=None, max_new_tokens=None) -> Rollouts:
        self.calls += 1
        parts = []
        for i, rid in enumerate(batch.ids):
            self.generator.manual_seed(zlib.crc32(f"{rid}/{self.calls}".encode()))
            parts.append(super().generate(model, select_prompts(batch, [i]), group_size, temperature,
                                          max_new_tokens))
        width = max(p.response_ids.shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Rollouts(prompts=batch, response_ids=torch.cat([widen(p.response_ids, pad) for p in parts]),
                        response_mask=torch.cat([widen(p.response_mask, 0) for p in parts]),
                        truncated=torch.cat([p.truncated for p in parts]),
                        texts=[t for p in parts for t in p.texts], group_size=group_size)


class FixedPrompts(LightningDataModule):
    def __init__(self, model_path: str, data: str, steps: int, prompts: int):
        super().__init__()
        self.model_path, self.data, self.steps, self.prompts = model_path, data, steps, prompts

    def train_dataloader(self) -> DataLoader:
        from datamodules.prompting import PromptCollator
        from datamodules.vlm_datamodule import load_records
        from modules.processors import load_processor

        records, _ = load_records(f"{self.data}/train-*.parquet", 0.0, limit=self.steps * self.prompts)
        collate = PromptCollator(load_processor(self.model_path), mode="rl")
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per = self.prompts // world
        batches = [collate(records[s * self.prompts + rank * per: s * self.prompts + (rank + 1) * per])
                   for s in range(self.steps)]
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


class Record(Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.steps.append({k: float(m[k]) for k in METRICS if k in m})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--kl", type=float, default=0.0)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    module = GRPOModule(
        model_path=a.model, group_size=a.group_size, rollout=PerPromptSeededEngine(max_new_tokens=8),
        rewards=[AccuracyReward(), FormatReward(), OddLengthReward()], reward_weights=[0.8, 0.2, 1.0],
        entropy_coef=0.01, lr=1e-3, max_grad_norm=0.5, micro_batch_prompts=1, seed=0, kl=KLPenalty(coef=a.kl))
    record = Record()
    trainer = Trainer(accelerator="cpu", devices=a.devices, max_steps=a.steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      strategy=FSDP2Strategy() if a.devices > 1 else "auto", callbacks=[record],
                      limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=FixedPrompts(a.model, a.data, a.steps, a.prompts))
    weights = full_state_dict(module.policy)
    pushed = {n: t.clone() for n, t in push_stream(module.policy)}  # what vLLM would get, on every rank
    torch.save(pushed, f"{a.out}.pushed.rank{trainer.global_rank}")
    if trainer.is_global_zero:
        sharded = [n for n, p in module.policy.named_parameters() if type(p).__name__ == "DTensor"]
        torch.save({"steps": record.steps, "weights": weights, "world_size": trainer.world_size,
                    "sharded_params": len(sharded)}, a.out)


if __name__ == "__main__":
    main()
