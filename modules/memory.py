"""GPU memory estimate for a training run, from the model's config alone (no weights are loaded).

`count_parameters(config)` counts vision tower, connector, language model and lm_head from the config's
dimensions (InternVL in both the transformers layout and the original `llm_config` one, LLaVA/SigLIP,
Qwen2.5-VL). `estimate_memory(...)` turns the counts and the run's settings into bytes per GPU:

| row | formula (per rank) |
|---|---|
| weights | all params x weight bytes (+ bf16 autocast copy of the trainable ones under bf16-mixed); / world under FSDP and ZeRO-3, plus two gathered decoder layers (current + prefetched) |
| grads | trainable params x grad bytes (DDP with >1 rank keeps a second copy in its reduce buckets); sharded like weights |
| optimizer | trainable params x state bytes: AdamW m+v in the parameter dtype (fp32: 8 B, bf16: 4 B), 8-bit AdamW 2 B; DeepSpeed adds a 4-B fp32 master copy |
| activations | tokens x layers x (ACT_H x hidden + ACT_F x ffn) x act bytes without checkpointing; with it, one hidden vector per token per layer plus one layer recomputed in full; plus the logits term (see LOGIT_BYTES) |
| rollout engine | vLLM: gpu_memory_utilization x capacity; HF engine: the KV cache of every response at full length |
| overhead | CUDA context and allocator fragmentation (CUDA_CONTEXT_GB + FRAGMENTATION of the rest) |

Rollout and update do not overlap in time when vLLM sleeps between rollouts (or with the HF engine, whose cache
is freed before the update), so the peak is states + max(activations, rollout engine) there, and the sum
otherwise. The constants are documented below and checked against a live tiny model in
tests/unit/test_memory.py (states exactly, activations within a factor of 3).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

GIB = 1024 ** 3
# Elements saved for backward per token per decoder layer, in units of hidden size and FFN size. Derivation
# for a Qwen2 / ViT layer with SDPA attention: norm input+output (2h) twice, q, k, v, attention output and the
# o_proj input (5h), residual inputs (1h) -> ~10h; gated MLP keeps gate, act(gate), up and their product (4f),
# a plain MLP fc1 output and act output (2f).
ACT_H = 10.0
ACT_F_GATED = 4.0
ACT_F_PLAIN = 2.0
# Bytes kept per token per vocabulary entry by the log-prob / cross-entropy head with grad: the lm_head output
# (2 B in bf16), its fp32 copy (4 B, saved by logsumexp), and the fp32 softmax saved for the entropy (4 B).
# modules.policy.token_logprobs chunks the lm_head, but autograd keeps every chunk until backward.
LOGIT_BYTES = 10.0
CUDA_CONTEXT_GB = 1.0
FRAGMENTATION = 0.05

Strategy = Literal["ddp", "fsdp", "fsdp2", "deepspeed_stage_3"]
SHARDED = ("fsdp", "fsdp2", "deepspeed_stage_3")  # weights, grads and optimizer states split over ranks
Precision = Literal["32-true", "bf16-mixed", "bf16-true"]
Optimizer = Literal["adamw", "adamw_8bit"]


# -- parameter counts ----------------------------------------------------------------------------------------
@dataclass
class ParamCount:
    vision: int
    connector: int
    language_model: int
    lm_head: int
    largest_layer: int = 0  # parameters of the biggest decoder layer (the FSDP gather unit)

    @property
    def total(self) -> int:
        return self.vision + self.connector + self.language_model + self.lm_head


def _cfg(config: Any) -> dict:
    if isinstance(config, (str, Path)):
        return json.loads((Path(config) / "config.json").read_text()) if Path(config).is_dir() \
            else json.loads(Path(config).read_text())
    return config if isinstance(config, dict) else config.to_dict()


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _pair(x: Any) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def text_params(tc: dict) -> tuple[int, int, int, int]:
    """(embeddings + layers + final norm, lm_head, one layer, layers) of a Qwen2/Llama-style decoder."""
    h, f, v = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"]
    heads = tc["num_attention_heads"]
    kv = tc.get("num_key_value_heads") or heads
    hd = tc.get("head_dim") or h // heads
    bias = tc.get("attention_bias", tc.get("model_type", "qwen2").startswith("qwen2"))
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (heads * hd + 2 * kv * hd if bias else 0)
    layer = attn + 3 * h * f + 2 * h
    n = tc["num_hidden_layers"]
    body = v * h + n * layer + h
    head = 0 if tc.get("tie_word_embeddings", False) else v * h
    return body, head, layer, n


def vision_params(vc: dict) -> tuple[int, int]:
    """(vision tower parameters, vision hidden size out) for InternViT, SigLIP/CLIP and Qwen2.5-VL's ViT."""
    h = vc["hidden_size"]
    f = vc.get("intermediate_size") or 4 * h
    n = _first(vc, "num_hidden_layers", "depth")
    p = _pair(vc.get("patch_size", 14))
    c = vc.get("num_channels", vc.get("in_channels", 3))
    mt = vc.get("model_type", "")
    if "depth" in vc and "num_hidden_layers" not in vc:  # Qwen2.5-VL: gated MLP, RMSNorm, fused qkv with bias
        t = vc.get("temporal_patch_size", 2)
        layer = 3 * h * h + 3 * h + h * h + h + 3 * h * f + 2 * f + h + 2 * h
        return c * t * p * p * h + n * layer, h
    rms = vc.get("norm_type", "layer_norm") == "rms_norm"
    norm = h if rms else 2 * h
    qkv_bias = _first(vc, "attention_bias", "qkv_bias", default=mt.startswith(("siglip", "clip")))
    qk_norm = _first(vc, "use_qk_norm", "qk_normalization", default=False)
    layer = 4 * h * h + h + (3 * h if qkv_bias else 0) + 2 * h * f + f + h + 2 * norm
    if qk_norm:
        layer += 2 * norm
    if mt.startswith(("siglip", "clip")):
        patches = (_pair(vc.get("image_size", 224)) // p) ** 2 + (1 if mt.startswith("clip") else 0)
        pool = 0
        if mt.startswith("siglip") and vc.get("vision_use_head", True):  # attention-pooling head
            pool = h + 4 * h * h + 4 * h + norm + 2 * h * f + f + h
        return c * p * p * h + h + patches * h + n * layer + norm + pool, h
    layer += 2 * h  # InternViT layer scales (lambda_1, lambda_2)
    patches = (_pair(vc.get("image_size", 448)) // p) ** 2
    return c * p * p * h + h + (patches + 1) * h + h + n * layer, h


def count_parameters(config: Any) -> ParamCount:
    """Parameter counts by part from a config (dict, PretrainedConfig, model folder or config.json path)."""
    cfg = _cfg(config)
    tc = _first(cfg, "text_config", "llm_config")
    vc = cfg["vision_config"]
    body, head, layer, _ = text_params(tc)
    vis, vh = vision_params(vc)
    th = tc["hidden_size"]
    if "depth" in vc and "num_hidden_layers" not in vc:  # Qwen2.5-VL merger: RMSNorm, Linear(4h,4h), Linear(4h,out)
        m = 4 * vh
        conn = vh + m * m + m + m * vc.get("out_hidden_size", th) + vc.get("out_hidden_size", th)
    elif "downsample_ratio" in cfg:  # InternVL: pixel shuffle x(1/r)^2, LayerNorm, Linear, GELU, Linear
        m = int(round(vh / cfg["downsample_ratio"] ** 2))
        conn = 2 * m + m * th + th + th * th + th
    else:  # LLaVA: Linear, act, Linear
        conn = vh * th + th + th * th + th
    return ParamCount(vision=vis, connector=conn, language_model=body, lm_head=head, largest_layer=layer)


# -- memory -------------------------------------------------------------------------------------------------
def bytes_per_param(strategy: str, precision: str, optimizer: str) -> tuple[float, float, float, float]:
    """(weight bytes, extra bytes per trainable weight, grad bytes, optimizer bytes) per parameter."""
    if precision not in ("32-true", "bf16-mixed", "bf16-true"):
        raise ValueError(f"precision {precision!r} is not one of 32-true, bf16-mixed, bf16-true")
    if optimizer not in ("adamw", "adamw_8bit"):
        raise ValueError(f"optimizer {optimizer!r} is not one of adamw, adamw_8bit")
    deepspeed = strategy.startswith("deepspeed")
    if precision == "32-true":
        w, extra, g = 4.0, 0.0, 4.0
    elif precision == "bf16-true" or deepspeed:
        w, extra, g = 2.0, 0.0, 2.0
    else:  # bf16-mixed: fp32 parameters are the master weights; autocast caches a bf16 copy
        w, extra, g = 4.0, 2.0, 4.0
    opt = 2.0 if optimizer == "adamw_8bit" else 2 * (4.0 if deepspeed else w)
    if deepspeed and precision != "32-true":
        opt += 4.0  # fp32 master weights live in the DeepSpeed optimizer
    return w, extra, g, opt


@dataclass
class MemoryEstimate:
    """Bytes per GPU by row, and the capacity they are compared with."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    rollout_engine: float
    overhead: float
    capacity_gb: float
    overlap: bool  # rollout engine memory held during the update (no sleep)
    params: ParamCount | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def peak_phase(self) -> float:
        update = self.activations + self.logits
        return update + self.rollout_engine if self.overlap else max(update, self.rollout_engine)

    @property
    def total(self) -> float:
        return self.states + self.peak_phase + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity_gb * GIB

    def table(self) -> str:
        """A plain-text table in GiB (rows: weights, grads, optimizer, activations, logits, rollout, total)."""
        rows = [("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                ("activations", self.activations), ("logits (log-prob head)", self.logits),
                ("rollout engine", self.rollout_engine), ("overhead", self.overhead)]
        lines = []
        if self.params is not None:
            p = self.params
            lines.append(f"parameters: {p.total / 1e9:.2f}B (vision {p.vision / 1e9:.2f}B, connector "
                         f"{p.connector / 1e6:.1f}M, LLM {p.language_model / 1e9:.2f}B, lm_head {p.lm_head / 1e9:.2f}B)")
        lines += [f"{'memory per GPU':<26}{'GiB':>10}", "-" * 36]
        lines += [f"{name:<26}{b / GIB:>10.2f}" for name, b in rows]
        phase = "rollout and update overlap" if self.overlap else "rollout and update take turns"
        lines += ["-" * 36, f"{'total':<26}{self.total / GIB:>10.2f}  ({phase})",
                  f"{'capacity':<26}{self.capacity_gb:>10.2f}  -> {'fits' if self.fits else 'DOES NOT FIT'}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def activation_bytes(tc: dict, vc: dict, tokens: float, vision_tokens: float, checkpointing: bool,
                     act_bytes: float) -> float:
    """Saved activations of the decoder over `tokens` and the vision tower over `vision_tokens`."""
    def stack(tok: float, h: int, f: int, n: int, gated: bool) -> float:
        full = ACT_H * h + (ACT_F_GATED if gated else ACT_F_PLAIN) * f
        if checkpointing:  # layer inputs kept, one layer recomputed at a time
            return tok * act_bytes * (n * h + full)
        return tok * act_bytes * n * full

    text = stack(tokens, tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"], True)
    vh = vc["hidden_size"]
    vis = stack(vision_tokens, vh, vc.get("intermediate_size") or 4 * vh, _first(vc, "num_hidden_layers", "depth"),
                "depth" in vc)
    return text + vis


def _vision_tokens_per_image(vc: dict) -> int:
    p = _pair(vc.get("patch_size", 14))
    return (_pair(vc.get("image_size", 448)) // p) ** 2 + 1


def estimate_memory(config: Any, world_size: int = 1, strategy: Strategy = "ddp",
                    precision: Precision = "bf16-true", optimizer: Optimizer = "adamw",
                    trainable_fraction: float = 1.0, rollout_batch: int = 8, prompt_len: int = 1024,
                    response_len: int = 4096, gradient_checkpointing: bool = True,
                    vllm_gpu_memory_utilization: float | None = None, gpu_memory_gb: float = 80.0,
                    group_size: int = 1, images_per_prompt: int = 1, vllm_sleep: bool = True,
                    mode: Literal["grpo", "sft"] = "grpo", cpu_offload: bool = False) -> MemoryEstimate:
    """Memory per GPU of one training step.

    rollout_batch: responses per rank per optimiser step (GRPO: prompts per rank x G) or sequences per rank
    (SFT, with prompt_len = sequence length and response_len = 0). group_size: G; with the shared-prompt
    forward each prompt's prefix is computed once per group. images_per_prompt: 448-px tiles per prompt.
    strategy: fsdp / fsdp2 / deepspeed_stage_3 divide weights, grads and optimizer states by world_size (plus the
    gathered blocks); cpu_offload (FSDP2) keeps those shards in CPU RAM, leaving only the gathered blocks on GPU.
    """
    cfg = _cfg(config)
    tc, vc = _first(cfg, "text_config", "llm_config"), cfg["vision_config"]
    params = count_parameters(cfg)
    shard = world_size if strategy in SHARDED else 1
    w, extra, g, o = bytes_per_param(strategy, precision, optimizer)
    compute = 4.0 if precision == "32-true" else 2.0
    total, train = params.total, params.total * trainable_fraction
    weights = (total * w + train * extra) / shard
    if shard > 1:
        weights += 2 * params.largest_layer * compute  # gathered unit + prefetched next unit
    grads = train * g / shard * (2 if strategy == "ddp" and world_size > 1 else 1)
    optim = train * o / shard
    notes: list[str] = []
    if cpu_offload and shard > 1:
        host = (total * w + train * extra) / shard + grads + optim
        weights, grads, optim = 2 * params.largest_layer * compute, 0.0, 0.0
        notes.append(f"cpu_offload: {host / GIB:.2f} GiB of shards, grads and optimizer states per rank in CPU RAM")
    prompts = math.ceil(rollout_batch / max(1, group_size))
    tokens = prompts * prompt_len + rollout_batch * response_len
    logit_tokens = rollout_batch * (response_len if mode == "grpo" else prompt_len)
    act = activation_bytes(tc, vc, tokens, prompts * images_per_prompt * _vision_tokens_per_image(vc),
                           gradient_checkpointing, compute)
    logits = logit_tokens * tc["vocab_size"] * (LOGIT_BYTES if compute == 2.0 else 2 * 4.0)
    if mode == "sft":
        rollout, overlap = 0.0, False
    elif vllm_gpu_memory_utilization is not None:
        rollout, overlap = vllm_gpu_memory_utilization * gpu_memory_gb * GIB, not vllm_sleep
        notes.append(f"vLLM reserves gpu_memory_utilization={vllm_gpu_memory_utilization} of the GPU while awake")
    else:
        heads = tc["num_attention_heads"]
        hd = tc.get("head_dim") or tc["hidden_size"] // heads
        kv = tc.get("num_key_value_heads") or heads
        rollout = rollout_batch * (prompt_len + response_len) * tc["num_hidden_layers"] * 2 * kv * hd * compute
        overlap = False
    overhead = CUDA_CONTEXT_GB * GIB + FRAGMENTATION * (weights + grads + optim + act + logits + rollout)
    return MemoryEstimate(weights=weights, grads=grads, optimizer=optim, activations=act, logits=logits,
                          rollout_engine=rollout, overhead=overhead, capacity_gb=gpu_memory_gb, overlap=overlap,
                          params=params, notes=notes)


def advice(est: MemoryEstimate, strategy: str, optimizer: str, checkpointing: bool) -> list[str]:
    """What to change, biggest row first, when the estimate does not fit."""
    out = []
    if est.states > 0.4 * est.capacity_gb * GIB and strategy == "ddp":
        out.append("shard weights, grads and optimizer states: add `--config configs/scale/fsdp2.yaml` (or deepspeed.yaml)")
    if optimizer == "adamw" and est.optimizer > 0.15 * est.capacity_gb * GIB:
        out.append("8-bit AdamW (optimizer states /4): `--config configs/scale/adamw_8bit.yaml`")
    if not checkpointing and est.activations > 0.1 * est.capacity_gb * GIB:
        out.append("gradient checkpointing: `--model.init_args.gradient_checkpointing true`")
    if est.logits + est.activations > 0.2 * est.capacity_gb * GIB:
        out.append("fewer responses per update: smaller `data.batch_size`, `model.init_args.group_size`, "
                   "`model.init_args.mini_batch_prompts`, or a shorter max_new_tokens / max_length")
    if est.rollout_engine > 0.2 * est.capacity_gb * GIB:
        out.append("a smaller rollout reservation: lower `rollout.init_args.gpu_memory_utilization` "
                   "(and keep sleep_between_rollouts true)")
    return out
