"""A few rollouts to TensorBoard every N steps: question, response, answer and reward, with the prompt's image."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def unnormalise(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor | None:
    """[3, H, W] normalised pixels -> [3, H, W] in 0..1; None for layouts that are not images (Qwen patches)."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        return None
    m = torch.tensor(mean, dtype=pixels.dtype)[:, None, None]
    s = torch.tensor(std, dtype=pixels.dtype)[:, None, None]
    return (pixels.float().cpu() * s + m).clamp(0, 1)


class RolloutSamplesCallback(Callback):
    """Every `every_n_steps`, write `num_prompts` prompts with one response each as TensorBoard text and image.

    Args:
        every_n_steps: optimiser steps between two samples.
        num_prompts: prompts shown each time (the first response of each group).
    """

    def __init__(self, every_n_steps: int = 20, num_prompts: int = 2):
        self.every_n_steps, self.num_prompts = every_n_steps, num_prompts

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rollouts = getattr(pl_module, "last_rollouts", None)
        logger = trainer.logger
        if rollouts is None or not isinstance(logger, TensorBoardLogger) or not trainer.is_global_zero:
            return
        if trainer.global_step % self.every_n_steps:
            return
        tok = pl_module.processor.tokenizer
        rewards = pl_module.last_group_stats.get("rewards", [])
        prompts = rollouts.prompts
        image_proc = getattr(pl_module.processor, "image_processor", None)
        for p in range(min(self.num_prompts, len(prompts))):
            question = tok.decode(prompts.input_ids[p][prompts.attention_mask[p].bool()], skip_special_tokens=True)
            record = prompts.records[p]
            reward = rewards[p][0] if p < len(rewards) else float("nan")
            text = (f"**id** {record['id']} · **answer** {record['answer']} · **reward** {reward:.2f}\n\n"
                    f"**prompt**\n\n    {question.strip()}\n\n**response**\n\n    {rollouts.texts[p * rollouts.group_size]}")
            logger.experiment.add_text(f"rollouts/sample_{p}", text, trainer.global_step)
            self._image(logger, image_proc, prompts, p, trainer.global_step)

    @staticmethod
    def _image(logger: TensorBoardLogger, image_proc: Any, prompts: Any, p: int, step: int) -> None:
        pixels, rows = prompts.vision.get("pixel_values"), prompts.vision_rows.get("pixel_values")
        if pixels is None or rows is None or image_proc is None:
            return
        first = sum(rows[:p])
        if rows[p] == 0:
            return
        image = unnormalise(pixels[first], list(image_proc.image_mean), list(image_proc.image_std))
        if image is not None:
            logger.experiment.add_image(f"rollouts/image_{p}", image, step)
