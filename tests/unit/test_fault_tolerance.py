"""Unit checks of callbacks/fault_tolerance.py (the end-to-end ones with real signals are in
tests/integration/test_resume.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.fault_tolerance import AtomicCheckpointIO, SafeModelCheckpoint, atomic_write, read_journal


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")

    def broken(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "epoch=0-step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.arange(3)}, path)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_safe_model_checkpoint_swaps_the_last_link(tmp_path: Path) -> None:
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))
    a, b, last = tmp_path / "step=1.ckpt", tmp_path / "step=2.ckpt", tmp_path / "last.ckpt"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    SafeModelCheckpoint._link_checkpoint(trainer, str(a), str(last))
    assert last.is_symlink() and last.read_bytes() == b"1"
    SafeModelCheckpoint._link_checkpoint(trainer, str(b), str(last))
    assert last.is_symlink() and last.read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]


def test_read_journal_keeps_the_last_record_of_each_step(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "start", "step": 0, "resumed": false}\n'
                    '{"step": 1, "ids": ["a"], "rewards": [[0.0]], "losses": [0.1]}\n'
                    '{"event": "start", "step": 0, "resumed": true}\n'
                    '{"step": 1, "ids": ["b"], "rewards": [[1.0]], "losses": [0.2]}\n\n')
    journal = read_journal(path)
    assert list(journal) == [1] and journal[1]["ids"] == ["b"]
