"""Accuracy reward: is the boxed answer after ``</think>`` the gold answer?

The order of checks follows ``shared/docs/answer-checking.md``: extract first (last balanced box after the
last ``</think>``), then letters for multiple choice, then exact integers, then numbers with a relative
tolerance, then normalised strings, and only then math-verify, in a killable worker with a deadline.
Numbers are decided by us, never by math-verify (it rounds to 6 decimals: 1.6e-19 "equals" 3.2e-19), and
answers containing words never reach it (it reads "Paris" as the product p*a*r*i*s, so anagrams match).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from modules.answer import canonical_integer, extract_answer, match_choice, normalize_text, parse_number
from modules.rewards.base import Reward
from modules.rewards.verify import VerifyWorker

# Absolute tolerance used when the gold value is zero (a relative tolerance alone would demand exact 0.0).
ZERO_ABS_TOL = 1e-9
# Gold answers longer than this skip math-verify (gold is trusted, but sympy time grows with size).
MAX_GOLD_CHARS = 1000
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")


def has_words(text: str) -> bool:
    """True if ``text`` has a run of 3+ letters outside LaTeX command names (``Paris``, ``\\text{yes}``)."""
    return _WORD.search(_COMMAND.sub(" ", text)) is not None


def numbers_close(gold: float, candidate: float, rel_tol: float) -> bool:
    """Relative-tolerance equality; a zero gold uses ZERO_ABS_TOL instead (so 0 vs 1e-12 is equal).

    The absolute tolerance applies only at zero: applied everywhere it would make 1.6e-19 equal 3.2e-19.
    """
    if gold == 0:
        return abs(candidate) <= ZERO_ABS_TOL
    return math.isclose(gold, candidate, rel_tol=rel_tol)


class AccuracyReward(Reward):
    """1.0 if the extracted answer matches the record's gold answer, else 0.0.

    Multiple choice (``question_type == "multiple-choice"``): the candidate's letter (``B``, ``(B)``,
    ``B.``, ``**B**``, an option's text, ...) must equal the gold letter; the gold may be a letter or the
    option text. An unresolvable gold falls back to the open-question comparison.

    Open: two integer literals compare exactly (any length); two numbers compare with ``rel_tol``;
    otherwise normalised strings compare equal; otherwise math-verify decides symbolic equivalence
    (``\\frac{1}{2}`` vs ``0.5``, ``2\\sqrt{2}`` vs ``\\sqrt{8}``) within ``verify_timeout_s`` in a worker
    process, which works from any thread. A timeout scores 0.0 and is counted in ``verify_timeouts``.

    Args:
        rel_tol: relative tolerance for numeric answers.
        use_math_verify: allow the symbolic fallback (off: numbers and strings only, no worker process).
        verify_timeout_s: wall-clock limit of one math-verify comparison, in seconds.
        max_candidate_chars: candidates longer than this never reach math-verify.

    >>> AccuracyReward(use_math_verify=False)(["...</think> \\\\boxed{1,000}"], [{"answer": "1000"}])
    [1.0]
    """

    name = "accuracy"

    def __init__(
        self,
        rel_tol: float = 1e-4,
        use_math_verify: bool = True,
        verify_timeout_s: float = 2.0,
        max_candidate_chars: int = 200,
    ) -> None:
        super().__init__()
        if not 0 <= rel_tol < 1:
            raise ValueError(f"rel_tol (--accuracy.rel_tol) must be in [0, 1), got {rel_tol}")
        if verify_timeout_s <= 0:
            raise ValueError(
                f"verify_timeout_s (--accuracy.verify_timeout_s) must be > 0, got {verify_timeout_s}"
            )
        if max_candidate_chars < 1:
            raise ValueError("max_candidate_chars (--accuracy.max_candidate_chars) must be >= 1")
        self.rel_tol = rel_tol
        self.use_math_verify = use_math_verify
        self.verify_timeout_s = verify_timeout_s
        self.max_candidate_chars = max_candidate_chars
        self._verifier = VerifyWorker(timeout_s=verify_timeout_s) if use_math_verify else None

    @property
    def verify_timeouts(self) -> int:
        """How many math-verify comparisons hit the deadline (each scored 0.0)."""
        return self._verifier.timeouts if self._verifier is not None else 0

    def close(self) -> None:
        """Stop the math-verify worker process, if any (it restarts on demand)."""
        if self._verifier is not None:
            self._verifier.close()

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        """Accuracy of one response against ``record["answer"]``."""
        candidate = extract_answer(response)
        if not candidate:
            return 0.0
        gold = str(record.get("answer", "")).strip()
        if not gold:
            return 0.0
        if record.get("question_type", "open") == "multiple-choice":
            options: Sequence[str] = record.get("options") or []
            gold_letter = match_choice(gold, options)
            if gold_letter is not None:
                return float(match_choice(candidate, options) == gold_letter)
        return float(self.answers_match(candidate, gold))

    def answers_match(self, candidate: str, gold: str) -> bool:
        """Open-question equivalence of two answer strings (see the class docstring for the order)."""
        gold_int, cand_int = canonical_integer(gold), canonical_integer(candidate)
        if gold_int is not None and cand_int is not None:
            return gold_int == cand_int
        gold_num, cand_num = parse_number(gold), parse_number(candidate)
        if gold_num is not None and cand_num is not None:
            return numbers_close(gold_num, cand_num, self.rel_tol)
        if normalize_text(candidate) == normalize_text(gold):
            return True
        return self._symbolic_match(candidate, gold)

    def _symbolic_match(self, candidate: str, gold: str) -> bool:
        """math-verify in the worker, for short, word-free answers only."""
        if self._verifier is None or len(candidate) > self.max_candidate_chars or len(gold) > MAX_GOLD_CHARS:
            return False
        if has_words(candidate) or has_words(gold):
            return False
        return self._verifier.equivalent(gold, candidate)
