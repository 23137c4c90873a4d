"""vLLM rollout engine: an in-process `vllm.LLM` colocated with the trainer on the same GPU(s), no Ray.

Life cycle (one engine per rank, each rank samples its own prompts):
- `setup` builds `vllm.LLM(model_path, enable_sleep_mode=True, ...)` and puts it to sleep (level 1: weights
  copied to CPU RAM, KV cache dropped) so the first update has the GPU to itself.
- `sync_weights(model)` (after every optimiser step) only marks the engine stale; the next `generate` wakes
  the weights, pushes the policy's *trainable* parameters (`push_stream`: full tensors gathered one by one from
  FSDP2 shards; frozen parts never change, so the connector-only stage sends ~92M parameters, not 38B), wakes the KV cache, samples, and sleeps again. The
  engine is also stale right after `setup`, so a run resumed from a checkpoint samples from the resumed
  weights, not from `model_path`'s.
- `generate` sends each prompt once with `SamplingParams(n=G)`; with `enable_prefix_caching` the G samples of
  a prompt share its prefill (the same effect as `HFRolloutEngine(share_prompt=True)`).

Prompts. vLLM takes text plus PIL images, not the collated tensors, so every `PromptBatch.records[i]` must carry
`prompt_text` (the chat-template text that `PromptCollator.prompt_text` made, `<think>\\n` pre-fill included)
and `images` (the PIL images in template order) when this engine is selected. Text-only batches (no vision
tensors) fall back to the prompt token ids. `image_placeholder` rewrites the processor's image token in the text
when the vLLM model expects another one (vLLM's InternVL chat model expands `<image>` itself).

Truncated importance sampling (TIS). vLLM's kernels differ from the trainer's, so its sampler log-probs
(`Rollouts.logprobs`) differ slightly from the trainer's log-probs of the same tokens: the rollout is slightly
off-policy. GRPOModule should correct for it (to be wired by the module owner):

    old = logp.detach()  (or the stored old log-probs when several updates reuse the rollouts)
    if rollouts.logprobs is not None:
        w, diff = tis_weights(old, rollouts.logprobs[rows], mask, self.rollout.tis_cap)
        token_loss = token_loss * w          # before aggregation; w carries no gradient
        log("rollout/logprob_diff", diff)

`tis_weights` returns min(exp(trainer_old_logp - sampler_logp), cap) on response tokens (0 on padding) and the
mean |trainer - sampler| log-prob gap, the health metric of the engine (it should stay ~1e-2 or below; a jump
means the weight sync broke). `tis_cap=None` turns the correction off (weights of 1).

Everything that touches vLLM runs only on a CUDA machine with `pip install -e .[vllm]`; the pure helpers
(`tis_weights`, `weights_to_push`, `pack_responses`) are tested on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from datamodules.types import PromptBatch, Rollouts
from modules.rollout import RolloutEngine

log = logging.getLogger(__name__)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


# -- pure helpers (CPU-testable) -----------------------------------------------------------------------------
def tis_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                cap: float | None) -> tuple[torch.Tensor, float]:
    """Truncated importance weights [N, T] = min(exp(trainer - sampler), cap) on the mask, and the mean |gap|."""
    m = mask.to(trainer_logp.dtype)
    gap = (trainer_logp.detach().float() - sampler_logp.float()) * m
    weights = torch.ones_like(gap) if cap is None else torch.exp(gap).clamp(max=cap)
    diff = float(gap.abs().sum() / m.sum().clamp(min=1))
    return (weights * m).to(trainer_logp.dtype), diff


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpointing / compile wrapper segments."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def push_stream(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) of the parameters that train; all of them when nothing is trainable.

    A sharded (FSDP2) model's `DTensor` shards are gathered one tensor at a time (`full_parameters`), so no rank
    ever holds more than one extra full tensor; every rank must consume the stream to the end (each gather is a
    collective), and every rank gets the same full tensors for its own vLLM engine. Names are those of
    `model.named_parameters()` without wrapper segments, mapped back to the names `save_pretrained` writes (the
    ones vLLM loaded from), so vLLM's own checkpoint-name mapping applies.
    """
    from modules.sharding import full_parameters

    named = [(n, p.requires_grad) for n, p in model.named_parameters()]
    chosen = {n for n, trains in named if trains} or {n for n, _ in named}
    for name, tensor in full_parameters(model, chosen):
        yield from checkpoint_names(model, {clean_name(name): tensor}).items()


def weights_to_push(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`push_stream` as a list (all full tensors at once)."""
    return list(push_stream(model))


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename module names to checkpoint names (transformers 5 renames some families' keys on load and
    reverts the renaming in `save_pretrained`; InternVL's `model.language_model.*` is
    `language_model.model.*` on disk)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: module names are checkpoint names
        return tensors
    return dict(revert_weight_conversion(model, tensors))


def pack_responses(tokens: list[list[int]], logprobs: list[list[float]] | None, finished: list[bool],
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad per-response token lists: ids [N, R], mask [N, R], truncated [N] (and log-probs [N, R])."""
    n, width = len(tokens), max(1, max((len(t) for t in tokens), default=1))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    lp = None if logprobs is None else torch.zeros((n, width), dtype=torch.float32)
    for i, toks in enumerate(tokens):
        ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, :len(toks)] = 1
        if lp is not None:
            lp[i, :len(toks)] = torch.tensor(logprobs[i], dtype=torch.float32)
    return ids, mask, torch.tensor([not f for f in finished], dtype=torch.bool), lp


def placeholder_ids(model: nn.Module) -> list[int]:
    """Image / video placeholder token ids: a sampled one would break the trainer's image-token count."""
    cfg = getattr(model, "config", None)
    ids = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "image_token_index")]
    return sorted({i for i in ids if isinstance(i, int) and i >= 0})


def prompt_inputs(batch: PromptBatch, pad_id: int, image_placeholder: tuple[str, str] | None = None) -> list[dict]:
    """vLLM prompt dicts: chat text + images from the records, or token ids for text-only batches."""
    out = []
    for i, rec in enumerate(batch.records):
        text = rec.get("prompt_text")
        if text is None:
            if batch.vision:
                raise ValueError(
                    "VLLMRolloutEngine needs `prompt_text` and `images` in each PromptBatch record for image "
                    "prompts (the DataModule must add them when the vLLM engine is selected)")
            row = batch.input_ids[i][batch.attention_mask[i].bool()]
            out.append({"prompt_token_ids": row.tolist()})
            continue
        if image_placeholder is not None:
            text = text.replace(*image_placeholder)
        prompt: dict[str, Any] = {"prompt": text}
        if rec.get("images"):
            prompt["multi_modal_data"] = {"image": list(rec["images"])}
        out.append(prompt)
    return out


# -- the engine ----------------------------------------------------------------------------------------------
class VLLMRolloutEngine(RolloutEngine):
    """Rollouts with an in-process vLLM engine sharing the GPU with training (sleep mode between rollouts).

    Args:
        gpu_memory_utilization: share of the GPU vLLM may take while awake (weights + KV cache).
        temperature: sampling temperature (paper: not given; 1.0).
        top_p: nucleus sampling mass.
        max_new_tokens: response length cap (paper: 4096, then 8192).
        enable_prefix_caching: reuse a prompt's prefill across its G samples.
        sleep_between_rollouts: release vLLM's GPU memory (level-1 sleep) outside `generate`.
        tis_cap: cap of the truncated importance weights for the vLLM/trainer log-prob gap (None = off).
        tensor_parallel_size: GPUs per engine (1 = one engine per rank, the supported layout).
        dtype: vLLM weight dtype.
        max_model_len: context length of the engine (default: the model's).
        image_placeholder: [processor image token, vLLM image token] to rewrite in the prompt text (None = keep).
        engine_kwargs: further `vllm.LLM` keyword arguments (e.g. {"logprobs_mode": "raw_logprobs"}).
        sleep_level: 1 keeps a CPU copy of the weights while asleep (needed when only some parts train).
    """

    def __init__(self, gpu_memory_utilization: float = 0.5, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 1024, enable_prefix_caching: bool = True,
                 sleep_between_rollouts: bool = True, tis_cap: float | None = 2.0, tensor_parallel_size: int = 1,
                 dtype: str = "bfloat16", max_model_len: int | None = None,
                 image_placeholder: list[str] | None = None, engine_kwargs: dict[str, Any] | None = None,
                 sleep_level: int = 1):
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}: expected a share in (0, 1]")
        if tis_cap is not None and tis_cap < 1.0:
            raise ValueError(f"tis_cap={tis_cap}: a cap below 1 would down-weight on-policy tokens; use >= 1 or null")
        if image_placeholder is not None and len(image_placeholder) != 2:
            raise ValueError("image_placeholder: expected [processor token, vLLM token]")
        self.gpu_memory_utilization, self.temperature, self.top_p = gpu_memory_utilization, temperature, top_p
        self.max_new_tokens, self.enable_prefix_caching = max_new_tokens, enable_prefix_caching
        self.sleep_between_rollouts, self.tis_cap = sleep_between_rollouts, tis_cap
        self.tensor_parallel_size, self.dtype, self.max_model_len = tensor_parallel_size, dtype, max_model_len
        self.image_placeholder = tuple(image_placeholder) if image_placeholder else None
        self.engine_kwargs, self.sleep_level = dict(engine_kwargs or {}), sleep_level
        self.llm: Any = None
        self.tokenizer: Any = None
        self.seed, self.calls = 0, 0
        self._stale = True
        self._asleep = False

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, processor: Any, device: torch.device, seed: int) -> None:
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.seed, self._stale = seed, True
        if self.llm is not None:
            return
        try:
            import vllm
        except ImportError as e:
            raise ImportError("VLLMRolloutEngine needs vLLM: install with `pip install -e .[vllm]` on a CUDA "
                              "machine, or select modules.rollout.HFRolloutEngine") from e
        if torch.device(device).type != "cuda":
            raise RuntimeError(f"VLLMRolloutEngine runs on CUDA only (trainer device is {device})")
        # In-process engine core, so the policy's weights can be written straight into the vLLM model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        path = getattr(model, "name_or_path", None) or model.config._name_or_path
        kwargs = dict(model=str(path), dtype=self.dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                      enable_prefix_caching=self.enable_prefix_caching, enable_sleep_mode=self.sleep_between_rollouts,
                      tensor_parallel_size=self.tensor_parallel_size, seed=seed, max_model_len=self.max_model_len,
                      limit_mm_per_prompt={"image": 16}, **self.engine_kwargs)
        if self.tensor_parallel_size > 1:
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.llm = vllm.LLM(**kwargs)
        self._sleep()

    def _sleep(self) -> None:
        if self.sleep_between_rollouts and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def _wake(self, tags: list[str]) -> None:
        if self._asleep:
            self.llm.wake_up(tags=tags)

    # -- weights --------------------------------------------------------------------------------------------
    def sync_weights(self, model: nn.Module) -> None:
        """Mark the engine stale; the push happens at the next `generate`, just before sampling."""
        self._stale = True

    def _vllm_model(self) -> Any:
        """The vLLM model object inside the in-process engine (V1 with multiprocessing off)."""
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None) or engine.engine_core.engine_core.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model

    def _push(self, model: nn.Module) -> None:
        count = 0

        def counted(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self._vllm_model().load_weights(weights=counted(self._gathered(model)))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        log.debug("pushed %d tensors to vLLM", count)

    @staticmethod
    def _gathered(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        """Trainable weights as full tensors: FSDP2 `DTensor` shards gathered one by one (`push_stream`), FSDP1
        shards summoned whole first."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if any(isinstance(m, FSDP) for m in model.modules()):
            with FSDP.summon_full_params(model, writeback=False, rank0_only=False):
                return [(n, t.clone()) for n, t in push_stream(model)]
        return push_stream(model)

    # -- sampling -------------------------------------------------------------------------------------------
    def generate(self, model: nn.Module, batch: PromptBatch, group_size: int,
                 temperature: float | None = None, max_new_tokens: int | None = None) -> Rollouts:
        from vllm import SamplingParams

        self._wake(["weights"])
        if self._stale:
            self._push(model)
            self._stale = False
        self._wake(["kv_cache"])
        self._asleep = False
        params = SamplingParams(
            n=group_size, temperature=self.temperature if temperature is None else temperature, top_p=self.top_p,
            max_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens, logprobs=0,
            stop_token_ids=self._eos_ids(), seed=self.seed * 1_000_003 + self.calls,
            logit_bias={i: -100.0 for i in placeholder_ids(model)} or None)
        self.calls += 1
        try:
            outputs = self.llm.generate(prompt_inputs(batch, self.tokenizer.pad_token_id, self.image_placeholder),
                                        params, use_tqdm=False)
        finally:
            self._sleep()
        return self._rollouts(batch, outputs, group_size, model)

    def _rollouts(self, batch: PromptBatch, outputs: list[Any], g: int, model: nn.Module) -> Rollouts:
        tokens, logps, finished = [], [], []
        for out in outputs:
            for c in out.outputs:
                tokens.append(list(c.token_ids))
                logps.append([next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
                             or [0.0] * len(c.token_ids))
                finished.append(c.finish_reason != "length")
        ids, mask, truncated, lp = pack_responses(tokens, logps, finished, self.tokenizer.pad_token_id)
        device = next(model.parameters()).device
        texts = self.tokenizer.batch_decode(ids * mask + self.tokenizer.pad_token_id * (1 - mask),
                                            skip_special_tokens=True)
        return Rollouts(prompts=batch, response_ids=ids.to(device), response_mask=mask.to(device),
                        truncated=truncated.to(device), texts=texts, group_size=g, logprobs=lp.to(device))

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return sorted(i for i in ids if isinstance(i, int) and i != self.tokenizer.unk_token_id)

    # -- checkpoint state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))
