"""A few rollouts to TensorBoard every N steps: each sample's prompt, all its images, response and reward parts.

Per sample ``p`` and step (``trainer.global_step`` after the optimiser step, as everywhere: callbacks/tb_logging.py):

- Text tab, ``rollouts/sample_<p>``: id, answer, reward with its parts, the prompt and the response as fenced code
  blocks (TensorBoard renders Markdown; a fence keeps the chat template, ``<think>`` and line breaks as written), long
  lines wrapped so nothing is cut off;
- Images tab, ``rollouts/sample_<p>/images``: every image of the prompt, side by side in prompt order, so a
  two-image question shows both, under the same sample number and step as its text.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from callbacks.tb_logging import tensorboard_writers

WRAP = 100  # characters per line inside the code blocks
GAP = 6  # pixels between two images of one sample
FILL = 0.5  # grey gap and padding: the synthetic images have white backgrounds, a white gap would hide the boundary


def unnormalise(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor | None:
    """[3, H, W] normalised pixels -> [3, H, W] in 0..1; None for layouts that are not images (Qwen patches)."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        return None
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels.float().cpu() * s + m).clamp(0, 1)


def side_by_side(images: list[torch.Tensor]) -> torch.Tensor:
    """[3, H_i, W_i] images -> one [3, max H, sum W + gaps] image, top-aligned, grey between and below."""
    height = max(im.shape[1] for im in images)
    width = sum(im.shape[2] for im in images) + GAP * (len(images) - 1)
    out = torch.full((3, height, width), FILL)
    x = 0
    for im in images:
        out[:, : im.shape[1], x : x + im.shape[2]] = im
        x += im.shape[2] + GAP
    return out


def code_block(text: str, width: int = WRAP) -> str:
    """``text`` as a fenced Markdown code block, long lines wrapped, the fence longer than any backtick run inside."""
    lines = [textwrap.fill(line, width, replace_whitespace=False, drop_whitespace=False) or line
             for line in text.strip("\n").split("\n")]
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n" + "\n".join(lines) + f"\n{fence}"


def sample_markdown(step: int, p: int, record: dict[str, Any], prompt: str, response: str, reward: float,
                    parts: dict[str, float], n_images: int, group_size: int) -> str:
    """One sample as Markdown for TensorBoard's Text tab."""
    part_text = ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
    where = f"`rollouts/sample_{p}/images` at step {step}"
    images = ("none" if not n_images else f"1, in {where}" if n_images == 1
              else f"{n_images}, side by side in prompt order, in {where}")
    return "\n\n".join([
        f"**sample {p}** · step {step} · id `{record.get('id')}` · answer `{record.get('answer')}`",
        f"**reward** {reward:.2f}" + (f" ({part_text})" if part_text else ""),
        f"**images** {images}",
        "**prompt**", code_block(prompt),
        f"**response** (the first of the {group_size} sampled for this prompt)", code_block(response),
    ])


class RolloutSamplesCallback(Callback):
    """Every `every_n_steps`, write `num_prompts` prompts with one response each as TensorBoard text and images.

    Args:
        every_n_steps: optimiser steps between two samples.
        num_prompts: prompts shown each time (the first response of each group).
    """

    def __init__(self, every_n_steps: int = 20, num_prompts: int = 2):
        self.every_n_steps, self.num_prompts = every_n_steps, num_prompts

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rollouts = getattr(pl_module, "last_rollouts", None)
        writers = tensorboard_writers(trainer)
        step = trainer.global_step
        if rollouts is None or not writers or step % self.every_n_steps:
            return
        tok = pl_module.processor.tokenizer
        stats = getattr(pl_module, "last_group_stats", {})
        rewards, reward_parts = stats.get("rewards", []), stats.get("reward_parts", {})
        prompts = rollouts.prompts
        image_proc = getattr(pl_module.processor, "image_processor", None)
        for p in range(min(self.num_prompts, len(prompts))):
            prompt = tok.decode(prompts.input_ids[p][prompts.attention_mask[p].bool()], skip_special_tokens=True)
            images = self.images(image_proc, prompts, p)
            text = sample_markdown(
                step, p, prompts.records[p], prompt, rollouts.texts[p * rollouts.group_size],
                rewards[p][0] if p < len(rewards) else float("nan"),
                {name: part[p][0] for name, part in reward_parts.items() if p < len(part)},
                len(images), rollouts.group_size)
            for writer in writers:
                writer.add_text(f"rollouts/sample_{p}", text, step)
                if images:
                    writer.add_image(f"rollouts/sample_{p}/images", side_by_side(images), step)

    @staticmethod
    def images(image_proc: Any, prompts: Any, p: int) -> list[torch.Tensor]:
        """Every image (vision row) of prompt ``p`` as [3, H, W] in 0..1; empty for none or non-image layouts."""
        pixels, rows = prompts.vision.get("pixel_values"), prompts.vision_rows.get("pixel_values")
        if pixels is None or rows is None or image_proc is None or not rows[p]:
            return []
        first = sum(rows[:p])
        mean, std = list(image_proc.image_mean), list(image_proc.image_std)
        images = [unnormalise(pixels[first + i], mean, std) for i in range(rows[p])]
        return [im for im in images if im is not None]
