"""Fuzzing what tests/unit/test_answer_fuzz.py does not reach: every regex of modules/mmmu_rules.py (through the
MMMU scorer and its helpers), and near-misses of the answer.py regexes its token soup lacks.

Regex -> what drives it here:

* answer.py `_WRAPPER` (\\mathbf, \\operatorname, ...), `_SPACING` (\\, \\quad ~), `_SIZING` (\\left \\Big
  \\displaystyle), `_E_NOTATION` (E, +), `_TIMES_TEN` (*10^{..}), `_FRAC` (\\dfrac \\tfrac), `_DEGREE` (\\degree),
  `_PERCENT` (\\%), `_TIMES` (\\cdot × ·), `_UNIT_TAIL`/`_UNIT_TOKEN` (µ Ω m/s^2), `_TRAILING_WRAPPED_UNIT`
  (\\mathrm{..} at the end), `_LEAD` (the answer is / option: / choice), `_MARKUP` (* _ ` $), `_LETTER` ((a) A.).
  The other answer.py regexes are already in test_answer_fuzz.py's soup.
* mmmu_rules.py `_WRAPPERS` (last_boxed_content), `_LONG_DIGITS` (parse_open_response), `_NUM_COMMAS`,
  `_NUM_SCI`, `_NUM_SIMPLE` (extract_numbers), the sentence split in `_key_subresponses`, and `score_item` in
  every extraction mode for both question types.

Contracts: nothing raises, every call returns within a second, outputs keep their types and ranges.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modules.mmmu_rules import (
    EXTRACTION_MODES,
    extract_numbers,
    get_multi_choice_info,
    last_boxed_content,
    normalize_str,
    parse_open_response,
    reasoning_answer_text,
    score_item,
)
from tests.unit.test_answer_fuzz import check_answer_functions

CALL_LIMIT_S = 1.0
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ANSWER_TOKENS = [
    "\\mathbf{", "\\operatorname{", "\\mathrm{", "\\textbf{", "\\,", "\\;", "\\quad", "\\qquad", "~", "\\left",
    "\\right", "\\Big", "\\displaystyle", "E", "e", "+", "-", "*", "10^{", "10^", "\\dfrac{", "\\tfrac{", "\\frac{",
    "\\degree", "^\\circ", "°", "\\%", "%", "\\cdot", "×", "·", "µ", "Ω", "m/s^2", " kg", " cm", "the answer is ",
    "Option: ", "choice ", "**", "_", "`", "$", "(a)", "(B)", "A.", "C)", " ", "{", "}", "1", "0", "7", ".", ",",
    "/", "</think>", "\\boxed{",
]
MMMU_TOKENS = [
    "\\boxed{", "\\text{", "\\textbf{", "\\mathrm{", "{", "}", "<think>", "</think>", "1", "2", "0", "9", ",", ".",
    "e", "E", "-", "+", " ", "\n", ". ", "A", "B", "(A)", "(C)", " D ", "answer is", "answer:", "=", "%",
    "Therefore", "so", "is", "opt0", "x y", "1,000", "3.14", "2e5", "-.5", "!", "?", ";", ":", "'",
]
answer_soup = st.lists(st.sampled_from(ANSWER_TOKENS), max_size=80).map("".join)
mmmu_soup = st.lists(st.sampled_from(MMMU_TOKENS), max_size=120).map("".join)
mmmu_text = st.one_of(mmmu_soup, st.text(max_size=300))


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < CALL_LIMIT_S, f"{fn.__name__} took {elapsed:.2f}s"
    return out


def check_mmmu(response: str, options: list[str], gold: str, seed: int) -> None:
    for mode in EXTRACTION_MODES:
        text = timed(reasoning_answer_text, response, think_prefilled=(mode == "prefilled"))
        assert text is None or isinstance(text, str)
    boxed = timed(last_boxed_content, response)
    assert boxed is None or boxed in response
    preds = timed(parse_open_response, response)
    assert all(isinstance(p, str | float) and p == p for p in preds)
    if len(response) <= 2000:  # reached from model output only via parse_open_response, which caps digit runs
        numbers = timed(extract_numbers, response)
        assert all(re.search(r"\d", n) for n in numbers)
    assert all(isinstance(x, str | float) for x in timed(normalize_str, response))
    index2ans, choices = get_multi_choice_info(options)
    for mode in ("raw", *EXTRACTION_MODES):
        mc = timed(score_item, response, "multiple-choice", gold[:1] or "A", choices, index2ans,
                   random.Random(seed), mode)
        assert mc["pred"] in choices and isinstance(mc["correct"], bool)
        assert not (mc["correct_strict"] and mc["unparsed"])
        assert mc == score_item(response, "multiple-choice", gold[:1] or "A", choices, index2ans,
                                random.Random(seed), mode)  # same seed, same fallback guess
        op = timed(score_item, response, "open", gold, [], {}, random.Random(seed), mode)
        assert isinstance(op["correct"], bool) and isinstance(op["pred"], list)


@FUZZ
@given(s=st.one_of(answer_soup, answer_soup.map(lambda a: f"so</think>\\boxed{{{a}}}")),
       opts=st.lists(answer_soup.map(lambda a: a[:30]), max_size=5))
def test_answer_regex_near_misses_never_raise(s: str, opts: list[str]) -> None:
    check_answer_functions(s, opts)


@FUZZ
@given(response=mmmu_text, k=st.integers(2, 9), gold=st.one_of(mmmu_soup.map(lambda g: g[:20]),
       st.sampled_from(["A", "1,000", "3.14", "['1', '2']", "['a'", "x y"])), seed=st.integers(0, 10**6))
def test_mmmu_rules_never_raise(response: str, k: int, gold: str, seed: int) -> None:
    options = [f"opt{i}" if i % 2 else f"x y {i}" for i in range(k)]
    check_mmmu(response, options, gold, seed)
    check_mmmu(f"thinking</think>{response}", options, gold, seed)
    check_mmmu(f"thinking</think>\\boxed{{{response}}}", options, gold, seed)


MMMU_PATHOLOGICAL = [
    "9" * 100_000 + "e5",
    ("1" * 100 + "e5 ") * 400,
    ("1" * 100 + ",") * 400,
    "1," * 50_000,
    "1e" * 50_000,
    "-." * 50_000,
    "0." * 50_000,
    ". A" * 30_000,
    "\n" * 100_000,
    "(A) " * 25_000,
    "</think>" + "\\text{" * 5000 + "1" + "}" * 5000,
    "</think>\\boxed{" + "\\text{" * 3000 + "B" + "}" * 3001,
    "</think>" + "answer is = " * 10_000,
    "</think>" + "\\boxed{" * 6000,  # was O(n^2) (minutes) before last_boxed_content used one linear scan
]


@pytest.mark.parametrize("s", MMMU_PATHOLOGICAL, ids=[f"mmmu-pathological-{i}" for i in range(len(MMMU_PATHOLOGICAL))])
def test_mmmu_pathological_inputs_are_fast(s: str) -> None:
    check_mmmu(s, ["opt0", "x y 1", "opt2"], "B", 0)
