"""The CUDA path: the same modules on a GPU, bf16-mixed as the r1v3 configs run them. Skipped without CUDA.

These run on a lent GPU machine (see the README's "Tests"), never in CI: CI has no GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Callback, Trainer

from app.make_data import write_dataset
from datamodules.vlm_datamodule import VLMDataModule
from modules.grpo_module import GRPOModule
from modules.loading import load_vlm, part_modules
from modules.policy import response_hidden, token_logprobs
from modules.rewards import AccuracyReward
from modules.rollout import HFRolloutEngine
from modules.sft_module import SFTModule
from tests.integration.test_grpo_fit import TextLengthReward  # earns 1 on odd lengths: groups vary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-data")
    write_dataset(root, n_train=32, n_val=8, seed=3, quiet=True)
    return root


def _data(data_dir, model_dir, mode: str) -> VLMDataModule:
    return VLMDataModule(str(data_dir / "train-*.parquet"), None, processor_path=str(model_dir), mode=mode,
                         batch_size=2, max_prompt_length=256)


class DevicesSeen(Callback):
    """The devices the policy's parameters sit on during training (Lightning moves the module back to the CPU
    when fit ends, so they cannot be read afterwards)."""

    def __init__(self):
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices |= {p.device.type for p in pl_module.policy.parameters()}


def _trainer(tmp_path, steps: int, *callbacks: Callback) -> Trainer:
    return Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                   limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=list(callbacks))


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl", "llava"])
def test_grpo_fit_on_cuda_bf16_moves_only_the_trainable_parts(family, tiny_model_dir, data_dir, tmp_path):
    model_dir = tiny_model_dir(family)
    module = GRPOModule(model_path=str(model_dir), trainable_parts=["connector", "language_model"], group_size=4,
                        rollout=HFRolloutEngine(max_new_tokens=12), rewards=[AccuracyReward(), TextLengthReward()],
                        reward_weights=[0.8, 1.0], lr=1e-3)
    before, _ = load_vlm(model_dir)
    seen = DevicesSeen()
    _trainer(tmp_path, 2, seen).fit(module, datamodule=_data(data_dir, model_dir, "rl"))

    assert seen.devices == {"cuda"}
    parts = part_modules(module.policy)
    trainable = {id(p) for name in ("connector", "language_model") for m in parts[name] for p in m.parameters()}
    after = dict(module.policy.named_parameters())
    for name, p0 in before.named_parameters():
        moved = not torch.equal(p0, after[name].detach().float().cpu())
        assert moved == (id(after[name]) in trainable), f"{family}: {name} moved={moved}"


def test_sft_fit_on_cuda_bf16_lowers_the_loss(tiny_model_dir, data_dir, tmp_path):
    model_dir = tiny_model_dir("internvl")
    module = SFTModule(model_path=str(model_dir), lr=3e-3, warmup_ratio=0.0)
    losses: list[float] = []
    trainer = _trainer(tmp_path, 12)
    module.log = lambda name, value, *a, **k: losses.append(float(value.detach())) if name == "train/loss" else None
    trainer.fit(module, datamodule=_data(data_dir, model_dir, "sft"))
    assert all(math.isfinite(v) for v in losses) and len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_token_logprobs_agree_between_cpu_and_cuda(family, tiny_model_dir, data_dir):
    """The update's log-probs on the GPU (fp32) match the CPU's: the same model, the same tokens."""
    model_dir = tiny_model_dir(family)
    data = _data(data_dir, model_dir, "rl")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model, _ = load_vlm(model_dir)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    response = torch.randint(10, 200, (batch.input_ids.shape[0], 9), generator=gen)
    mask = torch.ones_like(response)
    out = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        b = batch.to(torch.device(device))
        with torch.no_grad():
            h = response_hidden(model, b, response.to(device), mask.to(device), g=1)
            out[device] = token_logprobs(model, h, response.to(device))[0].float().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], atol=2e-3, rtol=1e-3)
