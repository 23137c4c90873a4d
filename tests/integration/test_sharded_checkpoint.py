"""Sharded (FSDP2, 2 gloo processes) checkpoints with real `python -m app fit` runs (configs/scale/fsdp2.yaml).

* The uninterrupted run (activation checkpointing on, as in the overlay) writes sharded checkpoint folders;
  `ExportCallback`, `CheckpointSelectionCallback` and `python -m app.export` turn them into stock Hugging Face
  folders, which a fresh process loads with stock transformers, with the weights of the checkpoint they came from.
* SIGKILL after a random step, then `--ckpt_path last`: from the checkpoint on, both ranks serve the same prompts,
  sample the same responses and get the same rewards and losses (1e-6) as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from callbacks.fault_tolerance import read_journal

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
TIMEOUT_S = 420
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    from app.make_data import write_dataset

    data = tmp_path_factory.mktemp("sharded-ckpt-data")
    write_dataset(data, n_train=32, n_val=8, quiet=True)
    return tiny_model_dir("internvl"), data


def _overlay(run: Path, model: Path, data: Path) -> Path:
    text = f"""
    seed_everything: 0
    trainer:
      devices: 2
      max_steps: {MAX_STEPS}
      deterministic: true
      val_check_interval: 2
      limit_val_batches: 1
      num_sanity_val_steps: 0
      enable_progress_bar: false
      default_root_dir: {run}
      logger:
        class_path: lightning.pytorch.loggers.CSVLogger
        init_args: {{save_dir: {run}, name: logs}}
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {{dirpath: {run / "ckpt"}, save_last: true, every_n_train_steps: 1, save_top_k: -1}}
        - class_path: callbacks.fault_tolerance.RunJournal
          init_args: {{path: {run / "journal.jsonl"}, texts: true}}
        - class_path: callbacks.critical_entropy.CriticalEntropyCallback
          init_args: {{every_n_steps: 2, num_probe_prompts: 2, samples_per_prompt: 2, max_new_tokens: 8}}
        - class_path: callbacks.export.ExportCallback   # before the selection, which loads the picked weights
        - class_path: callbacks.checkpoint_selection.CheckpointSelectionCallback
          init_args: {{acc_tolerance: 1.0, entropy_key: entropy/all_tokens, mean_entropy_key: null}}  # random
                                        # tiny models rarely say a critical word: select on all tokens
    model:
      init_args:
        model_path: {model}
        group_size: 2
        rollout:
          class_path: modules.rollout.HFRolloutEngine
          init_args: {{max_new_tokens: 10}}
        rewards:
          - class_path: modules.rewards.AccuracyReward
          - class_path: modules.rewards.FormatReward
          - class_path: tests.integration.fault_helpers.OddLengthReward
        reward_weights: [0.8, 0.2, 1.0]
        entropy_coef: 0.01
        lr: 1.0e-3
    data:
      train_files: {data}/train-*.parquet
      val_files: {data}/validation-*.parquet
      batch_size: 2
      val_batch_size: 2
      val_limit: 4
    """
    run.mkdir(parents=True, exist_ok=True)
    path = run / "overlay.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _start(run: Path, assets, *extra: str) -> subprocess.Popen:
    overlay = _overlay(run, *assets)
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--config", str(ROOT / "configs/scale/fsdp2.yaml"), "--config", str(overlay), *extra]
    log = (run / f"log-{len(list(run.glob('log-*')))}.txt").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _logs(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(run.glob("log-*.txt")))


def _finish(proc: subprocess.Popen, run: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"run in {run} timed out; log:\n{_logs(run)}")


def _journals(run: Path) -> dict[int, dict[int, dict]]:
    """rank -> step -> record."""
    return {0: read_journal(run / "journal.jsonl"), 1: read_journal(run / "journal.jsonl.rank1")}


def _assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps: range, rank: int) -> None:
    for step in steps:
        g, w = got[step], want[step]
        assert g["ids"] == w["ids"], f"rank {rank} step {step}: served {g['ids']} != {w['ids']}"
        assert g["texts"] == w["texts"], f"rank {rank} step {step}: sampled responses differ"
        flat = [[r for row in rec["rewards"] for r in row] for rec in (g, w)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-6), f"rank {rank} step {step}: rewards differ"
        assert g["losses"] == pytest.approx(w["losses"], abs=1e-6), f"rank {rank} step {step}: losses differ"


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sharded-reference")
    assert _finish(_start(run, assets), run) == 0, _logs(run)
    return run


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights as stock transformers loads them, in a fresh process (no app code imported)."""
    out = folder.parent / f"{folder.name}-weights.pt"
    code = ("import sys, torch; from transformers import AutoModelForImageTextToText as A; "
            "torch.save(A.from_pretrained(sys.argv[1]).state_dict(), sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], cwd="/", capture_output=True,
                          text=True, timeout=300, env={**_env(), "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _app_export(ckpt: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "app.export", str(ckpt), str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_sharded_checkpoints_export_to_stock_hf_folders(reference, assets):
    run = reference
    journals = _journals(run)
    assert sorted(journals[0]) == sorted(journals[1]) == list(range(1, MAX_STEPS + 1))
    assert journals[0][1]["ids"] != journals[1][1]["ids"], "both ranks served the same prompts"
    last = run / "ckpt" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, "expected one shard file per rank"
    from modules.sharding import read_checkpoint

    assert read_checkpoint(last)["global_step"] == MAX_STEPS

    exported = _hf_weights(run / "export")  # ExportCallback, at fit end: the final weights
    _assert_same_weights(exported, _hf_weights(_app_export(last, run / "from-last")))
    start = _hf_weights(assets[0])
    assert any(not torch.equal(exported[k], start[k]) for k in start), "training did not change the export"

    selection = json.loads(next(run.glob("logs/*/selection.json")).read_text())
    assert selection["picked"] is not None, selection
    path = Path(selection["picked"]["path"])
    assert path.is_dir(), "a sharded run's candidate is a sharded checkpoint folder"
    _assert_same_weights(_hf_weights(run / "selected"), _hf_weights(_app_export(path, run / "from-picked")))


def test_sigkill_then_resume_matches_uninterrupted_sharded_run(assets, reference, tmp_path):
    kill_step = int(os.environ.get("R1V_RESUME_KILL_STEP", random.randint(2, MAX_STEPS - 1)))
    print(f"SIGKILL after step {kill_step}; pin with R1V_RESUME_KILL_STEP={kill_step}")
    want = _journals(reference)
    proc = _start(tmp_path, assets)
    deadline = time.monotonic() + TIMEOUT_S
    journal = tmp_path / "journal.jsonl"
    while not (journal.exists() and max(read_journal(journal), default=0) >= kill_step):
        assert proc.poll() is None, f"run exited before step {kill_step}:\n{_logs(tmp_path)}"
        assert time.monotonic() < deadline, f"step {kill_step} not reached:\n{_logs(tmp_path)}"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # sometimes during the checkpoint save that follows the journal line
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    from modules.sharding import read_checkpoint

    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_dir(), f"no whole last.ckpt after a kill at step {kill_step}: {sorted(last.parent.iterdir())}"
    resumed_from = int(read_checkpoint(last)["global_step"])
    assert 1 <= resumed_from <= kill_step + 1
    for name in ("journal.jsonl", "journal.jsonl.rank1"):
        (tmp_path / name).rename(tmp_path / f"killed-{name}")
    assert _finish(_start(tmp_path, assets, "--ckpt_path", "last"), tmp_path) == 0, _logs(tmp_path)
    got = _journals(tmp_path)
    for rank in (0, 1):
        assert sorted(got[rank]) == list(range(resumed_from + 1, MAX_STEPS + 1))
        _assert_same_steps(got[rank], want[rank], range(resumed_from + 1, MAX_STEPS + 1), rank)
