"""Rewards on literal responses: a table of (response, record, accuracy, format), adversarial cases included.

The math-verify cases run the real worker process; a module-scoped fixture warms it so the per-case time
bound measures scoring, not the child's one-off import.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import threading
import time
from typing import Any

import pytest
import torch

from modules.rewards import AccuracyReward, FormatReward, Reward, WeightedRewards, default_rewards

THINK = "Let me work through this carefully."
HUGE = "7" * 4999 + "1"  # 5000 digits: int() would refuse it
SLOW_FOR_SYMPY = "10^{10^{10}}"  # math-verify runs for minutes on this (measured)
OPTS = ["London", "Paris", "Rome", "Berlin"]


def says(answer: str, reasoning: str = THINK) -> str:
    """A well-formed response: reasoning (template pre-filled <think>), close, answer part."""
    return f"{reasoning}</think>\n{answer}"


def open_q(answer: str) -> dict[str, Any]:
    return {"answer": answer, "options": [], "question_type": "open"}


def mc(answer: str, options: list[str] = OPTS) -> dict[str, Any]:
    return {"answer": answer, "options": list(options), "question_type": "multiple-choice"}


CASES = [
    # id, response, record, expected accuracy, expected format
    ("plain-int", says("The answer is \\boxed{42}."), open_q("42"), 1.0, 1.0),
    ("wrong-int", says("\\boxed{41}"), open_q("42"), 0.0, 1.0),
    ("think-prefix", "<think>" + says("\\boxed{42}"), open_q("42"), 1.0, 1.0),
    ("two-boxes-last-wins", says("\\boxed{3}, no: \\boxed{42}"), open_q("42"), 1.0, 0.0),
    ("two-boxes-last-wrong", says("\\boxed{42}, no: \\boxed{3}"), open_q("42"), 0.0, 0.0),
    ("box-only-in-thinking", says("so it is 42", reasoning="\\boxed{42}"), open_q("42"), 0.0, 0.0),
    ("no-close", "I think \\boxed{42}", open_q("42"), 0.0, 0.0),
    ("empty", "", open_q("42"), 0.0, 0.0),
    ("empty-reasoning", "</think>\\boxed{42}", open_q("42"), 1.0, 0.0),
    ("think-then-empty", "<think>  </think>\\boxed{42}", open_q("42"), 1.0, 0.0),
    ("empty-box", says("\\boxed{}"), open_q("42"), 0.0, 0.0),
    ("nested-frac", says("\\boxed{\\frac{1}{2}}"), open_q("\\frac{1}{2}"), 1.0, 1.0),
    ("frac-vs-decimal", says("\\boxed{\\frac{1}{2}}"), open_q("0.5"), 1.0, 1.0),
    ("dfrac", says("\\boxed{\\dfrac{1}{2}}"), open_q("\\frac{1}{2}"), 1.0, 1.0),
    ("unbalanced-last-ignored", says("\\boxed{42} or \\boxed{7"), open_q("42"), 1.0, 0.0),
    ("unbalanced-only", says("\\boxed{42"), open_q("42"), 0.0, 0.0),
    ("fbox", says("\\fbox{42}"), open_q("42"), 1.0, 1.0),
    ("huge-int-equal", says(f"\\boxed{{{HUGE}}}"), open_q(HUGE), 1.0, 0.0),  # answer part > 300 chars
    ("huge-int-off-by-one", says(f"\\boxed{{{HUGE[:-1]}2}}"), open_q(HUGE), 0.0, 0.0),
    ("huge-int-in-thinking", says("\\boxed{9}", reasoning=HUGE), open_q("9"), 1.0, 1.0),
    ("huge-gold-short-answer", says("\\boxed{9}"), open_q(HUGE), 0.0, 1.0),
    ("unicode-text", says("\\boxed{\\text{北京}}"), open_q("北京"), 1.0, 1.0),
    ("unicode-minus", says("\\boxed{−3}"), open_q("-3"), 1.0, 1.0),
    ("unicode-emoji-noise", says("🙂 \\boxed{ℵ₀} 🙂"), open_q("ℵ0"), 1.0, 1.0),
    ("100k-response", says("\\boxed{42}", reasoning="x = 1 + 1 " * 10_000), open_q("42"), 1.0, 1.0),
    ("mc-letter", says("\\boxed{B}"), mc("B"), 1.0, 1.0),
    ("mc-paren", says("\\boxed{(B)}"), mc("B"), 1.0, 1.0),
    ("mc-dot", says("\\boxed{B.}"), mc("B"), 1.0, 1.0),
    ("mc-close-paren", says("\\boxed{B)}"), mc("B"), 1.0, 1.0),
    ("mc-colon-text", says("\\boxed{B: Paris}"), mc("B"), 1.0, 1.0),
    ("mc-bold", says("\\boxed{**B**}"), mc("B"), 1.0, 1.0),
    ("mc-text-paren", says("\\boxed{\\text{(B) Paris}}"), mc("B"), 1.0, 1.0),
    ("mc-option-text", says("\\boxed{paris}"), mc("B"), 1.0, 1.0),
    ("mc-gold-is-text", says("\\boxed{B}"), mc("Paris"), 1.0, 1.0),
    ("mc-wrong-letter", says("\\boxed{C}"), mc("B"), 0.0, 1.0),
    ("mc-out-of-range", says("\\boxed{E}"), mc("B"), 0.0, 1.0),
    ("mc-unresolvable-gold-falls-back", says("\\boxed{Madrid}"), mc("Madrid"), 1.0, 1.0),
    ("mc-numeric-option", says("\\boxed{15}"), mc("B", ["10", "15", "20"]), 1.0, 1.0),
    ("mc-article-text", says("\\boxed{A dog}"), mc("B", ["The cat", "A dog"]), 1.0, 1.0),
    ("commas", says("\\boxed{1,000}"), open_q("1000"), 1.0, 1.0),
    ("thin-space", says("\\boxed{1\\,000}"), open_q("1000"), 1.0, 1.0),
    ("units-spaced", says("\\boxed{12 cm}"), open_q("12"), 1.0, 1.0),
    ("units-text", says("\\boxed{12\\text{ cm}}"), open_q("12"), 1.0, 1.0),
    ("not-a-unit", says("\\boxed{2n}"), open_q("2"), 0.0, 1.0),
    ("sci-e", says("\\boxed{3e8}"), open_q("3\\times10^{8}"), 1.0, 1.0),
    ("sci-times", says("\\boxed{1.2\\times10^{-3}}"), open_q("0.0012"), 1.0, 1.0),
    ("tiny-constants-differ", says("\\boxed{3.2\\times10^{-19}}"), open_q("1.6\\times10^{-19}"), 0.0, 1.0),
    ("percent", says("\\boxed{25\\%}"), open_q("25"), 1.0, 1.0),
    ("degrees-circ", says("\\boxed{30^\\circ}"), open_q("30"), 1.0, 1.0),
    ("degrees-sign", says("\\boxed{30°}"), open_q("30^{\\circ}"), 1.0, 1.0),
    ("rel-tol-inside", says("\\boxed{3.14159}"), open_q("3.1416"), 1.0, 1.0),
    ("rel-tol-outside", says("\\boxed{3.14}"), open_q("3.1416"), 0.0, 1.0),
    ("integers-exact", says("\\boxed{10001}"), open_q("10000"), 0.0, 1.0),
    ("zero-abs-tol", says("\\boxed{0.0000000001}"), open_q("0"), 1.0, 1.0),
    ("sym-sqrt", says("\\boxed{2\\sqrt{2}}"), open_q("\\sqrt{8}"), 1.0, 1.0),
    ("sym-poly", says("\\boxed{(x+1)^2}"), open_q("x^2+2x+1"), 1.0, 1.0),
    ("sym-set", says("\\boxed{\\{2,1\\}}"), open_q("\\{1,2\\}"), 1.0, 1.0),
    ("sym-wrong", says("\\boxed{\\sqrt{3}}"), open_q("\\sqrt{8}"), 0.0, 1.0),
    ("text-case", says("\\boxed{paris}"), open_q("Paris"), 1.0, 1.0),
    ("anagram-not-equal", says("\\boxed{Pairs}"), open_q("Paris"), 0.0, 1.0),
    ("second-think-after-close", says("<think>more</think>\\boxed{42}"), open_q("42"), 1.0, 0.0),
    ("trailing-think-open", says("\\boxed{42}<think>"), open_q("42"), 1.0, 0.0),
    ("essay-after-box", says("\\boxed{42}" + " and so on" * 40), open_q("42"), 1.0, 0.0),
]


@pytest.fixture(scope="module")
def accuracy() -> AccuracyReward:
    reward = AccuracyReward()
    assert reward(["x</think>\\boxed{2\\sqrt{2}}"], [open_q("\\sqrt{8}")]) == [1.0]  # warm the worker
    yield reward
    reward.close()


def test_table_is_large_and_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("response", "record", "want_acc", "want_fmt"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_table(
    accuracy: AccuracyReward, response: str, record: dict, want_acc: float, want_fmt: float
) -> None:
    start = time.perf_counter()
    got_acc = accuracy([response], [record])
    got_fmt = FormatReward()([response], [record])
    elapsed = time.perf_counter() - start
    assert (got_acc, got_fmt) == ([want_acc], [want_fmt])
    assert elapsed < 1.0, f"scoring took {elapsed:.2f}s"
    assert accuracy.errors == 0 and accuracy.verify_timeouts == 0


def test_batch_scoring_keeps_order(accuracy: AccuracyReward) -> None:
    responses = [c[1] for c in CASES]
    records = [c[2] for c in CASES]
    assert accuracy(responses, records) == [c[3] for c in CASES]
    assert FormatReward()(responses, records) == [c[4] for c in CASES]


def test_weighted_arithmetic_by_hand() -> None:
    rewards = WeightedRewards([AccuracyReward(use_math_verify=False), FormatReward()], [0.8, 0.2])
    responses = [says("\\boxed{7}"), "</think>\\boxed{7}", says("\\boxed{8}"), "\\boxed{7}"]
    total, parts = rewards.score(responses, [open_q("7")] * 4)
    # (acc, fmt): (1,1) -> 0.8+0.2 = 1.0 ; (1,0) -> 0.8 ; (0,1) -> 0.2 ; (0,0) -> 0.0
    assert torch.equal(parts["accuracy"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(parts["format"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(total, torch.tensor([1.0, 0.8, 0.2, 0.0]))
    assert total.shape == (4,) and total.dtype == torch.float32


def test_default_rewards_is_the_paper_mix() -> None:
    combo = default_rewards()
    assert [(r.name, w) for r, w in zip(combo.rewards, combo.weights, strict=True)] == [
        ("accuracy", 0.8),
        ("format", 0.2),
    ]
    assert isinstance(combo.rewards[0], AccuracyReward) and combo.rewards[0].use_math_verify


@pytest.mark.parametrize(
    ("rewards", "weights"),
    [
        ([FormatReward()], [0.5, 0.5]),
        ([], []),
        ([FormatReward(), FormatReward()], [1.0, 1.0]),
        ([FormatReward()], [math.nan]),
    ],
)
def test_weighted_validation(rewards: list[Reward], weights: list[float]) -> None:
    with pytest.raises(ValueError):
        WeightedRewards(rewards, weights)


class _Exploding(Reward):
    """A real reward that fails on some inputs, to exercise the totality contract."""

    name = "exploding"

    def score_one(self, response: str, record: dict) -> float:
        if "boom" in response:
            raise RuntimeError("boom")
        return math.inf if "inf" in response else 0.5


def test_reward_is_total_and_counts_errors() -> None:
    reward = _Exploding()
    assert reward(["ok", "boom", "inf", "ok"], [{}] * 4) == [0.5, 0.0, 0.0, 0.5]
    assert reward.errors == 2
    with pytest.raises(ValueError, match="2 responses but 1 records"):
        reward(["a", "b"], [{}])


def test_malformed_inputs_score_zero() -> None:
    acc, fmt = AccuracyReward(use_math_verify=False), FormatReward()
    responses: list[Any] = [None, 42, says("\\boxed{1}"), says("\\boxed{1}")]
    records: list[Any] = [open_q("1"), open_q("1"), {}, {"answer": None, "question_type": "weird"}]
    assert acc(responses, records) == [0.0, 0.0, 0.0, 0.0]
    assert fmt(responses, records) == [0.0, 0.0, 1.0, 1.0]


def test_constructor_validation_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--accuracy.rel_tol"):
        AccuracyReward(rel_tol=-1)
    with pytest.raises(ValueError, match="--accuracy.verify_timeout_s"):
        AccuracyReward(verify_timeout_s=0)
    with pytest.raises(ValueError, match="--format.max_answer_chars"):
        FormatReward(max_answer_chars=0)


def test_math_verify_is_skipped_when_disabled_or_long() -> None:
    assert AccuracyReward(use_math_verify=False)([says("\\boxed{2\\sqrt{2}}")], [open_q("\\sqrt{8}")]) == [
        0.0
    ]
    padded = "2\\sqrt{2}" + "+0" * 100  # equal, but 209 chars > max_candidate_chars
    reward = AccuracyReward(max_candidate_chars=200)
    assert reward([says(f"\\boxed{{{padded}}}")], [open_q("\\sqrt{8}")]) == [0.0]
    assert reward._verifier is not None and reward._verifier._proc is None  # never started a worker


def test_timeout_from_a_non_main_thread() -> None:
    reward = AccuracyReward(verify_timeout_s=0.5)
    results: dict[str, Any] = {}

    def work() -> None:
        results["warm"] = reward([says("\\boxed{2\\sqrt{2}}")], [open_q("\\sqrt{8}")])
        start = time.perf_counter()
        # the reward screens towers before math-verify (test_reward_holes); the worker's deadline is
        # what is under test here, so the tower goes to the worker itself
        assert reward._verifier is not None
        results["slow"] = [float(reward._verifier.equivalent("1", SLOW_FOR_SYMPY))]
        results["slow_s"] = time.perf_counter() - start
        results["after"] = reward([says("\\boxed{(x+1)^2}")], [open_q("x^2+2x+1")])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    reward.close()
    assert not thread.is_alive()
    assert results["warm"] == [1.0] and results["slow"] == [0.0] and results["after"] == [1.0]
    assert 0.5 <= results["slow_s"] < 2.0
    assert reward.verify_timeouts == 1 and reward.errors == 0


def _score_in_daemon(queue: Any) -> None:
    reward = AccuracyReward()
    queue.put(reward([says("\\boxed{2\\sqrt{2}}")], [open_q("\\sqrt{8}")]))
    reward.close()


def test_worker_starts_inside_a_daemonic_process() -> None:
    """DataLoader workers are daemonic; multiprocessing refuses children there, our subprocess does not."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_score_in_daemon, args=(queue,), daemon=True)
    proc.start()
    try:
        assert queue.get(timeout=120) == [1.0]
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def test_pickle_drops_the_worker_and_still_scores() -> None:
    reward = AccuracyReward(verify_timeout_s=1.5)
    assert reward([says("\\boxed{2\\sqrt{2}}")], [open_q("\\sqrt{8}")]) == [1.0]
    clone = pickle.loads(pickle.dumps(reward))
    reward.close()
    assert clone.verify_timeout_s == 1.5 and clone._verifier is not None and clone._verifier._proc is None
    assert clone([says("\\boxed{\\frac{1}{2}}")], [open_q("0.5")]) == [1.0]
