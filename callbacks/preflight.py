"""Memory pre-flight: estimate GPU memory per rank from config.json and the run's settings, before any weight
is loaded, print the table, and stop with advice when it does not fit.

Hook order (Lightning 2.6, `Trainer._run` -> `call._call_setup_hook` then `call._call_configure_model`):
DataModule.setup -> Callback.setup -> LightningModule.setup -> configure_model. GRPOModule and SFTModule load
their weights in `configure_model` (their `setup` calls it), so this callback's `setup` runs before the
weights load: a run that cannot fit stops in seconds, not after loading 38B parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from modules.memory import MemoryEstimate, advice, count_parameters, estimate_memory

log = logging.getLogger(__name__)


class MemoryPreflightError(RuntimeError):
    """The estimated peak memory per GPU exceeds the capacity."""


def strategy_name(trainer: Trainer) -> str:
    """'fsdp' | 'fsdp2' | 'deepspeed_stage_3' | 'ddp' (ZeRO-1/2 are counted as unsharded weights: conservative).

    'fsdp2' is Lightning's ModelParallelStrategy, under which the modules shard with FSDP2 (modules/sharding.py).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    s = trainer.strategy
    if isinstance(s, FSDPStrategy):
        return "fsdp"
    if isinstance(s, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(s, DeepSpeedStrategy) and (s.config or {}).get("zero_optimization", {}).get("stage") == 3:
        return "deepspeed_stage_3"
    return "ddp"


def effective_precision(trainer_precision: str, dtype: str, autocast_bf16: bool) -> str:
    """The precision the weights actually have: the module's dtype counts as much as the Trainer's flag."""
    p = str(trainer_precision)
    if p.startswith("bf16") or p.startswith("16"):
        return "bf16-true" if "true" in p else "bf16-mixed"
    if dtype in ("bfloat16", "bf16", "float16", "fp16"):
        return "bf16-true"
    return "bf16-mixed" if autocast_bf16 else "32-true"


def trainable_fraction(model_path: str, parts: list[str]) -> float:
    counts = count_parameters(Path(model_path))
    by_part = {"vision": counts.vision, "connector": counts.connector, "language_model": counts.language_model,
               "lm_head": counts.lm_head}
    return sum(by_part[p] for p in parts if p in by_part) / max(1, counts.total)


class MemoryPreflight(Callback):
    """Print a memory table per GPU at start-up and stop runs that will not fit.

    Args:
        gpu_memory_gb: capacity per GPU in GiB (default: read from CUDA; without CUDA the check is skipped).
        stop_if_no_fit: raise (with advice) when the estimate exceeds the capacity; False only warns.
    """

    def __init__(self, gpu_memory_gb: float | None = None, stop_if_no_fit: bool = True):
        self.gpu_memory_gb = gpu_memory_gb
        self.stop_if_no_fit = stop_if_no_fit
        self.last: MemoryEstimate | None = None

    def _capacity(self, trainer: Trainer) -> float | None:
        if self.gpu_memory_gb is not None:
            return float(self.gpu_memory_gb)
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            return torch.cuda.get_device_properties(trainer.strategy.root_device).total_memory / 1024 ** 3
        return None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        capacity = self._capacity(trainer)
        if capacity is None:
            rank_zero_info("memory pre-flight: skipped (no CUDA device and no gpu_memory_gb given)")
            return
        est = self.estimate(trainer, pl_module, capacity)
        self.last = est
        rank_zero_info(f"memory pre-flight (per GPU, {trainer.world_size} rank(s)):\n{est.table()}")
        if est.fits:
            return
        h = pl_module.hparams
        tips = advice(est, strategy_name(trainer), h.get("optimizer", "adamw"), h.get("gradient_checkpointing", False))
        msg = (f"estimated peak {est.total / 1024 ** 3:.1f} GiB per GPU exceeds {capacity:.1f} GiB. Try:\n- "
               + "\n- ".join(tips or ["more GPUs, or a smaller model"])
               + "\n(set MemoryPreflight(stop_if_no_fit=false) to run anyway)")
        if self.stop_if_no_fit:
            raise MemoryPreflightError(msg)
        log.warning(msg)

    def estimate(self, trainer: Trainer, pl_module: LightningModule, capacity: float) -> MemoryEstimate:
        """Collect the run's settings from the module, its rollout engine, the DataModule and the Trainer."""
        h = pl_module.hparams
        data = getattr(trainer, "datamodule", None)
        dh: Any = getattr(data, "hparams", {}) or {}
        batch = int(dh.get("batch_size", 1))
        rollout = getattr(pl_module, "rollout", None)
        grpo = rollout is not None and "group_size" in h
        if grpo:
            g = int(h["group_size"])
            prompts = min(batch, h.get("mini_batch_prompts") or batch)
            response = getattr(rollout, "max_new_tokens", None) or rollout.params.max_new_tokens
            kw = dict(rollout_batch=prompts * g, group_size=g, prompt_len=int(dh.get("max_prompt_length", 1024)),
                      response_len=int(response), mode="grpo",
                      vllm_gpu_memory_utilization=getattr(rollout, "gpu_memory_utilization", None),
                      vllm_sleep=getattr(rollout, "sleep_between_rollouts", True))
        else:
            kw = dict(rollout_batch=batch, group_size=1, prompt_len=int(dh.get("max_length", 1024)),
                      response_len=0, mode="sft")
        precision = effective_precision(trainer.precision, h.get("dtype", "float32"), h.get("autocast_bf16", False))
        return estimate_memory(
            Path(h["model_path"]), world_size=trainer.world_size, strategy=strategy_name(trainer),
            precision=precision, optimizer=h.get("optimizer", "adamw"),
            trainable_fraction=trainable_fraction(h["model_path"], list(h.get("trainable_parts", []))),
            gradient_checkpointing=bool(h.get("gradient_checkpointing", False)), gpu_memory_gb=capacity,
            cpu_offload=bool(getattr(getattr(pl_module, "sharding", None), "cpu_offload", False)), **kw)
