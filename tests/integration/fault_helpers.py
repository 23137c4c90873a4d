"""Helpers the fault-tolerance tests load into real `python -m app fit` subprocesses (by class_path)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modules.rewards import Reward


class OddLengthReward(Reward):
    """A reward a random-init model earns half the time (odd-length responses score 1), so GRPO advantages and
    losses are non-zero and depend on exactly which tokens were sampled."""

    name = "odd_length"

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        return float(len(response) % 2)
