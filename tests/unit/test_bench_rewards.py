"""The reward-timing benchmark (bench/rewards.py) in small: a seeded fuzzed corpus scores without errors,
deadline misses or a slow response. `make bench-rewards` runs the 100k version against the targets."""

from __future__ import annotations

from bench.rewards import fuzz_corpus, time_rewards
from modules.rewards import AccuracyReward, FormatReward


def test_fuzzed_corpus_is_seeded_and_mixed() -> None:
    corpus = fuzz_corpus(300, seed=3)
    assert corpus == fuzz_corpus(300, seed=3) and corpus != fuzz_corpus(300, seed=4)
    assert {kind for kind, _, _ in corpus} == {"numeric", "choice", "symbolic", "soup", "tower"}


def test_small_corpus_scores_fast_without_deadline_misses() -> None:
    corpus = fuzz_corpus(400, seed=0)
    accuracy, fmt = AccuracyReward(), FormatReward()
    accuracy(["x</think>\\boxed{2\\sqrt{2}}"], [{"answer": "\\sqrt{8}"}])  # start the worker untimed
    try:
        stats = time_rewards(corpus, accuracy, fmt)
    finally:
        accuracy.close()
    assert stats["n"] == 400
    assert accuracy.verify_timeouts == 0 and accuracy.errors == 0 and fmt.errors == 0
    assert accuracy.screened > 0  # the towers of the corpus were stopped before math-verify
    # no response paid a deadline (2 s); the benchmark holds the real targets (p99 50 ms, max 0.5 s), which wall
    # clock on a loaded 2-core CI machine cannot; CPU time per response is what a quiet core would take
    assert stats["max"] < 1.5 and stats["cpu"]["p99"] < 0.25, stats
