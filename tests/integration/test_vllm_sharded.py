"""GRPO sharded with FSDP2 over 2 CPU processes, each rank sampling with its own real vLLM engine (tier `vllm`).

`python -m app fit --config configs/tiny/grpo.yaml --config configs/scale/fsdp2.yaml --trainer.devices 2` with the
vLLM engine selected on the command line: before each rollout every rank gathers the policy's DTensor shards one
full tensor at a time (`push_stream`) and writes them into its engine (`push_weights` -> `reload_weights`). In fp32
the sampler's log-probs then equal the trainer's (`rollout/logprob_diff`, the mean over both ranks, < 1e-3) at every
step, the steps after optimiser updates included. The same run with an engine that drops the sync (the weights
reach vLLM only once, before the first step) shows a gap far above that: the check can fail.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.vllm_support import SKIP_REASON, SYNC_TOLERANCE

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason=SKIP_REASON)

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
TIMEOUT_S = 900
ENGINE = "modules.vllm_engine.VLLMRolloutEngine"
NO_SYNC_ENGINE = "tests.integration.fault_helpers.NoSyncVLLMEngine"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT)}


def _overlay(run: Path, model: Path, data: Path) -> Path:
    text = f"""
    seed_everything: 0
    trainer:
      devices: 2
      max_steps: {STEPS}
      limit_val_batches: 0
      enable_progress_bar: false
      enable_checkpointing: false
      default_root_dir: {run}
      logger:
        class_path: lightning.pytorch.loggers.CSVLogger
        init_args: {{save_dir: {run}, name: logs}}
      callbacks: []
    model:
      init_args:
        model_path: {model}
        group_size: 4
        rewards:
          - class_path: modules.rewards.FormatReward
          - class_path: tests.integration.fault_helpers.OddLengthReward
        reward_weights: [0.2, 1.0]
        lr: 1.0e-3
    data:
      train_files: {data}/train-*.parquet
      val_files: {data}/validation-*.parquet
      batch_size: 1
      train_limit: 8
      val_limit: 2
    """
    path = run / "overlay.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _start(run: Path, model: Path, data: Path, engine: str) -> tuple[subprocess.Popen, Path]:
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--config", str(ROOT / "configs/scale/fsdp2.yaml"), "--config", str(_overlay(run, model, data)),
           "--model.init_args.rollout.class_path", engine,
           "--model.init_args.rollout.init_args.dtype", "float32",
           "--model.init_args.rollout.init_args.kv_cache_gb", "0.125",
           "--model.init_args.rollout.init_args.max_model_len", "512",
           "--model.init_args.rollout.init_args.max_new_tokens", "8",
           "--model.init_args.rollout.init_args.engine_kwargs", "{enforce_eager: true}"]
    log = run / "log.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def _gaps(run: Path) -> dict[int, float]:
    gaps: dict[int, float] = {}
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("rollout/logprob_diff"):
                    gaps[int(row["step"])] = float(row["rollout/logprob_diff"])
    return gaps


def _pushes(log: Path) -> dict[str, int]:
    """vLLM weight reloads per process (vLLM prefixes its log lines with the pid): one engine per rank."""
    pids = re.findall(r"pid=(\d+)\).*Reloading and processing weights took", log.read_text(errors="replace"))
    return {pid: pids.count(pid) for pid in set(pids)}


def test_sharded_fit_pushes_gathered_weights_to_each_ranks_vllm(tmp_path, tiny_model_dir):
    from app.make_data import write_dataset

    model, data = tiny_model_dir("internvl"), tmp_path / "data"
    write_dataset(data, n_train=8, n_val=2, quiet=True)
    # both fits at once (independent runs; 4 processes, each with its own vLLM engine)
    runs = {name: _start(tmp_path / name, model, data, engine)
            for name, engine in (("synced", ENGINE), ("no_sync", NO_SYNC_ENGINE))}
    for name, (proc, log) in runs.items():
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, f"{name}: " + log.read_text(errors="replace")[-6000:]

    synced, broken = _gaps(tmp_path / "synced"), _gaps(tmp_path / "no_sync")
    for name, gaps in (("synced", synced), ("no_sync", broken)):
        print(f"\n{name}: rollout/logprob_diff by step " + ", ".join(f"{s}: {g:.2e}" for s, g in sorted(gaps.items())))
    # scalars sit at global_step after the optimiser step: step s was sampled after s - 1 updates
    assert sorted(synced) == sorted(broken) == list(range(1, STEPS + 1)), (synced, broken)
    # both ranks' engines took a push before every rollout (the no-sync engine only before the first)
    assert sorted(_pushes(runs["synced"][1]).values()) == [STEPS, STEPS]
    assert sorted(_pushes(runs["no_sync"][1]).values()) == [1, 1]
    # every step samples from the weights gathered from the shards: model_path's first, then the updated ones
    assert all(g < SYNC_TOLERANCE for g in synced.values()), synced
    # without the sync, the first step still matches (the push after set-up), the later ones sample stale weights
    assert broken[1] < SYNC_TOLERANCE, broken
    assert all(broken[s] > 10 * SYNC_TOLERANCE for s in range(2, STEPS + 1)), broken
