"""MMMU answer parsing, judging and aggregation, following the official MMMU eval rules.

Reimplements the behaviour of MMMU-Benchmark/MMMU ``eval/eval_utils.py`` (parse_multi_choice_response,
parse_open_response, extract_numbers, normalize_str, eval_multi_choice, eval_open) and the instance-weighted
aggregation of ``calculate_ins_level_acc``, plus a reasoning-aware pre-extraction (text after ``</think>``,
last balanced ``\\boxed{}``) that runs *before* the official rules.

Deliberate differences from the official code, all documented where they occur:
- the random fallback draws from a caller-supplied ``random.Random`` (the official code uses the global
  ``random`` seeded once with 42, so figures depend on call order) and reports that it fell back;
- ``parse_open_response`` de-duplicates preserving order instead of through an unordered ``set``
  (the judge is an any-match, so the verdict is the same);
- parser inputs longer than ``MAX_PARSE_CHARS`` are cut to their tail (the last mention wins anyway), and
  in open answers digit runs longer than ``MAX_DIGIT_RUN`` are cut to that many digits: the official number
  regexes are quadratic in a digit run's length (20,000 digits take ~15 s); no MMMU gold comes close.
All functions are pure apart from consuming the given ``rng``.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from modules.answer import last_boxed

DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Art & Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health & Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities & Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech & Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
SUBJECT_TO_DISCIPLINE: dict[str, str] = {s: d for d, subs in DISCIPLINES.items() for s in subs}
SUBJECTS: tuple[str, ...] = tuple(sorted(SUBJECT_TO_DISCIPLINE))

MAX_PARSE_CHARS = 20_000
MAX_DIGIT_RUN = 100
_LONG_DIGITS = re.compile(rf"\d{{{MAX_DIGIT_RUN + 1},}}")
EXTRACTION_MODES = ("prefilled", "optional", "raw")
_PUNCT_STRIP = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = {":", ",", ".", "!", "?", ";", "'"}
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_WRAPPERS = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|textit|mbox)\{(.*)\}$", re.DOTALL)
_BOXED = "\\boxed{"


def subject_from_id(item_id: str) -> str:
    """Subject of an MMMU id ``<split>_<Subject_Name>_<n>`` (the middle part); ValueError if malformed."""
    parts = item_id.split("_")
    if len(parts) < 3 or not parts[-1].isdigit():
        raise ValueError(f"not an MMMU id of the form <split>_<Subject>_<n>: {item_id!r}")
    return "_".join(parts[1:-1])


def get_multi_choice_info(options: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Letters for the options in order (A, B, ...): returns (index2ans, all_choices) as the official helper."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return dict(zip(letters, options, strict=True)), letters


def parse_gold(answer: Any) -> str | list[str]:
    """The gold answer: lists stay lists; a string that reads as a Python list literal becomes a list.

    Some open golds on the hub are stored as list-literal strings ("['24/7', '3/7']"); ``ast.literal_eval``
    is used (never ``eval``), and anything that does not parse to a list of scalars stays the plain string.
    """
    if isinstance(answer, list | tuple):
        return [str(a) for a in answer]
    text = str(answer)
    if text.strip().startswith("["):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
            return [str(v) for v in value]
    return text


# ----------------------------------------------------------------------------------------------------------
# Reasoning-aware extraction (ours, runs before the official rules)


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance; None when there is none.

    A trailing unclosed box is skipped (the previous balanced one counts). One level of ``\\text{}``-style
    wrapping around the whole content is removed so ``\\boxed{\\text{B}}`` reads as ``B``.
    """
    content = last_boxed(text)  # one linear scan (modules.answer), safe on thousands of unclosed boxes
    if content is None:
        return None
    content = content.strip()
    while (m := _WRAPPERS.match(content)) is not None:
        content = m.group(1).strip()
    return content


def reasoning_answer_text(response: str, think_prefilled: bool = True) -> str | None:
    """The answer part of a reasoning response, or None when the model never finished thinking.

    Choice documented here: the R1V3 chat template pre-fills ``<think>``, so a response is mid-thought from
    its first token and one with no ``</think>`` was cut off: None (unparsed), whatever it contains. With
    ``think_prefilled=False`` a response with no think tags at all is taken whole as the answer, and only an
    opened-but-unclosed ``<think>`` gives None. The candidate is the text after the *last* ``</think>``; if it
    holds a balanced ``\\boxed{}``, the last box's content. An empty answer part stays "" (the MC rules then
    fall back, which is reported as unparsed).
    """
    if "</think>" in response:
        tail = response.rsplit("</think>", 1)[1]
    elif think_prefilled or "<think>" in response:
        return None
    else:
        tail = response
    boxed = last_boxed_content(tail)
    return boxed if boxed is not None else tail.strip()


def answer_candidate(response: str, mode: str = "prefilled") -> str | None:
    """Text handed to the official parser under an extraction mode.

    ``prefilled``: ``reasoning_answer_text(think_prefilled=True)``; ``optional``: the same with
    ``think_prefilled=False``; ``raw``: the whole response, as the official script does.
    """
    if mode == "raw":
        return response
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"extraction mode must be one of {EXTRACTION_MODES}, got {mode!r}")
    return reasoning_answer_text(response, think_prefilled=(mode == "prefilled"))


# ----------------------------------------------------------------------------------------------------------
# Official rules


def parse_multi_choice_response(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random
) -> tuple[str, bool]:
    """Official MC parser. Returns (letter, fell_back); fell_back is True when the letter is a random guess.

    Order: strip each of ``, . ! ? ; : '`` in turn from both ends, pad with a space; candidates are letters
    written ``(X)``; else letters written `` X ``; else, for responses of more than 5 words, options whose
    text occurs (case-insensitive). Several candidates: the one mentioned last wins. None: ``rng.choice``.
    """
    text = response[-MAX_PARSE_CHARS:]
    for char in _PUNCT_STRIP:
        text = text.strip(char)
    text = f" {text} "
    candidates = [c for c in all_choices if f"({c})" in text]
    needles = {c: f"({c})" for c in candidates}
    haystack = text
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in text]
        needles = {c: f" {c} " for c in candidates}
    if not candidates and len(text.split()) > 5:
        haystack = text.lower()
        candidates = [c for c, ans in index2ans.items() if ans.lower() in haystack]
        needles = {c: index2ans[c].lower() for c in candidates}
    if not candidates:
        return rng.choice(list(all_choices)), True
    positions = [haystack.rfind(needles[c]) for c in candidates]
    return candidates[positions.index(max(positions))], False


def check_is_number(string: str) -> bool:
    """True when ``float`` accepts the string once commas are removed (official semantics)."""
    try:
        float(string.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(string: str) -> list[str | float]:
    """Official normalisation: numbers -> [float rounded to 2 decimals]; text -> [lower-cased].

    A single character becomes two padded variants ``[" x", "x "]`` so it only matches as a separate token.
    """
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def extract_numbers(string: str) -> list[str]:
    """All numbers in the text, official order: comma-grouped, then scientific notation, then plain."""
    return _NUM_COMMAS.findall(string) + _NUM_SCI.findall(string) + _NUM_SIMPLE.findall(string)


def _shortest_tail(sentence: str, indicators: Sequence[str]) -> str | None:
    """The shortest text after the last occurrence of any indicator (official tie and empty handling)."""
    shortest: str | None = None
    for indicator in indicators:
        if indicator in sentence:
            tail = sentence.split(indicator)[-1].strip()
            if not shortest or len(tail) < len(shortest):
                shortest = tail
    return shortest


def _key_subresponses(response: str) -> list[str]:
    """Official key-phrase split: per line, the shortest tail after an indicator; the last line also '='."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys: list[str] = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        tail = _shortest_tail(sentence, indicators)
        if tail and tail.strip() not in _TRIVIAL_TAILS:
            keys.append(tail)
    return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
    """Official open-answer parser: key tails plus every number in them, normalised, de-duplicated."""
    text = _LONG_DIGITS.sub(lambda m: m.group(0)[:MAX_DIGIT_RUN], response[-MAX_PARSE_CHARS:])
    keys = _key_subresponses(text)
    raw: list[str] = list(keys)
    for key in keys:
        raw.extend(extract_numbers(key))
    preds: list[str | float] = []
    for item in raw:
        for norm in normalize_str(item):
            if norm not in preds:
                preds.append(norm)
    return preds


def eval_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
    """Official MC judge: exact letter equality (gold may list several accepted letters)."""
    if isinstance(gold, str):
        return gold == pred
    return any(g == pred for g in gold)


def eval_open(gold: str | Sequence[str], preds: Sequence[str | float]) -> bool:
    """Official open judge: a text pred containing a text gold, or a float pred equal to a float gold."""
    golds: list[str | float] = []
    for g in [gold] if isinstance(gold, str) else gold:
        golds.extend(normalize_str(g))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Scoring and aggregation


def score_item(
    response: str,
    question_type: str,
    answer: Any,
    all_choices: Sequence[str],
    index2ans: Mapping[str, str],
    rng: random.Random,
    mode: str = "prefilled",
) -> dict[str, Any]:
    """Score one response: ``correct`` (official, random fallback from ``rng``), ``correct_strict``
    (fallback and unparsed count wrong), ``unparsed`` (no answer found), and ``pred``.

    An MC response with no answer part goes through the fallback like an empty official response, so
    ``correct`` stays comparable with official figures; an open one is simply wrong.
    """
    candidate = answer_candidate(response, mode)
    gold = parse_gold(answer)
    if question_type == "multiple-choice":
        letter, fell_back = parse_multi_choice_response(candidate or "", all_choices, index2ans, rng)
        correct = eval_multi_choice(gold, letter)
        unparsed = candidate is None or fell_back
        return {"correct": correct, "correct_strict": correct and not unparsed, "unparsed": unparsed,
                "pred": letter}
    unparsed = candidate is None or not candidate.strip()
    preds: list[str | float] = [] if unparsed else parse_open_response(candidate or "")
    correct = eval_open(gold, preds)
    return {"correct": correct, "correct_strict": correct, "unparsed": unparsed, "pred": preds}


SCORE_KEYS = ("correct", "correct_strict", "unparsed")
JUDGE_KEYS = ("correct_judge", "judged")  # judge mode (modules.mmmu_judge.apply_judge)


def _metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float | int]:
    """Instance-weighted metrics over per-id rows (acc, acc_strict, unparsed_frac, num; in judge mode also
    acc_judge and judged_frac)."""
    n = len(rows)
    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / n if n else 0.0
    out: dict[str, float | int] = {"acc": mean("correct"), "acc_strict": mean("correct_strict"),
                                   "unparsed_frac": mean("unparsed"), "num": n}
    if rows and all("correct_judge" in r for r in rows):
        out["acc_judge"], out["judged_frac"] = mean("correct_judge"), mean("judged")
    return out


def _per_id(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Average correctness over the samples of each id; ValueError on conflicting subjects."""
    groups: dict[str, dict[str, Any]] = {}
    results = list(results)
    keys = SCORE_KEYS + (JUDGE_KEYS if results and all("correct_judge" in r for r in results) else ())
    for res in results:
        item_id = str(res["id"])
        subject = res.get("subject") or subject_from_id(item_id)
        group = groups.setdefault(item_id, {"subject": subject, "n": 0, **dict.fromkeys(keys, 0.0)})
        if group["subject"] != subject:
            raise ValueError(f"id {item_id!r} appears under subjects {group['subject']!r} and {subject!r}")
        group["n"] += 1
        for key in keys:
            group[key] += float(bool(res[key]))
    for group in groups.values():
        for key in keys:
            group[key] /= group["n"]
    return groups


def aggregate(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall, per-discipline and per-subject metrics, weighted by instances (``calculate_ins_level_acc``).

    Each result needs ``id``, ``correct``, ``correct_strict``, ``unparsed`` and optionally ``subject``
    (else taken from the id); when every result also has ``correct_judge`` and ``judged`` (judge mode),
    ``acc_judge`` and ``judged_frac`` are reported too. Several results with one id are samples: their correctness is averaged
    first, so every question weighs the same. Subjects outside the 30 are reported under "Other".
    """
    per_id = _per_id(results)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in per_id.values():
        by_subject.setdefault(row["subject"], []).append(row)
    subjects = {s: _metrics(by_subject[s]) for s in sorted(by_subject)}
    disciplines: dict[str, dict[str, float | int]] = {}
    for name in [*DISCIPLINES, "Other"]:
        rows = [r for s, rs in by_subject.items() if SUBJECT_TO_DISCIPLINE.get(s, "Other") == name for r in rs]
        if rows:
            disciplines[name] = _metrics(rows)
    overall = _metrics(list(per_id.values()))
    overall["num_responses"] = sum(r["n"] for r in per_id.values())
    return {"overall": overall, "disciplines": disciplines, "subjects": subjects}
