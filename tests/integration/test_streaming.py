"""`streaming: true` through the real VLMDataModule and `datasets`' streaming IterableDataset, on local parquet shards:
full batches of validated rows, bad rows counted, sharding per rank and per worker, resume from the DataModule's
state, and a clear refusal of curriculum strategies a stream cannot serve."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lightning import Trainer

from app.make_data import write_dataset
from datamodules.row_io import ColumnMap
from datamodules.streaming import StreamingPrompts
from datamodules.vlm_datamodule import VLMDataModule

N_ROWS = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three 8-row shards; row 5 of the second one has image bytes that are not an image."""
    root = tmp_path_factory.mktemp("stream-data")
    write_dataset(root, n_train=N_ROWS, n_val=2, seed=4, quiet=True, shard_size=8)
    second = sorted(root.glob("train-*.parquet"))[1]
    rows = pq.read_table(second).to_pylist()
    rows[5]["id"], rows[5]["images"] = "bad-image", [{"bytes": b"\x89PNG\r\n\x1a\nnope", "path": None}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(second)), second)
    return root


def _dm(shards, model, **kw) -> VLMDataModule:
    kw = {"batch_size": 4, "max_prompt_length": 256, "seed": 5, "max_skip_fraction": 0.1, "streaming": True, **kw}
    return VLMDataModule(str(shards / "train-*.parquet"), processor_path=str(model), **kw)


def _serve(dm: VLMDataModule, n_batches: int | None = None) -> list[list[str]]:
    """Serve like the Trainer (each batch marked consumed), across epochs; None = one epoch."""
    out: list[list[str]] = []
    while n_batches is None or len(out) < n_batches:
        for batch in dm.train_dataloader():
            assert len(batch) == 4 and len(batch.records) == 4
            dm.mark_consumed(batch)
            out.append(batch.ids)
            if len(out) == n_batches:
                break
        if n_batches is None:
            break
    return out


def test_an_epoch_serves_every_good_row_once_in_full_batches_and_counts_the_bad_one(shards, tiny_model_dir):
    dm = _dm(shards, tiny_model_dir("internvl"), shuffle_buffer=8)
    dm.setup("fit")
    ids = [i for b in _serve(dm) for i in b]
    assert len(ids) == len(set(ids)) == 20  # 23 good rows: 5 full batches, the last 3 rows make no batch
    assert "bad-image" not in ids and dm.skips["train"].counts == {"corrupt_image": 1}
    in_order = [i for f in sorted(shards.glob("train-*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]
    assert ids != [i for i in in_order if i != "bad-image"][:20]  # the buffer shuffled them
    again = [i for b in _serve(dm) for i in b]
    assert again != ids  # a new epoch, a new order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_the_datamodule_state_continues_each_stream(shards, tiny_model_dir, workers):
    model = tiny_model_dir("internvl")
    reference = _dm(shards, model, shuffle_buffer=0, num_workers=workers)
    reference.setup("fit")
    want = _serve(reference)
    killed = _dm(shards, model, shuffle_buffer=0, num_workers=workers)
    killed.setup("fit")
    got = _serve(killed, 2)  # workers fetched ahead; the state holds only what was consumed
    resumed = _dm(shards, model, shuffle_buffer=0, num_workers=workers)
    resumed.setup("fit")
    resumed.load_state_dict(killed.state_dict())  # after setup, as Lightning restores a checkpoint
    got += _serve(resumed)
    if workers == 0:
        assert got == want  # exact
    else:  # each worker's stream continues where its last consumed batch ended: nothing repeated or skipped
        assert sorted(i for b in got for i in b) == sorted(i for b in want for i in b)


def test_ranks_and_workers_read_disjoint_rows(shards):
    files = sorted(shards.glob("train-*.parquet"))
    per_rank = []
    for rank in (0, 1):
        data = StreamingPrompts(files, ColumnMap(), batch_size=1, seed=0, shuffle_buffer=0, rank=rank, world_size=2)
        per_rank.append({b[0].id for b in data})
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == N_ROWS - 1


def test_curriculum_strategies_that_need_the_index_are_refused_at_start_up(shards, tiny_model_dir):
    from callbacks.curriculum import CurriculumCallback, EasyToHard
    from datamodules.ordering import RandomOrder

    dm = _dm(shards, tiny_model_dir("internvl"))
    dm.trainer = Trainer(callbacks=[CurriculumCallback(EasyToHard())], logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="streaming serves rows in the order of its shuffle buffer; the curriculum "
                                         "strategy EasyToHard needs the whole row index"):
        dm.setup("fit")
    ok = _dm(shards, tiny_model_dir("internvl"))
    ok.trainer = Trainer(callbacks=[CurriculumCallback(RandomOrder())], logger=False, enable_progress_bar=False)
    ok.setup("fit")
    with pytest.raises(ValueError, match="cannot take data.validate: full"):
        _dm(shards, tiny_model_dir("internvl"), validate="full")


def test_jsonl_with_image_paths_and_a_columns_mapping_streams_too(tmp_path, tiny_model_dir):
    import io
    import json

    from PIL import Image

    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (30 + i, 20), (40 * i, 0, 0)).save(buf, format="PNG")
        (tmp_path / "img" / f"{i}.png").write_bytes(buf.getvalue())
        lines.append({"uid": f"j{i}", "problem": "<image>\nWhat colour?", "final_answer": "red",
                      "images": [f"img/{i}.png"]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    dm = VLMDataModule(str(tmp_path / "train.jsonl"), processor_path=str(tiny_model_dir("internvl")), batch_size=2,
                       max_prompt_length=512, streaming=True, shuffle_buffer=0,
                       columns={"id": "uid", "question": "problem", "answer": "final_answer"})
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b.ids for b in batches] == [["j0", "j1"], ["j2", "j3"], ["j4", "j5"]]
    assert all("pixel_values" in b.vision for b in batches) and dm.skips["train"].total == 0
