"""The lazy data path through the real VLMDataModule: bounded set-up, rows decoded in DataLoader workers, exact resume.

Data: real parquet shards from `app.make_data` (several files), one of them with rows whose images are not images.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.make_data import write_dataset
from datamodules.serving import LazyPrompts
from datamodules.vlm_datamodule import VLMDataModule

BAD_IDS = ("bad-0", "bad-1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three 16-row shards and a fourth whose rows 3 and 4 (of 8) carry corrupt image bytes."""
    root = tmp_path_factory.mktemp("lazy-data")
    write_dataset(root, n_train=56, n_val=4, seed=3, quiet=True, shard_size=16)
    last = sorted(root.glob("train-*.parquet"))[-1]
    rows = pq.read_table(last).to_pylist()
    for k, bad_id in zip((3, 4), BAD_IDS, strict=True):
        rows[k]["id"] = bad_id
        rows[k]["images"] = [{"bytes": b"\xff\xd8\xff" + b"\x00not a jpeg" * 8, "path": None}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(last)), last, row_group_size=4)
    return root


def _dm(shards, model, **kw) -> VLMDataModule:
    return VLMDataModule(str(shards / "train-*.parquet"), processor_path=str(model), batch_size=4,
                         max_prompt_length=256, seed=7, max_skip_fraction=0.2, **kw)


def _serve(dm: VLMDataModule, n_batches: int) -> list[list[str]]:
    """Serve n batches the way the Trainer does (each consumed batch is marked), across epoch ends."""
    out: list[list[str]] = []
    while len(out) < n_batches:
        for batch in dm.train_dataloader():
            assert len(batch) == 4  # a bad row is replaced: the batch stays full
            dm.batch_server.mark_consumed(batch.requested_ids)  # what on_before_batch_transfer does in training
            out.append(batch.ids)
            if len(out) == n_batches:
                break
    return out


def test_setup_builds_an_index_and_decodes_nothing(shards, tiny_model_dir):
    dm = _dm(shards, tiny_model_dir("internvl"), preflight_sample=1)
    dm.setup("fit")
    data = dm.datasets["train"]
    assert isinstance(data, LazyPrompts) and len(data) == 56 and len(data.index.files) == 4
    assert dm.skips["train"].total == 0  # image checks wait for serving
    assert data.known_bad == {}


def test_resume_with_two_workers_on_multi_file_data_serves_exactly_the_same_rows(shards, tiny_model_dir):
    model = tiny_model_dir("internvl")
    reference = _dm(shards, model, num_workers=2)
    reference.setup("fit")
    want = _serve(reference, 20)  # 20 batches of 4 over 56 rows: crosses an epoch end
    served = {i for ids in want for i in ids}
    assert not served & set(BAD_IDS)
    assert reference.skips["train"].counts == {"corrupt_image": 2}, reference.skips["train"].summary()

    killed = _dm(shards, model, num_workers=2)
    killed.setup("fit")
    got = _serve(killed, 7)  # the workers have fetched ahead: those batches are pending, not consumed
    state = killed.state_dict()
    assert state["batch_server"]["pending"], "expected batches fetched ahead of the step"

    resumed = _dm(shards, model, num_workers=2)
    resumed.load_state_dict(state)  # before setup, as Lightning does when restoring a checkpoint
    resumed.setup("fit")
    got += _serve(resumed, 13)
    assert got == want


@pytest.mark.parametrize("level_type", [pa.int32(), pa.float64()], ids=["vectorised", "row-by-row"])
def test_the_index_checks_ids_and_difficulty_like_validate_row(tmp_path, level_type):
    """Integer difficulties take the vectorised column check, floats the row-by-row one: same index, same skips."""
    from datamodules.row_index import build_index
    from datamodules.row_io import ColumnMap
    from datamodules.schema import RowLimits, SkipCounter

    table = pa.table({"id": ["a", "", None, " b ", "c", "d"], "question": ["q"] * 6, "answer": ["1"] * 6,
                      "images": [[]] * 6, "difficulty": pa.array([1, 2, 3, None, 9, 5], type=level_type)})
    pq.write_table(table, tmp_path / "t.parquet")
    skips = SkipCounter()
    index = build_index([tmp_path / "t.parquet"], ColumnMap(), RowLimits(), skips)
    assert index.ids == ["a", "b", "d"] and index.difficulty == [1, None, 5]
    assert index.pos_of.tolist() == [0, 3, 5] and index.file_of.tolist() == [0, 0, 0]
    assert skips.counts == {"missing_id": 2, "bad_difficulty": 1} and skips.examples["bad_difficulty"] == ["c"]


def test_validation_drops_bad_rows_instead_of_repeating_good_ones(shards, tiny_model_dir):
    dm = VLMDataModule(str(shards / "train-*.parquet"), val_files=str(sorted(shards.glob("train-*.parquet"))[-1]),
                       processor_path=str(tiny_model_dir("internvl")), batch_size=4, val_batch_size=4,
                       max_prompt_length=256, max_skip_fraction=0.5, preflight_sample=1)
    dm.setup("validate")
    ids = [i for batch in dm.val_dataloader() for i in batch.ids]
    good = [i for i in pq.read_table(sorted(shards.glob("train-*.parquet"))[-1]).column("id").to_pylist()
            if i not in BAD_IDS]
    assert ids == good  # every good row once, in order; the two bad ones left out, not replaced
    assert dm.skips["val"].counts == {"corrupt_image": 2}
