"""Supervised fine-tuning: the cold start (stage 1) and connector-only tuning (stage 3) of Skywork-R1V3.

Cross-entropy on the assistant reply only (the DataModule's labels are -100 on the prompt, images included,
and on padding); which parts train comes from `trainable_parts` (stage 3: `[connector]`); a cosine schedule
with linear warmup (paper, stage 3: warmup ratio 0.03). Early stopping on `val/loss` is a callback in YAML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningModule

from datamodules.types import PromptBatch
from modules.common import (
    build_optimizer,
    check_compatible,
    load_policy,
    log_global_step,
    policy_state,
    total_training_steps,
    validate_model_path,
    warmup_cosine,
)
from modules.policy import positions
from modules.sharding import FSDP2Sharding, shard_for_strategy

ALL_PARTS = ["vision", "connector", "language_model", "lm_head"]


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over labelled tokens.

    logits [N, L, V] predict labels shifted by one: position t predicts labels[:, t + 1]. Returns (loss, number
    of labelled tokens).
    """
    targets = labels[:, 1:]  # [N, L-1]
    logits = logits[:, :-1].float()  # [N, L-1, V]
    n = (targets != -100).sum()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss / n.clamp(min=1), n


class SFTModule(LightningModule):
    """Cross-entropy fine-tuning of a VLM on reasoning traces.

    Args:
        model_path: local Hugging Face folder to start from.
        trainable_parts: parts that train (cold start: all; stage 3: [connector]).
        dtype: weight dtype (float32, bfloat16).
        attn_implementation: transformers attention implementation.
        gradient_checkpointing: recompute activations in the backward pass.
        trust_remote_code: allow Python code shipped with the checkpoint.
        lr: peak learning rate (paper, stage 3: 1e-5).
        weight_decay: AdamW weight decay.
        optimizer: adamw or adamw_8bit.
        warmup_ratio: share of steps with linear warmup (paper, stage 3: 0.03).
        lr_schedule: cosine or constant after warmup.
        min_lr_ratio: the cosine ends at lr * min_lr_ratio.
        max_grad_norm: gradient clipping (0 = off).
        autocast_bf16: bf16 autocast for forward and backward.
        sharding: FSDP2 options used when the strategy is ModelParallelStrategy (modules/sharding.py).
    """

    def __init__(self, model_path: str, trainable_parts: list[str] = ALL_PARTS, dtype: str = "float32",
                 attn_implementation: str | None = "sdpa", gradient_checkpointing: bool = False,
                 trust_remote_code: bool = False, lr: float = 1e-5, weight_decay: float = 0.0,
                 optimizer: str = "adamw", warmup_ratio: float = 0.03, lr_schedule: str = "cosine",
                 min_lr_ratio: float = 0.0, max_grad_norm: float = 1.0, autocast_bf16: bool = False,
                 sharding: FSDP2Sharding | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["sharding"])
        self.sharding = sharding
        validate_model_path(model_path)
        self.policy: torch.nn.Module | None = None
        self.processor = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        h = self.hparams
        self.policy, self.processor = load_policy(h.model_path, h.trainable_parts, h.dtype, h.attn_implementation,
                                                  h.gradient_checkpointing, h.trust_remote_code)
        self.policy = shard_for_strategy(self.policy, self._trainer, self.sharding)

    def setup(self, stage: str) -> None:
        self.configure_model()

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        mask = batch.attention_mask
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.autocast_bf16):
            out = self.policy(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions(self.policy, mask),
                              **batch.vision)
        return out.logits

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        loss, n = sft_loss(self(batch), batch.labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SFT loss at step {self.global_step}, batch ids {batch.ids}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/tokens", n.float(), batch_size=len(batch))
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        loss, n = sft_loss(self(batch), batch.labels)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        log_global_step(self, on_epoch=True)

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = build_optimizer(h.optimizer, params, h.lr, h.weight_decay)
        sched = warmup_cosine(opt, total_training_steps(self.trainer), h.warmup_ratio, h.lr_schedule, h.min_lr_ratio)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)
        log_global_step(self, before_step=True)  # the step this one completes: what checkpoints and callbacks use

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        if "state_dict" in checkpoint:  # a sharded checkpoint was loaded in place (strictly) by the strategy
            check_compatible(policy_state(checkpoint), self.policy, "the checkpoint being resumed")
