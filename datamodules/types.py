"""Typed containers that cross the seams: DataModule -> rollout engine -> rewards -> loss.

Shapes use B = prompts in a batch, G = rollouts per prompt, P = padded prompt length,
R = padded response length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

QUESTION_TYPES = ("multiple-choice", "open")


@dataclass
class PromptRecord:
    """One validated row of the prompt schema (README, "Data schema"). Images are decoded PIL images."""

    id: str
    question: str
    answer: str
    question_type: str = "open"  # "multiple-choice" | "open"
    options: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # list[PIL.Image.Image]
    difficulty: int | None = None
    subject: str | None = None
    solution: str | None = None

    def scoring_view(self) -> dict[str, Any]:
        """What rewards and scorers need, and nothing heavy (no images)."""
        return {
            "id": self.id,
            "question": self.question,  # for model verifiers (modules.rewards.verifier)
            "answer": self.answer,
            "options": list(self.options),
            "question_type": self.question_type,
            "difficulty": self.difficulty,
        }


@dataclass
class PromptBatch:
    """A left-padded batch of chat-formatted prompts (the `<think>\\n` pre-fill included).

    input_ids / attention_mask: [B, P]. `vision` holds the processor's image tensors (pixel_values, and
    image_grid_thw for Qwen2.5-VL), passed to the model as keyword arguments. `records` carries
    answer/options/type/difficulty for the rewards. For SFT batches `labels` is [B, P] with -100 everywhere
    but the assistant reply.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    labels: torch.Tensor | None = None
    vision_rows: dict[str, list[int]] = field(default_factory=dict)  # rows of each vision tensor per sample
    # serving: the ids the sampler asked for (a bad row is replaced by the next valid one), the rows skipped
    # while serving this batch (`datamodules.schema.Skip`) and how many rows were read for it
    requested_ids: list[str] | None = None
    skipped: list[Any] = field(default_factory=list)
    rows_read: int = 0
    stream_state: Any = None  # streaming: (worker id, the stream's state after this batch's last row)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            vision={k: v.to(device) for k, v in self.vision.items()},
            records=self.records,
            labels=None if self.labels is None else self.labels.to(device),
            vision_rows=self.vision_rows,
            requested_ids=self.requested_ids,
            skipped=self.skipped,
            rows_read=self.rows_read,
            stream_state=self.stream_state,
        )


@dataclass
class Rollouts:
    """B*G sampled responses, grouped: rows g*G .. g*G+G-1 answer prompt g.

    response_ids / response_mask: [B*G, R], right-padded; the mask is 1 on generated tokens up to and
    including EOS. truncated: [B*G] bool, True when the response hit max_new_tokens without EOS.
    texts: decoded responses (special tokens stripped). group_size: G.
    """

    prompts: PromptBatch
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    group_size: int
    logprobs: torch.Tensor | None = None  # [B*G, R] sampler log-probs, when the engine returns them

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def group_records(self) -> list[dict[str, Any]]:
        """The record of each response's prompt, repeated G times: [B*G]."""
        return [r for r in self.prompts.records for _ in range(self.group_size)]
