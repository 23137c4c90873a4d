"""Export the trained policy as a plain Hugging Face folder at the end of fit: the next stage's input."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from modules.sharding import export_policy


class ExportCallback(Callback):
    """Write `out_dir` (safetensors weights, processor, chat template, generation config) when fit ends.

    Args:
        out_dir: folder to write; the next stage's `model.model_path` points here.
            Default: `<trainer.default_root_dir>/export`.
    """

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "export")
        out = export_policy(pl_module.policy, pl_module.processor, out_dir, trainer.is_global_zero)  # sharded: all
        if out is not None:                                                                 # ranks gather to rank 0
            rank_zero_info(f"exported {type(pl_module).__name__} policy to {out}")
        trainer.strategy.barrier()
