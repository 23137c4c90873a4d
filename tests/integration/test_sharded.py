"""FSDP2 sharding (Lightning's ModelParallelStrategy, 2 gloo CPU processes) equals one process.

GRPO steps on the same prompts (tests/integration/sharded_steps.py), once on one process and once sharded over two:
the logged loss, global grad norm (clipped at 0.5, so clipping acts) and reward agree, and so do the weights after
the steps, gathered from the shards. KL to a reference model is on, so the sharded reference model is exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    from app.make_data import write_dataset

    data = tmp_path_factory.mktemp("sharded-data")
    write_dataset(data, n_train=16, n_val=4, quiet=True)
    return tiny_model_dir("internvl"), data


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Both runs at once (they are independent): {world size: saved figures}."""
    model, data = assets
    out = tmp_path_factory.mktemp("sharded-runs")
    procs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "tests.integration.sharded_steps", str(model), str(data), str(out / f"{n}.pt"),
               "--devices", str(n), "--steps", str(STEPS), "--kl", "0.05"]
        procs[n] = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
    logs = {n: p.communicate(timeout=600)[0] for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, f"{n} process(es) failed:\n{logs[n][-4000:]}"
    figures = {n: torch.load(out / f"{n}.pt", weights_only=True) for n in procs}
    for n in procs:
        figures[n]["pushed"] = [torch.load(out / f"{n}.pt.pushed.rank{r}", weights_only=True) for r in range(n)]
    return figures


def test_two_processes_are_sharded(runs):
    assert runs[2]["world_size"] == 2 and runs[1]["world_size"] == 1
    assert runs[2]["sharded_params"] == len(runs[2]["weights"]) > 0  # every parameter is a DTensor
    assert runs[1]["sharded_params"] == 0


def test_logged_metrics_equal_one_process(runs):
    one, two = runs[1]["steps"], runs[2]["steps"]
    assert len(one) == len(two) == STEPS
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert a["train/grad_norm"] > 0.5, "clipping at 0.5 never acted: the test would not see per-rank clipping"
        for key in ("train/loss", "train/grad_norm", "train/rollout_entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), f"step {step}: {key}"
        for key in ("train/reward", "train/response_length", "train/response_length_max"):
            assert b[key] == a[key], f"step {step}: {key} (the same responses must be sampled)"


def test_updated_weights_equal_one_process(runs, assets):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    one, two = runs[1]["weights"], runs[2]["weights"]
    assert one.keys() == two.keys()
    start = AutoModelForImageTextToText.from_pretrained(assets[0]).state_dict()
    assert load_file(assets[0] / "model.safetensors")  # the folder is intact
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-3, "the steps did not move the weights"
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    off = sum(int(((one[k] - two[k]).abs() > 1e-6).sum()) for k in one) / sum(t.numel() for t in one.values())
    # AdamW moves each weight by ~lr per step whatever the gradient's size, so fp32 summation-order noise in a
    # near-zero gradient shows in a handful of weights: bounded at 1% of the update, and in under 0.1% of them
    assert worst < 0.01 * moved, (worst, moved)
    assert off < 1e-3, off


def test_vllm_push_gathers_full_tensors_from_shards(runs, assets):
    """The (name, tensor) stream VLLMRolloutEngine pushes: checkpoint names, full shapes, the same on both ranks,
    and the gathered weights (the one-process run's push within the same tolerance as the weights)."""
    from safetensors import safe_open

    with safe_open(str(assets[0] / "model.safetensors"), "pt") as f:  # the names vLLM loads the checkpoint from
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rank0, rank1 = runs[2]["pushed"]
    assert rank0.keys() == rank1.keys() == shapes.keys() == runs[1]["pushed"][0].keys()
    for name, t in rank0.items():
        assert type(t) is torch.Tensor and tuple(t.shape) == shapes[name], name  # full, not a shard
        assert torch.equal(t, rank1[name]), name
    one = runs[1]["pushed"][0]
    worst = max(float((one[k] - rank0[k]).abs().max()) for k in one)
    assert worst < 2e-5, worst


@pytest.mark.slow
def test_connector_only_sft_sharded_fit_trains_the_connector_only(assets, tmp_path):
    """Stage 3 under configs/scale/fsdp2.yaml on 2 processes: SFTModule shards with frozen parts inside the units
    (the inner model's unit holds the frozen embeddings and the trainable connector); the export changes the
    connector's weights and no other."""
    from safetensors.torch import load_file

    model, data = assets
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/connector.yaml"),
           "--config", str(ROOT / "configs/scale/fsdp2.yaml"), "--trainer.devices", "2", "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
           "--model.init_args.model_path", str(model), "--model.init_args.lr", "1e-3",
           "--model.init_args.warmup_ratio", "0", "--data.train_files", str(data / "train-*.parquet"),
           "--data.val_files", str(data / "validation-*.parquet"), "--data.batch_size", "1",
           "--data.val_batch_size", "1", "--data.val_limit", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, after = load_file(model / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed), sorted(changed)
