"""Shared by the vLLM tier (tests marked `vllm`): prompts with images, trainer log-probs, and the engine settings
that keep real vLLM small on 2 CPU cores. Run the tier with `make test-vllm` (README, "vLLM")."""

from __future__ import annotations

import torch
from PIL import Image

from datamodules.prompting import PromptCollator
from datamodules.types import PromptBatch, PromptRecord, Rollouts
from modules.policy import response_hidden, token_logprobs

SKIP_REASON = "vLLM tier: needs vLLM (`make test-vllm` builds .venv-vllm and runs these tests)"
# fp32 on both sides: the sampler's log-probs and the trainer's must agree to this mean |gap| when in sync
SYNC_TOLERANCE = 1e-3
ENGINE_ARGS = dict(dtype="float32", kv_cache_gb=0.25, max_model_len=512, max_new_tokens=8,
                   engine_kwargs={"enforce_eager": True})


def image_records(n: int = 2) -> list[PromptRecord]:
    colours = ["red", "green", "blue", "yellow"]
    return [PromptRecord(id=f"q{i}", question=f"How many {colours[i % 4]} circles are there?", answer=str(i + 1),
                         images=[Image.new("RGB", (112, 112), colours[i % 4])]) for i in range(n)]


def image_batch(processor, n: int = 2) -> PromptBatch:
    return PromptCollator(processor)(image_records(n))


@torch.no_grad()
def trainer_logprobs(model, batch: PromptBatch, rollouts: Rollouts) -> torch.Tensor:
    """The trainer's log-probs [N, R] of the sampled tokens under the model's current weights."""
    hidden = response_hidden(model, batch, rollouts.response_ids, rollouts.response_mask, rollouts.group_size)
    return token_logprobs(model, hidden, rollouts.response_ids)[0]


def mean_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.float()
    return float(((a.float() - b.float()).abs() * m).sum() / m.sum().clamp(min=1))
