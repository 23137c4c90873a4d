"""A small MMMU folder in the HF hub layout, for tests.

``write_mmmu_fixture(root)`` writes ``<root>/<Subject>/{validation,dev}-00000-of-00001.parquet`` for all 30
subjects with the HF Image struct (``{bytes, path}``) and real PNGs. An image's width is ``8 + N`` for
column ``image_N``, so tests can check image order from the decoded images alone. Question kinds rotate
over: MC with 2..9 options, open numeric, multi-image in reverse marker order, image markers inside
options, and open with a list-literal gold. ``bad_rows`` plants unusable rows.
"""

from __future__ import annotations

import ast
import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from modules.mmmu_rules import SUBJECTS

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
STRING_COLUMNS = ("id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty",
                  "question_type", "subfield")
IMAGE_COLUMNS = tuple(f"image_{n}" for n in range(1, 8))
BAD_KINDS = ("missing_image", "bad_options", "unsafe_options", "unknown_question_type", "bad_answer",
             "bad_image")
BAD_KIND_REASON = {"unsafe_options": "bad_options"}


@dataclass
class FixtureSummary:
    """What the fixture holds: usable validation items by id, dev ids, planted bad ids by skip reason."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    dev_ids: list[str] = field(default_factory=list)
    bad: dict[str, list[str]] = field(default_factory=dict)


def png_bytes(slot: int, shade: int = 0) -> bytes:
    """A real PNG of width 8 + slot, height 8."""
    buf = io.BytesIO()
    Image.new("RGB", (8 + slot, 8), (shade % 256, (slot * 30) % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows with the hub schema (strings + image_1..7 structs, HF features metadata)."""
    columns: dict[str, pa.Array] = {}
    for name in STRING_COLUMNS:
        columns[name] = pa.array([r.get(name) for r in rows], type=pa.string())
    for name in IMAGE_COLUMNS:
        cells = [r.get(name) for r in rows]
        columns[name] = pa.array([{"bytes": c, "path": None} if isinstance(c, bytes) else c for c in cells],
                                 type=IMAGE_STRUCT)
    features = {n: {"dtype": "string", "_type": "Value"} for n in STRING_COLUMNS}
    features.update({n: {"_type": "Image"} for n in IMAGE_COLUMNS})
    table = pa.table(columns).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _base_row(item_id: str, shade: int) -> dict[str, Any]:
    """Fields every row has."""
    return {"id": item_id, "explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Medium",
            "subfield": "Testing", "_shade": shade}


def _good_row(subject_idx: int, n: int, rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """Row number n (1-based) of a subject and its expected summary."""
    subject, kind = SUBJECTS[subject_idx], (subject_idx + n - 1) % 5
    row = _base_row(f"validation_{subject}_{n}", subject_idx * 8 + n)
    if kind == 0:
        k = 2 + subject_idx % 8
        options = [f"choice {chr(65 + i)} of {subject}" for i in range(k)]
        row.update(question="<image 1> Which option is right?", options=repr(options),
                   answer=chr(65 + rng.randrange(k)), question_type="multiple-choice", slots=[1])
    elif kind == 1:
        row.update(question="Compute the value shown in <image 1>.", options="[]",
                   answer=rng.choice(["3.5", "12,000", "0.25"]), question_type="open", slots=[1])
    elif kind == 2:
        options = ["left", "right", "both", "neither"]
        row.update(question="Compare <image 2> with <image 1>: which is larger?", options=repr(options),
                   answer=chr(65 + rng.randrange(4)), question_type="multiple-choice", slots=[2, 1])
    elif kind == 3:
        options = ["<image 1>", "<image 2>", "none of them"]
        row.update(question="Given <image 3>, which picture matches?", options=repr(options),
                   answer=chr(65 + rng.randrange(3)), question_type="multiple-choice", slots=[3, 1, 2])
    else:
        row.update(question="<image 1> Give either probability.", options="[]",
                   answer="['24/7', '3/7']", question_type="open", slots=[1])
    expected = {"subject": subject, "question_type": row["question_type"], "answer": row["answer"],
                "n_options": len(ast.literal_eval(row["options"])), "image_slots": row["slots"]}
    return row, expected


def _bad_row(kind: str, item_id: str) -> dict[str, Any]:
    """A row that the loader must skip for ``kind``."""
    row = {**_base_row(item_id, 1), "question": "<image 1> Pick one.", "options": "['x', 'y']",
           "answer": "A", "question_type": "multiple-choice", "slots": [1]}
    if kind == "missing_image":
        row.update(question="<image 1> versus <image 2>?", slots=[1])
        row["slots_written"] = [1]
    elif kind == "bad_options":
        row["options"] = "['x', 'y'"
    elif kind == "unsafe_options":
        row["options"] = "__import__('os').system('touch PWNED')"
    elif kind == "unknown_question_type":
        row["question_type"] = "essay"
    elif kind == "bad_answer":
        row["answer"] = "Z"
    elif kind == "bad_image":
        row["broken_image"] = True
    else:
        raise ValueError(f"unknown bad-row kind {kind!r}; known: {BAD_KINDS}")
    return row


def _materialise(row: dict[str, Any]) -> dict[str, Any]:
    """Attach image bytes for the row's slots (a broken PNG for bad_image rows)."""
    out = {k: v for k, v in row.items() if not k.startswith("_") and k not in ("slots", "slots_written")}
    for slot in row.get("slots_written", row["slots"]):
        out[f"image_{slot}"] = b"not a png" if row.get("broken_image") else png_bytes(slot, row["_shade"])
    out.pop("broken_image", None)
    return out


def write_mmmu_fixture(
    root: str | Path,
    per_subject: int = 3,
    seed: int = 0,
    bad_rows: Mapping[str, Sequence[str]] | None = None,
    subjects: Sequence[str] | None = None,
) -> FixtureSummary:
    """Write the fixture under ``root``; ``bad_rows`` maps subject -> kinds from ``BAD_KINDS`` appended
    after the good rows of the validation split. Returns the expected summary."""
    rng, summary = random.Random(seed), FixtureSummary()
    for idx, subject in enumerate(SUBJECTS):
        if subjects is not None and subject not in subjects:
            continue
        rows = []
        for n in range(1, per_subject + 1):
            row, expected = _good_row(idx, n, rng)
            rows.append(_materialise(row))
            summary.items[row["id"]] = expected
        for j, kind in enumerate((bad_rows or {}).get(subject, ())):
            item_id = f"validation_{subject}_{per_subject + j + 1}"
            rows.append(_materialise(_bad_row(kind, item_id)))
            summary.bad.setdefault(BAD_KIND_REASON.get(kind, kind), []).append(item_id)
        write_rows(Path(root) / subject / "validation-00000-of-00001.parquet", rows)
        dev, _ = _good_row(idx, 1, rng)
        dev["id"] = f"dev_{subject}_1"
        write_rows(Path(root) / subject / "dev-00000-of-00001.parquet", [_materialise(dev)])
        summary.dev_ids.append(dev["id"])
    return summary


OFFICIAL_VAL_ITEMS, OFFICIAL_VAL_MC, OFFICIAL_VAL_OPEN = 900, 847, 53
# validation_Math_7 on the hub: its options name images beyond MMMU's seven image columns
MATH_7_OPTIONS = [", ".join(f"<image {n}>" for n in range(7 + 6 * k, 13 + 6 * k)) for k in range(4)]


def write_official_counts_fixture(root: str | Path) -> FixtureSummary:
    """MMMU-val's shape: 30 subjects x 30 items, 847 multiple-choice and 53 open (two open items in each of the
    first 23 subjects, one in the other 7), one image each, and ``validation_Math_7`` as on the hub: options
    ``<image 7>`` ... ``<image 30>`` with only ``image_1`` present."""
    summary = FixtureSummary()
    for idx, subject in enumerate(SUBJECTS):
        n_open = 2 if idx < 23 else 1
        rows = []
        for n in range(1, 31):
            row = {**_base_row(f"validation_{subject}_{n}", idx + n), "slots": [1]}
            if n <= n_open:
                row.update(question="<image 1> What value is shown?", options="[]", answer="12",
                           question_type="open")
            elif subject == "Math" and n == 7:
                row.update(question="Match the figures in sequence with <image 1>", options=repr(MATH_7_OPTIONS),
                           answer="C", question_type="multiple-choice")
            else:
                row.update(question="<image 1> Which one?", options="['a', 'b', 'c', 'd']", answer="B",
                           question_type="multiple-choice")
            summary.items[row["id"]] = {"subject": subject, "question_type": row["question_type"]}
            rows.append(_materialise(row))
        write_rows(Path(root) / subject / "validation-00000-of-00001.parquet", rows)
    return summary
