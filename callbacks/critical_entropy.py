"""Critical-token entropy measured during training: Skywork-R1V3's checkpoint-selection signal (recipe.md §3).

A fixed probe set (the first ``num_probe_prompts`` validation prompts, collated once) is sampled K times per
prompt with the policy every ``every_n_steps`` optimiser steps and at the end of every validation. For each
sampled response token the entropy of the distribution it was drawn from is computed (no grad; the prompt's
hidden states once per group, the LM head a chunk of positions at a time), the critical words ("Wait",
"Alternatively", "Hmm") are located in the generated ids themselves, and the figures are pooled over all
responses (and over ranks, exactly, from sums and counts).

Each measurement is written to the loggers once, at the ``global_step`` it was taken (``callbacks.tb_logging``),
with a TensorBoard description per scalar (units and meaning, the ``DESCRIPTIONS`` below); it is also put in
``trainer.callback_metrics`` (``pl_module.log(..., logger=False)``), so
``ModelCheckpoint(monitor="entropy/critical", mode="max")`` and the checkpoint-selection callback see it:

- ``entropy/critical``: mean entropy (nats) at critical tokens; NaN when no critical word occurred. NaN is
  logged as is; ``ModelCheckpoint`` ranks a NaN monitor value as the worst possible one.
- ``entropy/critical/<word>``, for each word that occurred; ``entropy/n_critical`` (occurrences measured, a count).
- ``entropy/all_tokens`` (mean over every response token, nats), ``entropy/high_entropy_frac`` (share of tokens
  above ``high_entropy_ratio`` x ln |V| nats, |V| the width of the policy's logits), ``entropy/critical_rate``
  (critical words per 1000 response tokens).
- TensorBoard histograms ``entropy/hist/all_tokens`` and ``entropy/hist/critical`` (rank 0's tokens).

Not to be confused with ``train/rollout_entropy``, the GRPO module's mean entropy over each step's training
rollouts (other prompts every step, so noisier); the probe measures the same fixed prompts every time.

The probe uses its own ``torch.Generator``, re-seeded from ``seed`` at every measurement, so it never moves
the training sampler's random state (which is checkpointed for exact resume) and every checkpoint is probed
with the same random numbers, which lowers the noise of comparisons between checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from callbacks.tb_logging import log_scalars, tensorboard_writers
from datamodules.types import PromptBatch, PromptRecord
from modules.entropy import (
    DEFAULT_CRITICAL_WORDS,
    NOWAIT_WORDS,
    Position,
    chunked_logp_and_entropy,
    critical_word_positions,
    incremental_decode_offsets,
)
from modules.policy import response_hidden

__all__ = ["CriticalEntropyCallback", "ProbeMeasurement", "pool_entropy_sums", "stats_from_sums"]

WORD_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_CRITICAL_WORDS, "nowait": NOWAIT_WORDS}
PREFIX = "entropy"
_BASE = ("sum_critical", "n_critical", "sum_all", "n_tokens", "n_high", "n_occurrences")
_PROBE = "the probe's fixed prompts (K samples each, same random numbers at every measurement)"
DESCRIPTIONS: dict[str, str] = {
    "critical": "Mean entropy, in **nats**, of the distribution each critical word (Wait, Alternatively, Hmm, ...) "
                f"was sampled from, over every occurrence in the responses to {_PROBE}. Higher = the policy is "
                "still undecided where reasoning turns (R1V3's checkpoint-selection signal). Empty (NaN) when no "
                "critical word occurred.",
    "all_tokens": f"Mean entropy, in **nats**, over every response token sampled for {_PROBE}. At most ln |V|. "
                  "Not `train/rollout_entropy` (this step's training rollouts).",
    "critical_rate": "Critical words **per 1000 response tokens** in the probe's responses (every occurrence).",
    "n_critical": "**Count** of critical-word occurrences whose entropy went into `entropy/critical` "
                  "(all probe responses, all ranks).",
    "high_entropy_frac": "**Share** (0-1) of the probe's response tokens whose entropy exceeds "
                         "{ratio:g} x ln |V| = {threshold:.3g} nats (|V| = {vocab} logits): a threshold relative "
                         "to the largest possible entropy, so it means the same for any vocabulary.",
}
"""TensorBoard descriptions of the ``entropy/*`` scalars (Markdown; ``high_entropy_frac`` is a format string)."""


@dataclass
class ProbeMeasurement:
    """What one measurement produced.

    Attributes:
        stats: pooled figures with the keys of ``modules.entropy.aggregate_entropy`` (``critical``, ...).
        token_entropies: one [T_i] float32 tensor of entropies per response (its unmasked tokens only).
        positions: critical (token index, word) per response, indices into ``token_entropies[i]``.
        texts: decoded responses.
    """

    stats: dict[str, float]
    token_entropies: list[Tensor]
    positions: list[list[Position]]
    texts: list[str]

    def critical_values(self, shift: int = 0) -> list[float]:
        """Entropy at every critical occurrence (shifted by ``shift`` tokens, in range only)."""
        return [
            float(ent[i + shift])
            for ent, pos in zip(self.token_entropies, self.positions, strict=True)
            for i, _ in pos
            if 0 <= i + shift < ent.numel()
        ]


def canonical_words(words: Sequence[str]) -> list[str]:
    """First spelling of each word, case-insensitively deduplicated (the names ``critical_word_positions`` uses)."""
    seen: dict[str, str] = {}
    for w in words:
        seen.setdefault(w.lower(), w)
    return list(seen.values())


def pool_entropy_sums(
    responses: Sequence[tuple[Tensor, Sequence[Position]]], words: Sequence[str], threshold: float, shift: int
) -> Tensor:
    """Sums and counts behind ``aggregate_entropy``, as one float64 vector that can be summed over ranks.

    Layout: ``_BASE`` (6 entries) then (sum, count) for each of ``canonical_words(words)``.
    """
    names = canonical_words(words)
    out = torch.zeros(len(_BASE) + 2 * len(names), dtype=torch.float64)
    for ent, positions in responses:
        ent = ent.reshape(-1).double()  # [T]
        out[2] += ent.sum()
        out[3] += ent.numel()
        out[4] += (ent > threshold).sum()
        out[5] += len(positions)
        for i, word in positions:
            if 0 <= i + shift < ent.numel():
                k = len(_BASE) + 2 * names.index(word)
                out[0] += ent[i + shift]
                out[1] += 1
                out[k] += ent[i + shift]
                out[k + 1] += 1
    return out


def stats_from_sums(sums: Tensor, words: Sequence[str]) -> dict[str, float]:
    """The figures of ``aggregate_entropy`` from (possibly rank-summed) ``pool_entropy_sums`` output."""
    s = [float(x) for x in sums]
    n_tok = s[3]
    stats = {
        "critical": s[0] / s[1] if s[1] else math.nan,
        "all_tokens": s[2] / n_tok if n_tok else math.nan,
        "high_entropy_frac": s[4] / n_tok if n_tok else math.nan,
        "critical_rate": 1000.0 * s[5] / n_tok if n_tok else math.nan,
        "n_critical": s[1],
    }
    for j, word in enumerate(canonical_words(words)):
        total, count = s[len(_BASE) + 2 * j], s[len(_BASE) + 2 * j + 1]
        if count:
            stats[f"critical/{word}"] = total / count
    return stats


def vocab_size(policy: nn.Module) -> int:
    """Width of the policy's logits (the output embedding's rows; padded vocabularies count their padding)."""
    head = policy.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


@contextlib.contextmanager
def _own_generator(engine: Any, gen: torch.Generator, device: torch.device) -> Iterator[None]:
    """Sample with ``gen`` instead of the engine's checkpointed generator; restore everything afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # engines that draw from the global RNG are covered too
        if hasattr(engine, "generator"):
            saved, engine.generator = engine.generator, gen
            try:
                yield
            finally:
                engine.generator = saved
        else:
            state = engine.state_dict()
            try:
                yield
            finally:
                engine.load_state_dict(state)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # no dropout: the entropy of the distribution actually sampled from
    try:
        yield
    finally:
        model.train(was_training)


class CriticalEntropyCallback(Callback):
    """Measure entropy at critical reasoning tokens on a fixed probe set and log it.

    Args:
        every_n_steps: measure after every N optimiser steps (0 = only at validation end).
        on_validation: also measure at the end of every validation (not in the sanity check).
        num_probe_prompts: probe prompts, the first N of the DataModule's ``val_records`` (train records when
            there is no validation set).
        samples_per_prompt: responses sampled per probe prompt (K).
        temperature: sampling temperature; entropies are those of ``softmax(logits / temperature)``, the
            distribution sampled from (raw logits at temperature 0).
        max_new_tokens: response length cap (None = the rollout engine's).
        words: critical words, matched case-insensitively as whole words in the generated text.
        word_set: "default" (Wait, Alternatively, Hmm: R1V3 §6.2) or "nowait" (NoWait's 17 keywords) replaces
            ``words``; None keeps ``words``.
        shift: 0 reads the distribution the critical token was sampled from (recipe §3 interpretation); 1 the
            distribution of the token after it.
        high_entropy_ratio: tokens whose entropy exceeds ``high_entropy_ratio x ln |V|`` nats count in
            ``entropy/high_entropy_frac`` (|V|: the policy's logits). Relative to the maximum entropy, so the
            same setting means the same for a 512-token tiny model and a 152k vocabulary. Default 0.1: 0.62 nats
            at |V| = 515, 1.19 at 151,665. Measured on the tiny demo model after 300 SFT steps (64 probe
            responses, 4071 tokens): 12% of tokens above it, about the minority the 80/20 high-entropy-token
            work singles out, where 0.5 counts 0.05% (its 90th percentile is 0.12 x ln |V|). R1V3's absolute 6.8
            (§6.5, units unstated) is ratio 0.57 of ln 151,665.
        chunk_size: response positions per LM-head call (peak ~ chunk_size x vocab x 4 bytes).
        probe_batch_size: probe prompts per generate call (each call samples probe_batch_size x K responses).
        seed: seed of the probe's own generator (offset by the global rank), re-seeded at each measurement.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        on_validation: bool = True,
        num_probe_prompts: int = 16,
        samples_per_prompt: int = 4,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        words: list[str] = list(DEFAULT_CRITICAL_WORDS),  # noqa: B006 (copied below, never mutated)
        word_set: Literal["default", "nowait"] | None = None,
        shift: int = 0,
        high_entropy_ratio: float = 0.1,
        chunk_size: int = 1024,
        probe_batch_size: int = 16,
        seed: int = 0,
    ):
        if every_n_steps < 0 or num_probe_prompts < 1 or samples_per_prompt < 1 or probe_batch_size < 1:
            raise ValueError("every_n_steps >= 0 and num_probe_prompts, samples_per_prompt, probe_batch_size >= 1")
        if not 0 < high_entropy_ratio <= 1:
            raise ValueError(f"high_entropy_ratio is a share of ln |V| in (0, 1], got {high_entropy_ratio}")
        if word_set is not None and word_set not in WORD_SETS:
            raise ValueError(f"word_set must be one of {sorted(WORD_SETS)} or None, got {word_set!r}")
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.num_probe_prompts, self.samples_per_prompt = num_probe_prompts, samples_per_prompt
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.words = list(WORD_SETS[word_set]) if word_set is not None else list(words)
        if not self.words:
            raise ValueError("no critical words")
        self.shift, self.high_entropy_ratio = shift, high_entropy_ratio
        self.chunk_size, self.probe_batch_size, self.seed = chunk_size, probe_batch_size, seed
        self._probe: list[PromptBatch] | None = None
        self._last: tuple[int, ProbeMeasurement] | None = None  # (global step, result) of the last measure
        self._bucket = 0  # global_step // every_n_steps at the last train-time measurement

    # -- probe set ------------------------------------------------------------------------------------------
    def probe_batches(self, trainer: Trainer) -> list[PromptBatch]:
        """The fixed probe prompts, collated once with the DataModule's collator (cached)."""
        if self._probe is None:
            dm = trainer.datamodule
            records: list[PromptRecord] = list(getattr(dm, "val_records", None) or dm.train_records)
            records = records[: self.num_probe_prompts]
            if not records:
                raise ValueError("CriticalEntropyCallback: the DataModule has no records to probe with")
            n = self.probe_batch_size
            self._probe = [dm.collator(records[i : i + n]) for i in range(0, len(records), n)]
        return self._probe

    # -- measurement ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_entropies(
        self, policy: nn.Module, batch: PromptBatch, response_ids: Tensor, response_mask: Tensor,
        group_size: int, share_prompt: bool = True,
    ) -> Tensor:
        """Entropy [N, R] (nats, 0 where masked) of the distribution each response token was sampled from."""
        if response_ids.shape[1] == 1:  # response_hidden feeds response[:, :-1]: keep it non-empty
            response_ids = torch.cat([response_ids, response_ids], dim=1)
            response_mask = torch.cat([response_mask, torch.zeros_like(response_mask)], dim=1)
        scale = 1.0 / self.temperature if self.temperature > 0 else 1.0
        with _eval_mode(policy):
            hidden = response_hidden(policy, batch, response_ids, response_mask, group_size, share_prompt)
            lm_head = policy.lm_head if scale == 1.0 else (lambda h: policy.lm_head(h) * scale)
            _, ent = chunked_logp_and_entropy(hidden, lm_head, response_ids, response_mask, self.chunk_size)
        return ent[:, : response_mask.shape[1]]

    def measure_responses(
        self, policy: nn.Module, tokenizer: Any, batch: PromptBatch, response_ids: Tensor,
        response_mask: Tensor, group_size: int, share_prompt: bool = True,
    ) -> tuple[list[Tensor], list[list[Position]], list[str]]:
        """Per-response entropies over unmasked tokens, critical positions (from the ids) and texts."""
        ent = self.token_entropies(policy, batch, response_ids, response_mask, group_size, share_prompt)

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        entropies, positions, texts = [], [], []
        for row in range(response_ids.shape[0]):
            keep = response_mask[row].bool()  # [R]
            text, offsets = incremental_decode_offsets(decode, response_ids[row][keep].tolist())
            entropies.append(ent[row][keep].float().cpu())
            positions.append(critical_word_positions(text, offsets, self.words))
            texts.append(text)
        return entropies, positions, texts

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> ProbeMeasurement:
        """Sample the probe set and pool the figures over all responses and all ranks."""
        device = pl_module.device
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed + trainer.global_rank)
        share_prompt = bool(getattr(pl_module.hparams, "share_prompt", True))
        tokenizer = getattr(pl_module.processor, "tokenizer", pl_module.processor)
        entropies, positions, texts = [], [], []
        for batch in self.probe_batches(trainer):
            batch = batch.to(device)
            with _own_generator(pl_module.rollout, gen, device):
                rollouts = pl_module.rollout.generate(
                    pl_module.policy, batch, self.samples_per_prompt, temperature=self.temperature,
                    max_new_tokens=self.max_new_tokens,
                )
            e, p, t = self.measure_responses(
                pl_module.policy, tokenizer, batch, rollouts.response_ids, rollouts.response_mask,
                self.samples_per_prompt, share_prompt,
            )
            entropies += e
            positions += p
            texts += t
        sums = pool_entropy_sums(list(zip(entropies, positions, strict=True)), self.words,
                                 self.high_entropy_threshold(pl_module.policy), self.shift)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.to(device), reduce_op="sum").cpu()
        return ProbeMeasurement(stats_from_sums(sums, self.words), entropies, positions, texts)

    def high_entropy_threshold(self, policy: nn.Module) -> float:
        """``high_entropy_ratio x ln |V|`` nats, |V| the width of the policy's logits."""
        return self.high_entropy_ratio * math.log(vocab_size(policy))

    # -- logging --------------------------------------------------------------------------------------------
    def descriptions(self, tags: Sequence[str], policy: nn.Module) -> dict[str, str]:
        """The TensorBoard description of each ``entropy/*`` tag (units, meaning, the threshold in use)."""
        vocab = vocab_size(policy)
        out = {}
        for tag in tags:
            key = tag.removeprefix(f"{PREFIX}/")
            if key.startswith("critical/"):
                out[tag] = (f"Mean entropy, in **nats**, at occurrences of \"{key.split('/', 1)[1]}\" in the probe's "
                            "responses (the part of `entropy/critical` this word contributes).")
            elif key == "high_entropy_frac":
                out[tag] = DESCRIPTIONS[key].format(ratio=self.high_entropy_ratio, vocab=vocab,
                                                    threshold=self.high_entropy_ratio * math.log(vocab))
            elif key in DESCRIPTIONS:
                out[tag] = DESCRIPTIONS[key]
        return out

    def _measure_and_log(self, trainer: Trainer, pl_module: LightningModule, on_step: bool) -> None:
        step = trainer.global_step
        fresh = self._last is None or self._last[0] != step  # same step = same weights: reuse
        if fresh:
            self._last = (step, self.measure(trainer, pl_module))
        result = self._last[1]
        metrics = {f"{PREFIX}/{key}": float(value) for key, value in result.stats.items()}
        for tag, value in metrics.items():  # trainer.callback_metrics only (ModelCheckpoint, checkpoint selection)
            pl_module.log(tag, value, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=False,
                          logger=False)  # already pooled over ranks
        if fresh:  # the loggers get each measurement once, at the step it was taken
            log_scalars(trainer, metrics, step, self.descriptions(list(metrics), pl_module.policy))
            self._histograms(trainer, result, step)

    def _histograms(self, trainer: Trainer, result: ProbeMeasurement, step: int) -> None:
        for writer in tensorboard_writers(trainer):
            if result.token_entropies:
                all_tokens = torch.cat(result.token_entropies)
                if all_tokens.numel():
                    writer.add_histogram(f"{PREFIX}/hist/all_tokens", all_tokens, step)
            critical = result.critical_values(self.shift)
            if critical:
                writer.add_histogram(f"{PREFIX}/hist/critical", torch.tensor(critical), step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_n_steps:
            return
        bucket = trainer.global_step // self.every_n_steps  # robust to several optimiser steps per batch
        if bucket > self._bucket:
            self._bucket = bucket
            self._measure_and_log(trainer, pl_module, on_step=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bucket = trainer.global_step // self.every_n_steps if self.every_n_steps else 0

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._measure_and_log(trainer, pl_module, on_step=False)
