"""Exact resume and safe checkpoints: the README's commands, the shipped config, real subprocesses, real signals.

Each run works in its own folder laid out like a clone (`configs/`, `artifacts/tiny-vlm`, `artifacts/data`), so
the commands are the README's "Resuming" commands word for word (read from README.md), with the same flags
appended to both to shrink the run (batch 2 x group 2, 10 new tokens, 14 steps, validation every 4 steps) and
to add a `RunJournal` of every step. The shipped configs/tiny/grpo.yaml keeps its logger, its ModelCheckpoint
(every 10 steps, no `dirpath`) and its callbacks.

* SIGKILL at a random step after the config's first checkpoint, then `--ckpt_path last`: from the checkpoint on, the resumed
  run serves the same prompt ids, samples the same responses and gets the same rewards and losses (1e-6) as an
  uninterrupted run, and continues the same TensorBoard version (one curve, equal to the uninterrupted one's).
* SIGTERM (during validation, during a training step): the step in progress finishes, `last.ckpt` is saved, the
  process exits with status 0, and resuming with the README's command again matches the uninterrupted run.
* configs/tiny/sft.yaml (automatic optimization): SIGTERM, then the README's command (`grpo` -> `sft`): one
  TensorBoard version whose loss curve equals an uninterrupted run's. tests/unit/test_resume_layout.py checks every
  other shipped config and overlay for where `last` is found and where the resumed run writes.
* `--ckpt_path last` with nothing to resume is an error naming the folders searched.
* A kill in the middle of a checkpoint save leaves the previous `last.ckpt` intact and loadable.

Set R1V_RESUME_KILL_STEP to pin the SIGKILL step.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.make_data import write_dataset
from callbacks.fault_tolerance import read_journal

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 14
FIRST_CKPT = 10  # configs/tiny/grpo.yaml: ModelCheckpoint(every_n_train_steps=10)
TIMEOUT_S = 300
RUN_DIR = Path("runs/tiny/grpo")  # the config's default_root_dir and logger save_dir
VERSION0 = RUN_DIR / "version_0"
SHRINK = [
    "--trainer.max_steps", str(MAX_STEPS), "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.deterministic", "true",
    "--model.init_args.group_size", "2", "--model.init_args.rollout.init_args.max_new_tokens", "10",
    "--model.init_args.lr", "1e-3", "--model.init_args.entropy_coef", "0.01",
    "--model.init_args.rewards+=tests.integration.fault_helpers.OddLengthReward",
    "--model.init_args.reward_weights", "[0.8, 0.2, 1.0]",
    "--data.batch_size", "2", "--data.val_batch_size", "2", "--data.val_limit", "2",
    "--trainer.callbacks+=callbacks.fault_tolerance.RunJournal", "--trainer.callbacks.path", "journal.jsonl",
    "--trainer.callbacks.texts", "true",
]
pytestmark = pytest.mark.slow


def readme_commands() -> tuple[list[str], list[str]]:
    """The two commands of README.md's "Resume" block: the first run and the resumed one (after `python -m app`)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*Resume\.\*\*.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md: no **Resume.** section with a bash block"
    lines = [ln.split("#")[0].strip() for ln in block.group(1).splitlines()]
    cmds = [shlex.split(ln) for ln in lines if ln.startswith("python -m app fit")]
    assert len(cmds) == 2 and cmds[1] == [*cmds[0], "--ckpt_path", "last"], cmds
    return cmds[0][3:], cmds[1][3:]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("resume-data")
    write_dataset(data, n_train=64, n_val=8, quiet=True)
    return tiny_model_dir("internvl"), data


def _make_clone(work: Path, assets) -> Path:
    """A folder laid out like a clone after `make_tiny` and `make_data`: the README's relative paths work."""
    model, data = assets
    (work / "artifacts").mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "artifacts" / "tiny-vlm").symlink_to(model)
    (work / "artifacts" / "data").symlink_to(data)
    return work


@pytest.fixture
def clone(assets, tmp_path) -> Path:
    return _make_clone(tmp_path, assets)


def _start(work: Path, args: list[str], shrink: list[str] = SHRINK) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = (work / f"log-{len(list(work.glob('log-*')))}.txt").open("w")
    return subprocess.Popen([sys.executable, "-m", "app", *args, *shrink], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, work: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run in {work} timed out; log:\n{_logs(work)}")


def _logs(work: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(work.glob("log-*.txt")))


def _wait_for_step(proc: subprocess.Popen, work: Path, step: int) -> None:
    journal = work / "journal.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if journal.exists() and max(read_journal(journal), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before step {step}; log:\n{_logs(work)}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {TIMEOUT_S}s; log:\n{_logs(work)}")


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


def _curves(work: Path, run_dir: Path = RUN_DIR) -> dict[str, list[tuple[int, float]]]:
    """Every training scalar of the run's TensorBoard folder, as TensorBoard's own loader reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(p.name for p in (work / run_dir).glob("version_*"))
    assert versions == ["version_0"], f"one run must read as one TensorBoard version, got {versions}"
    acc = EventAccumulator(str(work / run_dir / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith("train/")}


def _assert_same_curves(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for tag in want:
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(set(steps)), f"{tag}: steps logged twice or out of order: {steps}"
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], abs=1e-6), tag


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> tuple[dict[int, dict], dict]:
    """The uninterrupted run's journal and TensorBoard curves."""
    work = _make_clone(tmp_path_factory.mktemp("reference"), assets)
    first, _ = readme_commands()
    proc = _start(work, first)
    assert _finish(proc, work) == 0, _logs(work)
    journal = read_journal(work / "journal.jsonl")
    assert sorted(journal) == list(range(1, MAX_STEPS + 1))
    assert any(abs(x) > 1e-6 for rec in journal.values() for x in rec["losses"]), "losses are all zero"
    assert len({r for rec in journal.values() for row in rec["rewards"] for r in row}) > 1, "rewards constant"
    return journal, _curves(work)


def test_sigkill_at_random_step_then_readme_command_resumes_like_uninterrupted_run(clone, reference):
    # after the config's first checkpoint (step 10) is on disk: the step-11 journal line comes after it
    kill_step = int(os.environ.get("R1V_RESUME_KILL_STEP", random.randint(FIRST_CKPT + 1, MAX_STEPS - 2)))
    delay = random.uniform(0.0, 0.5)
    print(f"SIGKILL after step {kill_step} (+{delay:.2f}s); pin with R1V_RESUME_KILL_STEP={kill_step}")
    first, resume = readme_commands()
    proc = _start(clone, first)
    _wait_for_step(proc, clone, kill_step)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    killed = read_journal(clone / "journal.jsonl")
    _assert_same_steps(killed, reference[0], range(1, kill_step + 1))  # same until the kill, too
    resumed_from = _ckpt_step(clone / VERSION0 / "checkpoints" / "last.ckpt")
    assert FIRST_CKPT <= resumed_from <= max(killed)

    (clone / "journal.jsonl").rename(clone / "journal-killed.jsonl")
    proc = _start(clone, resume)
    assert _finish(proc, clone) == 0, _logs(clone)
    assert f"resuming from {VERSION0 / 'checkpoints' / 'last.ckpt'}" in _logs(clone)
    lines = (clone / "journal.jsonl").read_text().splitlines()
    assert '"resumed": true' in lines[0] and f'"step": {resumed_from}' in lines[0], lines[0]
    resumed = read_journal(clone / "journal.jsonl")
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))
    _assert_same_steps(resumed, reference[0], range(resumed_from + 1, MAX_STEPS + 1))
    _assert_same_curves(_curves(clone), reference[1])  # the steps logged twice were replaced, not repeated


@pytest.mark.parametrize("after_step, where", [(4, "after validation"), (5, "end of the training step")],
                         ids=["during-validation", "during-training-step"])
def test_sigterm_saves_last_exits_cleanly_and_readme_command_resumes_exactly(clone, reference, after_step, where):
    # Validation runs right after step 4, so a signal sent when step 4 is journaled arrives during it; after step 5
    # it arrives during the training step 6. The config's own checkpoints start at step 10: the one found
    # afterwards is the SIGTERM one.
    first, resume = readme_commands()
    proc = _start(clone, first)
    _wait_for_step(proc, clone, after_step)
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, clone)
    log = _logs(clone)
    assert rc == 0, log
    assert "Traceback" not in log, log
    assert "SIGTERM: saved" in log, log
    print(f"SIGTERM after step {after_step}: " + next(x for x in log.splitlines() if "SIGTERM: saved" in x))

    stopped = read_journal(clone / "journal.jsonl")
    last = max(stopped)
    assert after_step <= last <= after_step + 1, "the run should stop right after the step in progress"
    if last > after_step:
        assert where in log
    ckpts = clone / VERSION0 / "checkpoints"
    assert _ckpt_step(ckpts / "last.ckpt") == last  # the step in progress finished and was saved

    (clone / "journal.jsonl").rename(clone / "journal-stopped.jsonl")
    proc = _start(clone, resume)
    assert _finish(proc, clone) == 0, _logs(clone)
    resumed = read_journal(clone / "journal.jsonl")
    assert sorted(resumed) == list(range(last + 1, MAX_STEPS + 1))
    _assert_same_steps(resumed, reference[0], range(last + 1, MAX_STEPS + 1))
    assert sorted(p.name for p in ckpts.iterdir()) == [f"epoch=0-step={FIRST_CKPT}.ckpt", "last.ckpt"]  # no last-v1
    _assert_same_curves(_curves(clone), reference[1])


SFT_RUN_DIR = Path("runs/tiny/sft")
SFT_SHRINK = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
              "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.deterministic", "true", "--data.batch_size", "2", "--data.val_batch_size", "2",
              "--data.val_limit", "2"]


def test_sft_config_sigterm_then_readme_command_continues_the_same_curve(assets, clone, tmp_path_factory):
    """configs/tiny/sft.yaml (automatic optimization, its own folders): SIGTERM after step 2, then the README's
    resume command; one TensorBoard version whose loss curve equals an uninterrupted run's."""
    first, resume = readme_commands()
    first, resume = [a.replace("grpo", "sft") for a in first], [a.replace("grpo", "sft") for a in resume]
    ref = _make_clone(tmp_path_factory.mktemp("sft-reference"), assets)
    assert _finish(_start(ref, first, SFT_SHRINK), ref) == 0, _logs(ref)

    proc = _start(clone, first, SFT_SHRINK)
    deadline = time.monotonic() + TIMEOUT_S
    while not any(len(v) >= 2 for v in (_curves(clone, SFT_RUN_DIR) if (clone / SFT_RUN_DIR / "version_0").exists()
                                           else {}).values()):  # flushed each step by ContinueCurves
        assert proc.poll() is None and time.monotonic() < deadline, _logs(clone)
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, clone) == 0, _logs(clone)
    stopped_at = _ckpt_step(clone / SFT_RUN_DIR / "version_0" / "checkpoints" / "last.ckpt")
    assert 2 <= stopped_at < 6, stopped_at

    assert _finish(_start(clone, resume, SFT_SHRINK), clone) == 0, _logs(clone)
    _assert_same_curves(_curves(clone, SFT_RUN_DIR), _curves(ref, SFT_RUN_DIR))


def test_ckpt_path_last_with_nothing_to_resume_is_an_error_naming_the_folders(clone):
    _, resume = readme_commands()
    proc = _start(clone, resume)
    assert _finish(proc, clone) == 2
    log = _logs(clone)
    assert "Traceback" not in log, log
    assert "no checkpoint to resume from" in log and str(RUN_DIR / "*" / "checkpoints") in log, log
    assert "leave out --ckpt_path" in log, log
    assert not (clone / RUN_DIR).exists()  # nothing started


@pytest.fixture(scope="module")
def multi_file(tmp_path_factory, tiny_model_dir):
    """Four 16-row training shards: rows are read lazily from several files, in DataLoader workers."""
    data = tmp_path_factory.mktemp("resume-multi-data")
    write_dataset(data, n_train=64, n_val=8, quiet=True, shard_size=16)
    assert len(list(data.glob("train-*.parquet"))) == 4
    return tiny_model_dir("internvl"), data


def test_sigkill_then_resume_on_multi_file_data_with_two_workers(multi_file, tmp_path):
    """The README's commands on four shards read lazily in two DataLoader workers (which fetch ahead)."""
    first, resume = readme_commands()
    shrink = [*SHRINK, "--data.num_workers", "2"]
    ref = _make_clone(_mkdir(tmp_path / "reference"), multi_file)
    assert _finish(_start(ref, first, shrink), ref) == 0, _logs(ref)
    want = read_journal(ref / "journal.jsonl")
    assert sorted(want) == list(range(1, MAX_STEPS + 1))

    run = _make_clone(_mkdir(tmp_path / "killed"), multi_file)
    kill_step = int(os.environ.get("R1V_RESUME_KILL_STEP", random.randint(FIRST_CKPT + 1, MAX_STEPS - 2)))
    print(f"SIGKILL after step {kill_step}; pin with R1V_RESUME_KILL_STEP={kill_step}")
    proc = _start(run, first, shrink)
    _wait_for_step(proc, run, kill_step)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    resumed_from = _ckpt_step(run / VERSION0 / "checkpoints" / "last.ckpt")
    (run / "journal.jsonl").rename(run / "journal-killed.jsonl")
    assert _finish(_start(run, resume, shrink), run) == 0, _logs(run)
    resumed = read_journal(run / "journal.jsonl")
    assert sorted(resumed) == list(range(resumed_from + 1, MAX_STEPS + 1))
    _assert_same_steps(resumed, want, range(resumed_from + 1, MAX_STEPS + 1))


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


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
    from app.resume import find_last
    from callbacks.fault_tolerance import AtomicCheckpointIO

    assert find_last([str(path.parent)]) == str(path)
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert _ckpt_step(path) == 3
