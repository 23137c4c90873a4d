"""What the GRPO and SFT modules share: loading the policy, optimisers and schedules, exporting."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from modules.loading import check_checkpoint_dir, load_vlm, parts_table, set_trainable_parts

log = logging.getLogger(__name__)
OPTIMIZERS = ("adamw", "adamw_8bit")


def load_policy(model_path: str, trainable_parts: list[str], dtype: str, attn_implementation: str | None,
                gradient_checkpointing: bool, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    """Load the model and processor, set the trainable parts and print the table."""
    model, processor = load_vlm(model_path, dtype=dtype, attn_implementation=attn_implementation,
                                gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code)
    model.train()  # from_pretrained returns eval mode
    rows = set_trainable_parts(model, trainable_parts)
    rank_zero_info(f"model {model_path} ({model.config.model_type})\n{parts_table(rows)}")
    return model, processor


def build_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (its optimiser states take a quarter of the memory)."""
    if not params:
        raise ValueError("no trainable parameters: check `trainable_parts`")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a core dependency
            raise ImportError("optimizer 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas)
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.0,
                  schedule: str = "cosine", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then cosine decay (or constant) to min_ratio."""
    total = max(1, total_steps)
    warm = int(round(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_training_steps(trainer: Any) -> int:
    """max_steps when set, else the estimated stepping batches."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    est = trainer.estimated_stepping_batches
    return int(est) if math.isfinite(est) else 1000


def export_hf(model: nn.Module, processor: Any, out_dir: str | Path,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a stock Hugging Face folder (safetensors under stock names, stock processor, chat template,
    generation config): it opens with plain transformers and serves with vLLM without this project.

    `state_dict`: full weights to write instead of the model's own (a sharded model's, gathered).
    """
    from modules.stock import save_stock

    return save_stock(model, processor, out_dir, state_dict=state_dict)


def validate_model_path(model_path: str) -> None:
    """Fail at start-up (not at the first step) on a bad model folder."""
    check_checkpoint_dir(model_path)


def fresh(obj: Any) -> Any:
    """A class-typed default written with `lazy_instance` becomes a new, fully built object per module.

    Lazy defaults are created once at import and would otherwise be shared (with their state) by every module
    built from Python; LightningCLI builds real objects from YAML, which pass through unchanged.
    """
    kwargs = getattr(obj, "_lazy_kwargs", None)
    if kwargs is None:
        return obj
    return type(obj).__bases__[1](**kwargs)


class IncompatibleCheckpoint(ValueError):
    """The checkpoint's weights do not fit the model they are loaded into."""


def policy_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The policy's weights from a GRPO/SFT module checkpoint (keys without the `policy.` prefix)."""
    state = checkpoint.get("state_dict", {})
    out = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    if not out:
        raise IncompatibleCheckpoint("checkpoint holds no `policy.*` weights: not written by this app's modules")
    return out


def check_compatible(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Same parameter names and shapes, or an error saying what differs (family, vocabulary, sizes)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
              if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        detail = []
        if missing or extra:
            detail.append(f"{len(missing)} parameters missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                          f"(e.g. {extra[:2]}): another model family?")
        if shapes:
            k, a, b = shapes[0]
            detail.append(f"{len(shapes)} shape mismatches, e.g. {k}: checkpoint {a} vs model {b}"
                          " (another tokenizer/vocabulary or size?)")
        raise IncompatibleCheckpoint(f"{source} does not fit {type(model).__name__}: " + "; ".join(detail))


def log_global_step(module: Any, on_epoch: bool = False, before_step: bool = False) -> None:
    """Put the scalars this hook logs at ``global_step`` after the optimiser step on the loggers' x axis.

    Lightning writes ``self.log`` values at its own batch counter, which is one less than ``global_step`` after a
    step (and at validation); checkpoint names, ``selection.json`` and what the callbacks write use ``global_step``
    (callbacks/tb_logging.py). A logged ``step`` metric is the x value Lightning's logger connector uses instead
    (and drops from the written scalars), so one moment of training carries one step number everywhere.

    Call it where the step is known before the callbacks' ``on_train_batch_end`` runs (``ModelCheckpoint`` names
    its files from the logged ``step`` too, so a value logged later would name them after the previous step): in
    ``training_step`` after a manual optimiser step, in ``on_before_optimizer_step`` (``before_step=True``: the
    step being taken) under automatic optimisation, in ``validation_step`` with ``on_epoch=True``.
    """
    if module.trainer.state.fn != "fit":  # the off-by-one is a fit-loop matter; validate would print a "step" row
        return
    step = module.global_step + (1 if before_step else 0)
    module.log("step", float(step), on_step=not on_epoch, on_epoch=on_epoch, reduce_fx="max", batch_size=1,
               sync_dist=False, prog_bar=False)
