"""Chat-formatted prompts with images at their markers, and left-padded collation into typed batches.

The processor's chat template does the formatting (ChatML, `<think>\\n` pre-fill for the assistant); this
module only decides where each image goes and which tokens the SFT loss sees.
"""

from __future__ import annotations

from typing import Any

import torch

from datamodules.schema import LETTERS
from datamodules.schema import MARKER_RE as MARKER
from datamodules.types import PromptBatch, PromptRecord

DEFAULT_INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."
MC_INSTRUCTION = "Think step by step, then give the letter of the correct option in \\boxed{}."


def interleave(text: str, images: list[Any]) -> list[dict[str, Any]]:
    """Split `text` at `<image>` / `<image N>` markers into chat content parts.

    `<image N>` places image N (1-based); a bare `<image>` takes the next unused image in order. Images that no
    marker mentions are placed before the text, the usual convention for single-image questions.
    """
    parts: list[dict[str, Any]] = []
    used: set[int] = set()
    next_plain, pos = 0, 0
    for m in MARKER.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        if m.group(1) is not None:
            idx = int(m.group(1)) - 1
        else:
            while next_plain in used:
                next_plain += 1
            idx = next_plain
        if not 0 <= idx < len(images):
            raise ValueError(f"marker {m.group(0)!r} refers to image {idx + 1} of {len(images)}")
        parts.append({"type": "image", "image": images[idx]})
        used.add(idx)
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    leading = [{"type": "image", "image": im} for i, im in enumerate(images) if i not in used]
    return leading + parts


def user_text(record: PromptRecord, instruction: str | None = None) -> str:
    """Question, lettered options, then the answer-format instruction."""
    text = record.question.strip()
    if record.options:
        text += "\nOptions:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(record.options))
    if instruction is None:
        instruction = MC_INSTRUCTION if record.question_type == "multiple-choice" else DEFAULT_INSTRUCTION
    return f"{text}\n{instruction}" if instruction else text


def build_messages(record: PromptRecord, system_prompt: str | None = None,
                   instruction: str | None = None) -> tuple[list[dict], list[Any]]:
    """Chat messages for one record and its images in the order the template will meet them."""
    content = interleave(user_text(record, instruction), record.images)
    images = [p.pop("image") for p in content if p["type"] == "image"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    return messages, images


class PromptCollator:
    """Turn PromptRecords into a left-padded PromptBatch (RL) or a PromptBatch with SFT labels.

    SFT: the target is the record's `solution` (reasoning, `</think>`, boxed answer) followed by the end-of-turn
    token; labels are -100 on the prompt (images included) and on padding, so the loss sees the reply only.
    """

    def __init__(self, processor: Any, mode: str = "rl", system_prompt: str | None = None,
                 instruction: str | None = None, max_length: int | None = None):
        if mode not in ("rl", "sft"):
            raise ValueError(f"mode must be 'rl' or 'sft', got {mode!r}")
        self.processor, self.mode = processor, mode
        self.system_prompt, self.instruction, self.max_length = system_prompt, instruction, max_length
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.end_of_turn = self.tokenizer.eos_token or "<|im_end|>"

    def prompt_text(self, record: PromptRecord) -> tuple[str, list[Any]]:
        messages, images = build_messages(record, self.system_prompt, self.instruction)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, images

    def encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, Any]:
        """Encode each sample on its own, then left-pad: per-sample vision rows stay known.

        Returns input_ids/attention_mask [B, P], each vision tensor concatenated over samples, and
        `vision_rows`: for each vision key, how many of its rows belong to each sample (needed to repeat a
        prompt's images G times, or to share them across a group).
        """
        encs = []
        for text, ims in zip(texts, images, strict=True):
            enc = self.processor(text=[text], images=ims or None, return_tensors="pt")
            encs.append(dict(enc))
        pad_id = self.tokenizer.pad_token_id
        width = max(e["input_ids"].shape[1] for e in encs)
        ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):
            n = e["input_ids"].shape[1]
            ids[i, width - n:] = e["input_ids"][0]
            mask[i, width - n:] = e["attention_mask"][0]
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "vision_rows": {}}
        for key in sorted({k for e in encs for k in e} - {"input_ids", "attention_mask"}):
            tensors = [e.get(key) for e in encs]
            if any(t is None or not isinstance(t, torch.Tensor) for t in tensors):
                continue
            if tensors[0].dim() == 2 and tensors[0].shape[0] == 1 and key.endswith("_ids"):
                # per-token tensors such as mm_token_type_ids: left-pad like input_ids
                padded = torch.zeros((len(encs), width), dtype=tensors[0].dtype)
                for i, t in enumerate(tensors):
                    padded[i, width - t.shape[1]:] = t[0]
                out[key] = padded
                continue
            out[key] = torch.cat(tensors, dim=0)
            out["vision_rows"][key] = [int(t.shape[0]) for t in tensors]
        return out

    def __call__(self, records: list[PromptRecord]) -> PromptBatch:
        pairs = [self.prompt_text(r) for r in records]
        texts, images = [p[0] for p in pairs], [p[1] for p in pairs]
        labels = None
        if self.mode == "sft":
            targets = [self._target(r) for r in records]
            enc = self.encode([t + y for t, y in zip(texts, targets, strict=True)], images)
            labels = self._labels(enc, texts, images)
        else:
            enc = self.encode(texts, images)
        input_ids, attention = enc.pop("input_ids"), enc.pop("attention_mask")
        rows = enc.pop("vision_rows")
        vision = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        # the chat text and PIL images ride along for engines that take them rather than tensors (vLLM)
        views = [{**r.scoring_view(), "prompt_text": t, "images": ims}
                 for r, t, ims in zip(records, texts, images, strict=True)]
        return PromptBatch(input_ids=input_ids, attention_mask=attention, vision=vision,
                           records=views, labels=labels, vision_rows=rows)

    def _target(self, record: PromptRecord) -> str:
        if not record.solution:
            raise ValueError(f"row {record.id!r}: SFT needs a `solution` (reasoning, </think>, boxed answer)")
        return record.solution.strip() + self.end_of_turn

    def _labels(self, enc: dict[str, torch.Tensor], texts: list[str], images: list[list[Any]]) -> torch.Tensor:
        """-100 everywhere but the reply: prompt lengths come from encoding the prompts alone."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.full_like(ids, -100)
        for i, (text, ims) in enumerate(zip(texts, images, strict=True)):
            prompt_len = int(self.encode([text], [ims])["attention_mask"].sum())
            total = int(mask[i].sum())
            start = ids.shape[1] - total + prompt_len  # left padding: real tokens sit at the end
            labels[i, start:] = ids[i, start:]
        return labels

    def prompt_length(self, record: PromptRecord) -> int:
        """Tokens of the chat-formatted prompt, image tokens included."""
        text, images = self.prompt_text(record)
        return int(self.encode([text], [images])["attention_mask"].sum())
