"""The reward contract: a named, total callable from (responses, records) to one float per response.

A record is the scoring view of a prompt (``PromptRecord.scoring_view()``): ``answer`` (str), ``options``
(list[str], empty for open questions) and ``question_type`` ("multiple-choice" | "open").
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class Reward(ABC):
    """Base class of every reward. Subclasses set ``name`` and implement ``score_one``.

    Calling a reward is total: a response whose scoring raises, or returns a non-finite value, scores 0.0
    and is counted in ``self.errors`` (the first error of each instance is logged). The only exception is a
    caller bug: ``responses`` and ``records`` of different lengths raise ``ValueError``.
    """

    name: str = ""

    def __init__(self) -> None:
        self.errors = 0

    @abstractmethod
    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        """Score one response against its record (may raise; ``__call__`` turns that into 0.0)."""

    def __call__(self, responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        """Score a batch: one float per response, in order."""
        if len(responses) != len(records):
            raise ValueError(f"{self.name}: {len(responses)} responses but {len(records)} records")
        return [
            self._safe_score(response, record) for response, record in zip(responses, records, strict=True)
        ]

    def _safe_score(self, response: str, record: Mapping[str, Any]) -> float:
        try:
            value = float(self.score_one(response, record))
            if not math.isfinite(value):
                raise ValueError(f"non-finite reward {value}")
            return value
        except Exception as err:  # noqa: BLE001 - totality is the contract
            if getattr(self, "errors", 0) == 0:
                log.warning("reward %s failed on one response (scored 0.0): %r", self.name, err)
            self.errors = getattr(self, "errors", 0) + 1
            return 0.0

    def pop_metrics(self) -> dict[str, float]:
        """Diagnostics gathered since the last call (``reward/...``, ``time/...``), then reset; none by default."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class WeightedRewards:
    """A weighted sum of rewards that also returns every component, for ``rewards/<name>`` logging.

    Args:
        rewards: the reward objects (names must be unique).
        weights: one finite weight per reward, in the same order.

    ``score`` returns ``(total [N], {name: component [N]})`` as float32 CPU tensors.
    """

    def __init__(self, rewards: list[Reward], weights: list[float]) -> None:
        if len(rewards) == 0 or len(rewards) != len(weights):
            raise ValueError(f"need one weight per reward: {len(rewards)} rewards, {len(weights)} weights")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"reward names must be unique and non-empty, got {names}")
        if not all(math.isfinite(float(w)) for w in weights):
            raise ValueError(f"reward weights must be finite, got {weights}")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]

    def score(
        self, responses: Sequence[str], records: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score N responses: total [N] = sum_i weight_i * component_i [N]."""
        components = {r.name: torch.tensor(r(responses, records), dtype=torch.float32) for r in self.rewards}
        total = torch.zeros(len(responses), dtype=torch.float32)  # [N]
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            total = total + weight * components[reward.name]  # [N]
        return total, components

    def pop_metrics(self) -> dict[str, float]:
        """Every reward's ``pop_metrics`` merged (names are ``reward/...`` or ``time/...``)."""
        out: dict[str, float] = {}
        for reward in self.rewards:
            pop = getattr(reward, "pop_metrics", None)
            out.update(pop() if callable(pop) else {})
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{w}*{r.name}" for r, w in zip(self.rewards, self.weights, strict=True))
        return f"WeightedRewards({parts})"
