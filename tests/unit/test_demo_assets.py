"""`make demo`'s asset step: data made with other cold-start error settings is made again, and says so."""

from __future__ import annotations

import json

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
