"""Hostile data through the real VLMDataModule: one data folder holds every kind of bad row at once.

Each bad row is skipped and counted under its own reason (one row per reason in `SKIP_REASONS`), every good row is
served in one epoch, nothing else is dropped, and a string from the data file is never run as code. Both ways of
validating: `validate: full` (every row checked at set-up, only good rows served) and the default `serve` (rows
checked when served: a bad row is counted and replaced by the next good one, batches stay full).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.make_data import write_dataset
from datamodules.schema import SKIP_REASONS
from datamodules.vlm_datamodule import VLMDataModule

N_PARQUET_GOOD, N_JSONL_GOOD = 24, 16


def _synthetic_rows(tmp: Path) -> tuple[list[dict], pa.Schema]:
    write_dataset(tmp / "synthetic", n_train=N_PARQUET_GOOD + N_JSONL_GOOD, n_val=1, quiet=True)
    table = pq.read_table(next((tmp / "synthetic").glob("train-*.parquet")))
    return table.to_pylist(), table.schema


def _build(tmp: Path) -> tuple[Path, set[str], Path]:
    rows, schema = _synthetic_rows(tmp)
    data = tmp / "data"
    (data / "img").mkdir(parents=True)
    good_parquet, good_jsonl = rows[:N_PARQUET_GOOD], rows[N_PARQUET_GOOD:]

    # parquet: good rows (HF Image structs with bytes) + one whose image bytes are not an image
    corrupt = copy.deepcopy(good_parquet[0])
    corrupt["id"] = "bad-corrupt_image"
    corrupt["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "path": None}]
    pq.write_table(pa.Table.from_pylist([*good_parquet, corrupt], schema=schema), data / "train-a.parquet")

    # JSONL: images as files next to the data file
    def as_jsonl(row: dict) -> dict:
        out = {k: v for k, v in row.items() if k not in ("images", "meta")}
        paths = []
        for k, img in enumerate(row["images"]):
            rel = f"img/{row['id']}-{k}.png"
            (data / rel).write_bytes(img["bytes"])
            paths.append(rel)
        return {**out, "images": paths}

    lines = [as_jsonl(r) for r in good_jsonl]
    base = next(r for r in lines if r["question_type"] == "multiple-choice" and len(r["images"]) == 1
                and r["question"].count("<image>") == 1)  # bad rows are this valid row with one thing broken
    (tmp / "outside.png").write_bytes((data / base["images"][0]).read_bytes())
    pwned = tmp / "PWNED"

    def bad(reason: str, **changes) -> dict:
        row = {**copy.deepcopy(base), "id": f"bad-{reason}", **changes}
        return {k: v for k, v in row.items() if v is not _DROP}

    lines += [
        bad("missing_image", images=["img/does-not-exist.png"]),
        bad("image_path_escapes", images=["../outside.png"]),
        bad("marker_count_mismatch", question="<image> and <image>: how many circles?"),
        bad("empty_question", question="  <image>  \n "),
        bad("question_too_long", question="<image>\n" + "How many? " * 20_000),
        bad("missing_answer", answer=_DROP),
        bad("bad_text_encoding", question="<image>\nHow many BAD_BYTES circles?"),
        bad("options_on_open_question", question_type="open", options=["1", "2"], answer="1"),
        bad("options_not_a_list", options=f"__import__('os').system('touch {pwned}')"),
        bad("bad_question_type", question_type="essay"),
        bad("bad_difficulty", difficulty=9),
        bad("missing_id", id=""),
        bad("mc_without_options", options=[]),
        bad("answer_not_in_options", answer="Z"),
    ]
    text = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    text = text.replace(b"BAD_BYTES", b"\xff\xfe\xc3(")  # invalid UTF-8 inside a JSON string
    lines_bytes = text.splitlines(keepends=True)
    lines_bytes.insert(N_JSONL_GOOD + 3, b'{"id": "bad-json", "question": "unterminated\n')  # bad_json
    (data / "train-b.jsonl").write_bytes(b"".join(lines_bytes))
    return data, {r["id"] for r in good_parquet + good_jsonl}, pwned


_DROP = object()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def hostile(built, tiny_model_dir):
    data, good_ids, pwned = built
    dm = VLMDataModule(train_files=str(data), processor_path=str(tiny_model_dir("internvl")), batch_size=4,
                       max_prompt_length=512, max_skip_fraction=0.5, validate="full")
    dm.setup("fit")
    return dm, good_ids, pwned


def test_every_bad_row_is_skipped_under_its_own_reason(hostile):
    dm, _, _ = hostile
    skips = dm.skips["train"]
    assert skips.counts == dict.fromkeys(SKIP_REASONS, 1), skips.summary()
    for reason, ids in skips.examples.items():
        expected = {"missing_id": [""], "bad_json": [ids[0]]}.get(reason, [f"bad-{reason}"])
        assert ids == expected, (reason, ids)
    assert skips.examples["bad_json"][0].startswith("line ")


def test_all_good_rows_are_served_and_nothing_else_dropped(hostile):
    dm, good_ids, _ = hostile
    assert {r.id for r in dm.train_records} == good_ids
    assert len(dm.train_records) == len(good_ids) == N_PARQUET_GOOD + N_JSONL_GOOD
    served: list[str] = []
    for batch in dm.train_dataloader():  # one epoch through the real collator (processor, chat template)
        assert batch.input_ids.shape[0] == len(batch.records) == 4
        served += [rec["id"] for rec in batch.records]
    assert sorted(served) == sorted(good_ids)  # each good row exactly once per epoch


def test_strings_from_data_are_never_run(hostile):
    _, _, pwned = hostile
    assert not pwned.exists()


def test_too_many_bad_rows_stop_the_run_with_the_reasons(hostile, tiny_model_dir):
    from datamodules.schema import SkipFractionError

    dm, _, _ = hostile
    folder = dm.hparams.train_files
    strict = VLMDataModule(train_files=folder, processor_path=str(tiny_model_dir("internvl")), batch_size=4,
                           max_prompt_length=512, validate="full")  # default: at most 1% of rows may be bad
    with pytest.raises(SkipFractionError, match="options_not_a_list"):
        strict.setup("fit")


# ------------------------------------------------------------------------------- validate: serve (the default)
SET_UP_REASONS = {"missing_id", "bad_difficulty", "bad_json"}  # what ordering reads: checked when indexing


def test_served_rows_skip_each_bad_row_under_its_reason_and_keep_batches_full(built, tiny_model_dir):
    data, good_ids, pwned = built
    dm = VLMDataModule(train_files=str(data), processor_path=str(tiny_model_dir("internvl")), batch_size=1,
                       max_prompt_length=512, max_skip_fraction=0.5)
    dm.setup("fit")
    skips = dm.skips["train"]
    assert skips.counts == dict.fromkeys(SET_UP_REASONS, 1), skips.summary()  # only what the index reads
    n_rows = len(good_ids) + len(SKIP_REASONS) - len(SET_UP_REASONS)
    assert len(dm.datasets["train"]) == n_rows
    served: list[str] = []
    for batch in dm.train_dataloader():  # batch 1: one epoch asks for every indexed row once
        assert len(batch.records) == 1 and batch.ids[0] in good_ids
        served += batch.ids
    assert len(served) == n_rows and set(served) == good_ids  # bad rows replaced by good ones; every good row served
    assert skips.counts == dict.fromkeys(SKIP_REASONS, 1), skips.summary()  # now every reason, once
    assert dm.monitors["train"].rows_read >= n_rows
    assert not pwned.exists()


def test_served_bad_rows_past_the_fraction_stop_the_run(built, tiny_model_dir):
    from datamodules.schema import SkipFractionError

    data, _, _ = built
    dm = VLMDataModule(train_files=str(data), processor_path=str(tiny_model_dir("internvl")), batch_size=4,
                       max_prompt_length=512, max_skip_fraction=0.06)  # the 3 set-up skips of 56 rows pass
    dm.setup("fit")
    with pytest.raises(SkipFractionError, match=r"data/train \(rows served so far\): skipped"):
        for _ in range(3):
            for _batch in dm.train_dataloader():
                pass
