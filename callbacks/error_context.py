"""Where training is when something fails: the step and the prompt ids of the batch (read by the CLI's error
report, app/cli.py). Added by the CLI to every run."""

from __future__ import annotations

from typing import Any

import lightning as L


class ErrorContext(L.Callback):
    """Remembers the last training batch started (`step`: optimizer steps done, `ids`: its prompt ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.step = trainer.global_step
        records = getattr(batch, "records", None) or []
        self.ids = [str(r.get("id")) for r in records if isinstance(r, dict)]

    def describe(self, trainer: L.Trainer) -> str | None:
        """'training, after step N, batch ids [...]' or None before the first training batch."""
        if self.step is None:
            return None
        phase = "validation" if trainer.validating else "training"
        ids = f", batch ids {self.ids[:8]}{' ...' if len(self.ids) > 8 else ''}" if self.ids else ""
        return f"{phase}, after step {self.step}{ids}"
