"""A tiny GRPO fit with a real Trainer: parameters move where they should, metrics land in TensorBoard."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.make_data import write_dataset
from callbacks.rollout_samples import RolloutSamplesCallback
from datamodules.vlm_datamodule import VLMDataModule
from modules.advantages import GRPOAdvantage
from modules.grpo_module import GRPOModule
from modules.loading import load_vlm, part_modules
from modules.rewards import Reward
from modules.rollout import HFRolloutEngine
from modules.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_TAGS = [
    "train/reward", "train/reward/accuracy", "train/reward/format", "train/response_length",
    "train/response_length_max", "train/truncated_frac", "train/clip_frac", "train/rollout_entropy", "train/grad_norm",
    "train/lr", "train/zero_std_frac", "time/rollout_s", "time/update_s", "throughput/tokens_per_s",
    "val/accuracy", "val/reward", "val/format_rate", "val/response_length",
]


class TextLengthReward(Reward):
    """A reward a random-init model can earn: responses of odd character length score 1 (gives variance)."""

    name = "odd_length"

    def score_one(self, response: str, record: dict) -> float:
        return float(len(response) % 2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model = make_tiny(root / "model", "internvl", seed=1)
    write_dataset(root / "data", n_train=32, n_val=8, seed=1, quiet=True)
    return root, model


def _tags(logdir: Path) -> set[str]:
    files = glob.glob(str(logdir / "**" / "events.out.tfevents*"), recursive=True)
    tags: set[str] = set()
    for f in files:
        ea = EventAccumulator(f)
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    return tags


@pytest.mark.slow
def test_tiny_grpo_fit_moves_trainable_parts_only_and_logs(assets, tmp_path):
    root, model_dir = assets
    from modules.rewards import AccuracyReward, FormatReward

    module = GRPOModule(
        model_path=str(model_dir), trainable_parts=["connector", "language_model"], group_size=4,
        rollout=HFRolloutEngine(max_new_tokens=8), rewards=[AccuracyReward(), FormatReward(), TextLengthReward()],
        reward_weights=[0.8, 0.2, 1.0], lr=1e-3, mini_batch_prompts=1, ppo_epochs=2,
    )
    data = VLMDataModule(str(root / "data" / "train-*.parquet"), str(root / "data" / "validation-*.parquet"),
                         processor_path=str(model_dir), batch_size=2, val_batch_size=4, max_prompt_length=256)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=1, limit_val_batches=1,
                      num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                      log_every_n_steps=1, use_distributed_sampler=False,
                      logger=TensorBoardLogger(str(tmp_path), name="tb"),
                      callbacks=[RolloutSamplesCallback(every_n_steps=1, num_prompts=1)])
    before, _ = load_vlm(model_dir)
    trainer.fit(module, datamodule=data)

    after = dict(module.policy.named_parameters())
    parts = part_modules(module.policy)
    trainable = {id(p) for name in ("connector", "language_model") for m in parts[name] for p in m.parameters()}
    for name, p0 in before.named_parameters():
        p1 = after[name]
        moved = not torch.equal(p0, p1.detach())
        if id(p1) in trainable:
            assert moved, f"trainable parameter {name} did not change"
        else:
            assert not moved, f"frozen parameter {name} changed"
    tags = _tags(tmp_path)
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    assert not missing, f"missing TensorBoard tags: {missing}"
    assert "train/reward/odd_length" in tags
    ea = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)[0])
    ea.Reload()
    assert "rollouts/sample_0/text_summary" in ea.Tags()["tensors"]  # question, response, answer, reward
    assert "rollouts/sample_0/images" in ea.Tags()["images"]


class NaNAdvantage(GRPOAdvantage):
    """A broken advantage plug-in (rewards themselves are guarded: a NaN reward scores 0): NaN loss must stop."""

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.full_like(rewards, float("nan"))


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_ids(assets, tmp_path):
    root, model_dir = assets
    module = GRPOModule(model_path=str(model_dir), group_size=2, rollout=HFRolloutEngine(max_new_tokens=4),
                        advantage=NaNAdvantage())
    data = VLMDataModule(str(root / "data" / "train-*.parquet"), processor_path=str(model_dir), batch_size=2)
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, use_distributed_sampler=False, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 0, batch ids \['train-"):
        trainer.fit(module, datamodule=data)


@pytest.mark.slow
def test_group_size_one_with_grpo_fails_at_start_up(assets):
    _, model_dir = assets
    with pytest.raises(ValueError, match="group_size=1"):
        GRPOModule(model_path=str(model_dir), group_size=1)


@pytest.mark.slow
def test_ddp_two_cpu_processes(assets, tmp_path):
    """`python -m app fit` with DDP on 2 gloo processes runs, each rank serving its own shard."""
    root, model_dir = assets
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--model.init_args.model_path", str(model_dir), "--model.init_args.group_size", "2",
           "--model.init_args.rollout.init_args.max_new_tokens", "6",
           "--data.train_files", str(root / "data" / "train-*.parquet"), "--data.val_files", "null",
           "--data.batch_size", "2", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
           "--trainer.val_check_interval", "null", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_steps=2" in proc.stderr + proc.stdout
    assert "train/reward" in _tags(tmp_path)
