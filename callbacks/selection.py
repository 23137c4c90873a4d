"""Checkpoint selection by critical-token entropy (recipe.md section 3), as a pure policy.

R1V3 keeps checkpoints whose entropy at reasoning-initiation tokens ("Wait", "Alternatively", "Hmm") is
high and discards those that "follow the script". The paper gives no thresholds and no rule for
combining this with accuracy, so the policy here is ours (INTERPRETATION):

1. Refuse a checkpoint taken during an entropy spike: its critical (or mean) entropy exceeds
   ``spike_factor`` x the median of the previous ``spike_window`` checkpoints' values (ordered by step).
   Recipe section 5.4: a sharp entropy rise signals policy destabilisation, not healthy exploration.
2. Refuse a checkpoint without a critical-entropy figure (no critical word in its validation rollouts).
3. Keep checkpoints whose validation accuracy is within ``acc_tolerance`` of the best non-spike one.
4. Pick the highest critical entropy; ties go to higher accuracy, then to the later step.

Everything here is plain Python so the policy can be unit-tested and rerun offline on logged figures.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CheckpointCandidate", "select_checkpoint", "write_selection_json"]

STATUSES = ("picked", "spike", "no_entropy", "below_accuracy_tolerance", "lower_entropy")


@dataclass
class CheckpointCandidate:
    """One saved checkpoint and the validation figures measured for it.

    Attributes:
        path: checkpoint file or directory.
        step: global step at which it was saved.
        critical_entropy: mean entropy (nats) at critical tokens over validation rollouts; NaN if none.
        val_accuracy: validation accuracy in [0, 1].
        mean_entropy: mean entropy over all response tokens, used for spike detection when given.
    """

    path: str
    step: int
    critical_entropy: float
    val_accuracy: float
    mean_entropy: float | None = None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _spike_reason(
    ordered: list[CheckpointCandidate], i: int, spike_factor: float, spike_window: int
) -> str | None:
    """Why ``ordered[i]`` is a spike relative to the previous ``spike_window`` candidates, or None."""
    previous = ordered[max(0, i - spike_window) : i]
    for field in ("critical_entropy", "mean_entropy"):
        value = getattr(ordered[i], field)
        history = [getattr(c, field) for c in previous if _finite(getattr(c, field))]
        if not _finite(value) or not history:
            continue
        median = statistics.median(history)
        if value > spike_factor * median:
            return (
                f"{field} {value:.4g} > {spike_factor:g} x median {median:.4g} of the previous "
                f"{len(history)} checkpoint(s): entropy spike"
            )
    return None


def _row(c: CheckpointCandidate, status: str, reason: str, floor: float) -> dict[str, Any]:
    return {**asdict(c), "status": status, "reason": reason, "accuracy_floor": floor}


def select_checkpoint(
    cands: list[CheckpointCandidate],
    acc_tolerance: float = 0.02,
    spike_factor: float = 1.5,
    spike_window: int = 5,
) -> tuple[CheckpointCandidate | None, list[dict[str, Any]]]:
    """Pick the checkpoint with the highest critical-token entropy among near-best, stable ones.

    Args:
        cands: candidates in any order (they are sorted by step).
        acc_tolerance: keep candidates with ``val_accuracy >= best - acc_tolerance`` (absolute, e.g. 0.02
            = 2 points); ``best`` is over candidates not refused as spikes.
        spike_factor: a candidate whose critical or mean entropy exceeds this multiple of the running
            median is refused.
        spike_window: how many earlier checkpoints (by step) form the running median; the first
            checkpoint, which has no history, is never a spike.

    Returns:
        (picked candidate or None when nothing qualifies, one report dict per candidate in step order
        with the candidate's figures, ``status`` (one of ``STATUSES``), a human ``reason`` and the
        ``accuracy_floor`` used).
    """
    if acc_tolerance < 0:
        raise ValueError(f"acc_tolerance must be >= 0, got {acc_tolerance}")
    if spike_factor <= 0:
        raise ValueError(f"spike_factor must be > 0, got {spike_factor}")
    if spike_window < 1:
        raise ValueError(f"spike_window must be >= 1, got {spike_window}")
    ordered = sorted(cands, key=lambda c: c.step)
    spikes = {
        i: r for i in range(len(ordered)) if (r := _spike_reason(ordered, i, spike_factor, spike_window))
    }
    stable_acc = [
        c.val_accuracy for i, c in enumerate(ordered) if i not in spikes and _finite(c.val_accuracy)
    ]
    floor = max(stable_acc) - acc_tolerance if stable_acc else math.nan
    best_acc = floor + acc_tolerance

    rows: list[dict[str, Any]] = []
    eligible: list[int] = []
    for i, c in enumerate(ordered):
        if i in spikes:
            rows.append(_row(c, "spike", spikes[i], floor))
        elif not _finite(c.critical_entropy):
            rows.append(_row(c, "no_entropy", "no critical-entropy figure (no critical word found)", floor))
        elif not (_finite(c.val_accuracy) and c.val_accuracy >= floor):
            reason = f"val_accuracy {c.val_accuracy:.4g} < best {best_acc:.4g} - tolerance {acc_tolerance:g}"
            rows.append(_row(c, "below_accuracy_tolerance", reason, floor))
        else:
            rows.append(_row(c, "lower_entropy", "", floor))  # provisional; fixed below
            eligible.append(i)
    if not eligible:
        return None, rows

    pick = max(
        eligible, key=lambda i: (ordered[i].critical_entropy, ordered[i].val_accuracy, ordered[i].step)
    )
    winner = ordered[pick]
    for i in eligible:
        if i == pick:
            rows[i]["status"] = "picked"
            rows[i]["reason"] = (
                f"highest critical entropy {winner.critical_entropy:.4g} among {len(eligible)} candidate(s) "
                f"within {acc_tolerance:g} of the best accuracy {best_acc:.4g}"
            )
        else:
            rows[i]["reason"] = (
                f"critical entropy {ordered[i].critical_entropy:.4g} vs {winner.critical_entropy:.4g} "
                f"of step {winner.step} (ties: higher accuracy, then later step)"
            )
    return winner, rows


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None, recursively, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_selection_json(
    path: str | Path, picked: CheckpointCandidate | None, report: list[dict[str, Any]]
) -> Path:
    """Write ``{"picked": ..., "candidates": report}`` as strict JSON (NaN written as null).

    Args:
        path: output file; parent folders are created.
        picked: the chosen candidate, or None.
        report: the per-candidate rows from ``select_checkpoint``.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"picked": None if picked is None else asdict(picked), "candidates": report}
    out.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    return out
