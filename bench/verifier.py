"""What the model verifier costs per GRPO step: `python -m bench.verifier` (`make bench-verifier`).

A step of the paper's shape (32 prompts x 32 rollouts = 1024 responses) is scored by ``RuleOrVerifier``
against the test server (tests/verifier_server.py) answering every request after a fixed delay, a stand-in
for one verifier call's latency. Each prompt's rejected rollouts repeat a few distinct wrong answers, as a
group sampled from one policy does. Rows side by side: the rule-only reward, then the verifier at several
concurrencies, then the same step again (every verdict cached). Reported: verifier calls (distinct
(question, gold, answer) among the rule misses), failed calls and the step's scoring wall time.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def step(prompts: int, group: int, miss: float, distinct: int, seed: int) -> tuple[list[str], list[dict]]:
    """Responses and records of one step: per prompt, a share ``miss`` of wrong answers among ``distinct``."""
    rng = random.Random(seed)
    responses, records = [], []
    for p in range(prompts):
        record = {"question": f"Problem {p}: what is {p} + 1?", "answer": str(p + 1), "options": [],
                  "question_type": "open"}
        for _ in range(group):
            answer = f"{p + 1}" if rng.random() >= miss else f"wrong {rng.randrange(distinct)}"
            responses.append(f"reasoning</think> so \\boxed{{{answer}}}")
            records.append(record)
    return responses, records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--miss", type=float, default=0.5, help="share of rollouts the rules reject")
    parser.add_argument("--distinct", type=int, default=6, help="distinct wrong answers per prompt")
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per verifier call")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64, 256])
    args = parser.parse_args(argv)

    from modules.rewards import AccuracyReward, RuleOrVerifier, VerifierReward
    from tests.verifier_server import running_server

    responses, records = step(args.prompts, args.group, args.miss, args.distinct, seed=0)
    rule = AccuracyReward(use_math_verify=False)
    print(f"{len(responses)} responses ({args.prompts} prompts x {args.group}), rule miss share {args.miss}, "
          f"{args.distinct} distinct wrong answers per prompt, {args.latency} s per call on the server")
    print(f"{'scoring':<34}{'calls':>7}{'errors':>8}{'wall s':>9}{'vs rules':>10}")
    t0 = time.perf_counter()
    rule(responses, records)
    base = time.perf_counter() - t0
    print(f"{'rules only':<34}{0:>7}{0:>8}{base:>9.3f}{1.0:>10.1f}")
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(Path(tmp), [{"match": "", "reply": "no", "delay": args.latency}]) as url:
        for concurrency in args.concurrency:
            reward = RuleOrVerifier(VerifierReward(url, "verifier", concurrency=concurrency, max_retries=0), rule)
            for label in (f"rule OR verifier, {concurrency} in flight", "  same step again (cached)"):
                t0 = time.perf_counter()
                reward(responses, records)
                wall = time.perf_counter() - t0
                m = reward.pop_metrics()
                print(f"{label:<34}{int(m['reward/verifier_calls']):>7}{int(m['reward/verifier_errors']):>8}"
                      f"{wall:>9.3f}{wall / base:>10.1f}")


if __name__ == "__main__":
    main()
