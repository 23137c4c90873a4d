"""The model verifier against a real HTTP server on localhost (tests/verifier_server.py in a subprocess):
verdicts rescue rule misses or not, failures fall back and are counted, the cache and the concurrency are
observed on the server side, a dying verifier stops the run naming its endpoint."""

from __future__ import annotations

import time

import pytest

from modules.rewards import (
    AccuracyReward,
    FormatReward,
    RuleOrVerifier,
    VerifierReward,
    VerifierUnavailable,
    WeightedRewards,
)
from modules.rewards.verifier import parse_verdict, question_text
from tests.verifier_server import free_port, make_tiny_text_lm, running_server, stats

GOLD = {"question": "What is half of one?", "answer": "0.5", "options": [], "question_type": "open"}


def response(answer: str) -> str:
    return f"reasoning</think> So \\boxed{{{answer}}}."


def reward(base_url: str, **kw) -> RuleOrVerifier:
    kw = {"timeout_s": 5.0, "max_retries": 0, "retry_backoff_s": 0.0, **kw}
    return RuleOrVerifier(VerifierReward(base_url, "verifier", **kw), rule=AccuracyReward(use_math_verify=False))


@pytest.mark.parametrize("reply, verdict", [
    ("Yes", True), ("yes.", True), ("**No**", False), ("no, they differ", False), ("<think>hmm no</think>Yes", True),
    ("The answers match", None), ("", None), ("yesterday", None), ("maybe", None), ("1. yes", None),
])
def test_parse_verdict_is_strict(reply, verdict):
    assert parse_verdict(reply, ["yes"], ["no"]) is verdict


def test_question_text_letters_options():
    text = question_text({"question": "Which?", "options": ["cat", "dog"]}, 100)
    assert text == "Which?\nOptions:\nA. cat\nB. dog"


def test_a_yes_rescues_a_rule_miss_a_no_does_not_and_rule_hits_are_never_sent(tmp_path):
    rules = [{"match": "final answer: one half", "reply": "Yes."},
             {"match": "final answer: 0.7", "reply": "No"}]
    with running_server(tmp_path, rules) as url:
        acc = reward(url)
        scores = acc([response("one half"), response("0.7"), response("1/2"), "no answer"], [GOLD] * 4)
        seen = stats(url)
    assert scores == [1.0, 0.0, 1.0, 0.0]  # 1/2 passes the rules; "no answer" has nothing to ask about
    assert seen["requests"] == 2
    assert all("What is half of one?" in t and "Reference answer: 0.5" in t for t in seen["texts"])
    metrics = acc.pop_metrics()
    assert metrics["reward/rule_accuracy"] == pytest.approx(1 / 4)
    assert metrics["reward/verifier_rescued"] == pytest.approx(1 / 4)
    assert metrics["reward/verifier_calls"] == 2 and metrics["reward/verifier_errors"] == 0
    assert metrics["time/verifier_s"] > 0
    assert acc.pop_metrics()["reward/verifier_calls"] == 0  # popped: the next step starts from zero


def test_garbage_and_http_errors_fall_back_to_the_rule_and_are_counted(tmp_path):
    rules = [{"match": "final answer: one half", "reply": "The two answers are equal"},
             {"match": "final answer: 2^{-1}", "status": 400}]
    with running_server(tmp_path, rules) as url:
        acc = reward(url, max_retries=2)
        scores = acc([response("one half"), response("2^{-1}"), response("0.5")], [GOLD] * 3)
        seen = stats(url)
    assert scores == [0.0, 0.0, 1.0]
    assert seen["requests"] == 2  # a 400 is not retried
    assert acc.pop_metrics()["reward/verifier_errors"] == 2
    assert acc.verifier.cache == {}  # failures are not cached


def test_a_503_is_retried_and_the_second_try_counts(tmp_path):
    rules = [{"match": "one half", "status": 503, "fail_times": 1, "reply": "yes"}]
    with running_server(tmp_path, rules) as url:
        acc = reward(url, max_retries=1)
        assert acc([response("one half")], [GOLD]) == [1.0]
        assert stats(url)["requests"] == 2
    assert acc.pop_metrics()["reward/verifier_errors"] == 0


def test_a_slow_verifier_times_out_falls_back_and_is_counted(tmp_path):
    with running_server(tmp_path, [{"match": "", "reply": "yes", "delay": 3.0}]) as url:
        acc = reward(url, timeout_s=0.3, max_retries=1)
        t0 = time.monotonic()
        scores = acc([response("one half"), response("0.5")], [GOLD] * 2)
        elapsed = time.monotonic() - t0
        requests = stats(url)["requests"]
    assert scores == [0.0, 1.0]
    assert elapsed < 2.5  # two tries of 0.3 s, not the server's 3 s
    metrics = acc.pop_metrics()
    assert metrics["reward/verifier_errors"] == 1 and metrics["time/verifier_s"] < 2.5
    assert requests <= 2  # the server logs a request when it replies; the second may still be sleeping


def test_a_dead_server_falls_back_then_stops_the_run_naming_the_endpoint():
    url = f"http://127.0.0.1:{free_port()}/v1"
    acc = reward(url, max_retries=1, error_window=4, max_error_share=0.5)
    assert acc([response("one half"), response("0.5")], [GOLD] * 2) == [0.0, 1.0]
    assert acc.verifier.failures == 1
    with pytest.raises(VerifierUnavailable, match=f"127.0.0.1:{url.split(':')[2]}.*failed 4 of its last 4"):
        acc([response(f"{k} halves") for k in range(3)], [GOLD] * 3)


def test_a_failure_share_below_the_limit_keeps_training(tmp_path):
    rules = [{"match": "final answer: bad", "reply": "???"}, {"match": "", "reply": "no"}]
    with running_server(tmp_path, rules) as url:
        acc = reward(url, error_window=4, max_error_share=0.5)
        scores = acc([response(a) for a in ("bad", "x1", "x2", "x3", "bad2")], [GOLD] * 5)
    assert scores == [0.0] * 5
    assert acc.verifier.failures == 2 and acc.verifier.calls == 5  # 2 of the last 4: at the limit, not over


def test_the_cache_asks_each_question_gold_answer_once(tmp_path):
    with running_server(tmp_path, [{"match": "half", "reply": "yes"}]) as url:
        acc = reward(url)
        group = [response("one half")] * 8 + [response("one  half")]
        first = acc(group, [GOLD] * 9)
        after_first = stats(url)["requests"]
        second = acc(group, [GOLD] * 9)
        other_question = acc([response("one half")], [{**GOLD, "question": "Half of 1?"}])
        seen = stats(url)["requests"]
    assert first == second == [1.0] * 9 and other_question == [1.0]
    assert after_first == 2  # "one half" and "one  half": two distinct answers, each asked once
    assert seen == 3  # the second batch came from the cache; a new question is a new key
    assert acc.pop_metrics()["reward/verifier_cache_hits"] == 2


def test_requests_overlap_on_the_server(tmp_path):
    with running_server(tmp_path, [{"match": "", "reply": "no", "delay": 0.5}]) as url:
        acc = reward(url, concurrency=6)
        t0 = time.monotonic()
        acc([response(f"{k} halves") for k in range(6)], [GOLD] * 6)
        elapsed = time.monotonic() - t0
        spans = stats(url)["spans"]
    assert len(spans) == 6
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end  # all six were being served at one moment
    assert elapsed < 6 * 0.5 * 0.6


@pytest.mark.slow  # ~25 s: builds a tiny LM and loads transformers in the server process
def test_a_real_tiny_model_replies_garbage_that_falls_back(tmp_path):
    """Real generation (a random tiny Qwen2 with the project's tokenizer): the plumbing works end to end and
    whatever it says, unless it is a clean yes/no, counts as a failed call and leaves the rule score."""
    model_dir = make_tiny_text_lm(tmp_path / "lm")
    with running_server(tmp_path, model=model_dir) as url:
        acc = reward(url, max_tokens=8, timeout_s=60.0)
        answers = ["one half", "0.5", "two"]
        scores = acc([response(a) for a in answers], [GOLD] * 3)
        exchanges = stats(url)["exchanges"]
    assert len(exchanges) == 2 and all(reply for _, reply in exchanges)  # generated text came back
    assert scores[1] == 1.0  # the rules pass it: never sent
    for answer, score in zip(answers[::2], scores[::2], strict=True):
        reply = next(r for text, r in exchanges if f"final answer: {answer}\n" in text)
        assert score == (1.0 if parse_verdict(reply, ["yes"], ["no"]) else 0.0)
    expected_failures = sum(parse_verdict(r, ["yes"], ["no"]) is None for _, r in exchanges)
    assert acc.verifier.failures == expected_failures and acc.verifier.calls == 2


def test_weighted_rewards_use_it_as_the_accuracy_component(tmp_path):
    with running_server(tmp_path, [{"match": "one half", "reply": "yes"}]) as url:
        rewards = WeightedRewards([reward(url), FormatReward()], [0.8, 0.2])
        total, components = rewards.score([response("one half"), "x</think> \\boxed{3}"], [GOLD] * 2)
    assert components["accuracy"].tolist() == [1.0, 0.0]
    assert total.tolist() == pytest.approx([1.0, 0.2])
    metrics = rewards.pop_metrics()
    assert metrics["reward/verifier_rescued"] == 0.5 and metrics["reward/rule_accuracy"] == 0.0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="placeholders"):
        VerifierReward("http://127.0.0.1:1/v1", "m", prompt="Is {answer} right?")
    with pytest.raises(ValueError, match="http"):
        VerifierReward("127.0.0.1:8000", "m")
