"""Accuracy reward: is the boxed answer after ``</think>`` the gold answer?

The order of checks follows ``shared/docs/answer-checking.md``: extract first (last balanced box after the
last ``</think>``), then letters for multiple choice (``modules.choices``: hedges and contradictions score 0),
then exact integers, then exact decimals with a relative tolerance, then normalised strings, and only then
math-verify, in a killable worker with a deadline, for inputs that pass ``screen.too_costly_for_math_verify``.
Numbers are decided by us, never by math-verify (it rounds to 6 decimals: 1.6e-19 "equals" 3.2e-19), and
answers containing words never reach it (it reads "Paris" as the product p*a*r*i*s, so anagrams match).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, DecimalException, localcontext
from typing import Any

from modules.answer import canonical_integer, extract_answer, has_percent, normalize_text, parse_decimal
from modules.choices import choice_letters, match_choice
from modules.rewards.base import Reward
from modules.rewards.screen import too_costly_for_math_verify
from modules.rewards.verify import VerifyWorker

__all__ = ["AccuracyReward", "has_words", "numbers_close", "number_readings", "too_costly_for_math_verify"]

# Absolute tolerance used when the gold value is zero (a relative tolerance alone would demand exact 0.0).
ZERO_ABS_TOL = 1e-9
# Gold answers longer than this skip math-verify (gold is trusted, but sympy time grows with size).
MAX_GOLD_CHARS = 1000
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")


def has_words(text: str) -> bool:
    """True if ``text`` has a run of 3+ letters outside LaTeX command names (``Paris``, ``\\text{yes}``)."""
    return _WORD.search(_COMMAND.sub(" ", text)) is not None


def numbers_close(gold: Decimal, candidate: Decimal, rel_tol: float) -> bool:
    """Relative-tolerance equality of exact decimals; a zero gold uses ZERO_ABS_TOL instead (0 vs 1e-12 equal).

    The absolute tolerance applies only at zero: applied everywhere it would make 1.6e-19 equal 3.2e-19.
    Decimals, not floats, so values beyond float range (``10^{-400}``, ``1e400``) keep their difference.
    """
    try:
        with localcontext() as ctx:
            ctx.prec, ctx.Emax, ctx.Emin = 50, 10**17, -(10**17)
            if gold == 0:
                return abs(candidate) <= Decimal(ZERO_ABS_TOL)
            return abs(gold - candidate) <= Decimal(rel_tol) * max(abs(gold), abs(candidate))
    except DecimalException:
        return False


def number_readings(text: str) -> list[tuple[Decimal, bool]]:
    """The values a numeric answer may mean, each with "is an exact integer"; empty if not a number.

    A percentage has two readings, ``25%`` -> 25 and 0.25 (see ``AccuracyReward``, percentages).
    """
    value = parse_decimal(text)
    if value is None:
        return []
    readings = [(value, canonical_integer(text) is not None)]
    if has_percent(text):
        readings.append((value.scaleb(-2), False))
    return readings


class AccuracyReward(Reward):
    """1.0 if the extracted answer matches the record's gold answer, else 0.0.

    Multiple choice (``question_type == "multiple-choice"``): the candidate's letter (``B``, ``(B)``,
    ``B.``, ``**B**``, an option's text, ...) must equal the gold letter; the gold may be a letter or the
    option text. An unresolvable gold falls back to the open-question comparison.

    A box naming more than one letter (``A or B``) scores 0, unless the gold itself lists several letters
    (``A, C``): then the candidate's set of letters must equal the gold's.

    Open: two integer literals compare exactly (any length); two numbers compare as exact decimals with
    ``rel_tol`` (so ``2\\times10^{-400}`` is not ``10^{-400}``); otherwise normalised strings compare equal;
    otherwise math-verify decides symbolic equivalence (``2\\sqrt{2}`` vs ``\\sqrt{8}``) within
    ``verify_timeout_s`` in a worker process, which works from any thread. A timeout scores 0.0 and is
    counted in ``verify_timeouts``. Exponent towers and huge powers or factorials (``10^{10^{10}}``,
    ``10^{1000000}``, ``1000000!``) never reach math-verify (sympy would spend the whole deadline on them):
    they score by string equality only and are counted in ``screened``.

    Percentages: a ``%`` (or "percent") on either side allows both readings of that side, n and n/100.
    So gold ``25\\%`` accepts ``25``, ``25\\%``, ``0.25`` and ``\\frac{1}{4}``; gold ``0.25`` accepts
    ``25\\%``; gold ``25`` accepts ``25\\%``; but gold ``25`` does not accept ``0.25`` (no ``%`` anywhere).
    Both readings are common in the data (a question asking "what percentage" with gold ``25``, a gold
    ``25\\%`` answered as a probability), and neither reading can be confused with a different answer.

    Digits of any script count (``modules.answer``: Arabic-Indic ``٤٢`` is 42, as fullwidth ``４２`` is).

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
        self.screened = 0

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
            if (gold_set := choice_letters(gold, len(options))) is not None:
                cand_set = choice_letters(candidate, len(options)) or {match_choice(candidate, options)}
                return float(cand_set == gold_set)
            gold_letter = match_choice(gold, options)
            if gold_letter is not None:
                return float(match_choice(candidate, options) == gold_letter)
        return float(self.answers_match(candidate, gold))

    def answers_match(self, candidate: str, gold: str) -> bool:
        """Open-question equivalence of two answer strings (see the class docstring for the order)."""
        gold_values, cand_values = number_readings(gold), number_readings(candidate)
        if gold_values and cand_values:
            return any(
                g == c if g_int and c_int else numbers_close(g, c, self.rel_tol)
                for g, g_int in gold_values
                for c, c_int in cand_values
            )
        if normalize_text(candidate) == normalize_text(gold):
            return True
        return self._symbolic_match(candidate, gold)

    def _symbolic_match(self, candidate: str, gold: str) -> bool:
        """math-verify in the worker, for short, word-free answers only."""
        if self._verifier is None or len(candidate) > self.max_candidate_chars or len(gold) > MAX_GOLD_CHARS:
            return False
        if has_words(candidate) or has_words(gold):
            return False
        if too_costly_for_math_verify(candidate) or too_costly_for_math_verify(gold):
            self.screened += 1
            return False
        return self._verifier.equivalent(gold, candidate)
