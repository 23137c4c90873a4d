"""Load a VLM and its processor from a local Hugging Face folder, and choose which parts train.

One loader serves the tiny offline model and a real checkpoint (InternVL3, LLaVA, Qwen2.5-VL). Parts are
named by role, not by module path, so one config field (`trainable_parts`) drives all three recipe stages:
all parts in RL, the connector alone in stage 3.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from modules.processors import load_processor

log = logging.getLogger(__name__)

PARTS = ("vision", "connector", "language_model", "lm_head")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """A checkpoint folder that cannot be used, with what would be valid."""


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail early, naming the path, for a missing folder, a hub id, or a folder that is not a VLM."""
    p = Path(path).expanduser()
    if not p.exists():
        hint = ""
        if "/" in str(path) and not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1:
            hint = (" It looks like a Hugging Face hub id; this app never downloads at run time: fetch it "
                    "yourself (`huggingface-cli download ID --local-dir DIR`) and point `model_path` at DIR.")
        raise ModelLoadError(f"model_path {str(path)!r}: no such folder.{hint} "
                             "Build the embedded default with `python -m app.make_tiny artifacts/tiny-vlm`.")
    if not p.is_dir():
        raise ModelLoadError(f"model_path {str(p)!r} is a file; expected a Hugging Face model folder.")
    cfg = p / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"model_path {str(p)!r} has no config.json: not a Hugging Face model folder.")
    config = json.loads(cfg.read_text())
    if "vision_config" not in config:
        raise ModelLoadError(
            f"model_path {str(p)!r} (model_type={config.get('model_type')!r}) is not a vision-language model: "
            "expected a config with a vision_config (InternVL, LLaVA, Qwen2.5-VL).")
    return p


def load_vlm(path: str | Path, dtype: str = "float32", attn_implementation: str | None = "sdpa",
             gradient_checkpointing: bool = False, trust_remote_code: bool = False):
    """Load (model, processor) from a local folder; weights from safetensors only."""
    from transformers import AutoModelForImageTextToText

    p = check_checkpoint_dir(path)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if trust_remote_code:
        log.warning("trust_remote_code=True: running Python code shipped inside %s", p)
    model = AutoModelForImageTextToText.from_pretrained(
        p, dtype=DTYPES[dtype], attn_implementation=attn_implementation, use_safetensors=True,
        trust_remote_code=trust_remote_code, local_files_only=True,
    )
    processor = load_processor(p, trust_remote_code=trust_remote_code)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def part_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Map role -> modules. Qwen2.5-VL's connector (`visual.merger`) is kept apart from the rest of `visual`."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise ModelLoadError(f"{type(model).__name__} has no `.model`; not a supported VLM layout")
    parts: dict[str, list[nn.Module]] = {"lm_head": [model.lm_head], "language_model": [inner.language_model]}
    if hasattr(inner, "visual"):  # Qwen2.5-VL
        merger = inner.visual.merger
        parts["connector"] = [merger]
        parts["vision"] = [m for name, m in inner.visual.named_children() if name != "merger"]
    else:  # InternVL, LLaVA
        parts["vision"] = [inner.vision_tower]
        parts["connector"] = [inner.multi_modal_projector]
    return parts


def set_trainable_parts(model: nn.Module, trainable: list[str] | tuple[str, ...]) -> list[tuple[str, int, bool]]:
    """Freeze everything, then unfreeze the named parts. Returns rows (part, parameters, trainable)."""
    unknown = [t for t in trainable if t not in PARTS]
    if unknown:
        raise ValueError(f"trainable_parts: unknown part(s) {unknown}; valid parts are {list(PARTS)}")
    if not trainable:
        raise ValueError(f"trainable_parts is empty; choose at least one of {list(PARTS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    rows = []
    for name, mods in part_modules(model).items():
        params = [p for m in mods for p in m.parameters()]
        on = name in trainable
        for p in params:
            p.requires_grad_(on)
        rows.append((name, sum(p.numel() for p in params), on))
    order = {n: i for i, n in enumerate(PARTS)}
    return sorted(rows, key=lambda r: order[r[0]])


def parts_table(rows: list[tuple[str, int, bool]]) -> str:
    """A plain-text table of the parts, for the start-up log."""
    lines = [f"{'part':<16}{'parameters':>14}  state", "-" * 40]
    lines += [f"{n:<16}{c:>14,}  {'trainable' if on else 'frozen'}" for n, c, on in rows]
    total, train = sum(r[1] for r in rows), sum(r[1] for r in rows if r[2])
    lines.append(f"{'total':<16}{total:>14,}  {train:,} trainable")
    return "\n".join(lines)


def model_family(model: nn.Module) -> str:
    """'internvl' | 'llava' | 'qwen2_5_vl' | the model_type for other families."""
    return getattr(model.config, "model_type", type(model).__name__)
