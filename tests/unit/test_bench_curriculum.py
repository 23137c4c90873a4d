"""`bench.curriculum`'s data: the demo's tasks at every level, made when missing; data without hard levels refused."""

from __future__ import annotations

import json

import pytest

from app.make_data import write_dataset
from bench.curriculum import ensure_data


def test_missing_data_is_made_with_normal_and_hard_levels_of_the_demos_tasks(tmp_path):
    from app.demo import DEMO_TASKS

    ensure_data(tmp_path / "d", n_train=30, n_val=15)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["difficulties"] == [1, 2, 3, 4, 5] and meta["tasks"] == list(DEMO_TASKS)
    written = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "d").iterdir()}
    ensure_data(tmp_path / "d", n_train=30, n_val=15)  # present and usable: kept as it is
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "d").iterdir()} == written


def test_data_without_hard_levels_is_refused_naming_the_folder(tmp_path):
    write_dataset(tmp_path / "demo", n_train=9, n_val=9, tasks=("count",), difficulties=(1, 2, 3), quiet=True)
    with pytest.raises(SystemExit, match=r"--data .*demo: made with difficulty levels \['1', '2', '3'\]"):
        ensure_data(tmp_path / "demo")
