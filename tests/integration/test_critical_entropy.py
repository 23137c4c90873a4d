"""End to end: GRPO fit with critical-token entropy logging, ModelCheckpoint on it, selection and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.make_data import write_dataset
from callbacks.checkpoint_selection import CheckpointSelectionCallback
from callbacks.critical_entropy import CriticalEntropyCallback
from callbacks.selection import STATUSES
from datamodules.vlm_datamodule import VLMDataModule
from modules.tiny import make_tiny
from tests.unit.test_critical_entropy_callback import grpo_module

SCALARS = ("entropy/critical", "entropy/all_tokens", "entropy/high_entropy_frac", "entropy/critical_rate",
           "entropy/n_critical")


@pytest.mark.slow
def test_fit_logs_entropy_selects_and_exports(tmp_path: Path):
    model_dir = make_tiny(tmp_path / "tiny", "internvl")
    write_dataset(tmp_path / "data", n_train=32, n_val=16, quiet=True)
    torch.manual_seed(0)
    module = grpo_module(model_dir, max_new_tokens=16)
    data = VLMDataModule(train_files=str(tmp_path / "data" / "train-*.parquet"),
                         val_files=str(tmp_path / "data" / "validation-*.parquet"),
                         processor_path=str(model_dir), batch_size=2, val_batch_size=2, val_limit=4)
    entropy_cb = CriticalEntropyCallback(every_n_steps=1, num_probe_prompts=2, samples_per_prompt=2,
                                         max_new_tokens=16)
    # A random-init model almost never samples "Wait", so entropy/critical is NaN here and the policy would
    # refuse every candidate; select on the (always finite) mean entropy to exercise the export path. The
    # critical-token path itself is checked on hand-built ids in tests/unit/test_critical_entropy_callback.py.
    select_cb = CheckpointSelectionCallback(acc_tolerance=1.0, entropy_key="entropy/all_tokens",
                                            mean_entropy_key=None)  # exports to <default_root_dir>/selected
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="entropy/critical", mode="max", save_top_k=2)
    logger = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="tb")
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2,
                      check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                      log_every_n_steps=1, logger=logger, callbacks=[entropy_cb, select_cb, ckpt],
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)

    # TensorBoard: one reading per measurement, at the step it was taken, and histograms at the same steps
    acc = EventAccumulator(str(Path(trainer.log_dir)), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], (tag, tags["scalars"])
    # 4 train-time probes; the validations at steps 2 and 4 reuse them (same step, same weights): not re-written
    scalar_steps = [e.step for e in acc.Scalars("entropy/all_tokens")]
    assert scalar_steps == [1, 2, 3, 4]
    assert "entropy/hist/all_tokens" in tags["histograms"]
    assert [e.step for e in acc.Histograms("entropy/hist/all_tokens")] == scalar_steps
    assert all(0 < e.value < 7 for e in acc.Scalars("entropy/all_tokens"))  # log(512) = 6.24 nats at most

    # ModelCheckpoint found its monitor (NaN counts as worst, but the key must be there)
    assert "entropy/critical" in trainer.callback_metrics
    assert ckpt.best_model_path and Path(ckpt.best_model_path).exists()

    # selection.json: one row per validation (steps 2 and 4), a valid status each, the pick exported
    report = json.loads((Path(trainer.log_dir) / "selection.json").read_text())
    rows = report["candidates"]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["status"] in STATUSES and r["reason"] for r in rows)
    assert all(Path(r["path"]).exists() for r in rows)
    assert [r["status"] for r in rows].count("picked") == 1 and report["picked"] is not None

    from transformers import AutoModelForImageTextToText

    import modules.processors  # noqa: F401  (registers the image-only processors)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "selected", local_files_only=True)
    picked = torch.load(report["picked"]["path"], map_location="cpu", weights_only=False)  # this run wrote it
    ref = {k.removeprefix("policy."): v for k, v in picked["state_dict"].items()}
    own = model.state_dict()
    same = [k for k in own if k in ref]
    assert len(same) > 0.9 * len(own) and all(torch.equal(own[k], ref[k]) for k in same)
