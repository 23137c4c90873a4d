"""What this app writes is a stock Hugging Face folder: stock weight names, stock processor class.

One home for the names a checkpoint carries on disk. transformers 5 renames some families' keys when it loads
them and reverts the renaming in `save_pretrained` (InternVL's `model.language_model.*` is
`language_model.model.*` on disk), but for LLaVA with a SigLIP / CLIP vision tower it saves
`vision_tower.embeddings.*` where stock checkpoints (and vLLM) have `vision_tower.vision_model.embeddings.*`.
`stock_names` applies both; `save_stock` writes the folder (and fixes the files `save_pretrained` wrote), and the
vLLM engine pushes weights under the same names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# vision towers whose stock checkpoints nest their weights under `vision_model.` (transformers strips it on load)
NESTED_TOWERS = {"SiglipVisionModel": "vision_model.", "CLIPVisionModel": "vision_model."}


def _tower_prefix(model: nn.Module) -> tuple[str, str] | None:
    """(on-disk prefix transformers writes, stock prefix) for a LLaVA-style tower, else None."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    nested = NESTED_TOWERS.get(type(tower).__name__) if tower is not None else None
    if nested is None or getattr(model.config, "model_type", "") != "llava":
        return None
    return "vision_tower.", "vision_tower." + nested


def restock(name: str, prefix: tuple[str, str] | None) -> str:
    """One on-disk name as transformers saved it -> the stock checkpoint name."""
    if prefix is None or not name.startswith(prefix[0]) or name.startswith(prefix[1]):
        return name
    return prefix[1] + name[len(prefix[0]):]


def stock_names(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """(module name, tensor) pairs -> (stock checkpoint name, tensor) pairs, as a stock folder stores them."""
    pairs = list(tensors)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: module names are checkpoint names
        reverted = pairs
    else:
        reverted = list(revert_weight_conversion(model, dict(pairs)).items())
    prefix = _tower_prefix(model)
    return [(restock(n, prefix), t) for n, t in reverted]


def _restock_files(out: Path, prefix: tuple[str, str]) -> None:
    """Rename the keys of the safetensors files (and the shard index) that `save_pretrained` wrote."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            meta = f.metadata() or {"format": "pt"}
            tensors = {restock(k, prefix): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, shard, metadata=meta)
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {restock(k, prefix): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_stock(model: nn.Module, processor: Any, out_dir: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a stock Hugging Face folder: safetensors under stock names, the stock processor (with the family's
    video processor config), chat template, generation config. `state_dict`: full weights to write instead of
    the model's own (a sharded model's, gathered on rank 0)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    prefix = _tower_prefix(model)
    if prefix is not None:
        _restock_files(out, prefix)
    processor.save_pretrained(out)
    return out
