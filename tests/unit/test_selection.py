"""Checkpoint selection policy (callbacks/selection.py) on handcrafted tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from callbacks.selection import STATUSES, CheckpointCandidate, select_checkpoint, write_selection_json

NAN = math.nan


def _cand(step: int, crit: float, acc: float, mean: float | None = None) -> CheckpointCandidate:
    return CheckpointCandidate(
        path=f"ckpt/step={step}.ckpt", step=step, critical_entropy=crit, val_accuracy=acc, mean_entropy=mean
    )


# step, critical entropy, val accuracy, mean entropy        -> expected status, and why
TABLE = [
    _cand(10, 1.0, 0.600, 0.80),  # below: best stable acc 0.73 (step 60) - 0.02 = 0.71 > 0.60
    _cand(20, 1.2, 0.700, 0.70),  # below: 0.70 < 0.71
    _cand(30, 1.1, 0.715, 0.60),  # lower_entropy: eligible, 1.1 < 1.3
    _cand(40, 2.0, 0.800, 0.60),  # spike: median(1.0, 1.2, 1.1) = 1.1, 1.5 x 1.1 = 1.65 < 2.0
    _cand(50, 1.3, 0.720, 0.60),  # picked: median(1.0, 1.2, 1.1, 2.0) = 1.15 -> limit 1.725, no spike
    _cand(60, NAN, 0.730, 0.55),  # no_entropy (but its accuracy sets the bar: it is not a spike)
    _cand(70, 1.5, 0.690, 1.20),  # spike on mean entropy: median(0.7, 0.6, 0.6, 0.6, 0.55) = 0.6 -> 0.9
    _cand(80, 1.4, 0.700, None),  # below: 0.70 < 0.71 (critical: median(1.1, 2.0, 1.3, 1.5) = 1.4 -> 2.1)
]
EXPECTED = {
    10: "below_accuracy_tolerance",
    20: "below_accuracy_tolerance",
    30: "lower_entropy",
    40: "spike",
    50: "picked",
    60: "no_entropy",
    70: "spike",
    80: "below_accuracy_tolerance",
}


def test_handcrafted_table() -> None:
    picked, report = select_checkpoint(TABLE)
    assert picked is not None and picked.step == 50
    assert [row["step"] for row in report] == sorted(EXPECTED)
    assert {row["step"]: row["status"] for row in report} == EXPECTED
    assert all(row["status"] in STATUSES and row["reason"] for row in report)
    # the spiking step 40 has the best accuracy (0.80) but does not set the accuracy floor
    assert report[0]["accuracy_floor"] == pytest.approx(0.71)
    by_step = {row["step"]: row for row in report}
    assert "critical_entropy 2 > 1.5 x median 1.1" in by_step[40]["reason"]
    assert "mean_entropy 1.2 > 1.5 x median 0.6" in by_step[70]["reason"]
    assert by_step[50]["critical_entropy"] == 1.3 and by_step[50]["path"] == "ckpt/step=50.ckpt"


def test_order_of_input_does_not_matter() -> None:
    picked, report = select_checkpoint(list(reversed(TABLE)))
    assert picked is not None and picked.step == 50
    assert {row["step"]: row["status"] for row in report} == EXPECTED


def test_tolerance_widens_the_pool() -> None:
    # tolerance 0.15: floor = 0.73 - 0.15 = 0.58, so steps 10..80 minus spikes/NaN are eligible;
    # highest critical entropy among them is step 80 (1.4)
    picked, report = select_checkpoint(TABLE, acc_tolerance=0.15)
    assert picked is not None and picked.step == 80
    # tolerance 0: only the best accuracy qualifies, and that one (step 60) has no entropy
    picked, _ = select_checkpoint(TABLE, acc_tolerance=0.0)
    assert picked is None


def test_spike_window_and_factor() -> None:
    cands = [_cand(1, 1.0, 0.5), _cand(2, 3.0, 0.5), _cand(3, 4.0, 0.5)]
    # window 1: step 2 vs median(1.0) -> 3.0 > 1.5 spike; step 3 vs median(3.0) -> 4.0 < 4.5 fine
    _, report = select_checkpoint(cands, spike_window=1)
    assert [r["status"] for r in report] == ["lower_entropy", "spike", "picked"]
    # window 2: step 3 vs median(1.0, 3.0) = 2.0 -> 4.0 > 3.0 spike, so step 1 is the only stable one
    picked, report = select_checkpoint(cands, spike_window=2)
    assert [r["status"] for r in report] == ["picked", "spike", "spike"]
    assert picked is not None and picked.step == 1
    # a huge factor disables spike detection
    picked, _ = select_checkpoint(cands, spike_factor=100.0)
    assert picked is not None and picked.step == 3


def test_ties_prefer_accuracy_then_later_step() -> None:
    picked, report = select_checkpoint([_cand(1, 1.0, 0.60), _cand(2, 1.0, 0.61), _cand(3, 0.9, 0.61)])
    assert picked is not None and picked.step == 2  # equal entropy, higher accuracy
    picked, _ = select_checkpoint([_cand(5, 1.0, 0.6), _cand(2, 1.0, 0.6), _cand(9, 1.0, 0.6)])
    assert picked is not None and picked.step == 9  # equal entropy and accuracy, later step


def test_nothing_to_pick() -> None:
    assert select_checkpoint([]) == (None, [])
    picked, report = select_checkpoint([_cand(1, NAN, 0.9), _cand(2, NAN, 0.8)])
    assert picked is None
    assert [r["status"] for r in report] == ["no_entropy", "no_entropy"]
    # NaN accuracy never passes the accuracy floor
    picked, report = select_checkpoint([_cand(1, 1.0, NAN), _cand(2, 0.9, 0.5)])
    assert picked is not None and picked.step == 2
    assert report[0]["status"] == "below_accuracy_tolerance"


def test_nan_entropy_is_ignored_in_the_running_median() -> None:
    # step 3's history is (1.0, NaN): median 1.0, limit 1.5 -> 1.6 spikes
    _, report = select_checkpoint([_cand(1, 1.0, 0.5), _cand(2, NAN, 0.5), _cand(3, 1.6, 0.5)])
    assert [r["status"] for r in report] == ["picked", "no_entropy", "spike"]


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="acc_tolerance"):
        select_checkpoint(TABLE, acc_tolerance=-0.1)
    with pytest.raises(ValueError, match="spike_factor"):
        select_checkpoint(TABLE, spike_factor=0.0)
    with pytest.raises(ValueError, match="spike_window"):
        select_checkpoint(TABLE, spike_window=0)


def test_write_selection_json(tmp_path: Path) -> None:
    picked, report = select_checkpoint(TABLE)
    out = write_selection_json(tmp_path / "sel" / "selection.json", picked, report)
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["picked"]["step"] == 50
    assert data["candidates"][5]["critical_entropy"] is None  # NaN -> null
    assert [c["status"] for c in data["candidates"]] == [EXPECTED[s] for s in sorted(EXPECTED)]
    empty = write_selection_json(tmp_path / "none.json", None, [])
    assert json.loads(empty.read_text()) == {"picked": None, "candidates": []}
