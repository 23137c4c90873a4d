"""`python -m app.export CHECKPOINT OUT_DIR`: a Lightning checkpoint -> a plain Hugging Face folder.

The folder (safetensors weights, processor, chat template, generation config) loads with `from_pretrained`, can be
served by vLLM, and is what the next stage's `model.model_path` points at.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modules.common import IncompatibleCheckpoint, check_compatible, export_hf, policy_state
from modules.loading import load_vlm
from modules.sharding import read_checkpoint


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, model_path: str | None = None) -> Path:
    """Rebuild the model from its base folder, load the checkpoint's weights, write a HF folder."""
    ckpt_path = Path(checkpoint)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    ckpt = read_checkpoint(ckpt_path)  # weights only (never code); a file, or a sharded (FSDP2) run's folder
    base = model_path or ckpt.get("hyper_parameters", {}).get("model_path")
    if not base:
        raise IncompatibleCheckpoint(f"{ckpt_path}: no model_path in its hyper-parameters; pass --model-path")
    model, processor = load_vlm(base)
    state = policy_state(ckpt)
    check_compatible(state, model, str(ckpt_path))
    model.load_state_dict(state)
    return export_hf(model, processor, out_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m app.export", description=__doc__)
    ap.add_argument("checkpoint", help="a .ckpt written by `python -m app fit` (a file, or a sharded run's folder)")
    ap.add_argument("out_dir", help="the Hugging Face folder to write")
    ap.add_argument("--model-path", default=None, help="base model folder (default: the one the run started from)")
    a = ap.parse_args(argv)
    out = export_checkpoint(a.checkpoint, a.out_dir, a.model_path)
    print(f"exported {a.checkpoint} to {out}")


if __name__ == "__main__":
    main()
