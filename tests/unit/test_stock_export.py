"""Every folder this app writes is a stock Hugging Face folder: `make_tiny`'s, and an export of each family
(`export_hf`, behind ExportCallback and `python -m app.export`). A fresh `python -I` process that never imports
this project opens each with the Auto classes and gets the stock classes, every weight loaded under its stock
name. Stock `AutoProcessor` of InternVL / Qwen2.5-VL needs torchvision (their video processors import it): where
it is missing (this venv) it raises transformers' own ImportError naming torchvision, as for any stock checkpoint
of those families; with it (the vLLM venv) it returns the stock processor with its video processor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modules.common import export_hf
from modules.loading import load_vlm
from modules.tiny import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
STOCK = {"internvl": ("InternVLForConditionalGeneration", "InternVLProcessor", "InternVLVideoProcessor"),
         "llava": ("LlavaForConditionalGeneration", "LlavaProcessor", None),
         "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor")}


def stock_report(folders: list[Path], python: str = sys.executable) -> list[dict]:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": "/tmp"}
    proc = subprocess.run([python, "-I", str(ROOT / "tests" / "stock_check.py"), *map(str, folders)],
                          capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def assert_stock(report: dict, family: str) -> None:
    model, processor, video = STOCK[family]
    assert report["project_imported"] == []
    assert report["model"] == model
    assert report["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert report["processor_class"] == processor
    assert report["processor_class_module"].startswith("transformers.models.")
    if video is None or report["torchvision"]:
        assert report["auto_processor"] == processor
        assert report.get("video_processor") == video
    else:
        assert "torchvision" in report["auto_processor_error"].lower()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    out = {}
    for family in FAMILIES:
        made = tiny_model_dir(family)
        model, processor = load_vlm(made)
        out[family] = (made, export_hf(model, processor, tmp_path_factory.mktemp(f"export-{family}")))
    return out


def test_make_tiny_and_exports_open_in_stock_transformers(exports):
    folders = [p for pair in exports.values() for p in pair]
    reports = stock_report(folders)
    assert len(reports) == len(folders)
    for family, report in zip([f for f in exports for _ in (0, 1)], reports, strict=True):
        assert_stock(report, family)


def test_llava_weights_carry_stock_names(exports):
    from safetensors import safe_open

    with safe_open(str(exports["llava"][1] / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)


def test_the_app_still_loads_its_stock_folders_without_torchvision(exports):
    from modules.processors import InternVLImageProcessorOnly, Qwen2_5_VLImageProcessorOnly

    _, processor = load_vlm(exports["internvl"][1])
    assert isinstance(processor, InternVLImageProcessorOnly)
    _, processor = load_vlm(exports["qwen2_5_vl"][1])
    assert isinstance(processor, Qwen2_5_VLImageProcessorOnly)
    saved = json.loads((exports["qwen2_5_vl"][1] / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor" and "video_processor" in saved


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_push_names_are_the_stock_files_names(exports, family):
    """The vLLM engine pushes under the names vLLM loaded the folder from (modules.stock.stock_names)."""
    from safetensors import safe_open

    from modules.vllm_engine import weights_to_push

    model, _ = load_vlm(exports[family][1])
    with safe_open(str(exports[family][1] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {n for n, _ in weights_to_push(model)} == keys
