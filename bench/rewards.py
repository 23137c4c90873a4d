"""Per-response reward time over a fuzzed corpus (issue 22: pathological answers must not cost seconds).

Scores every response of a seeded corpus with the paper's rewards (``AccuracyReward`` with math-verify in its
worker, default 2 s deadline, and ``FormatReward``), one response per call as the trainer's scoring is
timed, and prints p50 / p99 / max per response against the targets (p99 < 50 ms, max < 0.5 s), the share
that reached math-verify, the screened towers and the deadline misses.

The corpus mixes what a policy writes (right and wrong numbers in every spelling the checker reads,
fractions, percentages, digits of other scripts, letters, hedges, symbolic answers that go to math-verify)
with what it may stumble into (LaTeX token soup, exponent towers, huge factorials, 10k-character reasoning).

    python -m bench.rewards [--n 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

TARGET_P99_S = 0.050
TARGET_MAX_S = 0.5

_SYMBOLIC = [
    ("\\sqrt{8}", ["2\\sqrt{2}", "\\sqrt{2}\\cdot 2", "3\\sqrt{2}", "\\sqrt{6}"]),
    ("x^2+2x+1", ["(x+1)^2", "(x+1)(x+1)", "(x-1)^2", "x^2+1"]),
    ("\\frac{\\pi}{2}", ["\\pi/2", "\\frac{2\\pi}{4}", "\\pi", "\\frac{\\pi}{3}"]),
    ("e^{-x^2}", ["e^{-x^{2}}", "\\exp(-x^2)", "e^{x^2}", "e^{-2x}"]),
    ("\\{1,2\\}", ["\\{2,1\\}", "\\{1,3\\}"]),
    ("2x+3y", ["3y+2x", "2x+2y", "x+y+x+2y"]),
    ("\\frac{\\sqrt{3}}{2}", ["\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{2}}{2}", "\\sin(\\pi/3)"]),
    ("(n+1)!", ["(n+1)n!", "n!", "(n+1)!"]),
]
TOWERS = [
    "9^{9^{9^{9}}}",
    "10^{10^{10}}",
    "2^{2^{64}}",
    "10^{1000000}",
    "1000000!",
    "(10^{10})!",
    "\\sqrt{x}^{10^{10}}",
    "e^{e^{e^{10}}}",
    "{10^{10}}^{10^{10}}",
    "x^{10^{10}}+1",
    "+\\pi9!!",
    "(9!)!",
]
_SOUP = ["\\boxed{", "{", "}", "\\frac", "\\sqrt", "^", "_", "10", "9", "x", "e", "\\pi", "!", "(", ")",
         "+", "-", "\\times", "\\cdot", "2", ".", ",", "%", "\\text{", "B", " ", "\\left(", "\\right)"]
_DIGITS = {"arabic": "٠١٢٣٤٥٦٧٨٩", "devanagari": "०१२३४५६७८९", "fullwidth": "０１２３４５６７８９"}
OPTS = ["12", "15", "18", "21"]


def _open(answer: str) -> dict[str, Any]:
    return {"answer": answer, "options": [], "question_type": "open"}


def _numeric(rng: random.Random) -> tuple[str, dict[str, Any]]:
    n = rng.randint(0, 10**rng.randint(1, 8))
    forms = [str(n), f"{n:,}", f"{n}\\%", f"{n} cm", f"{n}.0", f"{n + rng.choice([0, 1])}", f"{n}e0",
             f"{n}\\times10^{{0}}", f"\\frac{{{2 * n}}}{{2}}", f"{n / 100}", f"{n}\\times10^{{-400}}"]
    if rng.random() < 0.1:
        forms.append(str(n).translate(str.maketrans("0123456789", rng.choice(list(_DIGITS.values())))))
    gold = rng.choice([str(n), f"{n}\\%", f"{n}"])
    return rng.choice(forms), _open(gold)


def _choice(rng: random.Random) -> tuple[str, dict[str, Any]]:
    gold = rng.choice("ABCD")
    forms = [gold, f"({gold})", f"{gold}.", f"{gold}) {OPTS['ABCD'.index(gold)]}", rng.choice("ABCD"),
             "A or B", "A B C D", f"({gold}) and (C)", f"{gold}\\ {rng.choice(OPTS)}", rng.choice(OPTS)]
    return rng.choice(forms), {"answer": gold, "options": OPTS, "question_type": "multiple-choice"}


def _symbolic(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Half from a fixed list of forms, half with random coefficients (so that pairs rarely repeat)."""
    if rng.random() < 0.5:
        gold, candidates = rng.choice(_SYMBOLIC)
        return rng.choice(candidates), _open(gold)
    a, b, c = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7]), rng.randint(1, 9)
    pairs = [
        (f"{a}\\sqrt{{{b}}}", rng.choice([f"\\sqrt{{{a * a * b}}}", f"\\sqrt{{{a * a * b + 1}}}"])),
        (f"x^2+{2 * c}x+{c * c}", rng.choice([f"(x+{c})^2", f"(x+{c})(x-{c})"])),
        (f"\\frac{{{a}\\pi}}{{{b}}}", rng.choice([f"{a}\\pi/{b}", f"\\frac{{{a + 1}\\pi}}{{{b}}}"])),
        (f"{a}x+{c}y", rng.choice([f"{c}y+{a}x", f"{a}x-{c}y"])),
    ]
    gold, candidate = rng.choice(pairs)
    return candidate, _open(gold)


def _tower(rng: random.Random) -> tuple[str, dict[str, Any]]:
    return rng.choice(TOWERS), _open(rng.choice(["2", "\\sqrt{8}", "x^2"]))


def _soup(rng: random.Random) -> tuple[str, dict[str, Any]]:
    return "".join(rng.choice(_SOUP) for _ in range(rng.randint(1, 40))), _open(rng.choice(["42", "\\sqrt{8}"]))


KINDS = [(_numeric, 0.45), (_choice, 0.25), (_symbolic, 0.12), (_soup, 0.15), (_tower, 0.03)]


def fuzz_corpus(n: int, seed: int = 0) -> list[tuple[str, str, dict[str, Any]]]:
    """``n`` seeded (kind, response, record) triples in the proportions of ``KINDS``."""
    rng = random.Random(seed)
    makers, weights = zip(*KINDS, strict=True)
    out = []
    for _ in range(n):
        maker = rng.choices(makers, weights)[0]
        answer, record = maker(rng)
        reasoning = "Let me think. " * (rng.choice([1, 20, 700]))  # up to ~10k characters
        tail = rng.choice(["", ".", " cm.", " and that is all there is to say about it"])
        out.append((maker.__name__.strip("_"), f"{reasoning}</think>\nSo \\boxed{{{answer}}}{tail}", record))
    return out


def _child_cpu_s(accuracy: Any) -> tuple[int | None, float]:
    """(pid, CPU seconds used so far) of the active math-verify child (Linux /proc; (None, 0.0) where unreadable)."""
    proc = getattr(getattr(accuracy, "_verifier", None), "_proc", None)
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return proc.pid, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError, IndexError):
        return None, 0.0


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max": ordered[-1]}


def time_rewards(corpus: list[tuple[str, str, dict[str, Any]]], accuracy: Any, fmt: Any) -> dict[str, Any]:
    """Seconds per response (accuracy + format, one call each): wall clock, and CPU time (this process plus
    the math-verify child, which is what the wall time would be on an idle core), the slowest per kind and
    the five slowest responses."""
    wall: list[float] = []
    cpu: list[float] = []
    slowest: dict[str, float] = Counter()
    worst: list[tuple[float, str, str]] = []
    for kind, response, record in corpus:
        (pid0, child0), cpu0, start = _child_cpu_s(accuracy), time.process_time(), time.perf_counter()
        accuracy([response], [record])
        fmt([response], [record])
        elapsed = time.perf_counter() - start
        pid1, child1 = _child_cpu_s(accuracy)
        # a new child (after a deadline miss) hides the old one's CPU time: count the wall time instead
        cpu.append(time.process_time() - cpu0 + child1 - child0 if pid1 == pid0 else elapsed)
        wall.append(elapsed)
        slowest[kind] = max(slowest[kind], elapsed)
        worst = sorted([*worst, (elapsed, kind, response.rsplit("</think>", 1)[-1][:80])], reverse=True)[:5]
    return {"n": len(wall), **_percentiles(wall), "cpu": _percentiles(cpu), "slowest": dict(slowest),
            "worst": worst}


def main(argv: list[str] | None = None) -> None:
    from modules.rewards import AccuracyReward, FormatReward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="responses in the fuzzed corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = fuzz_corpus(args.n, args.seed)
    accuracy, fmt = AccuracyReward(), FormatReward()
    accuracy(["x</think>\\boxed{2\\sqrt{2}}"], [_open("\\sqrt{8}")])  # start the worker outside the timing
    time.sleep(2.0)  # and let its spare finish importing, as the trainer's first rollout would
    start = time.perf_counter()
    stats = time_rewards(corpus, accuracy, fmt)
    wall = time.perf_counter() - start
    accuracy.close()
    kinds = Counter(c[0] for c in corpus)
    print(f"{stats['n']} responses, seed {args.seed}, {wall:.1f} s in all ("
          + ", ".join(f"{k} {v / len(corpus):.0%}" for k, v in kinds.items()) + ")")
    print(f"{'per response':14}{'wall':>12}{'cpu':>12}{'target':>12}   (cpu: this process + math-verify child)")
    for key, target in (("p50", None), ("p99", TARGET_P99_S), ("max", TARGET_MAX_S)):
        goal = f"{target * 1e3:>10.0f}ms" if target else f"{'':>12}"
        print(f"{key:14}{stats[key] * 1e3:>10.2f}ms{stats['cpu'][key] * 1e3:>10.2f}ms{goal}")
    print("slowest response by kind: " + ", ".join(f"{k} {v * 1e3:.1f}ms" for k, v in stats["slowest"].items()))
    for elapsed, kind, answer in stats["worst"]:
        print(f"  slow: {elapsed * 1e3:8.1f}ms {kind:9} {answer!r}")
    print(f"load average while measuring (1/5/15 min): {os.getloadavg()}, on {os.cpu_count()} cores")
    calls = accuracy._verifier.calls if accuracy._verifier is not None else 0
    print(f"math-verify calls: {calls} ({calls / len(corpus):.1%}); screened before it: {accuracy.screened}; "
          f"deadline misses: "
          f"{accuracy.verify_timeouts}; reward errors: {accuracy.errors + fmt.errors}")


if __name__ == "__main__":
    main()
