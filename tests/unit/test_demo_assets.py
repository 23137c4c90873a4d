"""`make demo`'s asset step: data made with other cold-start error settings or another task mix is made again."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from app.demo import ensure_assets


def test_data_from_other_error_settings_is_regenerated(tmp_path, tiny_model_dir, capsys):
    model, data = tiny_model_dir("internvl"), tmp_path / "data"
    assert ensure_assets(model, data, 0.5, 8, 0, "answer") is True
    assert json.loads((data / "meta.json").read_text())["args"]["trace_error_kind"] == "answer"
    assert ensure_assets(model, data, 0.5, 8, 0, "answer") is False  # same settings: kept as is
    assert ensure_assets(model, data, 0.5, 8, 0, "count") is True
    assert "regenerating" in capsys.readouterr().out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["args"]["trace_error_kind"] == "count"
    assert len(list(data.glob("train-*.parquet"))) == 1 and len(list(data.glob("connector-*.parquet"))) == 1


def test_data_with_another_task_mix_is_regenerated(tmp_path, tiny_model_dir, capsys):
    model, data = tiny_model_dir("internvl"), tmp_path / "data"
    assert ensure_assets(model, data, 0.5, 6, 0, "count", ("count",), (1,)) is True
    assert ensure_assets(model, data, 0.5, 6, 0, "count", ("count",), (1,)) is False
    assert ensure_assets(model, data, 0.5, 6, 0, "count", ("count", "arithmetic"), (1, 2)) is True
    assert "regenerating" in capsys.readouterr().out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tasks"] == ["count", "arithmetic"] and meta["difficulties"] == [1, 2]
    wanted = {("count", 1), ("count", 2), ("arithmetic", 1), ("arithmetic", 2)}
    for split in ("train", "validation", "connector"):  # the connector stage's split has the same mix
        table = pq.read_table(next(data.glob(f"{split}-*.parquet")), columns=["subject", "difficulty"])
        assert set(zip(table["subject"].to_pylist(), table["difficulty"].to_pylist(), strict=True)) == wanted


def test_data_made_before_the_mix_options_counts_as_the_full_mix(tmp_path, tiny_model_dir):
    model, data = tiny_model_dir("internvl"), tmp_path / "data"
    assert ensure_assets(model, data, 0.5, 6, 0, "count") is True
    meta = json.loads((data / "meta.json").read_text())
    del meta["args"]["tasks"], meta["args"]["difficulties"]  # what an older make_data wrote
    (data / "meta.json").write_text(json.dumps(meta))
    assert ensure_assets(model, data, 0.5, 6, 0, "count") is False
    assert ensure_assets(model, data, 0.5, 6, 0, "count", ("count",)) is True
