"""Exact resume and safe checkpoints, with real `python -m app fit` subprocesses and real signals.

* SIGKILL at a random step, then `--ckpt_path last`: from the checkpoint on, the resumed run serves the same prompt
  ids, samples the same responses and gets the same rewards and losses (1e-6) as an uninterrupted run.
* SIGTERM: the step in progress finishes, `last.ckpt` is saved, the process exits with status 0, and resuming from
  that checkpoint again matches the uninterrupted run.
* A kill in the middle of a checkpoint save leaves the previous `last.ckpt` intact and loadable.

Runs use the real tiny config (configs/tiny/grpo.yaml) with an overlay: deterministic algorithms, a fixed seed,
batch 2 x group 2, 10 new tokens, 8 steps, validation every 3 steps (its sampling must not move the training
sampler), a checkpoint every step, and a `RunJournal` of every step. Set R1V_RESUME_KILL_STEP to pin the step.
"""

from __future__ import annotations

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

from app.make_data import write_dataset
from callbacks.fault_tolerance import read_journal

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 8
TIMEOUT_S = 300
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("resume-data")
    write_dataset(data, n_train=64, n_val=8, quiet=True)
    return tiny_model_dir("internvl"), data


def _overlay(run: Path, model: Path, data: Path, every_n_train_steps: int) -> Path:
    text = f"""
    seed_everything: 0
    trainer:
      max_steps: {MAX_STEPS}
      deterministic: true
      val_check_interval: 3
      limit_val_batches: 1
      num_sanity_val_steps: 1
      enable_progress_bar: false
      default_root_dir: {run}
      logger:
        class_path: lightning.pytorch.loggers.CSVLogger
        init_args: {{save_dir: {run}, name: logs}}
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {{dirpath: {run / "ckpt"}, save_last: true, every_n_train_steps: {every_n_train_steps},
                       save_top_k: 0}}
        - class_path: callbacks.fault_tolerance.RunJournal
          init_args: {{path: {run / "journal.jsonl"}, texts: true}}
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
      val_limit: 2
    """
    run.mkdir(parents=True, exist_ok=True)
    path = run / "overlay.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _start(run: Path, assets, *extra: str, every_n_train_steps: int = 1) -> subprocess.Popen:
    model, data = assets
    overlay = _overlay(run, model, data, every_n_train_steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--config", str(overlay), *extra]
    log = (run / f"log-{len(list(run.glob('log-*')))}.txt").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, run: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run in {run} timed out; log:\n{_logs(run)}")


def _logs(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(run.glob("log-*.txt")))


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    journal = run / "journal.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if journal.exists() and max(read_journal(journal), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before step {step}; log:\n{_logs(run)}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {TIMEOUT_S}s; log:\n{_logs(run)}")


def _ckpt_step(path: Path) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # also proves the file is whole and safe
    return int(ckpt["global_step"])


def _assert_same_steps(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    for step in steps:
        g, w = got[step], want[step]
        assert g["ids"] == w["ids"], f"step {step}: served {g['ids']} != {w['ids']}"
        assert g["texts"] == w["texts"], f"step {step}: sampled responses differ"
        flat = [[r for row in rec["rewards"] for r in row] for rec in (g, w)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-6), f"step {step}: rewards differ"
        assert g["losses"] == pytest.approx(w["losses"], abs=1e-6), f"step {step}: losses differ"


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted run's journal."""
    run = tmp_path_factory.mktemp("reference")
    proc = _start(run, assets)
    assert _finish(proc, run) == 0, _logs(run)
    journal = read_journal(run / "journal.jsonl")
    assert sorted(journal) == list(range(1, MAX_STEPS + 1))
    assert any(abs(x) > 1e-6 for rec in journal.values() for x in rec["losses"]), "losses are all zero"
    assert len({r for rec in journal.values() for row in rec["rewards"] for r in row}) > 1, "rewards constant"
    return journal


def test_sigkill_at_random_step_then_resume_matches_uninterrupted_run(assets, reference, tmp_path):
    kill_step = int(os.environ.get("R1V_RESUME_KILL_STEP", random.randint(2, MAX_STEPS - 2)))
    delay = random.uniform(0.0, 0.5)  # sometimes during the checkpoint save that follows the journal line
    print(f"SIGKILL after step {kill_step} (+{delay:.2f}s); pin with R1V_RESUME_KILL_STEP={kill_step}")
    proc = _start(tmp_path, assets)
    _wait_for_step(proc, tmp_path, kill_step)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    killed = read_journal(tmp_path / "journal.jsonl")
    _assert_same_steps(killed, reference, range(1, kill_step + 1))  # same until the kill, too
    resumed_from = _ckpt_step(tmp_path / "ckpt" / "last.ckpt")
    assert 1 <= resumed_from <= max(killed)

    (tmp_path / "journal.jsonl").rename(tmp_path / "journal-killed.jsonl")
    proc = _start(tmp_path, assets, "--ckpt_path", "last")
    assert _finish(proc, tmp_path) == 0, _logs(tmp_path)
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert '"resumed": true' in lines[0] and f'"step": {resumed_from}' in lines[0], lines[0]
    resumed = read_journal(tmp_path / "journal.jsonl")
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))
    _assert_same_steps(resumed, reference, range(resumed_from + 1, MAX_STEPS + 1))


@pytest.mark.parametrize("after_step, where", [(3, "after validation"), (4, "end of the training step")],
                         ids=["during-validation", "during-training-step"])
def test_sigterm_saves_last_checkpoint_exits_cleanly_and_resumes_exactly(assets, reference, tmp_path, after_step,
                                                                           where):
    # ModelCheckpoint would only save at step 100: the checkpoint found afterwards is the SIGTERM one.
    # Validation runs right after step 3, so a signal sent when step 3 is journaled arrives during it; after step 4
    # it arrives during the training step 5.
    proc = _start(tmp_path, assets, every_n_train_steps=100)
    _wait_for_step(proc, tmp_path, after_step)
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, tmp_path)
    log = _logs(tmp_path)
    assert rc == 0, log
    assert "Traceback" not in log, log
    assert "SIGTERM: saved" in log, log
    print(f"SIGTERM after step {after_step}: " + next(x for x in log.splitlines() if "SIGTERM: saved" in x))

    stopped = read_journal(tmp_path / "journal.jsonl")
    last = max(stopped)
    assert after_step <= last <= after_step + 1, "the run should stop right after the step in progress"
    if last > after_step:
        assert where in log
    assert _ckpt_step(tmp_path / "ckpt" / "last.ckpt") == last  # the step in progress finished and was saved

    (tmp_path / "journal.jsonl").rename(tmp_path / "journal-stopped.jsonl")
    proc = _start(tmp_path, assets, "--ckpt_path", "last", every_n_train_steps=100)
    assert _finish(proc, tmp_path) == 0, _logs(tmp_path)
    resumed = read_journal(tmp_path / "journal.jsonl")
    assert sorted(resumed) == list(range(last + 1, MAX_STEPS + 1))
    _assert_same_steps(resumed, reference, range(last + 1, MAX_STEPS + 1))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]  # one `last`, no last-v1


@pytest.fixture(scope="module")
def multi_file(tmp_path_factory, tiny_model_dir):
    """Four 16-row training shards: rows are read lazily from several files, in DataLoader workers."""
    data = tmp_path_factory.mktemp("resume-multi-data")
    write_dataset(data, n_train=64, n_val=8, quiet=True, shard_size=16)
    assert len(list(data.glob("train-*.parquet"))) == 4
    return tiny_model_dir("internvl"), data


def test_sigkill_then_resume_on_multi_file_data_with_two_workers(multi_file, tmp_path):
    workers = ("--data.num_workers", "2")  # rows read and images decoded in two workers, which fetch ahead
    ref = tmp_path / "reference"
    assert _finish(_start(ref, multi_file, *workers), ref) == 0, _logs(ref)
    want = read_journal(ref / "journal.jsonl")
    assert sorted(want) == list(range(1, MAX_STEPS + 1))

    run = tmp_path / "killed"
    kill_step = int(os.environ.get("R1V_RESUME_KILL_STEP", random.randint(2, MAX_STEPS - 2)))
    print(f"SIGKILL after step {kill_step}; pin with R1V_RESUME_KILL_STEP={kill_step}")
    proc = _start(run, multi_file, *workers)
    _wait_for_step(proc, run, kill_step)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    resumed_from = _ckpt_step(run / "ckpt" / "last.ckpt")
    (run / "journal.jsonl").rename(run / "journal-killed.jsonl")
    assert _finish(_start(run, multi_file, *workers, "--ckpt_path", "last"), run) == 0, _logs(run)
    resumed = read_journal(run / "journal.jsonl")
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))
    _assert_same_steps(resumed, want, range(resumed_from + 1, MAX_STEPS + 1))


KILL_DURING_SAVE = r"""
import os, signal, sys, torch
from callbacks.fault_tolerance import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
real_save = torch.save
def save_then_die(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the new bytes are on disk, not yet renamed over `path`
torch.save = save_then_die
io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
"""


def test_kill_during_checkpoint_save_keeps_previous_last(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _ckpt_step(path) == 1  # the previous checkpoint, whole
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in leftovers), leftovers

    # `--ckpt_path last` never picks the leftover, and the next save cleans it up
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer import Trainer

    from callbacks.fault_tolerance import AtomicCheckpointIO

    mc = ModelCheckpoint(dirpath=path.parent)
    assert mc._find_last_checkpoints(Trainer(logger=False, enable_progress_bar=False)) == {str(path)}
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert _ckpt_step(path) == 3
