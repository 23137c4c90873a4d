"""The prompt schema: its documentation, skip reasons and row validation into `PromptRecord`s. Pure: no tokenizer.

A bad row never stops a run: `validate_row` returns a `Skip` with a reason, a `SkipCounter` tallies them, and
`check_skip_fraction` fails loudly only when too many rows were skipped. A file missing a required column is not a
bad row but a bad file: `datamodules.row_io.read_rows` raises `SchemaError` naming the column and the file.
"""

from __future__ import annotations

import ast
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.types import QUESTION_TYPES, PromptRecord

SCHEMA_DOC = r"""
### Data schema

One row per prompt, in parquet (HF hub layout, e.g. `train-00000-of-00004.parquet`) or JSONL (`.jsonl`).

| column | type | notes |
|---|---|---|
| `id` | str | required; unique per file |
| `images` | list of images | required column (the list may be empty for a text-only row). Parquet: HF `Image` structs `{bytes, path}` (bytes win; a bare `path` is relative to the data file's folder). JSONL: paths relative to the data file's folder; paths that leave that folder are refused |
| `question` | str | required; `<image>` or `<image N>` markers (N 1-based) show where images go |
| `options` | list of str | empty for open questions; a string holding a Python list literal (MMMU style `"['a', 'b']"`) is accepted and parsed with `ast.literal_eval` (never `eval`). The question does not repeat the options: the prompt builder lists them as `A. …` |
| `answer` | str | required; for multiple-choice the letter (`B`); an answer equal to one option's text is turned into its letter |
| `question_type` | `multiple-choice` \| `open` | optional: inferred from `options` when missing |
| `difficulty` | int 1-5 | optional (curriculum ordering) |
| `subject` | str | optional (per-subject metrics) |
| `solution` | str | optional; the SFT target: reasoning, then `</think>`, then a short answer with `\boxed{...}`. It does NOT start with `<think>\n`: the chat template pre-fills that |

Other columns (the synthetic set's `meta`, MMMU's extras) are ignored. Files with their own column names are read
through `data.columns` (schema field -> your column, e.g. `{question: problem, answer: final_answer, images: image}`);
a single `image` column (one image, not a list) and MMMU-style `image_1` … `image_7` columns (empty cells left out)
stand in for `images` without a mapping.

Image markers: plain `<image>` markers count one image each, in order; numbered markers `<image 1>` … `<image K>`
must name every image once (repeats allowed) and none beyond the list. Mixing both kinds is refused. A question
with images and no marker at all is valid: the images are placed before the question text.

Rows that break a rule are skipped with a reason and counted (`corrupt_image`, `missing_image`,
`image_path_escapes`, `marker_count_mismatch`, `empty_question`, `question_too_long`, `missing_answer`,
`bad_text_encoding`, `options_on_open_question`, `options_not_a_list`, `bad_question_type`, `bad_difficulty`,
`missing_id`, `mc_without_options`, `answer_not_in_options`, `bad_json`). The id and difficulty are checked when
the files are indexed at set-up, everything else when a row is served (a bad row is replaced by the next row, so
the batch stays full); `data.validate: full` checks every row at set-up instead. A run stops with a clear error when
more than `data.max_skip_fraction` (1%) of the rows (served so far) were skipped.
""".strip()

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "question", "answer", "images")

CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
IMAGE_PATH_ESCAPES = "image_path_escapes"
MARKER_COUNT_MISMATCH = "marker_count_mismatch"
EMPTY_QUESTION = "empty_question"
QUESTION_TOO_LONG = "question_too_long"
MISSING_ANSWER = "missing_answer"
BAD_TEXT_ENCODING = "bad_text_encoding"
OPTIONS_ON_OPEN_QUESTION = "options_on_open_question"
OPTIONS_NOT_A_LIST = "options_not_a_list"
BAD_QUESTION_TYPE = "bad_question_type"
BAD_DIFFICULTY = "bad_difficulty"
MISSING_ID = "missing_id"
MC_WITHOUT_OPTIONS = "mc_without_options"
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
BAD_JSON = "bad_json"
SKIP_REASONS: tuple[str, ...] = (
    CORRUPT_IMAGE, MISSING_IMAGE, IMAGE_PATH_ESCAPES, MARKER_COUNT_MISMATCH, EMPTY_QUESTION, QUESTION_TOO_LONG,
    MISSING_ANSWER, BAD_TEXT_ENCODING, OPTIONS_ON_OPEN_QUESTION, OPTIONS_NOT_A_LIST, BAD_QUESTION_TYPE,
    BAD_DIFFICULTY, MISSING_ID, MC_WITHOUT_OPTIONS, ANSWER_NOT_IN_OPTIONS, BAD_JSON,
)  # fmt: skip

MARKER_RE = re.compile(r"<image(?:\s+(\d+))?>")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BAD_LINE_KEY = "__bad_json__"  # row_io.read_rows puts an unparseable JSONL line under this key
_TEXT_FIELDS = ("id", "question", "answer", "subject", "solution", "question_type")


class SchemaError(ValueError):
    """A data file that cannot be read as the schema (missing column, unknown format)."""


class SkipFractionError(RuntimeError):
    """More rows were skipped than allowed."""


@dataclass(frozen=True)
class RowLimits:
    """Bounds used by `validate_row`."""

    max_question_chars: int = 20000
    min_difficulty: int = 1
    max_difficulty: int = 5


@dataclass(frozen=True)
class Skip:
    """Why a row was dropped: `reason` is one of SKIP_REASONS, `detail` says what exactly."""

    reason: str
    id: str
    detail: str


class _SkipRow(Exception):
    """Raised inside the validators; turned into a `Skip` by `validate_row`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------------------ validation
def validate_row(
    raw: dict[str, Any], base_dir: str | Path, limits: RowLimits = RowLimits()
) -> PromptRecord | Skip:
    """Check one raw row and decode its images; returns a `PromptRecord` or a `Skip` saying why not.

    base_dir: the data file's folder; relative image paths resolve against it and may not leave it.
    Checks run cheapest first, so image decoding happens only for rows whose text is valid.
    """
    row_id = raw.get("id")
    shown_id = _shown(row_id)
    try:
        if BAD_LINE_KEY in raw:
            raise _SkipRow(BAD_JSON, str(raw[BAD_LINE_KEY]))
        text = {k: _text(raw.get(k), k) for k in _TEXT_FIELDS}
        if not text["id"]:
            raise _SkipRow(MISSING_ID, "id is empty or missing")
        question = text["question"] or ""
        if not MARKER_RE.sub("", question).strip():
            raise _SkipRow(EMPTY_QUESTION, "question has no text")
        if len(question) > limits.max_question_chars:
            raise _SkipRow(QUESTION_TOO_LONG, f"{len(question)} chars > {limits.max_question_chars}")
        if not text["answer"]:
            raise _SkipRow(MISSING_ANSWER, "answer is empty or missing")
        options = _options(raw.get("options"))
        qtype, answer = _question_type(text["question_type"], options, text["answer"])
        difficulty = _difficulty(raw.get("difficulty"), limits)
        sources = _image_list(raw.get("images"))
        _check_markers(question, len(sources))
        images = [_load_image(src, Path(base_dir)) for src in sources]
    except _SkipRow as skip:
        return Skip(skip.reason, shown_id, skip.detail)
    return PromptRecord(
        id=text["id"], question=question, answer=answer, question_type=qtype, options=options, images=images,
        difficulty=difficulty, subject=text["subject"] or None, solution=text["solution"] or None,
    )  # fmt: skip


def index_fields(raw: dict[str, Any], limits: RowLimits = RowLimits()) -> tuple[str, int | None] | Skip:
    """(id, difficulty) of a raw row, the part of `validate_row` that ordering needs and set-up can check without
    reading the rest of the row; a `Skip` (`bad_json`, `missing_id`, `bad_text_encoding`, `bad_difficulty`)
    otherwise."""
    try:
        if BAD_LINE_KEY in raw:
            raise _SkipRow(BAD_JSON, str(raw[BAD_LINE_KEY]))
        row_id = _text(raw.get("id"), "id")
        if not row_id:
            raise _SkipRow(MISSING_ID, "id is empty or missing")
        return row_id, _difficulty(raw.get("difficulty"), limits)
    except _SkipRow as skip:
        return Skip(skip.reason, _shown(raw.get("id")), skip.detail)


def _shown(value: Any) -> str:
    """The id as printable text, whatever it is."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value).encode("utf-8", errors="replace").decode("utf-8")


def _text(value: Any, name: str) -> str | None:
    """A text field as valid UTF-8 `str` (bytes are decoded; numbers become strings); None stays None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _SkipRow(BAD_TEXT_ENCODING, f"{name}: not UTF-8 ({e.reason} at byte {e.start})") from None
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        return str(value) if name == "id" else _bad_type(name, value)
    value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _SkipRow(
            BAD_TEXT_ENCODING, f"{name}: lone surrogate or undecodable byte at char {e.start}"
        ) from None
    return value.strip() if name in ("id", "answer", "question_type") else value


def _bad_type(name: str, value: Any) -> str | None:
    reason = {"answer": MISSING_ANSWER, "question": EMPTY_QUESTION, "question_type": BAD_QUESTION_TYPE}
    raise _SkipRow(reason.get(name, BAD_TEXT_ENCODING), f"{name}: a {type(value).__name__}, not text")


def _options(value: Any) -> list[str]:
    """Options as a list of str. A string must be a Python list literal (ast.literal_eval; never eval)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _SkipRow(
                OPTIONS_NOT_A_LIST, f"options string is not a list literal: {value[:60]!r}"
            ) from None
        if not isinstance(value, list):  # "1, 2" parses as a tuple: not a list literal
            raise _SkipRow(OPTIONS_NOT_A_LIST, f"options string holds a {type(value).__name__}, not a list")
    if not isinstance(value, list | tuple) or any(
        isinstance(o, bool) or not isinstance(o, str | int | float) for o in value
    ):
        raise _SkipRow(OPTIONS_NOT_A_LIST, f"options must be a list of strings, got {type(value).__name__}")
    return [_text(o, "options") or "" for o in value]


def _question_type(qtype: str | None, options: list[str], answer: str) -> tuple[str, str]:
    """(question_type, answer): infers the type when missing; an MC answer becomes a letter within the options."""
    qtype = qtype or ("multiple-choice" if options else "open")
    if qtype not in QUESTION_TYPES:
        raise _SkipRow(BAD_QUESTION_TYPE, f"question_type {qtype!r} not in {QUESTION_TYPES}")
    if qtype == "open":
        if options:
            raise _SkipRow(OPTIONS_ON_OPEN_QUESTION, f"{len(options)} options on an open question")
        return qtype, answer
    if len(options) < 2:
        raise _SkipRow(MC_WITHOUT_OPTIONS, f"multiple-choice question with {len(options)} options")
    letters = LETTERS[: len(options)]
    if len(answer) == 1 and answer.upper() in letters:
        return qtype, answer.upper()
    if answer in options:
        return qtype, letters[options.index(answer)]
    raise _SkipRow(
        ANSWER_NOT_IN_OPTIONS, f"answer {answer[:40]!r} is neither a letter in {letters} nor an option"
    )


def _difficulty(value: Any, limits: RowLimits) -> int | None:
    """None, or an int in [min_difficulty, max_difficulty] (integral floats and digit strings are accepted)."""
    if value is None:
        return None
    level: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        level = value
    elif isinstance(value, float) and value.is_integer():
        level = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        level = int(value.strip())
    if level is None or not limits.min_difficulty <= level <= limits.max_difficulty:
        raise _SkipRow(
            BAD_DIFFICULTY,
            f"difficulty {value!r} not an int in [{limits.min_difficulty}, {limits.max_difficulty}]",
        )
    return level


def _image_list(value: Any) -> list[Any]:
    """The images cell as a list of sources (a single image is accepted as a one-element list)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _check_markers(question: str, n_images: int) -> None:
    """Markers must match the images (see SCHEMA_DOC); no marker at all means the images go first."""
    found = MARKER_RE.findall(question)
    if not found:
        return
    numbered = {int(n) for n in found if n}
    plain = sum(1 for n in found if not n)
    if numbered and plain:
        raise _SkipRow(MARKER_COUNT_MISMATCH, "question mixes <image> and <image N> markers")
    if plain and plain != n_images:
        raise _SkipRow(MARKER_COUNT_MISMATCH, f"{plain} <image> markers for {n_images} images")
    if numbered and numbered != set(range(1, n_images + 1)):
        raise _SkipRow(MARKER_COUNT_MISMATCH, f"markers <image {sorted(numbered)}> for {n_images} images")


def _load_image(src: Any, base_dir: Path) -> Image.Image:
    """Decode one image source (HF struct {bytes, path}, a path string, or raw bytes) fully, as RGB."""
    data, rel = None, None
    if isinstance(src, dict):
        data, rel = src.get("bytes"), src.get("path")
    elif isinstance(src, bytes | bytearray):
        data = bytes(src)
    elif isinstance(src, str):
        rel = src
    if data is None:
        if not rel:
            raise _SkipRow(MISSING_IMAGE, "image has neither bytes nor a path")
        data = _read_image_file(str(rel), base_dir)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode every pixel: a truncated file fails here, not in a DataLoader worker
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _SkipRow(CORRUPT_IMAGE, f"cannot decode image: {type(e).__name__}: {e}") from None


def _read_image_file(rel: str, base_dir: Path) -> bytes:
    base = base_dir.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise _SkipRow(IMAGE_PATH_ESCAPES, f"image path {rel!r} leaves {base}")
    if not target.is_file():
        raise _SkipRow(MISSING_IMAGE, f"image file {rel!r} not found under {base}")
    return target.read_bytes()


# ------------------------------------------------------------------------------------------------------- counting
@dataclass
class SkipCounter:
    """Counts skipped rows by reason and keeps the first `keep` ids of each reason."""

    keep: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, skip: Skip) -> None:
        self.counts[skip.reason] = self.counts.get(skip.reason, 0) + 1
        ids = self.examples.setdefault(skip.reason, [])
        if len(ids) < self.keep:
            ids.append(skip.id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason, most frequent first: `corrupt_image: 3 (ids: a, b, c)`."""
        if not self.counts:
            return "no rows skipped"
        lines = [
            f"{reason}: {n} (ids: {', '.join(self.examples[reason])})"
            for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return "\n".join(lines)


def check_skip_fraction(
    counter: SkipCounter, total: int, max_fraction: float = 0.01, source: str = ""
) -> None:
    """Raise `SkipFractionError` when more than `max_fraction` of `total` rows were skipped."""
    if total <= 0 or counter.total <= max_fraction * total:
        return
    where = f"{source}: " if source else ""
    raise SkipFractionError(
        f"{where}skipped {counter.total} of {total} rows ({counter.total / total:.1%} > {max_fraction:.1%} allowed). "
        f"Fix the data or raise the limit. By reason:\n{counter.summary()}"
    )
