"""Checkpoint selection by critical-token entropy, wired into a fit (policy: ``callbacks.selection``).

After every validation (when ``val/accuracy`` and ``entropy/critical`` are both in ``trainer.callback_metrics``)
a candidate is recorded and a weights-only checkpoint of that moment is written, so every candidate has a file
whatever the ``ModelCheckpoint`` callbacks keep. When fit ends, ``select_checkpoint`` runs over all candidates,
``selection.json`` (every candidate, its figures, status and reason, and the pick) is written to the logger's
``log_dir`` (else ``default_root_dir``), and the pick is exported as a Hugging Face folder.

Note: exporting loads the picked weights into the LightningModule, so callbacks whose ``on_fit_end`` runs
after this one (e.g. ``ExportCallback``) see the picked weights, not the final ones. Under FSDP2
(``configs/scale/fsdp2.yaml``) candidates are sharded checkpoint folders; the export gathers the picked weights
once, to rank 0. DeepSpeed is not supported for the export.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.selection import CheckpointCandidate, select_checkpoint, write_selection_json
from modules.sharding import export_policy, load_module_weights

__all__ = ["CheckpointSelectionCallback"]


def _metric(metrics: dict[str, Any], key: str | None) -> float | None:
    """A callback metric as a float; NaN when absent (None when no key is configured)."""
    if key is None:
        return None
    value = metrics.get(key)
    return math.nan if value is None else float(value)


class CheckpointSelectionCallback(Callback):
    """Record a candidate per validation, pick one at fit end, write selection.json and export the pick.

    Args:
        acc_tolerance: keep candidates whose validation accuracy is within this (absolute) of the best.
        spike_factor: refuse a candidate whose critical or mean entropy exceeds this multiple of the median
            of the previous ``spike_window`` candidates (entropy spike = destabilisation, recipe §5.4).
        spike_window: candidates in that running median.
        accuracy_key: callback metric holding validation accuracy.
        entropy_key: callback metric holding critical-token entropy (``CriticalEntropyCallback``).
        mean_entropy_key: callback metric holding the mean token entropy, for spike detection (None = off).
        export: write the picked checkpoint as a Hugging Face folder at fit end.
        export_dir: where to write it. Default: `<trainer.default_root_dir>/selected`, beside the stage's `export`.
        dirpath: folder of the candidates' weights-only checkpoints (default: ``<log_dir>/selection``).
        keep_unpicked: keep the candidates' checkpoints that were not picked (False deletes them at fit end;
            they are only needed to export a different pick later).
    """

    def __init__(
        self,
        acc_tolerance: float = 0.02,
        spike_factor: float = 1.5,
        spike_window: int = 5,
        accuracy_key: str = "val/accuracy",
        entropy_key: str = "entropy/critical",
        mean_entropy_key: str | None = "entropy/all_tokens",
        export: bool = True,
        export_dir: str | None = None,
        dirpath: str | None = None,
        keep_unpicked: bool = True,
    ):
        self.acc_tolerance, self.spike_factor, self.spike_window = acc_tolerance, spike_factor, spike_window
        self.accuracy_key, self.entropy_key, self.mean_entropy_key = accuracy_key, entropy_key, mean_entropy_key
        self.export_enabled, self.export_dir, self.dirpath, self.keep_unpicked = export, export_dir, dirpath, keep_unpicked
        self.candidates: list[CheckpointCandidate] = []
        self.picked: CheckpointCandidate | None = None

    @staticmethod
    def run_dir(trainer: Trainer) -> Path:
        """The logger's log_dir, else the trainer's default_root_dir."""
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else self.run_dir(trainer) / "selection"

    # -- candidates -----------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        path = self._dir(trainer) / f"select-step={step}.ckpt"
        trainer.save_checkpoint(path, weights_only=True)  # collective: every rank calls it
        metrics = trainer.callback_metrics
        cand = CheckpointCandidate(
            path=str(path),
            step=step,
            critical_entropy=_metric(metrics, self.entropy_key),
            val_accuracy=_metric(metrics, self.accuracy_key),
            mean_entropy=_metric(metrics, self.mean_entropy_key),
        )
        self.candidates = [c for c in self.candidates if c.step != step] + [cand]  # a re-run step replaces

    # -- selection ------------------------------------------------------------------------------------------
    def select(self, trainer: Trainer) -> tuple[CheckpointCandidate | None, list[dict[str, Any]], Path]:
        """Run the policy over the recorded candidates and write ``selection.json`` (rank 0)."""
        picked, report = select_checkpoint(self.candidates, self.acc_tolerance, self.spike_factor,
                                           self.spike_window)
        out = self.run_dir(trainer) / "selection.json"
        if trainer.is_global_zero:
            write_selection_json(out, picked, report)
        return picked, report, out

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.candidates:
            rank_zero_warn("CheckpointSelectionCallback: no validation ran, so there is nothing to select")
            return
        self.picked, report, out = self.select(trainer)
        summary = ", ".join(f"step {r['step']}: {r['status']}" for r in report)
        rank_zero_info(f"checkpoint selection -> {out} ({summary})")
        if self.picked is None:
            rank_zero_warn("CheckpointSelectionCallback: no candidate qualified; nothing exported")
        elif self.export_enabled:  # every rank: a sharded policy loads and gathers collectively; rank 0 writes
            self.export(pl_module, self.picked, Path(self.export_dir or Path(trainer.default_root_dir) / "selected"),
                        trainer.is_global_zero)
        if not self.keep_unpicked and trainer.is_global_zero:
            for c in self.candidates:
                if c is not self.picked:
                    Path(c.path).unlink(missing_ok=True)
        trainer.strategy.barrier("checkpoint_selection")

    def export(self, pl_module: LightningModule, picked: CheckpointCandidate, out_dir: Path,
               is_global_zero: bool = True) -> Path | None:
        """Load the picked weights into ``pl_module`` and write its policy as a Hugging Face folder (a sharded
        run's checkpoint is a folder of shards: each rank loads its own, rank 0 writes the gathered weights)."""
        load_module_weights(pl_module, picked.path)  # weights_only: a checkpoint is data, never code
        out = export_policy(pl_module.policy, pl_module.processor, out_dir, is_global_zero)
        if out is not None:
            rank_zero_info(f"exported picked checkpoint (step {picked.step}) to {out}")
        return out

    # -- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"candidates": [asdict(c) for c in self.candidates]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.candidates = [CheckpointCandidate(**c) for c in state_dict.get("candidates", [])]
