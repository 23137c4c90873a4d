"""Public data sets' own layouts through the real VLMDataModule: a `columns:` mapping, a single `image` column,
MMMU-style `image_1` .. `image_7` columns. Each is a real parquet file; rows are served through the real collator."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.schema import SchemaError
from datamodules.vlm_datamodule import VLMDataModule

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _serve(path, model, **kw) -> tuple[VLMDataModule, list]:
    dm = VLMDataModule(str(path), processor_path=str(model), batch_size=2, max_prompt_length=2048, seed=0, **kw)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    return dm, batches


def test_columns_mapping_and_a_single_image_column(tmp_path, tiny_model_dir):
    """MMK12-like: `problem`, `final_answer`, one image per row in `image` (a struct, not a list), `level`."""
    n = 4
    table = pa.table({
        "uid": [f"k12-{i}" for i in range(n)],
        "problem": [f"<image>\nWhat is {i} + {i}?" for i in range(n)],
        "final_answer": [str(2 * i) for i in range(n)],
        "image": pa.array([_png((40 * i, 0, 0), (50 + 10 * i, 40)) for i in range(n)], type=IMAGE_STRUCT),
        "level": pa.array([3, 1, 2, 1], type=pa.int64()),
    })
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    columns = {"id": "uid", "question": "problem", "answer": "final_answer", "images": "image",
               "difficulty": "level"}
    dm, batches = _serve(tmp_path, tiny_model_dir("internvl"), columns=columns)
    records = list(dm.train_records)
    assert [r.id for r in records] == [f"k12-{i}" for i in range(n)]
    assert [r.answer for r in records] == ["0", "2", "4", "6"] and [r.difficulty for r in records] == [3, 1, 2, 1]
    assert [r.images[0].size for r in records] == [(50 + 10 * i, 40) for i in range(n)]  # one decoded image each
    assert dm.batch_server.rows[0].difficulty == 3  # the index read the mapped difficulty column for ordering
    assert sorted(i for b in batches for i in b.ids) == [f"k12-{i}" for i in range(n)]
    assert all("pixel_values" in b.vision for b in batches)


def test_a_single_image_column_is_taken_without_a_mapping(tmp_path, tiny_model_dir):
    table = pa.table({
        "id": ["a", "b"], "question": ["How many?", "Which colour?"], "answer": ["1", "red"],
        "image": pa.array([_png((0, 200, 0)), None], type=IMAGE_STRUCT),  # the second row is text-only
    })
    pq.write_table(table, tmp_path / "single.parquet")
    dm, batches = _serve(tmp_path / "single.parquet", tiny_model_dir("internvl"))
    assert [len(r.images) for r in dm.train_records] == [1, 0]
    assert dm.skips["train"].total == 0 and len(batches) == 1


def test_mmmu_style_numbered_image_columns(tmp_path, tiny_model_dir):
    """MMMU layout: image_1 .. image_7 (null when unused), options as a list literal string, `<image N>` markers."""
    rows = [
        {"id": "validation_Art_1", "question": "<image 1> <image 2> Which is warmer?", "options": "['left', 'right']",
         "answer": "A", "question_type": "multiple-choice", "image_1": _png((250, 10, 0)), "image_2": _png((0, 0, 250))},
        {"id": "validation_Art_2", "question": "What colour is <image 1>?", "options": "[]", "answer": "green",
         "question_type": "open", "image_1": _png((0, 250, 0))},
        {"id": "validation_Art_3", "question": "<image 3> compared with <image 1>, <image 2>: which is odd?",
         "options": "['1', '2', '3']", "answer": "C", "question_type": "multiple-choice",
         "image_1": _png((9, 9, 9)), "image_2": _png((9, 9, 9)), "image_3": _png((200, 9, 9))},
    ]
    columns = {"id": pa.string(), "question": pa.string(), "options": pa.string(), "answer": pa.string(),
               "question_type": pa.string(), **{f"image_{k}": IMAGE_STRUCT for k in range(1, 8)}}
    table = pa.table({c: pa.array([r.get(c) for r in rows], type=t) for c, t in columns.items()})
    pq.write_table(table, tmp_path / "validation-00000-of-00001.parquet")
    dm, batches = _serve(tmp_path, tiny_model_dir("internvl"))
    records = {r.id: r for r in dm.train_records}
    assert {k: len(r.images) for k, r in records.items()} == {
        "validation_Art_1": 2, "validation_Art_2": 1, "validation_Art_3": 3}
    assert records["validation_Art_1"].options == ["left", "right"]
    assert records["validation_Art_3"].images[2].getpixel((0, 0)) == (200, 9, 9)  # image_3 is the third image
    assert dm.skips["train"].total == 0 and sum(len(b) for b in batches) == 2  # one full batch of 2 per epoch


def test_a_mapping_to_a_missing_column_names_it_and_the_file(tmp_path, tiny_model_dir):
    pq.write_table(pa.table({"id": ["a"], "question": ["q"], "answer": ["1"], "images": [[]]}), tmp_path / "x.parquet")
    dm = VLMDataModule(str(tmp_path / "x.parquet"), processor_path=str(tiny_model_dir("internvl")),
                       columns={"question": "problem"})
    with pytest.raises(SchemaError, match=r"x.parquet: missing required column 'question' \(data.columns maps it "
                                          r"to 'problem'\)"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="unknown schema field"):
        VLMDataModule(str(tmp_path / "x.parquet"), columns={"prompt": "question"})
