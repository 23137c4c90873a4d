"""Safe loading: weights from safetensors only, torch.load only with weights_only=True, no eval/exec of strings,
remote code only when asked for (and then the start-up log says so)."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from callbacks.fault_tolerance import AtomicCheckpointIO
from modules.loading import load_vlm

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("app", "modules", "datamodules", "callbacks") for p in (ROOT / d).rglob("*.py"))
KNOWN_UNSAFE: dict[str, str] = {}  # path -> reason; a strict xfail turns into a failure once fixed


def _unsafe_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '?')}.{f.attr}" \
            if isinstance(f, ast.Attribute) else ""
        if name in ("eval", "exec", "pickle.load", "pickle.loads", "torch.load"):
            safe = name == "torch.load" and any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords)
            if not safe:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return found


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_UNSAFE[str(p.relative_to(ROOT))]))
    if str(p.relative_to(ROOT)) in KNOWN_UNSAFE else p for p in SOURCES
], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_eval_exec_pickle_or_unsafe_torch_load(path: Path) -> None:
    assert _unsafe_calls(path) == []


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_loading_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "evil": _Evil(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):  # asking for weights_only=False does not switch it off
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_weights_come_from_safetensors_only(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("internvl")
    folder = tmp_path / "bin-only"
    shutil.copytree(src, folder)
    model, _ = load_vlm(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises((OSError, ValueError)):
        load_vlm(folder)


def test_remote_code_only_when_asked_and_logged(tiny_model_dir, caplog: pytest.LogCaptureFixture) -> None:
    folder = tiny_model_dir("internvl")
    with caplog.at_level(logging.INFO, logger="modules.loading"):
        load_vlm(folder)
    assert "trust_remote_code" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modules.loading"):
        load_vlm(folder, trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text and str(folder) in caplog.text
