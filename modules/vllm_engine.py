"""vLLM rollout engine: an in-process `vllm.LLM` beside the trainer (same GPU(s), or the CPU), no Ray.

Life cycle (one engine per rank, each rank samples its own prompts):
- `setup` builds `vllm.LLM(model_path, ...)` with the engine core in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0). Where it runs is a placement: on CUDA (`CudaPlacement`) vLLM takes
  `gpu_memory_utilization` of the GPU and sleeps between rollouts (level 1: weights copied to CPU RAM, KV cache
  dropped) so each update has the GPU to itself; on CPU (`CpuPlacement`) it takes a fixed `kv_cache_gb` of RAM
  and stays awake (sleep mode is CUDA-only; the skip is logged once).
- `sync_weights(model)` (after every optimiser step) only marks the engine stale; the next `generate` pushes the
  policy's *trainable* parameters (`push_stream`: full tensors gathered one by one from FSDP2 shards; frozen
  parts never change, so the connector-only stage sends ~92M parameters, not 38B) under their stock checkpoint
  names, samples, and sleeps again on CUDA. The engine is
  also stale right after `setup`, so a run resumed from a checkpoint samples from the resumed weights, not from
  `model_path`'s. `push_weights(llm, pairs)` is the push itself, for any (name, full tensor) pairs (e.g. gathered
  from FSDP shards): `worker.reload_weights(..., is_checkpoint_format=True)`, which works on CPU and CUDA alike
  (`model.load_weights` fails on CPU once the backend has repacked its linear weights), then the prefix and
  encoder caches are reset.
- `generate` sends each prompt once with `SamplingParams(n=G)`; with `enable_prefix_caching` the G samples of
  a prompt share its prefill (the same effect as `HFRolloutEngine(share_prompt=True)`).

Prompts. vLLM takes text plus PIL images, not the collated tensors: `PromptCollator` puts `prompt_text` (the
chat-template text, `<think>\\n` pre-fill included) and `images` (the PIL images in template order) into every
`PromptBatch.records[i]`. Text-only batches without them fall back to the prompt token ids. `image_placeholder`
rewrites the processor's image token in the text when the vLLM model expects another one (the stock folders this
app writes need none: vLLM reads their processor).

Truncated importance sampling (TIS). vLLM's kernels differ from the trainer's, so its sampler log-probs
(`Rollouts.logprobs`) differ slightly from the trainer's log-probs of the same tokens: the rollout is slightly
off-policy. `GRPOModule.loss` multiplies the per-token loss by `tis_weights(old_logp, rollouts.logprobs, ...)`
and logs `rollout/logprob_diff` (the mean gap) and `rollout/tis_weight` (the mean weight).

`tis_weights` returns min(exp(trainer_old_logp - sampler_logp), cap) on response tokens (0 on padding) and the
mean |trainer - sampler| log-prob gap, the health metric of the engine (it should stay ~1e-2 or below; a jump
means the weight sync broke). `tis_cap=None` turns the correction off (weights of 1).

The vLLM tier (`make test-vllm`, its own venv, README "vLLM") runs all of this with real vLLM on CPU; the pure
helpers (`tis_weights`, `weights_to_push`, `pack_responses`, placements) are also tested in the main suite.
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
from modules.stock import stock_names

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
    `model.named_parameters()` without wrapper segments, mapped back to the names a stock checkpoint carries
    (`modules.stock.stock_names`, the names vLLM loaded from), so vLLM's own checkpoint-name mapping applies.
    """
    from modules.sharding import full_parameters

    named = [(n, p.requires_grad) for n, p in model.named_parameters()]
    chosen = {n for n, trains in named if trains} or {n for n, _ in named}
    for name, tensor in full_parameters(model, chosen):
        yield from stock_names(model, [(clean_name(name), tensor)])


def weights_to_push(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`push_stream` as a list (all full tensors at once)."""
    return list(push_stream(model))


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


# -- where the engine runs ----------------------------------------------------------------------------------
class CudaPlacement:
    """On a GPU: vLLM takes a share of its memory and sleeps (weights to CPU RAM, KV cache freed) between
    rollouts, so training has the GPU to itself."""

    def __init__(self, gpu_memory_utilization: float, sleep: bool, sleep_level: int):
        self.gpu_memory_utilization, self.sleep_enabled, self.sleep_level = gpu_memory_utilization, sleep, sleep_level
        self.awake = {"weights", "kv_cache"}  # a new engine holds both

    def engine_args(self) -> dict[str, Any]:
        return {"gpu_memory_utilization": self.gpu_memory_utilization, "enable_sleep_mode": self.sleep_enabled}

    def sleep(self, llm: Any) -> None:
        if self.sleep_enabled and self.awake:
            llm.sleep(level=self.sleep_level)
            self.awake = set()

    def wake(self, llm: Any, tags: list[str]) -> None:
        todo = [t for t in tags if t not in self.awake]
        if todo:
            llm.wake_up(tags=todo)
            self.awake.update(todo)


class CpuPlacement:
    """On CPU: a fixed KV-cache size in RAM; sleep mode is a CUDA feature, so the engine stays awake."""

    def __init__(self, kv_cache_gb: float, sleep_requested: bool):
        self.kv_cache_gb = kv_cache_gb
        if sleep_requested:
            log.info("vLLM on CPU: sleep mode is CUDA-only, so the engine keeps its weights and %.2g GB KV cache "
                     "between rollouts (sleep_between_rollouts is ignored)", kv_cache_gb)

    def engine_args(self) -> dict[str, Any]:
        # VLLM_CPU_KVCACHE_SPACE (whole GB), when set, still wins inside vLLM
        return {"kv_cache_memory_bytes": int(self.kv_cache_gb * 2**30)}

    def sleep(self, llm: Any) -> None:
        pass

    def wake(self, llm: Any, tags: list[str]) -> None:
        pass


def vllm_worker(llm: Any) -> Any:
    """The worker inside an in-process engine (V1 with VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    engine = llm.llm_engine
    executor = getattr(engine, "model_executor", None) or engine.engine_core.engine_core.model_executor
    worker = executor.driver_worker
    return getattr(worker, "worker", worker)


def push_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Write (stock checkpoint name, full tensor) pairs into a running vLLM engine; returns the names pushed.

    `model.load_weights` cannot be used after start-up on CPU (the CPU backend repacks linear weights for its
    kernels and leaves the original parameters empty); `reload_weights` loads checkpoint-format tensors in place
    and repacks them, on CPU and CUDA alike. Parts not in `weights` keep their values (vLLM warns once per such
    layer; the warning is silenced here because pushing only what trains is the point). Cached prefixes and image
    embeddings were computed with the old weights, so both caches are reset.
    """
    weights = list(weights)
    quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        vllm_worker(llm).reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    finally:
        quiet.setLevel(level)
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()  # image embeddings too (the scheduler's record and the runner's cache)
    return [n for n, _ in weights]


# -- the engine ----------------------------------------------------------------------------------------------
class VLLMRolloutEngine(RolloutEngine):
    """Rollouts with an in-process vLLM engine beside the trainer (GPU: sleep mode between rollouts; CPU: a
    fixed KV cache in RAM).

    Args:
        gpu_memory_utilization: share of the GPU vLLM may take while awake (weights + KV cache). CUDA only.
        kv_cache_gb: KV-cache size in GB on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE, which wins when set). CPU only.
        temperature: sampling temperature (paper: not given; 1.0).
        top_p: nucleus sampling mass.
        max_new_tokens: response length cap (paper: 4096, then 8192).
        enable_prefix_caching: reuse a prompt's prefill across its G samples.
        sleep_between_rollouts: release vLLM's GPU memory (level-1 sleep) outside `generate`. CUDA only; on CPU
            it is skipped with a logged note.
        tis_cap: cap of the truncated importance weights for the vLLM/trainer log-prob gap (None = off).
        tensor_parallel_size: GPUs per engine (1 = one engine per rank, the supported layout).
        dtype: vLLM weight dtype.
        max_model_len: context length of the engine (default: the model's).
        image_placeholder: [processor image token, vLLM image token] to rewrite in the prompt text (None = keep).
        engine_kwargs: further `vllm.LLM` keyword arguments (e.g. {"logprobs_mode": "raw_logprobs"}).
        sleep_level: 1 keeps a CPU copy of the weights while asleep (needed when only some parts train).
    """

    def __init__(self, gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 1024, enable_prefix_caching: bool = True,
                 sleep_between_rollouts: bool = True, tis_cap: float | None = 2.0, tensor_parallel_size: int = 1,
                 dtype: str = "bfloat16", max_model_len: int | None = None,
                 image_placeholder: list[str] | None = None, engine_kwargs: dict[str, Any] | None = None,
                 sleep_level: int = 1):
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}: expected a share in (0, 1]")
        if kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb={kv_cache_gb}: expected a positive size in GB")
        if tis_cap is not None and tis_cap < 1.0:
            raise ValueError(f"tis_cap={tis_cap}: a cap below 1 would down-weight on-policy tokens; use >= 1 or null")
        if image_placeholder is not None and len(image_placeholder) != 2:
            raise ValueError("image_placeholder: expected [processor token, vLLM token]")
        self.gpu_memory_utilization, self.kv_cache_gb = gpu_memory_utilization, kv_cache_gb
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.enable_prefix_caching = max_new_tokens, enable_prefix_caching
        self.sleep_between_rollouts, self.tis_cap = sleep_between_rollouts, tis_cap
        self.tensor_parallel_size, self.dtype, self.max_model_len = tensor_parallel_size, dtype, max_model_len
        self.image_placeholder = tuple(image_placeholder) if image_placeholder else None
        self.engine_kwargs, self.sleep_level = dict(engine_kwargs or {}), sleep_level
        self.llm: Any = None
        self.placement: CudaPlacement | CpuPlacement | None = None
        self.tokenizer: Any = None
        self.seed, self.calls = 0, 0
        self.last_pushed: list[str] = []
        self._stale = True

    # -- set-up ---------------------------------------------------------------------------------------------
    def place(self, device: torch.device) -> CudaPlacement | CpuPlacement:
        kind = torch.device(device).type
        if kind == "cuda":
            return CudaPlacement(self.gpu_memory_utilization, self.sleep_between_rollouts, self.sleep_level)
        if kind == "cpu":
            return CpuPlacement(self.kv_cache_gb, self.sleep_between_rollouts)
        raise RuntimeError(f"VLLMRolloutEngine runs on CUDA or CPU (trainer device is {device})")

    def setup(self, model: nn.Module, processor: Any, device: torch.device, seed: int) -> None:
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.seed, self._stale = seed, True  # a resumed run samples from the resumed weights, not model_path's
        if self.llm is not None:
            return
        try:
            import vllm
        except ImportError as e:
            raise ImportError("VLLMRolloutEngine needs vLLM: `pip install -e .[vllm]` on a CUDA machine, or "
                              "`make vllm-venv` for the CPU build (README, section vLLM); or select "
                              "modules.rollout.HFRolloutEngine") from e
        self.placement = self.place(device)
        # In-process engine core, so the policy's weights can be written straight into the vLLM model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        path = getattr(model, "name_or_path", None) or model.config._name_or_path
        kwargs = dict(model=str(path), dtype=self.dtype, enable_prefix_caching=self.enable_prefix_caching,
                      tensor_parallel_size=self.tensor_parallel_size, seed=seed, max_model_len=self.max_model_len,
                      limit_mm_per_prompt={"image": 16}, **self.placement.engine_args(), **self.engine_kwargs)
        if self.tensor_parallel_size > 1:
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.llm = vllm.LLM(**kwargs)
        self.placement.sleep(self.llm)

    # -- weights --------------------------------------------------------------------------------------------
    def sync_weights(self, model: nn.Module) -> None:
        """Mark the engine stale; the push happens at the next `generate`, just before sampling."""
        self._stale = True

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write (stock checkpoint name, full tensor) pairs into the engine (see `push_weights`)."""
        self.placement.wake(self.llm, ["weights"])
        self.last_pushed = push_weights(self.llm, weights)
        log.debug("pushed %d tensors to vLLM", len(self.last_pushed))

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

        if self._stale:
            self.push(self._gathered(model))
            self._stale = False
        self.placement.wake(self.llm, ["weights", "kv_cache"])
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
            self.placement.sleep(self.llm)
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

    def close(self) -> None:
        """Shut the engine down and free its memory (a later `setup` starts a new one)."""
        if self.llm is None:
            return
        import gc

        from vllm.distributed import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()

    # -- checkpoint state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))
