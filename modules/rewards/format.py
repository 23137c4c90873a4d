"""Format reward: did the response think, close its thinking once, and box exactly one short answer?"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modules.answer import THINK_CLOSE, THINK_OPEN, count_boxed, last_boxed, split_thinking
from modules.rewards.base import Reward


class FormatReward(Reward):
    """1.0 for ``[<think>] reasoning </think> answer-with-one-\\boxed{}``, else 0.0.

    Rules: the reasoning is non-empty; ``</think>`` occurs exactly once; ``<think>`` occurs at most once and
    only as the (optional, usually pre-filled) prefix, so a second thinking block after the close fails; the
    answer part holds exactly one ``\\boxed{...}``, balanced and non-empty, and is at most ``max_answer_chars`` long
    (no essay after the box).

    Args:
        max_answer_chars: longest accepted answer part (text after ``</think>``, stripped).

    >>> FormatReward()(["plan</think> So \\\\boxed{4}.", "no close \\\\boxed{4}"], [{}, {}])
    [1.0, 0.0]
    """

    name = "format"

    def __init__(self, max_answer_chars: int = 300) -> None:
        super().__init__()
        if max_answer_chars < 1:
            raise ValueError("max_answer_chars (--format.max_answer_chars) must be >= 1")
        self.max_answer_chars = max_answer_chars

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        """Format score of one response; the record is unused."""
        if not isinstance(response, str) or response.count(THINK_CLOSE) != 1:
            return 0.0
        if response.count(THINK_OPEN) > (1 if response.lstrip().startswith(THINK_OPEN) else 0):
            return 0.0
        reasoning, answer = split_thinking(response)
        if not reasoning or not reasoning.strip() or answer is None:
            return 0.0
        answer = answer.strip()
        if len(answer) > self.max_answer_chars or count_boxed(answer) != 1:
            return 0.0
        boxed = last_boxed(answer)
        return 1.0 if boxed is not None and boxed.strip() else 0.0
