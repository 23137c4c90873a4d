"""Token entropy and critical-token entropy, Skywork-R1V3's checkpoint-selection signal (recipe.md section 3).

Two halves:

1. Memory-light tensor maths. ``entropy_from_logits`` (nats, logsumexp-stable), ``selective_log_softmax``
   and the ``chunked_*`` functions that apply the LM head to a chunk of response positions at a time, so a
   [N, T, V] logits tensor (150k vocab x 8k tokens x fp32 = 4.9 GB per sequence) is never materialised.
2. Locating critical words ("Wait", "Alternatively", "Hmm") in a decoded response and mapping them to the
   token that starts them, then aggregating entropy at those tokens over many validation responses.

Interpretation (the paper is ambiguous, recipe.md section 3): the entropy *at* a critical token is the entropy
of the distribution the token was sampled from, i.e. the logits at the position that predicts it
(``shift=0``). ``shift=1`` instead reads the next step's distribution. Units are nats.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CRITICAL_WORDS",
    "NOWAIT_WORDS",
    "aggregate_entropy",
    "chunked_logits_entropy",
    "chunked_logp_and_entropy",
    "chunked_token_entropy",
    "critical_entropy_stats",
    "critical_word_positions",
    "entropy_from_logits",
    "incremental_decode_offsets",
    "selective_log_softmax",
]

DEFAULT_CRITICAL_WORDS: tuple[str, ...] = ("Wait", "Alternatively", "Hmm")
"""The deliberative tokens named by R1V3 (section 6.2, NoWait mode)."""

NOWAIT_WORDS: tuple[str, ...] = (
    "wait", "alternatively", "hmm", "but", "however", "alternative", "another", "check", "double-check",
    "oh", "maybe", "verify", "other", "again", "now", "ah", "any",
)  # fmt: skip
"""NoWait's (arXiv 2506.08343) keyword list: a superset, not R1V3's own list."""

DEFAULT_CHUNK_SIZE = 1024
"""Positions per LM-head call: 1024 x 152k vocab x 4 B = 0.6 GB of fp32 logits at a time."""

Span = tuple[int, int]
Position = tuple[int, str]  # (token index, canonical critical word)


# ----------------------------------------------------------------------------------------------------
# Entropy and log-probs from logits
# ----------------------------------------------------------------------------------------------------
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` in nats of the softmax of ``logits`` [..., V] -> [...].

    Computed in float32 via ``log_softmax``; ``-inf`` logits (banned tokens) contribute exactly 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [..., V]
    p = logp.exp()  # [..., V]
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)  # [...]


def selective_log_softmax(logits: Tensor, ids: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``log_softmax(logits)[..., ids]`` without a full-size fp32 log-softmax: gather minus logsumexp.

    Args:
        logits: [..., V] (any float dtype; maths in float32, ``chunk_size`` rows at a time).
        ids: [...] token ids (int64).
        chunk_size: rows of the flattened [M, V] logits upcast together.

    Returns:
        [...] float32 log-probabilities of ``ids``.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [M, V]
    flat_ids = ids.reshape(-1, 1)  # [M, 1]
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        block = flat[start : start + chunk_size].float()  # [C, V]
        picked = block.gather(-1, flat_ids[start : start + chunk_size]).squeeze(-1)  # [C]
        out.append(picked - torch.logsumexp(block, dim=-1))  # [C]
    return torch.cat(out).reshape(ids.shape) if out else flat.new_zeros(ids.shape, dtype=torch.float32)


def _map_positions(
    x: Tensor,
    mask: Tensor,
    fn: Callable[[Tensor, Tensor], Tensor],
    chunk_size: int,
    extra: Tensor | None = None,
) -> Tensor:
    """Apply ``fn(x_chunk [C, ...], extra_chunk [C] | None) -> [C]`` to masked positions, chunk by chunk.

    Args:
        x: [N, T, ...] per-position input (hidden states or logits).
        mask: [N, T] positions to evaluate; the others are 0 in the output.
        fn: per-chunk function.
        chunk_size: positions per call.
        extra: optional [N, T] per-position tensor handed to ``fn`` (e.g. token ids).

    Returns:
        [N, T] float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    flat_mask = mask.reshape(-1).bool()  # [N*T]
    index = flat_mask.nonzero().squeeze(-1)  # [K] flat indices of kept positions
    flat_x = x.reshape(-1, *x.shape[2:])  # [N*T, ...]
    out = torch.zeros(flat_mask.shape[0], dtype=torch.float32, device=x.device)  # [N*T]
    for start in range(0, index.numel(), chunk_size):
        idx = index[start : start + chunk_size]  # [C]
        extra_chunk = None if extra is None else extra.reshape(-1)[idx]  # [C]
        out = out.index_put((idx,), fn(flat_x[idx], extra_chunk).float())  # out-of-place keeps autograd
    return out.reshape(mask.shape)  # [N, T]


def chunked_token_entropy(
    hidden: Tensor, lm_head: Callable[[Tensor], Tensor], mask: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Entropy [N, T] of ``softmax(lm_head(hidden))`` at masked positions, ``chunk_size`` positions at a time.

    Args:
        hidden: [N, T, H] final hidden states at the positions that *predict* each response token.
        lm_head: maps [C, H] -> [C, V] logits (e.g. ``model.lm_head``; apply any logit scaling or
            temperature inside it).
        mask: [N, T] positions to evaluate; others are 0.
        chunk_size: positions per LM-head call (peak memory ~ chunk_size x V x 4 bytes x 3).

    Returns:
        [N, T] float32 entropies in nats. Differentiable unless called under ``torch.no_grad()``.
    """
    return _map_positions(hidden, mask, lambda h, _: entropy_from_logits(lm_head(h)), chunk_size)


def chunked_logits_entropy(logits: Tensor, mask: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Entropy [N, T] from already materialised (e.g. bf16) logits [N, T, V] without a full fp32 copy."""
    return _map_positions(logits, mask, lambda chunk, _: entropy_from_logits(chunk), chunk_size)


def chunked_logp_and_entropy(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    ids: Tensor,
    mask: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``ids`` and entropy from one LM-head call per chunk.

    Args:
        hidden: [N, T, H]; position t predicts ``ids[:, t]``.
        lm_head: [C, H] -> [C, V].
        ids: [N, T] sampled token ids.
        mask: [N, T].
        chunk_size: positions per LM-head call.

    Returns:
        (logp [N, T], entropy [N, T]), float32, 0 at unmasked positions.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    flat_mask = mask.reshape(-1).bool()  # [N*T]
    index = flat_mask.nonzero().squeeze(-1)  # [K]
    flat_h, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)  # [N*T, H], [N*T]
    logp = torch.zeros(flat_mask.shape[0], dtype=torch.float32, device=hidden.device)  # [N*T]
    ent = torch.zeros_like(logp)  # [N*T]
    for start in range(0, index.numel(), chunk_size):
        idx = index[start : start + chunk_size]  # [C]
        logits = lm_head(flat_h[idx]).float()  # [C, V]
        logp = logp.index_put((idx,), selective_log_softmax(logits, flat_ids[idx]))
        ent = ent.index_put((idx,), entropy_from_logits(logits))
    return logp.reshape(mask.shape), ent.reshape(mask.shape)


# ----------------------------------------------------------------------------------------------------
# Critical words -> token positions
# ----------------------------------------------------------------------------------------------------
def _word_pattern(words: Iterable[str]) -> tuple[re.Pattern[str], dict[str, str]]:
    """Case-insensitive whole-word alternation, longest first (so "double-check" beats "check")."""
    canonical: dict[str, str] = {}
    for w in words:
        canonical.setdefault(w.lower(), w)
    alternation = "|".join(re.escape(w) for w in sorted(canonical, key=len, reverse=True))
    # a word char or hyphen on either side means we are inside a longer word ("awaited", "re-check")
    return re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE), canonical


def _char_to_token(offsets: Sequence[Span], n_chars: int) -> list[int]:
    """For every character, the index of the first token whose span [start, end) covers it, else -1."""
    owner = [-1] * n_chars
    for tok, (start, end) in enumerate(offsets):
        for c in range(max(start, 0), min(end, n_chars)):
            if owner[c] == -1:
                owner[c] = tok
    return owner


def critical_word_positions(text: str, offsets: Sequence[Span], words: Sequence[str]) -> list[Position]:
    """Find critical words in ``text`` and map each occurrence to the token that starts it.

    Matching is case-insensitive and whole-word: "Wait," and "wait" count, "awaited" and "Waiting" do
    not. Each occurrence's first character is mapped to the *first* token whose character span covers
    it, so a token " Wait" whose span starts at the space counts, and a word split over several tokens
    ("Altern" + "atively") maps to its first piece. Special tokens with empty (0, 0) spans never match.

    Args:
        text: the decoded response the offsets refer to.
        offsets: per-token (start, end) character spans into ``text`` (HF ``return_offsets_mapping`` or
            ``incremental_decode_offsets``).
        words: critical words; the returned name is the spelling given here.

    Returns:
        (token_index, canonical word) per occurrence, in text order.
    """
    if not words:
        return []
    pattern, canonical = _word_pattern(words)
    owner = _char_to_token(offsets, len(text))
    starts = sorted((s, tok) for tok, (s, e) in enumerate(offsets) if e > s)
    found: list[Position] = []
    for match in pattern.finditer(text):
        tok = owner[match.start()]
        if tok == -1:  # no span covers the first letter: take the first token starting inside the word
            k = bisect.bisect_left(starts, (match.start(), -1))
            if k == len(starts) or starts[k][0] >= match.end():
                continue
            tok = starts[k][1]
        found.append((tok, canonical[match.group(0).lower()]))
    return found


def incremental_decode_offsets(
    decode: Callable[[list[int]], str], ids: Sequence[int]
) -> tuple[str, list[Span]]:
    """Decode generated ``ids`` and give each token the character span of the text it added.

    Re-tokenising the decoded text can split it differently from what was generated; this instead
    follows the ids themselves (vLLM-style incremental detokenisation, O(T) short decodes). A token
    that completes no character yet (part of a multi-byte UTF-8 character) gets an empty span and the
    text is credited to the token that completes it.

    Args:
        decode: ids -> text, e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=True)``.
        ids: generated token ids of one response.

    Returns:
        (text, offsets) with ``text`` the concatenation of all spans.
    """
    pieces: list[str] = []
    offsets: list[Span] = []
    length, prefix_start, read_start = 0, 0, 0
    for i in range(len(ids)):
        before = decode(list(ids[prefix_start:read_start]))
        after = decode(list(ids[prefix_start : i + 1]))
        if after.endswith("\ufffd") or len(after) <= len(before):  # incomplete character, or no text
            offsets.append((length, length))
            continue
        delta = after[len(before) :]
        pieces.append(delta)
        offsets.append((length, length + len(delta)))
        length += len(delta)
        prefix_start, read_start = read_start, i + 1
    return "".join(pieces), offsets


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def _nan_mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _critical_values(entropies: Tensor, positions: Sequence[Position], shift: int) -> list[tuple[str, float]]:
    """(word, entropy at token index + shift) for each occurrence whose shifted index is in range."""
    t = entropies.shape[0]
    return [(w, float(entropies[i + shift])) for i, w in positions if 0 <= i + shift < t]


def critical_entropy_stats(
    entropies: Tensor | Sequence[float], positions: Sequence[Position], shift: int = 0
) -> dict[str, float]:
    """Entropy at critical tokens of one response.

    Args:
        entropies: [T] per-token entropies of the response tokens.
        positions: (token index, word) from ``critical_word_positions``.
        shift: 0 reads the distribution the critical token was sampled from; 1 the step after it.

    Returns:
        ``critical`` (mean, NaN if none), ``n_critical``, and ``critical/<word>`` per word present.
    """
    ent = torch.as_tensor(entropies, dtype=torch.float32).reshape(-1)  # [T]
    values = _critical_values(ent, positions, shift)
    stats: dict[str, float] = {
        "critical": _nan_mean([v for _, v in values]),
        "n_critical": float(len(values)),
    }
    for word in sorted({w for w, _ in values}):
        stats[f"critical/{word}"] = _nan_mean([v for w, v in values if w == word])
    return stats


def aggregate_entropy(
    responses: Iterable[tuple[Tensor | Sequence[float], Sequence[Position]]],
    high_entropy_threshold: float,
    shift: int = 0,
) -> dict[str, float]:
    """Pool entropy statistics over many responses (every occurrence and token weighs the same).

    Args:
        responses: (entropies [T] over the response tokens only, critical positions) per response.
        high_entropy_threshold: tokens above it count as high-entropy (R1V3 section 6.5 used 6.8, units
            unstated).
        shift: as in ``critical_entropy_stats``.

    Returns:
        ``critical`` (mean over all occurrences, NaN if none), ``critical/<word>``, ``all_tokens`` (mean
        over all response tokens), ``high_entropy_frac``, ``critical_rate`` (critical words per 1000
        response tokens, counting every occurrence) and ``n_critical`` (occurrences in the mean).
    """
    values: list[tuple[str, float]] = []
    total, n_tokens, n_high, n_occurrences = 0.0, 0, 0, 0
    for entropies, positions in responses:
        ent = torch.as_tensor(entropies, dtype=torch.float32).reshape(-1)  # [T]
        values += _critical_values(ent, positions, shift)
        total += float(ent.double().sum())
        n_tokens += ent.numel()
        n_high += int((ent > high_entropy_threshold).sum())
        n_occurrences += len(positions)
    stats = {
        "critical": _nan_mean([v for _, v in values]),
        "all_tokens": total / n_tokens if n_tokens else math.nan,
        "high_entropy_frac": n_high / n_tokens if n_tokens else math.nan,
        "critical_rate": 1000.0 * n_occurrences / n_tokens if n_tokens else math.nan,
        "n_critical": float(len(values)),
    }
    for word in sorted({w for w, _ in values}):
        stats[f"critical/{word}"] = _nan_mean([v for w, v in values if w == word])
    return stats
