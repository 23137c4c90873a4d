"""Rollout and update benchmark: `python -m bench.rollout` (the lead wires `make bench`).

CPU rows (always): the tiny InternVL with the HF engine, shared prompt on and off: rollout tokens/s, GRPO
update step time (log-probs with grad, backward, AdamW) and peak RSS. `--vllm-only` (run in the vLLM venv by
`make bench`): the HF engine and the vLLM engine on the same prompts in one process, with their ratio; the vLLM
rollout time includes the weight push after each update, as in training. GPU rows (only with CUDA; the vLLM row
also needs vLLM): the same on a random-init model with InternVL3-1B dimensions. Medians over `--runs` runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_batch(model_dir: Path, data_dir: Path, n: int):
    from datamodules.prompting import PromptCollator
    from datamodules.vlm_datamodule import load_records
    from modules.loading import load_vlm

    model, processor = load_vlm(model_dir)
    records, _ = load_records(str(data_dir / "train-*.parquet"), max_skip_fraction=1.0, limit=n)
    collator = PromptCollator(processor)
    batch = collator(records)
    for rec, r in zip(batch.records, records, strict=True):  # what the vLLM engine needs
        rec["prompt_text"], rec["images"] = collator.prompt_text(r)
    return model, processor, batch


def update_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rollouts, share_prompt: bool) -> None:
    """One GRPO-shaped update: response log-probs with grad, a token-mean loss, backward, AdamW step."""
    from modules.policy import response_hidden, token_logprobs

    image_token = getattr(model.config, "image_token_id", None)
    if image_token is not None:  # a random model can sample the image placeholder; the unshared forward
        rollouts.response_ids[rollouts.response_ids == image_token] = 0  # would then miscount image tokens
    hidden = response_hidden(model, rollouts.prompts, rollouts.response_ids, rollouts.response_mask,
                             rollouts.group_size, share_prompt)
    logp, _ = token_logprobs(model, hidden, rollouts.response_ids)
    mask = rollouts.response_mask.float()
    loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(engine, model, processor, batch, g: int, runs: int, share_prompt: bool, device: torch.device) -> dict:
    """Median rollout tokens/s and update seconds over `runs`, and the peak memory."""
    engine.setup(model, processor, device, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    tps, upd = [], []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        rollouts = engine.generate(model, batch, g)
        _sync(device)
        t1 = time.perf_counter()
        update_step(model, opt, rollouts, share_prompt)
        _sync(device)
        tps.append(float(rollouts.response_mask.sum()) / (t1 - t0))
        upd.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else peak_rss_mb()
    return {"tokens_per_s": statistics.median(tps), "update_s": statistics.median(upd), "peak_mb": peak}


def cpu_rows(root: Path, runs: int, prompts: int, g: int, new_tokens: int) -> list[tuple[str, dict]]:
    from app.make_data import write_dataset
    from modules.rollout import HFRolloutEngine
    from modules.tiny import make_tiny

    model_dir = make_tiny(root / "tiny")
    write_dataset(root / "data", n_train=max(8, prompts), n_val=4, quiet=True)
    rows = []
    for share in (True, False):
        model, processor, batch = prompt_batch(model_dir, root / "data", prompts)
        model.train()
        engine = HFRolloutEngine(max_new_tokens=new_tokens, share_prompt=share)
        rows.append((f"cpu tiny HF share_prompt={share}",
                     measure(engine, model, processor, batch, g, runs, share, torch.device("cpu"))))
    return rows


def cpu_vllm_rows(root: Path, runs: int, prompts: int, g: int, new_tokens: int) -> list[tuple[str, Any]]:
    """The vLLM engine against the HF engine on the same prompts, in this one process (the vLLM venv)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [("cpu tiny vLLM", "skipped: vLLM not installed (`make vllm-venv`; `make bench` runs it there)")]
    from modules.rollout import HFRolloutEngine
    from modules.vllm_engine import VLLMRolloutEngine

    model, processor, batch = prompt_batch(root / "tiny", root / "data", prompts)
    model.train()
    hf = measure(HFRolloutEngine(max_new_tokens=new_tokens), model, processor, batch, g, runs, True,
                 torch.device("cpu"))
    engine = VLLMRolloutEngine(dtype="float32", kv_cache_gb=0.25, max_model_len=1024, max_new_tokens=new_tokens,
                               engine_kwargs={"enforce_eager": True})
    t0 = time.perf_counter()
    engine.setup(model, processor, torch.device("cpu"), seed=0)
    start_s = time.perf_counter() - t0
    try:
        vl = measure(engine, model, processor, batch, g, runs, True, torch.device("cpu"))
    finally:
        engine.close()
    ratio = vl["tokens_per_s"] / hf["tokens_per_s"]
    return [("cpu tiny HF (same prompts)", hf), ("cpu tiny vLLM (push included)", vl),
            ("vLLM / HF rollout tok/s", f"{ratio:.2f}x (vLLM engine start {start_s:.0f} s, not counted)")]


def build_internvl3_1b_like(out: Path) -> Path:
    """Random-init InternVL with InternVL3-1B dimensions (InternViT-300M + Qwen2.5-0.5B), tiny tokenizer."""
    from transformers import AutoModelForImageTextToText

    from modules.tiny import TinySpec, build_config, build_processor, train_tokenizer

    spec = TinySpec(896, 24, 14, 2, 4864, 1024, 24, 16, image_size=448)
    tok = train_tokenizer("internvl")
    config = build_config("internvl", spec, tok)
    config.text_config.vocab_size = 151674
    config.vision_config.intermediate_size = 4096
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    build_processor("internvl", tok, spec).save_pretrained(out)
    return out


def gpu_rows(root: Path, runs: int, prompts: int, g: int, new_tokens: int) -> list[tuple[str, Any]]:
    if not torch.cuda.is_available():
        return [("gpu rows", "skipped: no CUDA")]
    from modules.rollout import HFRolloutEngine

    model_dir = build_internvl3_1b_like(root / "internvl3-1b-like")
    device = torch.device("cuda")
    model, processor, batch = prompt_batch(model_dir, root / "data", prompts)
    model, batch = model.to(device).train(), batch.to(device)
    rows: list[tuple[str, Any]] = [("gpu 1B-like HF share_prompt=True", measure(
        HFRolloutEngine(max_new_tokens=new_tokens), model, processor, batch, g, runs, True, device))]
    try:
        import vllm  # noqa: F401
    except ImportError:
        return rows + [("gpu 1B-like vLLM", "skipped: vLLM not installed")]
    from modules.vllm_engine import VLLMRolloutEngine

    torch.cuda.reset_peak_memory_stats()
    engine = VLLMRolloutEngine(gpu_memory_utilization=0.3, max_new_tokens=new_tokens)
    rows.append(("gpu 1B-like vLLM", measure(engine, model, processor, batch, g, runs, True, device)))
    return rows


def table(rows: list[tuple[str, Any]]) -> str:
    lines = [f"{'setting':<36}{'rollout tok/s':>14}{'update s':>10}{'peak MB':>10}", "-" * 70]
    for name, r in rows:
        if isinstance(r, str):
            lines.append(f"{name:<36}{r}")
        else:
            lines.append(f"{name:<36}{r['tokens_per_s']:>14.1f}{r['update_s']:>10.3f}{r['peak_mb']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-gpu", action="store_true", help="CPU rows only")
    ap.add_argument("--vllm", action="store_true", help="add the CPU vLLM-vs-HF rows (needs vLLM)")
    ap.add_argument("--vllm-only", action="store_true", help="only the CPU vLLM-vs-HF rows (needs vLLM)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if args.vllm_only else cpu_rows(Path(tmp), args.runs, args.prompts, args.group_size,
                                                  args.max_new_tokens)
        if args.vllm_only or args.vllm:
            if args.vllm_only:
                from app.make_data import write_dataset
                from modules.tiny import make_tiny

                make_tiny(Path(tmp) / "tiny")
                write_dataset(Path(tmp) / "data", n_train=max(8, args.prompts), n_val=4, quiet=True)
            rows += cpu_vllm_rows(Path(tmp), args.runs, args.prompts, args.group_size, args.max_new_tokens)
        if not args.no_gpu and not args.vllm_only:
            rows += gpu_rows(Path(tmp), args.runs, args.prompts, args.group_size, args.max_new_tokens)
    print(f"medians over {args.runs} runs; {args.prompts} prompts x G={args.group_size}, "
          f"max_new_tokens={args.max_new_tokens}; peak = RSS (CPU) or max allocated (GPU)")
    print(table(rows))


if __name__ == "__main__":
    main()
