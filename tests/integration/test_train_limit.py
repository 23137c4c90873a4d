"""`data.train_limit`: a fixed RL prompt pool, the first N rows in file order, revisited epoch after epoch."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from app.make_data import write_dataset
from datamodules.vlm_datamodule import VLMDataModule


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("limit-data")
    write_dataset(root, n_train=24, n_val=4, seed=5, quiet=True, shard_size=10)  # 3 shards: 8 / 8 / 8 rows
    return root


def _dm(data_dir, model_dir, **kw) -> VLMDataModule:
    return VLMDataModule(str(data_dir / "train-*.parquet"), processor_path=str(model_dir), batch_size=4,
                         max_prompt_length=256, **kw)


def test_train_limit_serves_the_first_rows_in_file_order_every_epoch(data_dir, tiny_model_dir):
    files = sorted(data_dir.glob("train-*.parquet"))
    in_order = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    dm = _dm(data_dir, tiny_model_dir("internvl"), train_limit=10)  # crosses from the first shard into the second
    dm.setup("fit")
    assert [r.id for r in dm.train_records] == in_order[:10]
    for _ in range(2):  # two epochs: the same pool, every row once
        served = [i for batch in dm.train_dataloader() for i in batch.ids]
        assert set(served) <= set(in_order[:10]) and len(served) == len(set(served)) >= 8
    full = _dm(data_dir, tiny_model_dir("internvl"))
    full.setup("fit")
    assert len(full.train_records) == 24


@pytest.mark.parametrize("flag", ["train_limit", "val_limit"])
def test_a_limit_below_one_is_refused_by_name(data_dir, tiny_model_dir, flag):
    with pytest.raises(ValueError, match=f"data.{flag} must be >= 1"):
        _dm(data_dir, tiny_model_dir("internvl"), **{flag: 0})
