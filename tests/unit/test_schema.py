"""Schema readers and row validation on real parquet and JSONL files with one planted bad row per skip reason."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules import row_io
from datamodules import schema as S
from datamodules.types import PromptRecord


def _png(colour: tuple[int, int, int] = (200, 10, 10), size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = _png()
TRUNCATED_PNG = _png(size=64)[:60]


@dataclass
class _KeepingCounter(S.SkipCounter):
    """A SkipCounter that also keeps every Skip, so tests can read each one's reason and detail."""

    skips: list[S.Skip] = field(default_factory=list)

    def add(self, skip: S.Skip) -> None:
        super().add(skip)
        self.skips.append(skip)


def _collect(
    path: Path, limits: S.RowLimits = S.RowLimits()
) -> tuple[list[PromptRecord], S.SkipCounter, list[S.Skip]]:
    """Records, counter and skips of one file, read through the project's own `row_io.iter_records`."""
    counter = _KeepingCounter()
    records = list(row_io.iter_records(path, limits, counter))
    return records, counter, counter.skips


# ------------------------------------------------------------------------------------------------------- parquet
def _row(
    id: str, question: Any = "<image>\nHow many?", images: Any = None, answer: Any = "3", **kw: Any
) -> dict:
    row = {
        "id": id,
        "question": question,
        "answer": answer,
        "options": "[]",
        "question_type": None,
        "difficulty": None,
    }
    row["images"] = [{"bytes": GOOD_PNG, "path": None}] if images is None else images
    row.update(kw)
    if isinstance(row["question"], str):
        row["question"] = row["question"].encode("utf-8")  # the question column is binary in this file
    return row


PARQUET_BAD = {
    S.CORRUPT_IMAGE: _row("p-corrupt", images=[{"bytes": TRUNCATED_PNG, "path": None}]),
    S.MISSING_IMAGE: _row("p-missing", images=[{"bytes": None, "path": "nope.png"}]),
    S.IMAGE_PATH_ESCAPES: _row("p-escape", images=[{"bytes": None, "path": "../outside.png"}]),
    S.MARKER_COUNT_MISMATCH: _row("p-markers", question="<image 1> and <image 2>: which?"),
    S.EMPTY_QUESTION: _row("p-empty", question="  <image>  "),
    S.QUESTION_TOO_LONG: _row("p-long", question="<image>" + "x" * 20001),
    S.MISSING_ANSWER: _row("p-noanswer", answer=None),
    S.BAD_TEXT_ENCODING: _row("p-encoding", question=b"<image>\xff\xfe how many?"),
    S.OPTIONS_ON_OPEN_QUESTION: _row("p-openopts", options="['1', '2']", question_type="open"),
    S.OPTIONS_NOT_A_LIST: _row("p-optstr", options="1, 2, 3"),
    S.BAD_QUESTION_TYPE: _row("p-qtype", question_type="essay"),
    S.BAD_DIFFICULTY: _row("p-diff", difficulty=7),
    S.MISSING_ID: _row("", question="<image> count"),
    S.MC_WITHOUT_OPTIONS: _row("p-mcnoopts", question_type="multiple-choice"),
    S.ANSWER_NOT_IN_OPTIONS: _row("p-notopt", options="['1', '2']", answer="E"),
}
PARQUET_GOOD = [
    _row(
        "p-good-open", difficulty=2, subject="count", solution="1, 2, 3.\n</think>\nThe answer is \\boxed{3}."
    ),
    _row("p-good-mc", options="['2', '3', '4']", answer="b", question_type="multiple-choice"),
    _row("p-good-mc-text", options="['2', '3', '4']", answer="4"),
    _row("p-good-nomarker", question="How many red shapes?"),
    _row("p-good-two", question="<image 1> vs <image 2>", images=[{"bytes": GOOD_PNG, "path": None}] * 2),
    _row("p-good-path", images=[{"bytes": None, "path": "img/ok.png"}]),
    _row("p-good-text", question="What is 2 + 1?", images=[]),
]
PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("question", pa.binary()),
        ("answer", pa.string()),
        ("options", pa.string()),
        ("question_type", pa.string()),
        ("difficulty", pa.int64()),
        ("subject", pa.string()),
        ("solution", pa.string()),
    ]
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """tmp/data holds the data files and img/ok.png; tmp/outside.png exists but lies outside the data folder."""
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    (d / "img" / "ok.png").write_bytes(GOOD_PNG)
    (d / "img" / "bad.png").write_bytes(b"definitely not an image")
    (tmp_path / "outside.png").write_bytes(GOOD_PNG)
    return d


def test_parquet_skips_each_bad_row_under_its_reason(data_dir: Path) -> None:
    rows = [*PARQUET_BAD.values(), *PARQUET_GOOD]
    path = data_dir / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)
    records, counter, skips = _collect(path)
    assert [r.id for r in records] == [r["id"] for r in PARQUET_GOOD]
    assert {s.id or "<empty>": s.reason for s in skips} == {
        r["id"] or "<empty>": k for k, r in PARQUET_BAD.items()
    }
    assert counter.counts == {reason: 1 for reason in PARQUET_BAD}
    assert counter.total == len(PARQUET_BAD)
    by_id = {r.id: r for r in records}
    assert by_id["p-good-mc"].answer == "B" and by_id["p-good-mc"].options == ["2", "3", "4"]
    assert (
        by_id["p-good-mc-text"].answer == "C" and by_id["p-good-mc-text"].question_type == "multiple-choice"
    )
    assert by_id["p-good-open"].difficulty == 2 and by_id["p-good-open"].subject == "count"
    assert by_id["p-good-open"].solution.endswith("\\boxed{3}.")
    assert len(by_id["p-good-two"].images) == 2 and by_id["p-good-text"].images == []
    for rec in records:
        assert all(im.mode == "RGB" and im.size == (16, 16) for im in rec.images)


# --------------------------------------------------------------------------------------------------------- JSONL
JSONL_BAD: dict[str, str] = {
    S.CORRUPT_IMAGE: json.dumps(
        {"id": "j-corrupt", "images": ["img/bad.png"], "question": "<image> n?", "answer": "1"}
    ),
    S.MISSING_IMAGE: json.dumps(
        {"id": "j-missing", "images": ["img/none.png"], "question": "<image> n?", "answer": "1"}
    ),
    S.IMAGE_PATH_ESCAPES: json.dumps(
        {"id": "j-escape", "images": ["../outside.png"], "question": "<image> n?", "answer": "1"}
    ),
    S.MARKER_COUNT_MISMATCH: json.dumps(
        {"id": "j-markers", "images": ["img/ok.png"], "question": "<image> <image> n?", "answer": "1"}
    ),
    S.EMPTY_QUESTION: json.dumps({"id": "j-empty", "images": [], "question": "", "answer": "1"}),
    S.QUESTION_TOO_LONG: json.dumps({"id": "j-long", "images": [], "question": "y" * 20001, "answer": "1"}),
    S.MISSING_ANSWER: json.dumps({"id": "j-noanswer", "images": [], "question": "2 + 2?", "answer": "  "}),
    S.BAD_TEXT_ENCODING: '{"id": "j-surrogate", "images": [], "question": "bad \\ud800 text", "answer": "1"}',
    S.OPTIONS_ON_OPEN_QUESTION: json.dumps(
        {
            "id": "j-openopts",
            "images": [],
            "question": "2?",
            "answer": "1",
            "options": ["1"],
            "question_type": "open",
        }
    ),
    S.OPTIONS_NOT_A_LIST: json.dumps(
        {
            "id": "j-optstr",
            "images": [],
            "question": "2?",
            "answer": "A",
            "options": "__import__('os').system('touch PWNED')",
        }
    ),
    S.BAD_QUESTION_TYPE: json.dumps(
        {"id": "j-qtype", "images": [], "question": "2?", "answer": "1", "question_type": 5}
    ),
    S.BAD_DIFFICULTY: json.dumps(
        {"id": "j-diff", "images": [], "question": "2?", "answer": "1", "difficulty": "hard"}
    ),
    S.MISSING_ID: json.dumps({"images": [], "question": "2?", "answer": "1"}),
    S.MC_WITHOUT_OPTIONS: json.dumps(
        {"id": "j-mc", "images": [], "question": "2?", "answer": "A", "question_type": "multiple-choice"}
    ),
    S.ANSWER_NOT_IN_OPTIONS: json.dumps(
        {"id": "j-notopt", "images": [], "question": "2?", "answer": "7", "options": ["1", "2"]}
    ),
    S.BAD_JSON: '{"id": "j-json", "images": [',
}
JSONL_GOOD: dict[str, str] = {
    "j-good": json.dumps(
        {
            "id": "j-good",
            "images": ["img/ok.png"],
            "question": "<image>\nHow many?",
            "answer": 3,
            "difficulty": 5,
        }
    ),
    "j-good-literal": json.dumps(
        {
            "id": "j-good-literal",
            "images": ["./img/ok.png"],
            "question": "<image 1> which?",
            "answer": "A",
            "options": "['one', 'two']",
        }
    ),
    "j-good-none": json.dumps(
        {
            "id": "j-good-none",
            "images": None,
            "question": "1 + 1?",
            "answer": "2",
            "difficulty": None,
            "options": None,
        }
    ),
    "j-good-unicode": json.dumps(
        {"id": "j-good-unicode", "images": [], "question": "Wie viele Kreise? ∑ 😀", "answer": "2"}
    ),
}


def _write_jsonl(path: Path) -> None:
    lines = [JSONL_GOOD["j-good"].encode(), *(v.encode() for v in JSONL_BAD.values())]
    lines.append(
        b'{"id": "j-badbytes", "images": [], "question": "caf\xe9 \xff?", "answer": "1"}'
    )  # latin-1, not UTF-8
    lines.append(b"")  # blank lines are ignored
    lines += [v.encode() for k, v in JSONL_GOOD.items() if k != "j-good"]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_jsonl_skips_each_bad_row_under_its_reason(data_dir: Path) -> None:
    path = data_dir / "prompts.jsonl"
    _write_jsonl(path)
    records, counter, skips = _collect(path)
    assert [r.id for r in records] == list(JSONL_GOOD)
    expected = {reason: 1 for reason in JSONL_BAD}
    expected[S.BAD_TEXT_ENCODING] = 2  # the \ud800 escape and the raw 0xff byte
    assert counter.counts == expected
    assert set(counter.examples[S.BAD_TEXT_ENCODING]) == {"j-surrogate", "j-badbytes"}
    by_reason = {s.reason: s.id for s in skips if s.id != "j-badbytes"}
    assert by_reason[S.BAD_JSON] == "line 17" and by_reason[S.MISSING_ID] == ""
    assert all(by_reason[r].startswith("j-") for r in set(JSONL_BAD) - {S.BAD_JSON, S.MISSING_ID})
    by_id = {r.id: r for r in records}
    assert by_id["j-good"].answer == "3" and by_id["j-good"].difficulty == 5
    assert by_id["j-good-literal"].options == ["one", "two"]
    assert by_id["j-good-literal"].question_type == "multiple-choice"
    assert by_id["j-good-none"].images == [] and by_id["j-good-none"].options == []
    assert by_id["j-good"].images[0].mode == "RGB"


def test_options_string_is_never_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for payload in (
        "__import__('os').system('touch PWNED')",
        "open('PWNED', 'w')",
        "[1, 2][0]",
        "{'a': 1}",
        "1, 2, 3",
    ):
        got = S.validate_row(
            {"id": "x", "question": "q?", "answer": "A", "options": payload, "images": []}, tmp_path
        )
        assert isinstance(got, S.Skip) and got.reason == S.OPTIONS_NOT_A_LIST, payload
    assert not (tmp_path / "PWNED").exists()
    ok = S.validate_row(
        {"id": "x", "question": "q?", "answer": "b", "options": "['3', 4]", "images": []}, tmp_path
    )
    assert isinstance(ok, PromptRecord) and ok.options == ["3", "4"] and ok.answer == "B"


def test_markers_and_limits(tmp_path: Path) -> None:
    img = {"bytes": GOOD_PNG, "path": None}

    def reason(question: str, n_images: int, **limits: int) -> str | None:
        raw = {"id": "m", "question": question, "answer": "1", "images": [img] * n_images}
        got = S.validate_row(raw, tmp_path, S.RowLimits(**limits))
        return got.reason if isinstance(got, S.Skip) else None

    assert reason("no marker: images go first", 2) is None
    assert reason("<image 2> then <image 1> then <image 1>", 2) is None
    assert reason("<image> and <image 1>", 2) == S.MARKER_COUNT_MISMATCH
    assert reason("<image 1> n?", 0) == S.MARKER_COUNT_MISMATCH
    assert reason("<image 3> <image 1> n?", 2) == S.MARKER_COUNT_MISMATCH
    assert reason("<image> n?", 2) == S.MARKER_COUNT_MISMATCH
    assert reason("<image> " + "z" * 50, 1, max_question_chars=40) == S.QUESTION_TOO_LONG


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    path = tmp_path / "no-answer.parquet"
    pq.write_table(pa.table({"id": ["a"], "question": ["q"], "images": [[]]}), path)
    with pytest.raises(S.SchemaError, match=r"'answer'.*") as err:
        list(row_io.read_rows(path))
    assert str(path) in str(err.value)
    jsonl = tmp_path / "no-images.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n")
    with pytest.raises(S.SchemaError, match="'images'") as err:
        list(row_io.read_rows(jsonl))
    assert str(jsonl) in str(err.value)
    with pytest.raises(S.SchemaError, match="unknown data file type"):
        list(row_io.read_rows(tmp_path / "data.csv"))


def test_skip_counter_and_fraction_check() -> None:
    counter = S.SkipCounter()
    for i in range(7):
        counter.add(S.Skip(S.CORRUPT_IMAGE, f"id{i}", "bad"))
    counter.add(S.Skip(S.MISSING_ANSWER, "z", "empty"))
    assert counter.counts == {S.CORRUPT_IMAGE: 7, S.MISSING_ANSWER: 1} and counter.total == 8
    assert counter.examples[S.CORRUPT_IMAGE] == [f"id{i}" for i in range(5)]
    assert counter.summary().splitlines()[0] == "corrupt_image: 7 (ids: id0, id1, id2, id3, id4)"
    S.check_skip_fraction(counter, total=800, max_fraction=0.01)  # exactly 1%: allowed
    with pytest.raises(
        S.SkipFractionError, match=r"train.parquet: skipped 8 of 100 rows \(8.0% > 1.0%"
    ) as err:
        S.check_skip_fraction(counter, total=100, source="train.parquet")
    assert "corrupt_image: 7" in str(err.value)
    assert S.SkipCounter().summary() == "no rows skipped"


def test_iter_records_counts_skips(data_dir: Path) -> None:
    path = data_dir / "prompts.jsonl"
    _write_jsonl(path)
    counter = S.SkipCounter()
    ids = [r.id for r in row_io.iter_records(path, counter=counter)]
    assert ids == list(JSONL_GOOD) and counter.total == len(JSONL_BAD) + 1


def test_schema_doc_lists_every_reason() -> None:
    assert all(f"`{reason}`" in S.SCHEMA_DOC for reason in S.SKIP_REASONS)
    assert all(f"`{col}`" in S.SCHEMA_DOC for col in S.REQUIRED_COLUMNS)


def test_load_records_stops_at_the_limit_and_counts_skips_before_it(tmp_path: Path) -> None:
    from datamodules.vlm_datamodule import load_records

    rows = [{"id": f"r{i}", "question": "How many?", "answer": "1", "images": []} for i in range(4)]
    rows[1]["answer"] = ""  # one bad row before the limit
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x"}) + "\n")  # no answer/images column: a SchemaError
    spec = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    records, skips = load_records(spec, max_skip_fraction=1.0, limit=2)
    assert [r.id for r in records] == ["r0", "r2"] and skips.counts == {S.MISSING_ANSWER: 1}
    records, _ = load_records(spec, max_skip_fraction=1.0, limit=3)  # the limit ends file a: b is never opened
    assert [r.id for r in records] == ["r0", "r2", "r3"]
    with pytest.raises(S.SchemaError, match="b.jsonl"):  # past the end of file a, b is read and refused
        load_records(spec, max_skip_fraction=1.0, limit=4)
    with pytest.raises(S.SkipFractionError, match="skipped 1 of 3 rows"):  # 1 of the 3 rows read, not of 4
        load_records(spec[:1], max_skip_fraction=0.2, limit=2)
    assert load_records(spec, max_skip_fraction=1.0, limit=0)[0] == []
