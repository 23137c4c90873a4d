"""`python -m app.evaluate MODEL_DIR DATA [--samples K] [--temperature T] [--limit N]`: held-out accuracy.

Scores an exported model on prompt-schema files with the training rewards: accuracy, format rate, mean response
length, accuracy per difficulty level, and the standard error of the accuracy. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import torch

from datamodules.prompting import PromptCollator
from datamodules.vlm_datamodule import load_records
from modules.loading import load_vlm
from modules.rewards import default_rewards
from modules.rollout import HFRolloutEngine


def _summary(acc: torch.Tensor, fmt: torch.Tensor, lengths: torch.Tensor, difficulty: list) -> dict:
    """acc/fmt/lengths: [N, K] per item and sample."""
    per_item = acc.mean(1)  # [N]
    n = per_item.numel()
    by_level: dict[str, list[float]] = defaultdict(list)
    for d, a in zip(difficulty, per_item.tolist(), strict=True):
        by_level[str(d)].append(a)
    return {
        "accuracy": float(per_item.mean()),
        "accuracy_se": float(per_item.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
        "format_rate": float(fmt.mean()),
        "response_length": float(lengths.float().mean()),
        "n": n,
        "by_difficulty": {k: sum(v) / len(v) for k, v in sorted(by_level.items())},
    }


@torch.no_grad()
def evaluate(model_dir: str, data: str | list[str], samples: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 128, limit: int | None = None, batch_size: int = 32, seed: int = 0,
             model: torch.nn.Module | None = None, processor=None) -> dict:
    """Accuracy and format of `samples` responses per held-out prompt (temperature 0 = greedy)."""
    if model is None:
        model, processor = load_vlm(model_dir)
    records, skips = load_records(data, max_skip_fraction=1.0, limit=limit)
    collator = PromptCollator(processor, mode="rl")
    engine = HFRolloutEngine(temperature=temperature, max_new_tokens=max_new_tokens)
    engine.setup(model, processor, torch.device("cpu"), seed)
    rewards = default_rewards()
    acc, fmt, lengths = [], [], []
    for start in range(0, len(records), batch_size):
        batch = collator(records[start:start + batch_size])
        rollouts = engine.generate(model, batch, samples)
        _, comps = rewards.score(rollouts.texts, rollouts.group_records())
        shape = (len(batch), samples)
        acc.append(torch.as_tensor(comps["accuracy"]).view(shape))
        fmt.append(torch.as_tensor(comps["format"]).view(shape))
        lengths.append(rollouts.response_mask.sum(1).view(shape))
    out = _summary(torch.cat(acc), torch.cat(fmt), torch.cat(lengths), [r.difficulty for r in records])
    out.update(samples=samples, temperature=temperature, skipped=skips.total)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m app.evaluate", description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("data", help="file, folder or glob of prompt-schema files (held-out split)")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = evaluate(a.model_dir, a.data, a.samples, a.temperature, a.max_new_tokens, a.limit, seed=a.seed)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
