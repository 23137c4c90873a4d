"""Forward passes of a VLM policy over grouped rollouts: sampling, and response log-probs with grad.

Both come in two shapes, chosen by `share_prompt`:
- shared (default): each prompt (vision encoder + prefill) runs once; its KV cache is repeated for its G
  responses. In training the prompt's activations carry gradients, so its forward *and* backward run once per
  group, and the G responses attend to the repeated cache.
- unshared: the prompt is copied G times first, as other tools do. Kept to settle any doubt by comparison.

Positions are always passed explicitly, so sampling, the shared and the unshared training forward agree exactly
under left padding:
- 1-D RoPE families (InternVL, LLaVA): `cumsum(mask) - 1`.
- M-RoPE (Qwen2.5-VL): 3-D positions [3, N, L] from the model's own `get_rope_index` on the prompt. A text
  token after the prompt sits at `cumsum(mask) - 1 + delta` in all three axes, where `delta` (one per prompt)
  is what the image grids shifted the text by. The model's implicit fallback is not used: it keeps
  `rope_deltas` as state on the module, sized for the last prefill batch (B, not B*G), and builds decode
  positions the length of the whole mask.
Log-probs are computed from hidden states of response positions only, in chunks, so no [N, T, V] tensor of
the whole sequence is ever built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from datamodules.types import PromptBatch
from modules.entropy import entropy_from_logits
from modules.sharding import all_ranks_true

log = logging.getLogger(__name__)

LOGIT_CHUNK = 256  # response positions per lm_head chunk


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


def uses_mrope(model: nn.Module) -> bool:
    return hasattr(getattr(model, "model", None), "get_rope_index")


def _text_positions(mask: torch.Tensor) -> torch.Tensor:
    """[N, L] 1-D positions that skip padding: `cumsum(mask) - 1`, 0 on leading padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def mrope_positions(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                    vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, N, L] and per-row text offset delta [N, 1] of a (left-padded) sequence batch.

    `vision` must hold the image grids of exactly these N rows (repeated, for a repeated prompt). Tokens after
    the prompt that `vision["mm_token_type_ids"]` does not cover count as text.
    """
    mm = vision.get("mm_token_type_ids")
    if mm is None:
        mm = torch.zeros_like(input_ids)
    elif mm.shape[1] < input_ids.shape[1]:
        mm = torch.cat([mm, mm.new_zeros(mm.shape[0], input_ids.shape[1] - mm.shape[1])], dim=1)
    return model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm, image_grid_thw=vision.get("image_grid_thw"),
        video_grid_thw=vision.get("video_grid_thw"), second_per_grid_ts=vision.get("second_per_grid_ts"),
        attention_mask=mask,
    )


def positions(model: nn.Module, mask: torch.Tensor, input_ids: torch.Tensor | None = None,
              vision: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Positions of a whole sequence batch from its attention mask.

    1-D RoPE: [N, L]. M-RoPE: [3, N, L] when `input_ids` (and `vision`) are given, else None (the model then
    builds them itself from `mm_token_type_ids` and the image grids, which it can do for a full sequence).
    """
    if uses_mrope(model):
        if input_ids is None:
            return None
        return mrope_positions(model, input_ids, mask, vision or {})[0]
    return _text_positions(mask)


def _prompt_positions(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt positions ([N, P] or [3, N, P]) and the M-RoPE text offset [N, 1] (None for 1-D RoPE)."""
    if uses_mrope(model):
        return mrope_positions(model, ids, mask, vision)
    return _text_positions(mask), None


def _continued_positions(mask: torch.Tensor, start: int, stop: int | None,
                         delta: torch.Tensor | None) -> torch.Tensor:
    """Positions of text tokens in columns [start, stop) of a prompt+response mask [N, L].

    1-D: [N, L'] from `cumsum(mask) - 1`; M-RoPE: the same plus `delta`, on all three axes [3, N, L'].
    """
    pos = _text_positions(mask)[:, start:stop]
    if delta is None:
        return pos
    return (pos + delta).unsqueeze(0).expand(3, -1, -1)


def repeat_rows(x: torch.Tensor, rows: list[int], g: int) -> torch.Tensor:
    """Repeat each sample's block of rows g times, keeping samples in order: [sum(rows), ...] -> [g*sum, ...]."""
    starts = torch.tensor([0] + rows[:-1], device=x.device).cumsum(0)
    index = torch.cat([torch.arange(s, s + r, device=x.device).repeat(g) for s, r in zip(starts.tolist(), rows, strict=True)])
    return x.index_select(0, index)


def expand_batch(batch: PromptBatch, g: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """input_ids, mask and vision tensors with every prompt repeated g times: [B*g, P]."""
    vision = {}
    for key, value in batch.vision.items():
        if key in batch.vision_rows:
            vision[key] = repeat_rows(value, batch.vision_rows[key], g)
        else:  # per-token tensors such as mm_token_type_ids [B, P]
            vision[key] = value.repeat_interleave(g, 0)
    return batch.input_ids.repeat_interleave(g, 0), batch.attention_mask.repeat_interleave(g, 0), vision


def _pad_token_tensors(vision: dict[str, torch.Tensor], prompt_len: int, extra: int) -> dict[str, torch.Tensor]:
    """Extend per-token tensors ([N, P]) with zeros for response positions."""
    out = {}
    for k, v in vision.items():
        if v.dim() == 2 and v.shape[1] == prompt_len and k.endswith("_ids"):
            v = torch.cat([v, v.new_zeros(v.shape[0], extra)], dim=1)
        out[k] = v
    return out


def placeholder_ids(model: nn.Module) -> list[int]:
    """Token ids that stand for image/video features; `sample` never emits them.

    Such a token in a response would be taken for an image slot by a forward that also gets the pixels (the
    unshared training forward, a reference model, a later SFT pass) and fail "image features and image tokens
    do not match". Real checkpoints practically never sample them; random tiny ones often do.
    """
    cfg = model.config
    ids = {getattr(cfg, key, None) for key in ("image_token_id", "video_token_id", "image_token_index")}
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < model.lm_head.out_features)


def _sample_token(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [N, V] -> token ids [N] (greedy at temperature 0)."""
    if sp.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sp.temperature, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sp.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def sample(model: nn.Module, batch: PromptBatch, g: int, sp: SamplingParams, eos_ids: list[int], pad_id: int,
           gen: torch.Generator | None = None, share_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample g responses per prompt with a KV cache. Returns ids [B*g, R], mask [B*g, R], truncated [B*g].

    Rows g*i .. g*i+g-1 answer prompt i; each step draws one multinomial over [B*g, V], so both prompt shapes
    consume the generator identically. The mask is 1 up to and including EOS; truncated = no EOS. Image/video
    placeholder tokens are never sampled (`placeholder_ids`).
    """
    banned = placeholder_ids(model)
    if share_prompt:
        ids, mask, vision = batch.input_ids, batch.attention_mask, batch.vision
    else:
        ids, mask, vision = expand_batch(batch, g)
    pos, delta = _prompt_positions(model, ids, mask, vision)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **vision)
    cache, logits = out.past_key_values, out.logits[:, -1]
    if share_prompt:
        cache.batch_repeat_interleave(g)
        mask, logits = mask.repeat_interleave(g, 0), logits.repeat_interleave(g, 0)
        delta = None if delta is None else delta.repeat_interleave(g, 0)
    n, eos = mask.shape[0], torch.tensor(eos_ids, dtype=torch.long, device=mask.device)
    done = torch.zeros(n, dtype=torch.bool, device=mask.device)
    tokens, alive = [], []
    for step in range(sp.max_new_tokens):
        logits[:, banned] = float("-inf")
        tok = _sample_token(logits, sp, gen)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        alive.append(~done)
        tokens.append(tok)
        done = done | torch.isin(tok, eos)
        if all_ranks_true(model, bool(done.all())) or step == sp.max_new_tokens - 1:  # sharded: in step
            break
        mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)  # the token just drawn, if it is real
        out = model(input_ids=tok[:, None], attention_mask=mask,
                    position_ids=_continued_positions(mask, -1, None, delta), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    response = torch.stack(tokens, 1)
    resp_mask = torch.stack(alive, 1).long()
    return response, resp_mask, ~done


def _checkpointing(model: nn.Module) -> bool:
    """True when gradient checkpointing is on and active (training mode): HF layers then drop the KV cache."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def response_hidden(model: nn.Module, batch: PromptBatch, response: torch.Tensor, resp_mask: torch.Tensor,
                    g: int, share_prompt: bool = True) -> torch.Tensor:
    """Hidden states that predict each response token: [B*g, R, H] (position t predicts response[:, t]).

    Under gradient checkpointing the layers discard the KV cache the shared path needs, so it falls back to the
    unshared forward (same values, G times the prompt compute).
    """
    p = batch.input_ids.shape[1]
    if share_prompt and _checkpointing(model):
        log.warning("share_prompt needs the KV cache, which gradient checkpointing disables; "
                    "computing the training forward with the prompt copied G times instead")
        share_prompt = False
    if share_prompt:
        mask_p = batch.attention_mask
        pos_p, delta = _prompt_positions(model, batch.input_ids, mask_p, batch.vision)
        out = model.model(input_ids=batch.input_ids, attention_mask=mask_p, position_ids=pos_p,
                          use_cache=True, **batch.vision)
        cache, last = out.past_key_values, out.last_hidden_state[:, -1:].repeat_interleave(g, 0)
        if response.shape[1] == 1:
            return last
        cache.batch_repeat_interleave(g)
        delta = None if delta is None else delta.repeat_interleave(g, 0)
        full_mask = torch.cat([mask_p.repeat_interleave(g, 0), resp_mask], dim=1)
        out = model.model(input_ids=response[:, :-1], attention_mask=full_mask[:, :-1],
                          position_ids=_continued_positions(full_mask, p, -1, delta), past_key_values=cache,
                          use_cache=True)
        return torch.cat([last, out.last_hidden_state], dim=1)
    ids, mask, vision = expand_batch(batch, g)
    full_ids, full_mask = torch.cat([ids, response], 1), torch.cat([mask, resp_mask], 1)
    vision = _pad_token_tensors(vision, p, response.shape[1])
    out = model.model(input_ids=full_ids, attention_mask=full_mask,
                      position_ids=positions(model, full_mask, full_ids, vision), **vision)
    return out.last_hidden_state[:, p - 1:-1]


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) [N, R] (and entropy [N, R], nats) from hidden [N, R, H], lm_head applied chunk by chunk.

    With gradients on, each chunk is recomputed in the backward pass (activation checkpointing), so autograd keeps
    only the hidden states, never the [N, chunk, V] logits of every chunk: at a 150k vocabulary and thousands of
    response tokens those logits would dominate memory. Entropy goes through `entropy_from_logits`, which is exact
    (not NaN) where some logits are -inf.
    """

    def one_chunk(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model.lm_head(h).float()  # [N, c, V]
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        logp = logits.gather(-1, t[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [N, c]
        return logp, (entropy_from_logits(logits) if with_entropy else logp.new_zeros(()))

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    logps, ents = [], []
    for s in range(0, hidden.shape[1], chunk):
        h, t = hidden[:, s:s + chunk], targets[:, s:s + chunk]
        logp, ent = checkpoint(one_chunk, h, t, use_reentrant=False) if recompute else one_chunk(h, t)
        logps.append(logp)
        ents.append(ent)
    return torch.cat(logps, 1), (torch.cat(ents, 1) if with_entropy else None)
