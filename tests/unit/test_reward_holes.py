"""Reward holes of issue 22: hedged choices, letter + text, underflow, percentages, digits, towers, long summaries.

Each table row is (id, boxed answer, record, expected accuracy); responses are well formed, so the format
reward is 1 throughout except where a test says otherwise.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from bench.rewards import TOWERS
from modules.answer import canonical_integer, parse_decimal, parse_number
from modules.choices import choice_letters, match_choice
from modules.rewards import AccuracyReward, FormatReward
from tests.unit.test_rewards import OPTS, mc, open_q

NUM_OPTS = ["12", "15", "18", "21"]
TRIG = ["\\frac{1}{2}", "\\frac{\\sqrt{3}}{2}", "1", "0"]


def says(answer: str) -> str:
    return f"Let me work through this.</think>\nSo the answer is \\boxed{{{answer}}}."


CASES = [
    # item 3: a box naming more than one option letter is a hedge, scored 0 unless the gold lists several
    ("hedge-or", "A or B", mc("B"), 0.0),
    ("hedge-or-first-right", "B or A", mc("B"), 0.0),
    ("hedge-all-four", "A B C D", mc("B"), 0.0),
    ("hedge-paren-and", "(B) and (C)", mc("B"), 0.0),
    ("hedge-and", "B and C", mc("B"), 0.0),
    ("hedge-comma", "B, C", mc("B"), 0.0),
    ("hedge-slash", "B/C", mc("B"), 0.0),
    ("hedge-text-wrapped", "\\text{B or C}", mc("B"), 0.0),
    ("multi-gold-same-set", "C and A", mc("A, C"), 1.0),
    ("multi-gold-subset", "A", mc("A, C"), 0.0),
    ("multi-gold-superset", "A, B, C", mc("A, C"), 0.0),
    ("single-letter-still-right", "B", mc("B"), 1.0),
    ("letter-and-own-text", "B: Paris", mc("B"), 1.0),
    ("letter-text-with-article", "(B) A dog", mc("B", ["The cat", "A dog"]), 1.0),
    # item 4: letter + option text in LaTeX spacing; letter and text that disagree do not score
    ("latex-space-letter-text", "(B)\\ \\frac{\\sqrt3}{2}", mc("B", TRIG), 1.0),
    ("latex-quad-letter-text", "B\\quad\\frac{\\sqrt{3}}{2}", mc("B", TRIG), 1.0),
    ("latex-thin-letter", "(B)\\,", mc("B", TRIG), 1.0),
    ("plain-space-letter-text", "(B) \\frac{\\sqrt{3}}{2}", mc("B", TRIG), 1.0),
    ("letter-number-agree", "B) 15", mc("B", NUM_OPTS), 1.0),
    ("letter-number-disagree", "B) 18", mc("B", NUM_OPTS), 0.0),
    ("letter-number-disagree-gold-c", "B) 18", mc("C", NUM_OPTS), 0.0),
    ("letter-other-option-text", "B: Rome", mc("B"), 0.0),
    ("letter-other-option-text-gold-c", "B: Rome", mc("C"), 0.0),
    # item 5: numbers beyond float range are compared exactly, never as 0.0 == 0.0
    ("underflow-differ", "2\\times10^{-400}", open_q("10^{-400}"), 0.0),
    ("underflow-equal", "1\\times10^{-400}", open_q("10^{-400}"), 1.0),
    ("underflow-e-notation", "1e-400", open_q("10^{-400}"), 1.0),
    ("underflow-vs-zero", "10^{-400}", open_q("0"), 1.0),  # the documented absolute tolerance at a zero gold
    ("underflow-vs-tiny", "10^{-400}", open_q("10^{-300}"), 0.0),
    ("overflow-differ", "2e400", open_q("1e400"), 0.0),
    ("overflow-equal", "1.00001e400", open_q("1e400"), 1.0),
    ("underflow-tolerance", "1.00001\\times10^{-400}", open_q("10^{-400}"), 1.0),
    # item 6: a % on either side allows both readings, n and n/100 (see AccuracyReward's docstring)
    ("pct-gold-vs-fraction", "0.25", open_q("25\\%"), 1.0),
    ("pct-gold-vs-frac", "\\frac{1}{4}", open_q("25\\%"), 1.0),
    ("pct-gold-vs-bare", "25", open_q("25\\%"), 1.0),
    ("pct-gold-vs-pct", "25\\%", open_q("25\\%"), 1.0),
    ("pct-candidate-vs-fraction-gold", "25\\%", open_q("0.25"), 1.0),
    ("pct-candidate-vs-bare-gold", "25\\%", open_q("25"), 1.0),
    ("pct-wrong", "0.26", open_q("25\\%"), 0.0),
    ("pct-wrong-bare", "26", open_q("25\\%"), 0.0),
    ("no-pct-no-scaling", "0.25", open_q("25"), 0.0),
    ("pct-hundred", "100\\%", open_q("1"), 1.0),
    # item 7: every Unicode decimal digit reads as its ASCII digit, NFKC or not
    ("digits-arabic-indic", "٤٢", open_q("42"), 1.0),
    ("digits-extended-arabic-indic", "۴۲", open_q("42"), 1.0),
    ("digits-devanagari", "४२", open_q("42"), 1.0),
    ("digits-fullwidth", "４２", open_q("42"), 1.0),
    ("digits-math-bold", "𝟒𝟐", open_q("42"), 1.0),
    ("digits-arabic-indic-wrong", "٤٣", open_q("42"), 0.0),
    ("digits-arabic-indic-gold", "42", open_q("٤٢"), 1.0),
    ("digits-arabic-indic-decimal", "٣.٥", open_q("3.5"), 1.0),
    ("digits-arabic-indic-in-expression", "x=٣", open_q("x=3"), 1.0),
]


@pytest.fixture(scope="module")
def accuracy() -> AccuracyReward:
    reward = AccuracyReward()
    assert reward([says("2\\sqrt{2}")], [open_q("\\sqrt{8}")]) == [1.0]  # warm the worker
    yield reward
    reward.close()


@pytest.mark.parametrize(("answer", "record", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reward_holes(accuracy: AccuracyReward, answer: str, record: dict[str, Any], want: float) -> None:
    assert accuracy([says(answer)], [record]) == [want]
    assert FormatReward()([says(answer)], [record]) == [1.0]


def test_hedges_and_disagreements_read_as_no_letter() -> None:
    assert match_choice("A or B", OPTS) is None
    assert match_choice("(B) and (C)", OPTS) is None
    assert match_choice("B) 18", NUM_OPTS) is None
    assert match_choice("B) 15", NUM_OPTS) == "B"
    assert match_choice("(B)\\ \\frac{\\sqrt3}{2}", TRIG) == "B"


def test_letter_lists_are_read_in_linear_time() -> None:
    for text in ("A" + " " * 9000 + "!", "A " * 4000 + "!", "A or " * 1500 + "?"):
        start = time.perf_counter()
        assert choice_letters(text, 4) is None
        match_choice(text, OPTS)
        assert time.perf_counter() - start < 0.5


def test_numbers_out_of_float_range_are_not_zero_or_inf() -> None:
    assert parse_number("2\\times10^{-400}") is None  # not 0.0: a float cannot hold it
    assert parse_number("1e400") is None
    assert parse_number("1e-300") == pytest.approx(1e-300)


def test_one_digit_rule_for_all_scripts() -> None:
    for digits in ("٤٢", "۴۲", "४२", "４２", "𝟒𝟐", "42"):
        assert canonical_integer(digits) == "42", digits
        assert parse_number(digits) == 42.0, digits


# ------------------------------------------------------------------------------------ item 8: towers


@pytest.mark.parametrize("tower", TOWERS)
def test_towers_are_screened_before_math_verify(tower: str) -> None:
    from modules.rewards.accuracy import too_costly_for_math_verify

    assert too_costly_for_math_verify(tower)
    reward = AccuracyReward(verify_timeout_s=2.0)
    start = time.perf_counter()
    assert reward([says(tower)], [open_q("2")]) == [0.0]
    assert time.perf_counter() - start < 0.5
    assert reward.verify_timeouts == 0 and reward._verifier is not None and reward._verifier._proc is None
    # a tower that is a plain number (10^{1000000}) is decided exactly before the screen; the others are screened
    assert reward.screened == (0 if parse_decimal(tower) is not None else 1)


@pytest.mark.parametrize("fine", ["2^{100}", "x^{x^{x}}", "e^{-x^2}", "(n+1)!", "x^{2}+1", "e^{i\\pi}", "5!", "\\frac{2^{10}}{3}", "(x^2)^3"])
def test_ordinary_powers_are_not_screened(fine: str) -> None:
    from modules.rewards.accuracy import too_costly_for_math_verify

    assert not too_costly_for_math_verify(fine)


def test_replacement_worker_is_started_ahead_of_need() -> None:
    """After a timeout the next call finds a ready worker: it does not pay the ~0.8 s start-up."""
    reward = AccuracyReward(verify_timeout_s=0.5)
    assert reward([says("2\\sqrt{2}")], [open_q("\\sqrt{8}")]) == [1.0]  # starts active + spare
    time.sleep(3.0)  # let the spare finish importing math-verify, as real work between calls does
    worker = reward._verifier
    assert worker is not None
    # the worker itself does not screen: a tower sent to it straight runs into the deadline
    assert worker.equivalent("2", "10^{10^{10}}") is False
    assert worker.timeouts == 1
    start = time.perf_counter()
    assert reward([says("(x+1)^2")], [open_q("x^2+2x+1")]) == [1.0]
    after = time.perf_counter() - start
    reward.close()
    # a fresh child needs >= 0.8 s (2-3 s on a loaded machine) to import math-verify before it can answer
    assert after < 0.6, f"the call after a timeout waited {after:.2f}s for a worker"


# ------------------------------------------------------------------------------------ item 9: format
SUMMARY = (
    "The image shows a right triangle with legs 3 and 4. "
    "By the Pythagorean theorem the hypotenuse is sqrt(9 + 16) = 5. "
) * 8  # ~950 characters, the length of a paper-style summary


def test_format_accepts_a_summary_answer_that_ends_in_the_box() -> None:
    fmt = FormatReward()
    long_summary = f"reasoning</think>\n{SUMMARY}\nTherefore the hypotenuse is \\boxed{{5}}."
    assert len(long_summary.split("</think>")[1]) > 300
    assert fmt([long_summary], [{}]) == [1.0]
    assert fmt([f"reasoning</think>{SUMMARY} \\boxed{{5}} cm."], [{}]) == [1.0]  # a unit after the box


def test_format_refuses_essays_and_text_after_the_box() -> None:
    fmt = FormatReward()
    essay = f"reasoning</think>{SUMMARY * 4}\\boxed{{5}}"  # ~3800 characters: not a summary
    after = f"reasoning</think>So \\boxed{{5}}.\n{SUMMARY}"  # the box is not the end of the answer
    assert fmt([essay, after], [{}, {}]) == [0.0, 0.0]
