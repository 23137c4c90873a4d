"""Format reward: did the response think, close its thinking once, and end a summary answer in one box?

The rule follows the paper's slow-thinking template (R1V3 §6.2): ``<think>`` reasoning ``</think>`` followed
by a *summary answer*, which the hallucination analysis (§6.4) compares with the reasoning. So the answer part
may be a paragraph or a few (up to ``max_answer_chars``, default 2000 characters, a few hundred tokens), but it
must end in its one boxed answer: after the box only a short tail (a full stop, a unit, a closing ``$``) of at
most ``max_tail_chars`` may follow. An essay after the box, or an answer part longer than a summary, fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modules.answer import THINK_CLOSE, THINK_OPEN, after_last_boxed, count_boxed, last_boxed, split_thinking
from modules.rewards.base import Reward


class FormatReward(Reward):
    """1.0 for ``[<think>] reasoning </think> summary ending in one \\boxed{}``, else 0.0.

    Rules: the reasoning is non-empty; ``</think>`` occurs exactly once; ``<think>`` occurs at most once and
    only as the (optional, usually pre-filled) prefix, so a second thinking block after the close fails; the
    answer part holds exactly one ``\\boxed{...}``, balanced and non-empty; it is at most ``max_answer_chars``
    long (a summary, not an essay) and at most ``max_tail_chars`` follow the box (it ends the answer).

    Args:
        max_answer_chars: longest accepted answer part (text after ``</think>``, stripped).
        max_tail_chars: longest accepted text after the box (``.``, `` cm.``, ``$``), stripped.

    >>> FormatReward()(["plan</think> So \\\\boxed{4}.", "no close \\\\boxed{4}"], [{}, {}])
    [1.0, 0.0]
    """

    name = "format"

    def __init__(self, max_answer_chars: int = 2000, max_tail_chars: int = 16) -> None:
        super().__init__()
        if max_answer_chars < 1:
            raise ValueError("max_answer_chars (--format.max_answer_chars) must be >= 1")
        if max_tail_chars < 0:
            raise ValueError("max_tail_chars (--format.max_tail_chars) must be >= 0")
        self.max_answer_chars = max_answer_chars
        self.max_tail_chars = max_tail_chars

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
        if boxed is None or not boxed.strip():
            return 0.0
        tail = (after_last_boxed(answer) or "").strip()
        return 1.0 if len(tail) <= self.max_tail_chars else 0.0
