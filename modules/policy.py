"""Forward passes of a VLM policy over grouped rollouts: sampling, and response log-probs with grad.

Both come in two shapes, chosen by `share_prompt`:
- shared (default): each prompt (vision encoder + prefill) runs once; its KV cache is repeated for its G
  responses. In training the prompt's activations carry gradients, so its forward *and* backward run once per
  group, and the G responses attend to the repeated cache.
- unshared: the prompt is copied G times first, as other tools do. Kept to settle any doubt by comparison.

Positions: for 1-D RoPE families (InternVL, LLaVA) positions are `cumsum(mask) - 1`, so left padding does not
shift them and sampling and training agree exactly. Qwen2.5-VL computes its 3-D positions from the mask itself.
Log-probs are computed from hidden states of response positions only, in chunks, so no [N, T, V] tensor of
the whole sequence is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from datamodules.types import PromptBatch

LOGIT_CHUNK = 256  # response positions per lm_head chunk


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


def uses_mrope(model: nn.Module) -> bool:
    return hasattr(getattr(model, "model", None), "get_rope_index")


def positions(model: nn.Module, mask: torch.Tensor) -> torch.Tensor | None:
    """[N, L] positions from the attention mask, or None where the model builds its own (M-RoPE)."""
    if uses_mrope(model):
        return None
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def repeat_rows(x: torch.Tensor, rows: list[int], g: int) -> torch.Tensor:
    """Repeat each sample's block of rows g times, keeping samples in order: [sum(rows), ...] -> [g*sum, ...]."""
    starts = torch.tensor([0] + rows[:-1], device=x.device).cumsum(0)
    index = torch.cat([torch.arange(s, s + r, device=x.device).repeat(g) for s, r in zip(starts.tolist(), rows)])
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
    """Sample g responses per prompt with a KV cache. Returns ids [B*g, R], mask [B*g, R], truncated [B*g]."""
    if share_prompt:
        ids, mask, vision = batch.input_ids, batch.attention_mask, batch.vision
    else:
        ids, mask, vision = expand_batch(batch, g)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(model, mask), use_cache=True,
                logits_to_keep=1, **vision)
    cache, logits = out.past_key_values, out.logits[:, -1]
    if share_prompt:
        cache.batch_repeat_interleave(g)
        mask, logits = mask.repeat_interleave(g, 0), logits.repeat_interleave(g, 0)
    n, eos = mask.shape[0], torch.tensor(eos_ids, device=mask.device)
    done = torch.zeros(n, dtype=torch.bool, device=mask.device)
    tokens, alive = [], []
    for step in range(sp.max_new_tokens):
        tok = _sample_token(logits, sp, gen)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        alive.append(~done)
        tokens.append(tok)
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or step == sp.max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done | alive[-1]).long()[:, None]], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=_last_pos(model, mask),
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    response = torch.stack(tokens, 1)
    resp_mask = torch.stack(alive, 1).long()
    return response, resp_mask, ~done


def _last_pos(model: nn.Module, mask: torch.Tensor) -> torch.Tensor | None:
    pos = positions(model, mask)
    return None if pos is None else pos[:, -1:]


def response_hidden(model: nn.Module, batch: PromptBatch, response: torch.Tensor, resp_mask: torch.Tensor,
                    g: int, share_prompt: bool = True) -> torch.Tensor:
    """Hidden states that predict each response token: [B*g, R, H] (position t predicts response[:, t])."""
    p = batch.input_ids.shape[1]
    if share_prompt:
        mask_p = batch.attention_mask
        out = model.model(input_ids=batch.input_ids, attention_mask=mask_p, position_ids=positions(model, mask_p),
                          use_cache=True, **batch.vision)
        cache, last = out.past_key_values, out.last_hidden_state[:, -1:]
        cache.batch_repeat_interleave(g)
        full_mask = torch.cat([mask_p.repeat_interleave(g, 0), resp_mask], dim=1)
        pos = positions(model, full_mask)
        out = model.model(input_ids=response[:, :-1], attention_mask=full_mask[:, :-1],
                          position_ids=None if pos is None else pos[:, p:-1], past_key_values=cache, use_cache=True)
        return torch.cat([last.repeat_interleave(g, 0), out.last_hidden_state], dim=1)
    ids, mask, vision = expand_batch(batch, g)
    full_ids, full_mask = torch.cat([ids, response], 1), torch.cat([mask, resp_mask], 1)
    vision = _pad_token_tensors(vision, p, response.shape[1])
    out = model.model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions(model, full_mask),
                      **vision)
    return out.last_hidden_state[:, p - 1:-1]


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) [N, R] (and entropy [N, R]) from hidden [N, R, H], lm_head applied chunk by chunk."""
    logps, ents = [], []
    for s in range(0, hidden.shape[1], chunk):
        logits = model.lm_head(hidden[:, s:s + chunk]).float()
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        lse = logits.logsumexp(-1)
        logps.append(logits.gather(-1, targets[:, s:s + chunk, None]).squeeze(-1) - lse)
        if with_entropy:
            probs = torch.softmax(logits, -1)
            ents.append(lse - (probs * logits).sum(-1))
    return torch.cat(logps, 1), (torch.cat(ents, 1) if with_entropy else None)
