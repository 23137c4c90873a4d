"""Official MMMU parsing/judging rules, reasoning extraction, scoring and aggregation."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.mmmu_rules import (
    DISCIPLINES,
    SUBJECT_TO_DISCIPLINE,
    SUBJECTS,
    aggregate,
    eval_multi_choice,
    eval_open,
    extract_numbers,
    get_multi_choice_info,
    last_boxed_content,
    normalize_str,
    parse_gold,
    parse_multi_choice_response,
    parse_open_response,
    reasoning_answer_text,
    score_item,
    subject_from_id,
)

CITIES = ["Paris", "London", "Berlin", "Madrid"]
NINE = [f"option {i}" for i in range(9)]

# (response, options, expected letter; None = random fallback) under the official MC rules.
MC_CASES = [
    ("B", CITIES, "B"),
    ("B.", CITIES, "B"),
    ("(B)", CITIES, "B"),
    ("(b)", CITIES, None),
    ("**C**", CITIES, None),
    ("C)", CITIES, None),
    ("The answer is C", CITIES, "C"),
    ("The answer is (D).", CITIES, "D"),
    ("A or B? I pick B", CITIES, "B"),
    ("(A) is wrong, (C) is right", CITIES, "C"),
    ("(A) is right, not (C)", CITIES, "C"),
    ("I think the capital of France is Paris, obviously.", CITIES, "A"),
    ("Paris", CITIES, None),
    ("It is definitely London and not Paris at all", CITIES, "A"),
    ("Option D: Madrid", CITIES, None),
    ("D: Madrid is the answer here for sure", CITIES, "D"),
    ("The answer is B, because C is wrong", CITIES, "C"),
    ("A", CITIES, "A"),
    ("", CITIES, None),
    ("E", CITIES, None),
    ("'B'", CITIES, "B"),
    ("B.'", CITIES, None),
    ("answer: B", CITIES, "B"),
    ("\\boxed{B}", CITIES, None),
    ("**Answer: C**", CITIES, None),
    ("Between A and B, the better is A", CITIES, "A"),
    ("After thinking carefully the answer is BERLIN", CITIES, "C"),
    ("I think it is (I)", NINE, "I"),
    ("I think the answer is H", NINE, "H"),
    ("H, I think", NINE, "I"),
    ("The correct choice is (G) since (B) fails", NINE, "B"),
    ("Let me check A. Then B. Then C. So the answer is D", CITIES, "D"),
]

# (candidate, think_prefilled, expected answer text; None = unparsed)
EXTRACT_CASES = [
    ("thinking...</think> The answer is \\boxed{B}.", True, "B"),
    ("hmm (A) maybe</think>\\boxed{C}", True, "C"),
    ("\\boxed{A} in thinking</think> final: B", True, "final: B"),
    ("never closed \\boxed{A}", True, None),
    ("never closed", False, "never closed"),
    ("<think>never closed \\boxed{A}", False, None),
    ("plain answer \\boxed{7}", False, "7"),
    ("a</think>b</think> \\boxed{D}", True, "D"),
    ("</think>\\boxed{\\text{C}}", True, "C"),
    ("</think>\\boxed{\\frac{1}{2}}", True, "\\frac{1}{2}"),
    ("</think>\\boxed{A} then \\boxed{B", True, "A"),
    ("</think>   ", True, ""),
    ("</think>\\boxed{}", True, ""),
    ("</think>\\boxed{ 3.5 }", True, "3.5"),
    ("</think>\\boxed{\\textbf{(B) London}}", True, "(B) London"),
    ("</think>\\boxed{1} and \\boxed{2}", True, "2"),
]

# (response, gold, expected verdict) under the official open rules.
OPEN_CASES = [
    ("the answer is 3.5", "3.5", True),
    ("The answer is 3.50", "3.5", True),
    ("so the total is 12,000 dollars", "12000", True),
    ("It costs $1,234,567.89 in total", "1234567.89", False),
    ("the speed is 3e8 m/s", "300000000", True),
    ("the value is 1.2e-3", "0.0012", True),
    ("the value is 1.2e-3", "0.001", True),
    ("the answer is 42", "42.004", True),
    ("the answer is 42", "42.01", False),
    ("the answer is paris", "Paris", True),
    ("The final answer is the mitochondria.", "mitochondria", True),
    ("x = 5", "5", True),
    ("the answer is a", "A", True),
    ("the answer is b", "A", False),
    ("the answer is -7", "-7", True),
    ("so the result: 12 apples", "12", True),
    ("I am not sure", "12", False),
    ("the answer is 3/7", "['24/7', '3/7']", True),
    ("the answer is 24/7", "['24/7', '3/7']", True),
    ("the answer is 5/7", "['24/7', '3/7']", False),
    ("Therefore, the pressure is 101,325 Pa", "101325", True),
    ("The area is 50 cm^2", "50", True),
    ("Step 1: x = 2\nStep 2: so y is 4\nThe answer is 4", "4", True),
    ("Step 1: x = 2\nStep 2: so y is 4\nThe answer is 4", "2", False),
    ("the answer is 25%", "25%", True),
]


def test_table_size() -> None:
    assert len(MC_CASES) + len(EXTRACT_CASES) + len(OPEN_CASES) >= 60


@pytest.mark.parametrize(("response", "options", "expected"), MC_CASES)
def test_official_multi_choice(response: str, options: list[str], expected: str | None) -> None:
    index2ans, choices = get_multi_choice_info(options)
    letter, fell_back = parse_multi_choice_response(response, choices, index2ans, random.Random(0))
    assert fell_back == (expected is None)
    if expected is not None:
        assert letter == expected
    assert letter in choices


@pytest.mark.parametrize(("response", "prefilled", "expected"), EXTRACT_CASES)
def test_reasoning_answer_text(response: str, prefilled: bool, expected: str | None) -> None:
    assert reasoning_answer_text(response, think_prefilled=prefilled) == expected


@pytest.mark.parametrize(("response", "gold", "expected"), OPEN_CASES)
def test_official_open(response: str, gold: str, expected: bool) -> None:
    assert eval_open(parse_gold(gold), parse_open_response(response)) is expected


def test_extract_numbers_forms() -> None:
    # As the official regexes: the plain pattern also picks up the tail group "000" and the exponent "8".
    found = extract_numbers("12,000 and 3e8 and 1.5 and -2")
    assert found == ["12,000", "3e8", "000", "8", "1.5", "-2"]
    assert extract_numbers("no numbers") == []


def test_normalize_str() -> None:
    assert normalize_str(" 1,234.567 ") == [1234.57]
    assert normalize_str("Paris") == ["paris"]
    assert normalize_str("B") == [" b", "b "]


def test_eval_multi_choice_gold_list() -> None:
    assert eval_multi_choice("B", "B") and not eval_multi_choice("B", "C")
    assert eval_multi_choice(["A", "C"], "C")


def test_parse_gold_is_literal_only() -> None:
    assert parse_gold("['1', 2]") == ["1", "2"]
    assert parse_gold("[unclosed") == "[unclosed"
    assert parse_gold("__import__('os').system('x')") == "__import__('os').system('x')"
    assert parse_gold("A") == "A"


def test_last_boxed_content_none() -> None:
    assert last_boxed_content("no box here") is None
    assert last_boxed_content("\\boxed{unclosed") is None


def test_subject_map_covers_30_subjects() -> None:
    assert len(SUBJECTS) == 30 and len(DISCIPLINES) == 6
    assert SUBJECT_TO_DISCIPLINE["Energy_and_Power"] == "Tech & Engineering"
    assert SUBJECT_TO_DISCIPLINE["Public_Health"] == "Health & Medicine"
    assert [len(v) for v in DISCIPLINES.values()] == [4, 5, 5, 5, 4, 7]
    assert subject_from_id("validation_Art_Theory_12") == "Art_Theory"
    with pytest.raises(ValueError):
        subject_from_id("Accounting")


# ------------------------------------------------------------------------------------------ score_item

def _score(response: str, answer: str, mode: str = "prefilled", seed: int = 0,
           options: list[str] | None = None, qtype: str = "multiple-choice") -> dict:
    index2ans, choices = get_multi_choice_info(options if options is not None else CITIES)
    return score_item(response, qtype, answer, choices, index2ans, random.Random(seed), mode)


def test_score_boxed_after_thinking_beats_letters_in_thinking() -> None:
    resp = "Maybe (A)? or (B)... </think> The answer is \\boxed{C}"
    assert _score(resp, "C") == {"correct": True, "correct_strict": True, "unparsed": False,
                                "pred": "C"}
    # The official whole-response parse picks the last bracketed letter in the thinking instead.
    assert _score(resp, "C", mode="raw")["pred"] == "B"


def test_score_bold_letter_is_strictly_wrong() -> None:
    res = _score("</think> **C**", "C")
    assert res["unparsed"] and not res["correct_strict"]


def test_score_cut_off_response_is_unparsed_but_still_guesses() -> None:
    outs = {_score("I think (B) but I keep thinking", "B", seed=s)["correct"] for s in range(40)}
    assert outs == {True, False}  # the seeded guess is sometimes right
    res = _score("I think (B) but I keep thinking", "B")
    assert res["unparsed"] and not res["correct_strict"]
    assert _score("(B)", "B", mode="optional")["correct_strict"]


def test_score_open_items() -> None:
    assert _score("</think>\\boxed{12,000}", "12000", qtype="open", options=[])["correct_strict"]
    assert _score("</think>so it is 3.5", "3.5", qtype="open", options=[])["correct"]
    res = _score("still thinking 3.5", "3.5", qtype="open", options=[])
    assert res["unparsed"] and not res["correct"]


def test_seeded_fallback_reproducible() -> None:
    picks = [_score("</think>**X**", "A", options=NINE, seed=7)["pred"] for _ in range(3)]
    assert len(set(picks)) == 1
    assert len({_score("</think>**X**", "A", options=NINE, seed=s)["pred"] for s in range(60)}) > 3


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), st.integers(min_value=2, max_value=9), st.integers(0, 10**6))
def test_mc_parser_always_returns_a_choice(text: str, k: int, seed: int) -> None:
    index2ans, choices = get_multi_choice_info([f"opt{i}" for i in range(k)])
    first = parse_multi_choice_response(text, choices, index2ans, random.Random(seed))
    assert first[0] in choices
    assert first == parse_multi_choice_response(text, choices, index2ans, random.Random(seed))


def test_long_digit_runs_are_bounded() -> None:
    start = time.perf_counter()
    parse_open_response("the answer is " + "7" * 50_000)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------------------- aggregate

def _res(item_id: str, correct: bool, strict: bool | None = None, unparsed: bool = False) -> dict:
    return {"id": item_id, "correct": correct, "correct_strict": correct if strict is None else strict,
            "unparsed": unparsed}


def test_aggregate_instance_weighted_by_hand() -> None:
    results = [
        _res("validation_Art_1", True), _res("validation_Art_2", False),
        _res("validation_Math_1", True, strict=False, unparsed=True),
        _res("validation_Accounting_1", True), _res("validation_Accounting_2", False),
        _res("validation_Accounting_3", False),
    ]
    out = aggregate(results)
    assert out["overall"]["num"] == 6
    assert out["overall"]["acc"] == pytest.approx(3 / 6)  # not the subject mean (0.611)
    assert out["overall"]["acc_strict"] == pytest.approx(2 / 6)
    assert out["overall"]["unparsed_frac"] == pytest.approx(1 / 6)
    assert out["subjects"]["Accounting"]["acc"] == pytest.approx(1 / 3)
    assert out["disciplines"] == {
        "Art & Design": {"acc": 0.5, "acc_strict": 0.5, "unparsed_frac": 0.0, "num": 2},
        "Business": {"acc": pytest.approx(1 / 3), "acc_strict": pytest.approx(1 / 3),
                     "unparsed_frac": 0.0, "num": 3},
        "Science": {"acc": 1.0, "acc_strict": 0.0, "unparsed_frac": 1.0, "num": 1},
    }


def test_aggregate_averages_samples_per_id_first() -> None:
    results = [_res("validation_Math_1", c) for c in (True, True, False, False)]
    results.append(_res("validation_Math_2", True))
    out = aggregate(results)
    assert out["overall"]["acc"] == pytest.approx(0.75)  # not 3/5
    assert out["overall"]["num"] == 2 and out["overall"]["num_responses"] == 5


def test_aggregate_rejects_conflicting_subjects() -> None:
    with pytest.raises(ValueError, match="subjects"):
        aggregate([{**_res("x_1", True), "subject": "Art"}, {**_res("x_1", True), "subject": "Math"}])
