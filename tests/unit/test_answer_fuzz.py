"""Fuzzing modules/answer.py and the rewards: never raise, stay in bounds, finish each call in under a second.

Random unicode, brace soup built from the tokens that matter (``\\boxed{``, ``{``, ``}``, ``</think>``, ...),
plus a fixed list of pathological inputs (thousands of ``\\boxed{``, 100k-character strings, regex
near-misses) that hypothesis would rarely generate on its own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modules.answer import (
    canonical_integer,
    count_boxed,
    extract_answer,
    last_boxed,
    normalize_text,
    parse_number,
    split_thinking,
)
from modules.choices import match_choice
from modules.rewards import AccuracyReward, FormatReward

CALL_LIMIT_S = 1.0
FUZZ = settings(
    max_examples=200,
    deadline=10_000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TOKENS = [
    "\\boxed{",
    "\\fbox{",
    "\\boxed ",
    "{",
    "}",
    "\\{",
    "\\}",
    "<think>",
    "</think>",
    "\\frac",
    "\\text{",
    "\\times",
    "10^",
    "1",
    "0",
    "9",
    ",",
    ".",
    "e",
    "-",
    "%",
    "°",
    "^\\circ",
    " cm",
    " ",
    "B",
    "(",
    ")",
    ":",
    "**",
    "a",
    "é",
    "北",
    "\\sqrt",
    "x",
    "\n",
    "\\",
    "$",
    "/",
]
soup = st.lists(st.sampled_from(TOKENS), max_size=120).map("".join)
text = st.one_of(st.text(max_size=300), soup, st.text(alphabet="{}\\boxed0123456789</think>", max_size=300))
options = st.lists(st.one_of(st.text(max_size=20), soup.map(lambda s: s[:30])), max_size=6)
records = st.fixed_dictionaries(
    {
        "answer": st.one_of(text, st.sampled_from(["42", "B", "\\frac{1}{2}", "1,000", "Paris"])),
        "options": options,
        "question_type": st.sampled_from(["open", "multiple-choice"]),
    }
)

PATHOLOGICAL = [
    "\\boxed{" * 5000,
    "\\boxed{" * 20_000 + "}" * 3,
    "</think>" + "\\boxed{" * 5000 + "1" + "}" * 5000,
    "a" * 50_000 + "\\boxe{" + "a" * 50_000,
    "a" * 50_000 + "</thin" + "k>" * 1000,
    "1a" * 50_000,
    "9" * 100_000,
    "1," * 50_000,
    "{" * 100_000,
    "}" * 50_000 + "\\boxed{1}",
    "\\" * 100_000,
    "<think>" * 10_000 + "</think>" * 10_000,
    "1" * 5000 + " cm" * 1000,
    "\\frac{" * 5000 + "1}{2}",
    "(A)" * 30_000,
    "x</think>\\boxed{" + "9" * 5000 + "}",
    "x</think>\\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 60 + "}",
]


def timed(fn: Callable[..., Any], *args: Any, limit: float = CALL_LIMIT_S) -> Any:
    """Call fn(*args); assert it returns within ``limit`` seconds."""
    start = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"{getattr(fn, '__name__', fn)} took {elapsed:.2f}s"
    return out


def balanced(s: str) -> bool:
    """Unescaped braces of s are balanced."""
    depth = 0
    for tok in re.findall(r"\\[{}]|[{}]", s):
        if tok in ("{", "}"):
            depth += 1 if tok == "{" else -1
            if depth < 0:
                return False
    return depth == 0


def check_answer_functions(s: str, opts: list[str]) -> None:
    """Every public function of modules.answer: bounded, total, and its contract holds."""
    reasoning, answer = timed(split_thinking, s)
    if answer is not None:
        assert "</think>" not in answer and s.endswith(answer)
    else:
        assert reasoning == s and "</think>" not in s
    boxed = timed(last_boxed, s)
    n_boxes = timed(count_boxed, s)
    if boxed is not None:
        assert boxed in s and balanced(boxed) and n_boxes >= 1
    extracted = timed(extract_answer, s)
    expected = last_boxed(answer) if answer is not None else None
    assert extracted == (expected.strip() if expected is not None else None)
    assert isinstance(timed(normalize_text, s), str)
    value = timed(parse_number, s)
    assert value is None or (isinstance(value, float) and value == value and abs(value) != float("inf"))
    integer = timed(canonical_integer, s)
    assert integer is None or re.fullmatch(r"-?\d+", integer)
    letter = timed(match_choice, s, opts)
    assert letter is None or (len(letter) == 1 and (not opts or ord(letter) - ord("A") < len(opts)))


def check_rewards(acc: AccuracyReward, response: str, record: dict[str, Any]) -> None:
    """Both rewards: one float in {0, 1} per response, no errors, each call under CALL_LIMIT_S.

    A math-verify timeout (0.5 s here) fits the bound; the call after it would wait for the replacement
    worker to import math-verify, so that wait is absorbed here by an untimed call.
    """
    fmt = FormatReward()
    errors_before, timeouts_before = acc.errors, acc.verify_timeouts
    assert timed(acc, [response], [record]) in ([0.0], [1.0])
    assert timed(fmt, [response], [record]) in ([0.0], [1.0])
    assert acc.errors == errors_before and fmt.errors == 0
    if acc.verify_timeouts > timeouts_before:
        assert acc([WARM_RESPONSE], [WARM_RECORD]) == [1.0]


WARM_RESPONSE, WARM_RECORD = "x</think>\\boxed{2\\sqrt{2}}", {"answer": "\\sqrt{8}"}


@pytest.fixture(scope="module")
def symbolic() -> AccuracyReward:
    reward = AccuracyReward(verify_timeout_s=0.5)
    assert reward([WARM_RESPONSE], [WARM_RECORD]) == [1.0]  # start the worker outside any timing
    yield reward
    reward.close()


@FUZZ
@given(s=text, opts=options)
def test_answer_functions_never_raise(s: str, opts: list[str]) -> None:
    check_answer_functions(s, opts)
    check_answer_functions(f"reasoning</think>\\boxed{{{s}}}", opts)


@FUZZ
@given(reasoning=text, answer=text, record=records)
def test_rewards_never_raise_without_math_verify(reasoning: str, answer: str, record: dict[str, Any]) -> None:
    acc = AccuracyReward(use_math_verify=False)
    check_rewards(acc, reasoning, record)
    check_rewards(acc, f"{reasoning}</think>{answer}", record)
    check_rewards(acc, f"{reasoning}</think>\\boxed{{{answer}}}", record)


@settings(FUZZ, max_examples=60)
@given(answer=soup, gold=st.one_of(soup, st.sampled_from(["\\sqrt{8}", "x^2+2x+1", "\\frac{1}{2}", "\\pi"])))
def test_rewards_never_raise_with_math_verify(symbolic: AccuracyReward, answer: str, gold: str) -> None:
    check_rewards(symbolic, f"t</think>\\boxed{{{answer}}}", {"answer": gold, "question_type": "open"})


@pytest.mark.parametrize("s", PATHOLOGICAL, ids=[f"pathological-{i}" for i in range(len(PATHOLOGICAL))])
def test_pathological_inputs_are_fast(symbolic: AccuracyReward, s: str) -> None:
    opts = ["A" * 1000, s[:5000]]
    check_answer_functions(s, opts)
    for record in ({"answer": s, "options": opts, "question_type": "multiple-choice"}, {"answer": "1"}):
        check_rewards(symbolic, s, record)
        check_rewards(symbolic, f"ok</think>\\boxed{{{s[:150]}}}", record)
