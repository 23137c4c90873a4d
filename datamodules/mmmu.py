"""MMMU loading (HF parquet layout), prompt construction and the official prediction layout.

Layout read: ``<data_dir>/<Subject>/<split>-*.parquet`` (as on the hub, e.g.
``Accounting/validation-00000-of-00001.parquet``) or ``<data_dir>/<Subject>/<split>.parquet``. Rows that
cannot be used are skipped, counted by reason and listed by id in the ``LoadReport``; nothing is dropped
silently. ``options`` strings are parsed with ``ast.literal_eval`` only (never ``eval``).

Image markers: ``<image N>`` becomes an ``<image>`` placeholder fed the row's ``image_N``. A marker that
cannot be an image stays in the prompt as written and is listed in ``LoadReport.unresolved_markers``, and
the item is kept, as the official scoring keeps every item: a marker beyond MMMU's seven image columns
(``validation_Math_7``'s options name ``<image 7>`` ... ``<image 30>``), and a marker in an option whose
image column is empty. A question marker whose image column is empty is a broken row (``missing_image``).
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from datamodules.types import PromptRecord
from modules.mmmu_rules import SUBJECTS, get_multi_choice_info, parse_gold

IMAGE_PLACEHOLDER = "<image>"
MAX_IMAGES = 7
MARKER = re.compile(r"<image (\d+)>")
OPEN_INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."
MC_INSTRUCTION = "Think step by step, then give the letter of the correct option in \\boxed{}."
QUESTION_TYPE_ALIASES = {"multiple-choice": "multiple-choice", "open": "open", "short-answer": "open"}
DIFFICULTY_LEVELS = {"easy": 1, "medium": 2, "hard": 3}
REQUIRED_COLUMNS = ("id", "question", "options", "answer", "question_type")
SKIP_REASONS = (
    "missing_image", "bad_image", "bad_options", "unknown_question_type", "bad_answer", "duplicate_id",
)


class BadRow(Exception):
    """A row that cannot become an item; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class MMMUItem:
    """One usable MMMU question. ``images`` follow the ``<image>`` placeholders of ``prompt_text`` in order;
    ``image_slots`` says which ``image_N`` column each came from. ``answer`` is the raw gold string."""

    id: str
    subject: str
    question_type: str
    answer: str
    options: list[str]
    images: list[Any]
    prompt_text: str
    question: str
    image_slots: list[int]
    difficulty: str | None = None
    subfield: str | None = None
    explanation: str | None = None
    img_type: list[str] = field(default_factory=list)

    @property
    def all_choices(self) -> list[str]:
        """Option letters A, B, ... (empty for open questions)."""
        return get_multi_choice_info(self.options)[1]

    @property
    def index2ans(self) -> dict[str, str]:
        """Letter -> option text, as the official ``get_multi_choice_info``."""
        return get_multi_choice_info(self.options)[0]

    @property
    def gold(self) -> str | list[str]:
        """The gold answer, list-literal strings expanded (``parse_gold``)."""
        return parse_gold(self.answer)

    def to_prompt_record(self) -> PromptRecord:
        """The shared prompt schema: ``question`` is ``prompt_text`` (options and instruction included);
        for a gold with several accepted answers, ``answer`` is the first."""
        gold = self.gold
        level = DIFFICULTY_LEVELS.get((self.difficulty or "").strip().lower())
        return PromptRecord(
            id=self.id, question=self.prompt_text, answer=gold if isinstance(gold, str) else gold[0],
            question_type=self.question_type, options=list(self.options), images=list(self.images),
            difficulty=level, subject=self.subject, solution=self.explanation or None,
        )


@dataclass
class LoadReport:
    """What ``load_mmmu`` read, skipped and could not find."""

    split: str
    subjects_loaded: list[str] = field(default_factory=list)
    missing_subjects: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    items_loaded: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    unreferenced_images: list[str] = field(default_factory=list)
    unresolved_markers: dict[str, list[int]] = field(default_factory=dict)

    @property
    def skipped_counts(self) -> dict[str, int]:
        """Skipped rows per reason."""
        return {reason: len(ids) for reason, ids in self.skipped.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, counts included."""
        return {**asdict(self), "skipped_counts": self.skipped_counts}


def parse_options(text: Any) -> list[str]:
    """Options from their list-literal string via ``ast.literal_eval``; BadRow('bad_options') otherwise."""
    if isinstance(text, list):
        value: Any = text
    else:
        try:
            value = ast.literal_eval(str(text).strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
            raise BadRow("bad_options", f"not a list literal ({type(err).__name__})") from err
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise BadRow("bad_options", "options is not a list of strings")
    return [str(v) for v in value]


def decode_image(cell: Any, base_dir: Path) -> Image.Image:
    """An HF Image cell (``{"bytes", "path"}``) as a loaded RGB image; BadRow('bad_image') if unreadable."""
    data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    try:
        if data:
            image = Image.open(io.BytesIO(data))
        elif path:
            candidate = Path(path) if Path(path).is_absolute() else base_dir / path
            image = Image.open(candidate)
        else:
            raise BadRow("bad_image", "image cell has neither bytes nor path")
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadRow("bad_image", f"cannot decode image: {err}") from err


def render_markers(
    text: str, seen: list[int], resolvable: Sequence[int] | None = None, unresolved: list[int] | None = None
) -> str:
    """Replace ``<image N>`` markers: first appearance of N -> ``<image>`` (N appended to ``seen``);
    a repeated N -> ``[image k]``, k being the position of its placeholder (1-based). A marker whose N is not
    in ``resolvable`` (when given) stays as written and N is appended to ``unresolved``."""
    def swap(match: re.Match[str]) -> str:
        slot = int(match.group(1))
        if resolvable is not None and slot not in resolvable:
            if unresolved is not None and slot not in unresolved:
                unresolved.append(slot)
            return match.group(0)
        if slot in seen:
            return f"[image {seen.index(slot) + 1}]"
        seen.append(slot)
        return IMAGE_PLACEHOLDER
    return MARKER.sub(swap, text)


def build_prompt(
    question: str, options: Sequence[str], question_type: str, present: Sequence[int] | None = None
) -> tuple[str, list[int], list[int]]:
    """Prompt text, the image slots in placeholder order (question first, then options A, B, ...) and the
    unresolved marker numbers (kept as text; see the module docstring). ``present``: the row's non-empty
    image columns (None: all seven)."""
    seen: list[int] = []
    unresolved: list[int] = []
    columns = range(1, MAX_IMAGES + 1)
    parts = [render_markers(question.strip(), seen, columns, unresolved)]
    if options:
        letters = get_multi_choice_info(options)[1]
        in_options = columns if present is None else present
        lines = [f"{letter}. {render_markers(opt, seen, in_options, unresolved)}"
                 for letter, opt in zip(letters, options, strict=True)]
        parts.append("Options:\n" + "\n".join(lines))
    parts.append(MC_INSTRUCTION if question_type == "multiple-choice" else OPEN_INSTRUCTION)
    return "\n\n".join(parts), seen, sorted(unresolved)


def _check_answer(answer: str, question_type: str, letters: Sequence[str]) -> None:
    """MC golds must be option letters (or a list of them)."""
    if question_type != "multiple-choice":
        return
    gold = parse_gold(answer)
    golds = [gold] if isinstance(gold, str) else gold
    if not golds or any(g not in letters for g in golds):
        raise BadRow("bad_answer", f"gold {answer!r} is not one of {list(letters)}")


def row_to_item(row: Mapping[str, Any], subject: str, base_dir: Path) -> tuple[MMMUItem, bool, list[int]]:
    """One parquet row as an item, whether images were present but never referenced (those are put first,
    with their own placeholders at the start of the prompt), and the unresolved markers. Raises BadRow."""
    qtype = QUESTION_TYPE_ALIASES.get(str(row.get("question_type", "")).strip())
    if qtype is None:
        raise BadRow("unknown_question_type", repr(row.get("question_type")))
    options = parse_options(row.get("options"))
    if qtype == "multiple-choice" and len(options) < 2:
        raise BadRow("bad_options", f"multiple-choice with {len(options)} options")
    question, answer = str(row.get("question") or ""), str(row.get("answer") or "").strip()
    _check_answer(answer, qtype, get_multi_choice_info(options)[1])
    present = [n for n in range(1, MAX_IMAGES + 1) if row.get(f"image_{n}") is not None]
    prompt, slots, unresolved = build_prompt(question, options, qtype, present)
    missing = [n for n in slots if n not in present]
    if missing:
        raise BadRow("missing_image", f"markers {missing} have no image")
    unreferenced = [n for n in present if n not in slots]
    if unreferenced:
        prompt = "\n".join([IMAGE_PLACEHOLDER] * len(unreferenced) + [prompt])
        slots = unreferenced + slots
    images = [decode_image(row[f"image_{n}"], base_dir) for n in slots]
    item = MMMUItem(
        id=str(row["id"]), subject=subject, question_type=qtype, answer=answer, options=options,
        images=images, prompt_text=prompt, question=question, image_slots=slots,
        difficulty=row.get("topic_difficulty"), subfield=row.get("subfield"),
        explanation=row.get("explanation"), img_type=_img_types(row.get("img_type")),
    )
    return item, bool(unreferenced), unresolved


def _img_types(text: Any) -> list[str]:
    """``img_type`` list literal; [] when absent or unparseable (informational only)."""
    try:
        return parse_options(text) if text is not None else []
    except BadRow:
        return []


def split_files(subject_dir: Path, split: str) -> list[Path]:
    """The parquet files of one split in a subject folder (sharded HF names or ``<split>.parquet``)."""
    return sorted(set(subject_dir.glob(f"{split}-*.parquet")) | set(subject_dir.glob(f"{split}.parquet")))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a parquet file; ValueError naming the file when it is unreadable or lacks columns."""
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: cannot read parquet ({err})") from err
    absent = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if absent:
        raise ValueError(f"{path}: missing required columns {absent}")
    return table.to_pylist()


def load_mmmu(
    data_dir: str | Path,
    split: str = "validation",
    subjects: Sequence[str] | None = None,
    limit_per_subject: int | None = None,
) -> tuple[list[MMMUItem], LoadReport]:
    """Load MMMU items of ``split`` for ``subjects`` (default: all 30, in sorted order).

    Subjects with no folder or no file for the split are listed in ``report.missing_subjects``; bad rows
    are skipped and listed in ``report.skipped[reason]``. ``limit_per_subject`` keeps the first N usable
    items of each subject in file order. Raises FileNotFoundError if ``data_dir`` does not exist and
    ValueError for an unknown subject name or an unreadable file.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"MMMU data dir not found: {root}")
    wanted = list(SUBJECTS if subjects is None else subjects)
    unknown = [s for s in wanted if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"unknown MMMU subjects {unknown}; known: {list(SUBJECTS)}")
    report, items, seen_ids = LoadReport(split=split), [], set()
    for subject in wanted:
        files = split_files(root / subject, split)
        if not files:
            report.missing_subjects.append(subject)
            continue
        report.subjects_loaded.append(subject)
        count = 0
        for path in files:
            report.files.append(str(path))
            for row in _read_rows(path):
                if limit_per_subject is not None and count >= limit_per_subject:
                    break
                report.rows_read += 1
                item_id = str(row.get("id"))
                try:
                    if item_id in seen_ids:
                        raise BadRow("duplicate_id", item_id)
                    item, unreferenced, unresolved = row_to_item(row, subject, path.parent)
                except BadRow as bad:
                    report.skipped.setdefault(bad.reason, []).append(item_id)
                    continue
                seen_ids.add(item_id)
                if unreferenced:
                    report.unreferenced_images.append(item_id)
                if unresolved:
                    report.unresolved_markers[item_id] = unresolved
                items.append(item)
                count += 1
    report.items_loaded = len(items)
    return items, report


def write_predictions(
    out_dir: str | Path, items: Sequence[MMMUItem], responses: Sequence[str | Sequence[str]]
) -> dict[str, Path]:
    """Write the official parse-and-eval layout ``<out_dir>/<Subject>/output.json``.

    ``responses[i]`` answers ``items[i]``: a string, or a list of sampled strings (one entry per sample,
    same id, with a ``sample`` index; ``app.mmmu score`` averages them per id). Returns subject -> path.
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for item, resp in zip(items, responses, strict=True):
        samples = [resp] if isinstance(resp, str) else list(resp)
        for k, text in enumerate(samples):
            entry = {"id": item.id, "question_type": item.question_type, "answer": item.gold,
                     "all_choices": item.all_choices, "index2ans": item.index2ans, "response": text,
                     "question": item.question}  # extra key: what a judge (app.mmmu score --judge-url) reads
            if not isinstance(resp, str):
                entry["sample"] = k
            by_subject.setdefault(item.subject, []).append(entry)
    paths: dict[str, Path] = {}
    for subject, entries in by_subject.items():
        path = Path(out_dir) / subject / "output.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries, indent=2, ensure_ascii=False), encoding="utf-8")
        paths[subject] = path
    return paths
