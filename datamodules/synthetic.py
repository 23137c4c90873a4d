"""Synthetic visual-reasoning data for the embedded tiny default: grid-aligned shapes, five tasks, R1-style traces.

Perception is kept easy on purpose (see docs "tiny-task"): every image is a grid of `cell`-px cells holding at most
one shape (±2 px jitter) on white, three shapes and four saturated colours, so one 28x28 vision token sees one
shape. Difficulty (1-5) lives in the reasoning: more objects, more distractors, conjunction queries (colour AND
shape), two counts, arithmetic, two images.

Tasks (stored as `subject`): `count` (open), `compare` (MC: A first / B second / C same), `two_images` (open, sum or
difference over `<image 1>` and `<image 2>`), `match_option` (MC over four numbers), `arithmetic` (open, points).

Every item carries a correct trace (`solution`): per-row listing of the matching objects, a count, one self-check
that opens with a critical word ("Wait", "Hmm", "Alternatively"), then `</think>` and `The answer is \\boxed{X}.`.
With `trace_error_rate` r, a fraction r of the items get a *slipped* trace: it misses the last matching object of
the first counted group (reading order), so the boxed answer is wrong while the row's `answer` stays right. The slip
is chosen so that it always changes the final answer (compare items differ by at most one; match options always
hold n-1). `meta` (JSON) keeps the drawn objects, queries and parameters so answers can be recounted.

The scenes themselves (`Obj`, `Query`, sampling, rendering, PNG bytes) are in `datamodules.scenes`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from datamodules.scenes import (
    COLOURS,
    SHAPES,
    Obj,
    Query,
    encode_png,
    pick,
    randint,
    render_image,
    sample_query,
    sample_scene,
)

TASKS: tuple[str, ...] = ("count", "compare", "two_images", "match_option", "arithmetic")
DIFFICULTIES: tuple[int, ...] = (1, 2, 3, 4, 5)
CRITICAL_WORDS: tuple[str, ...] = ("Wait", "Hmm", "Alternatively")
LETTERS = "ABCD"
SPLIT_CODES: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

# Target counts per difficulty: one counted group / two counted groups (two groups share one 4x4 grid).
ONE_COUNT: dict[int, tuple[int, int]] = {1: (1, 2), 2: (1, 3), 3: (2, 4), 4: (2, 5), 5: (3, 6)}
TWO_COUNT: dict[int, tuple[int, int]] = {1: (1, 2), 2: (1, 3), 3: (1, 3), 4: (2, 4), 5: (2, 4)}
DISTRACTORS: dict[int, tuple[int, int]] = {1: (0, 1), 2: (1, 2), 3: (2, 4), 4: (3, 5), 5: (4, 6)}
MIN_GRID = 4  # the densest scene (4 + 4 targets + 6 distractors) needs 14 of 16 cells


@dataclass
class Drawn:
    """A task instance before rendering: scenes (one object list per image) and all text."""

    scenes: list[list[Obj]]
    queries: list[Query]
    question: str
    answer: str
    solution: str
    options: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- trace helpers
def _seen(objs: list[Obj], query: Query, slip: bool) -> list[Obj]:
    """The matching objects the trace reports; a slipped trace misses the last one in reading order."""
    hits = [o for o in objs if query.matches(o)]
    return hits[:-1] if slip else hits


def _rows(hits: list[Obj]) -> str:
    """'Row 1: red circle, red square. Row 3: red circle.' ('I see none.' when empty)."""
    if not hits:
        return "I see none."
    by_row: dict[int, list[str]] = {}
    for o in hits:
        by_row.setdefault(o.row, []).append(o.name)
    return " ".join(f"Row {r + 1}: {', '.join(names)}." for r, names in sorted(by_row.items()))


def _look(query: Query, hits: list[Obj], lead: str = "I look for the") -> str:
    return f"{lead} {query.noun()}. {_rows(hits)} That makes {len(hits)}."


def _recount(rng: np.random.Generator, query: Query, hits: list[Obj]) -> str:
    """A self-check of one count, opening with a critical word."""
    n = len(hits)
    seq = ", ".join(str(i) for i in range(1, n + 1)) or "none"
    row_counts = [sum(1 for o in hits if o.row == r) for r in sorted({o.row for o in hits})]
    variant = int(rng.integers(3 if len(row_counts) >= 2 else 2))
    if variant == 0:
        return f"Wait, let me recount the {query.noun()}: {seq}. Yes, {n}."
    if variant == 1:
        return f"Hmm, let me count the {query.noun()} again: {seq}. Yes, {n}."
    return f"Alternatively, by rows: {' + '.join(map(str, row_counts))} = {n}. Yes, {n}."


def _finish(reasoning: str, boxed: str) -> str:
    """Close the thought (the `<think>\\n` opening is pre-filled by the chat template) and box the answer."""
    return f"{reasoning}\n</think>\nThe answer is \\boxed{{{boxed}}}."


# ------------------------------------------------------------------------------------------------------- tasks
def _count(rng: np.random.Generator, d: int, grid: int, slip: bool) -> Drawn:
    q = sample_query(rng, colour=True, shape=d >= 3)
    n = randint(rng, ONE_COUNT[d])
    scene = sample_scene(rng, [(q, n)], DISTRACTORS[d], grid)
    hits = _seen(scene, q, slip)
    text = f"{_look(q, hits)} {_recount(rng, q, hits)}"
    question = f"<image>\nHow many {q.noun()} are there?"
    return Drawn([scene], [q], question, str(n), _finish(text, str(len(hits))))


def _compare(rng: np.random.Generator, d: int, grid: int, slip: bool) -> Drawn:
    colour, shape = d != 3, d >= 3
    q1 = sample_query(rng, colour, shape)
    q2 = sample_query(rng, colour, shape, avoid=q1)
    lo, hi = TWO_COUNT[d]
    relation = pick(rng, ("more", "fewer", "same"))
    if relation == "same":
        a = b = randint(rng, (lo, hi))
    else:  # counts differ by one, so an undercount by one always flips the verdict
        small = randint(rng, (lo, hi - 1))
        a, b = (small + 1, small) if relation == "more" else (small, small + 1)
    scene = sample_scene(rng, [(q1, a), (q2, b)], DISTRACTORS[d], grid)
    slip1 = slip and a >= b
    h1, h2 = _seen(scene, q1, slip1), _seen(scene, q2, slip and not slip1)
    na, nb = len(h1), len(h2)
    options = [q1.noun(), q2.noun(), "the same number"]
    seen_letter = "A" if na > nb else "B" if nb > na else "C"
    verdict = {"A": f"more {q1.noun()}", "B": f"more {q2.noun()}", "C": "the same number"}[seen_letter]
    opener = pick(rng, ("Wait, let me check", "Hmm, let me compare again"))
    text = (
        f"{_look(q1, h1, 'I count the')} {_look(q2, h2, 'Now the')} {opener}: {na} and {nb}. Yes, {verdict}."
    )
    true_letter = "A" if a > b else "B" if b > a else "C"
    question = f"<image>\nAre there more {q1.noun()} or more {q2.noun()}?"
    return Drawn([scene], [q1, q2], question, true_letter, _finish(text, seen_letter), options)


def _two_images(rng: np.random.Generator, d: int, grid: int, slip: bool) -> Drawn:
    q = sample_query(rng, colour=True, shape=d >= 4)
    op = "difference" if d in (3, 5) else "sum"
    lo, hi = TWO_COUNT[d]
    if op == "sum":
        a, b = randint(rng, (lo, hi)), randint(rng, (lo, hi))
    else:
        b = randint(rng, (lo, hi - 1))
        a = randint(rng, (b + 1, hi))
    scenes = [
        sample_scene(rng, [(q, a)], DISTRACTORS[d], grid),
        sample_scene(rng, [(q, b)], DISTRACTORS[d], grid),
    ]
    h1, h2 = _seen(scenes[0], q, slip), _seen(scenes[1], q, False)
    na, nb = len(h1), len(h2)
    head = (
        f"In image 1, the {q.noun()}: {_rows(h1)} That makes {na}. In image 2: {_rows(h2)} That makes {nb}."
    )
    if op == "sum":
        result, truth = na + nb, a + b
        text = f"{head} Together {na} + {nb} = {result}. Wait, let me add again: {nb} + {na} = {result}. Yes, {result}."
        question = f"<image 1>\n<image 2>\nHow many {q.noun()} are there in image 1 and image 2 together?"
    else:
        result, truth = na - nb, a - b
        text = f"{head} So {na} - {nb} = {result}. Hmm, check: {nb} + {result} = {na}. Yes, {result}."
        question = f"<image 1>\n<image 2>\nHow many more {q.noun()} are there in image 1 than in image 2?"
    return Drawn(scenes, [q], question, str(truth), _finish(text, str(result)), params={"op": op})


def _match_option(rng: np.random.Generator, d: int, grid: int, slip: bool) -> Drawn:
    q = sample_query(rng, colour=d >= 3, shape=d != 3)
    n = randint(rng, ONE_COUNT[d])
    start = randint(rng, (max(0, n - 3), n - 1))  # four consecutive numbers holding n and n - 1
    values = [start + i for i in rng.permutation(4)]
    options = [str(v) for v in values]
    scene = sample_scene(rng, [(q, n)], DISTRACTORS[d], grid)
    hits = _seen(scene, q, slip)
    letter = LETTERS[values.index(len(hits))]
    text = f"{_look(q, hits)} {_recount(rng, q, hits)} That is option {letter}."
    question = f"<image>\nHow many {q.noun()} are there?"
    answer = LETTERS[values.index(n)]
    return Drawn([scene], [q], question, answer, _finish(text, letter), options)


def _arithmetic(rng: np.random.Generator, d: int, grid: int, slip: bool) -> Drawn:
    """d1-2: one colour, d3: one colour+shape; d4: two colours, d5: two colour+shape groups."""
    if d <= 3:
        q = sample_query(rng, colour=True, shape=d == 3)
        k = randint(rng, (2, 3) if d < 3 else (2, 4))
        n = randint(rng, ONE_COUNT[d])
        scene = sample_scene(rng, [(q, n)], DISTRACTORS[d], grid)
        hits = _seen(scene, q, slip)
        p = len(hits) * k
        adds = " + ".join([str(k)] * len(hits)) or "0"
        text = f"{_look(q, hits)} Each is worth {k}, so {len(hits)} * {k} = {p}. Wait, let me check: {adds} = {p}. Yes, {p}."
        question = (
            f"<image>\nIf each {q.noun(False)} is worth {k} points, how many points do the {q.noun()} make?"
        )
        return Drawn([scene], [q], question, str(n * k), _finish(text, str(p)), params={"points": [k]})
    q1 = sample_query(rng, colour=True, shape=d == 5)
    q2 = sample_query(rng, colour=True, shape=d == 5, avoid=q1)
    k1, k2 = randint(rng, (2, 4)), randint(rng, (2, 4))
    a, b = randint(rng, TWO_COUNT[d]), randint(rng, TWO_COUNT[d])
    scene = sample_scene(rng, [(q1, a), (q2, b)], DISTRACTORS[d], grid)
    h1, h2 = _seen(scene, q1, slip), _seen(scene, q2, False)
    p1, p2 = len(h1) * k1, len(h2) * k2
    text = (
        f"{_look(q1, h1)} So {len(h1)} * {k1} = {p1}. {_look(q2, h2, 'Now the')} So {len(h2)} * {k2} = {p2}. "
        f"Total {p1} + {p2} = {p1 + p2}. Hmm, let me add again: {p2} + {p1} = {p1 + p2}. Yes, {p1 + p2}."
    )
    question = (
        f"<image>\nIf each {q1.noun(False)} is worth {k1} points and each {q2.noun(False)} is worth {k2} points, "
        "how many points are there in total?"
    )
    answer = str(a * k1 + b * k2)
    return Drawn(
        [scene], [q1, q2], question, answer, _finish(text, str(p1 + p2)), params={"points": [k1, k2]}
    )


_BUILDERS = dict(zip(TASKS, (_count, _compare, _two_images, _match_option, _arithmetic), strict=True))


# --------------------------------------------------------------------------------------------------- generation
def _split_code(split: str) -> int:
    """A stable integer per split name (used in the RNG seed, so splits never share a stream)."""
    if split in SPLIT_CODES:
        return SPLIT_CODES[split]
    return 1000 + sum((i + 1) * ord(ch) for i, ch in enumerate(split))


@lru_cache(maxsize=256)
def _block_order(seed: int, split_code: int, block: int, n_combos: int) -> tuple[int, ...]:
    order = np.random.default_rng([seed, split_code, block, 7]).permutation(n_combos)
    return tuple(int(i) for i in order)


def check_mix(tasks: Sequence[str], difficulties: Sequence[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The task and difficulty lists as tuples, or a ValueError naming what is wrong (empty, unknown, repeated)."""
    tasks, difficulties = tuple(tasks), tuple(int(d) for d in difficulties)
    if not tasks or set(tasks) - set(TASKS) or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {list(tasks)}: give one or more distinct tasks out of {list(TASKS)}")
    if not difficulties or set(difficulties) - set(DIFFICULTIES) or len(set(difficulties)) != len(difficulties):
        raise ValueError(f"difficulties {list(difficulties)}: give one or more distinct levels out of {list(DIFFICULTIES)}")
    return tasks, difficulties


def task_and_difficulty(
    index: int, seed: int, split: str, tasks: Sequence[str] = TASKS, difficulties: Sequence[int] = DIFFICULTIES
) -> tuple[str, int]:
    """Balanced assignment: each block of len(tasks) * len(difficulties) items (25 by default) holds every
    (task, difficulty) pair once, in shuffled order."""
    n_combos = len(tasks) * len(difficulties)
    block, pos = divmod(index, n_combos)
    combo = _block_order(seed, _split_code(split), block, n_combos)[pos]
    return tasks[combo % len(tasks)], difficulties[combo // len(tasks)]


def _meta(drawn: Drawn, task: str, difficulty: int, slip: bool) -> str:
    """The ground truth as compact, key-sorted JSON: objects per image, queries, task parameters, slip flag."""
    payload = {
        "task": task,
        "difficulty": difficulty,
        "images": [[vars(o) for o in scene] for scene in drawn.scenes],  # vars: asdict deep-copies, 3x slower
        "queries": [vars(q) for q in drawn.queries],
        "params": drawn.params,
        "trace_error": slip,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


TRACE_ERROR_KINDS = ("count", "answer", "hasty")
LISTING_SLIP_KINDS = ("count", "hasty")  # the kinds whose slipped trace misses an object in its listing
HASTY_OPENER = "Quick look."  # opens a "hasty" slipped trace; no correct trace starts with it


MISBOX_SHIFT = 2  # not 1: a tiny model's counts are often one short, and a +1 box would then be right by accident,
#                  rewarding the error in RL as often as the fix (measured: GRPO gained nothing on T=1 accuracy)


def misbox(solution: str, options: Sequence[str]) -> str:
    """The same trace with its boxed answer off by two (integer + 2, or the option letter two further on)."""
    m = list(re.finditer(r"\\boxed\{([^{}]*)\}", solution))[-1]
    value = m.group(1)
    if options:
        letters = "ABCDEFGHIJ"[: len(options)]
        wrong = letters[(letters.index(value) + MISBOX_SHIFT) % len(letters)]
    else:
        wrong = str(int(value) + MISBOX_SHIFT)
    return solution[: m.start(1)] + wrong + solution[m.end(1):]


def make_item(
    index: int,
    seed: int,
    split: str = "train",
    image_size: int = 112,
    cell: int = 28,
    trace_error_rate: float = 0.0,
    render: bool = True,
    trace_error_kind: str = "count",
    tasks: Sequence[str] = TASKS,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> dict[str, Any]:
    """One schema row (README "Data schema"), plus `meta`. Images are HF Image structs {bytes, path}.

    `trace_error_kind`: "count" (the listing misses an object, see the module docstring), "hasty" (the same slipped
    trace, opened by `HASTY_OPENER`, so the habit is announced by the first response token) or "answer" (the
    reasoning is right but the boxed answer is off by two: the number + 2, or the option letter two further on).

    `tasks` and `difficulties` restrict the mix: each block of rows then holds every chosen (task, level) pair once.

    The row depends only on (index, seed, split, sizes, rate, mix), so shards can be generated independently.
    With render=False the `images` list is empty (text only; used for tokenizer training text).
    """
    grid = image_size // cell
    if grid < MIN_GRID:
        raise ValueError(
            f"image_size // cell = {grid}; the tasks need a grid of at least {MIN_GRID}x{MIN_GRID} cells"
        )
    task, difficulty = task_and_difficulty(index, seed, split, *check_mix(tasks, difficulties))
    rng = np.random.default_rng([seed, _split_code(split), index])
    slip = bool(rng.random() < trace_error_rate)  # always drawn, so the rate never shifts the other draws
    if trace_error_kind not in TRACE_ERROR_KINDS:
        raise ValueError(f"trace_error_kind {trace_error_kind!r}: choose one of {TRACE_ERROR_KINDS}")
    drawn = _BUILDERS[task](rng, difficulty, grid, slip and trace_error_kind in LISTING_SLIP_KINDS)
    if slip and trace_error_kind == "answer":
        drawn.solution = misbox(drawn.solution, drawn.options)
    if slip and trace_error_kind == "hasty":
        drawn.solution = f"{HASTY_OPENER} {drawn.solution}"
    images = (
        [{"bytes": encode_png(render_image(s, image_size, cell)), "path": None} for s in drawn.scenes]
        if render
        else []
    )
    return {
        "id": f"{split}-{index:06d}",
        "images": images,
        "question": drawn.question,
        "options": drawn.options,
        "answer": drawn.answer,
        "question_type": "multiple-choice" if drawn.options else "open",
        "difficulty": difficulty,
        "subject": task,
        "solution": drawn.solution,
        "meta": _meta(drawn, task, difficulty, slip),
    }


def generate_items(
    n: int,
    seed: int,
    split: str = "train",
    image_size: int = 112,
    cell: int = 28,
    trace_error_rate: float = 0.0,
    start: int = 0,
    render: bool = True,
    trace_error_kind: str = "count",
    tasks: Sequence[str] = TASKS,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> list[dict[str, Any]]:
    """Rows `start` .. `start + n - 1` of a split (see `make_item`)."""
    if not 0.0 <= trace_error_rate <= 1.0:
        raise ValueError(f"trace_error_rate must be in [0, 1], got {trace_error_rate}")
    tasks, difficulties = check_mix(tasks, difficulties)
    return [
        make_item(i, seed, split, image_size, cell, trace_error_rate, render, trace_error_kind, tasks, difficulties)
        for i in range(start, start + n)
    ]


_MARKER = re.compile(r"<image(?:\s+\d+)?>\s*")


def SYNTH_VOCAB_TEXT(n: int = 500, seed: int = 12345) -> list[str]:  # noqa: N802 - name fixed by the brief
    """Sample texts for training the tiny tokenizer: questions (image markers removed: they are special tokens),
    solutions (correct and slipped), answers and option texts, plus every colour/shape word and digit."""
    texts: list[str] = []
    # The "count" slips, not the "hasty" ones: the tokenizer (and so every tiny model and measured figure) stays as
    # it was before that kind existed; byte-level BPE still encodes HASTY_OPENER, in a few more tokens.
    for row in generate_items(n, seed, split="vocab", trace_error_rate=0.5, render=False):
        texts += [_MARKER.sub("", row["question"]), row["solution"], row["answer"], *row["options"]]
    texts += [f"{c} {s} {s}s" for c in COLOURS for s in SHAPES] + [str(i) for i in range(100)]
    texts += [" ".join(CRITICAL_WORDS), " ".join(LETTERS)]
    return texts
