"""The stages of a GRPO step that are not forward passes: scoring, the update plan, statistics, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from datamodules.types import PromptBatch, Rollouts
from modules.advantages import zero_std_mask


@dataclass
class GroupScores:
    total: torch.Tensor  # [B, G]
    components: dict[str, torch.Tensor]  # name -> [B, G]


def score_rollouts(rewards, rollouts: Rollouts) -> GroupScores:
    """Score every response against its prompt's record: totals and components as [B, G]."""
    total, components = rewards.score(rollouts.texts, rollouts.group_records())
    shape = (rollouts.num_prompts, rollouts.group_size)
    return GroupScores(total=torch.as_tensor(total, dtype=torch.float32).view(shape),
                       components={k: torch.as_tensor(v, dtype=torch.float32).view(shape)
                                   for k, v in components.items()})


def apply_overlong_penalty(scores: GroupScores, rollouts: Rollouts, overlong: Overlong,
                           max_len: int) -> GroupScores:
    """Subtract the soft length penalty (when configured) from the total reward: [B, G]."""
    penalty = overlong.reward_penalty(rollouts.response_mask.sum(1).cpu(), max_len).view_as(scores.total)
    if not bool(penalty.any()):
        return scores
    return GroupScores(total=scores.total - penalty, components={**scores.components, "overlong": -penalty})


class Overlong:
    """Handling of responses that hit the length cap.

    Args:
        mode: "none" (train on them as they are), "mask" (leave truncated responses out of the loss), or
            "penalty" (DAPO-style soft penalty: reward minus up to `penalty` over the last `buffer` tokens).
        buffer: tokens before the cap where the soft penalty starts.
        penalty: the penalty at the cap.
    """

    def __init__(self, mode: str = "none", buffer: int = 16, penalty: float = 1.0):
        if mode not in ("none", "mask", "penalty"):
            raise ValueError(f"overlong mode {mode!r}: choose none, mask or penalty")
        self.mode, self.buffer, self.penalty = mode, buffer, penalty

    def loss_mask(self, truncated: torch.Tensor) -> torch.Tensor:
        """[N] 1.0 for responses that stay in the loss."""
        return (~truncated).float() if self.mode == "mask" else torch.ones_like(truncated, dtype=torch.float32)

    def reward_penalty(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """[N] amount subtracted from the reward: linear in the tokens past max_len - buffer."""
        if self.mode != "penalty":
            return torch.zeros_like(lengths, dtype=torch.float32)
        over = (lengths.float() - (max_len - self.buffer)).clamp(min=0)
        return self.penalty * over / max(1, self.buffer)


def group_rows(prompts: list[int], group_size: int) -> list[int]:
    """Response rows of some prompts: prompt p owns rows p*G .. p*G + G - 1."""
    return [p * group_size + j for p in prompts for j in range(group_size)]


@dataclass
class UpdatePlan:
    """Which tokens train, with which advantage, in which mini-batches."""

    advantages: torch.Tensor  # [B*G] per-response advantage
    mask: torch.Tensor  # [B*G, R] 1 on tokens in the loss
    group_size: int
    num_prompts: int
    mini_batch_prompts: int

    @classmethod
    def build(cls, rollouts: Rollouts, advantages: torch.Tensor, scores: GroupScores, overlong: Overlong,
              dynamic_sampling: bool, mini_batch_prompts: int | None) -> UpdatePlan:
        device = rollouts.response_mask.device
        keep = overlong.loss_mask(rollouts.truncated.cpu())  # [B*G]
        if dynamic_sampling:
            varied = (~zero_std_mask(scores.total)).float()  # [B]
            keep = keep * varied.repeat_interleave(rollouts.group_size)
        mask = rollouts.response_mask.float() * keep.to(device)[:, None]
        b = rollouts.num_prompts
        return cls(advantages=advantages.reshape(-1).to(device), mask=mask, group_size=rollouts.group_size,
                   num_prompts=b, mini_batch_prompts=min(b, mini_batch_prompts or b))

    @property
    def num_minibatches(self) -> int:
        return -(-self.num_prompts // self.mini_batch_prompts)

    def minibatches(self) -> list[list[int]]:
        """Prompt indices per mini-batch; whole groups stay together (their prompt is shared)."""
        m = self.mini_batch_prompts
        return [list(range(s, min(s + m, self.num_prompts))) for s in range(0, self.num_prompts, m)]

    @staticmethod
    def microbatches(prompts: list[int], size: int | None) -> list[list[int]]:
        """Split a mini-batch's prompts into micro-batches of `size` prompts (None: one micro-batch)."""
        size = size or len(prompts)
        return [prompts[s:s + size] for s in range(0, len(prompts), size)]

    def rows(self, prompts: list[int]) -> list[int]:
        return group_rows(prompts, self.group_size)


@dataclass
class LossStats:
    losses: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    entropy_sum: float = 0.0
    entropy_tokens: float = 0.0

    def add_parts(self, parts: dict, entropy: torch.Tensor | None, mask: torch.Tensor) -> None:
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(float(v))
        if entropy is not None:
            self.entropy_sum += float((entropy.detach() * mask).sum())
            self.entropy_tokens += float(mask.sum())


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def step_metrics(rollouts: Rollouts, scores: GroupScores, stats: LossStats, t_rollout: float,
                 t_update: float) -> dict[str, float]:
    """The per-step TensorBoard scalars (accuracy is ``train/reward/accuracy``, one name per quantity)."""
    lengths = rollouts.response_mask.sum(1).float()
    tokens = float(lengths.sum() + rollouts.prompts.attention_mask.sum() * rollouts.group_size)
    m = {
        "train/loss": _mean(stats.losses),
        "train/reward": float(scores.total.mean()),
        "train/response_length": float(lengths.mean()),
        "train/response_length_max": float(lengths.max()),
        "train/truncated_frac": float(rollouts.truncated.float().mean()),
        # this step's training rollouts under the policy being updated; entropy/* is the probe (fixed prompts)
        "train/rollout_entropy": stats.entropy_sum / max(1.0, stats.entropy_tokens),
        "train/grad_norm": _mean(stats.grad_norm),
        "time/rollout_s": t_rollout,
        "time/update_s": t_update,
        "throughput/tokens_per_s": tokens / max(1e-9, t_rollout + t_update),
    }
    for name, comp in scores.components.items():
        m[f"train/reward/{name}"] = float(comp.mean())
    if "clip_frac" in stats.parts:
        m["train/clip_frac"] = _mean(stats.parts["clip_frac"])
    if "kl" in stats.parts:
        m["train/kl"] = _mean(stats.parts["kl"])
    if "logprob_diff" in stats.parts:
        m["rollout/logprob_diff"] = _mean(stats.parts["logprob_diff"])
    if "tis_weight" in stats.parts:  # mean truncated importance weight on response tokens (1 = on-policy)
        m["rollout/tis_weight"] = _mean(stats.parts["tis_weight"])
    return m


def global_metrics(metrics: dict[str, float], stats: LossStats, trainer) -> dict[str, float]:
    """The step's scalars over all ranks (each rank holds as many prompts): means, maxima of `*_max` and
    `time/*`, sums of throughput, and the token-weighted entropy from summed numerators and token counts."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world <= 1:
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys] + [stats.entropy_sum, stats.entropy_tokens],
                        dtype=torch.float64, device=trainer.strategy.root_device)
    total = trainer.strategy.reduce(vals.clone(), reduce_op="sum").cpu()
    top = trainer.strategy.reduce(vals.clone(), reduce_op="max").cpu()
    out = {}
    for i, k in enumerate(keys):
        if k.endswith("_max") or k.startswith("time/"):
            out[k] = float(top[i])
        else:
            out[k] = float(total[i]) / (1 if k.startswith("throughput/") else world)
    if "train/rollout_entropy" in out:
        out["train/rollout_entropy"] = float(total[-2] / total[-1].clamp(min=1.0))
    return out


def select_prompts(batch: PromptBatch, prompts: list[int]) -> PromptBatch:
    """A PromptBatch of some of the prompts, their vision rows included."""
    vision = {}
    for key, value in batch.vision.items():
        rows = batch.vision_rows.get(key)
        if rows is None:
            vision[key] = value[prompts]
            continue
        starts = [sum(rows[:i]) for i in range(len(rows))]
        index = [r for p in prompts for r in range(starts[p], starts[p] + rows[p])]
        vision[key] = value[index]
    vision_rows = {k: [v[p] for p in prompts] for k, v in batch.vision_rows.items()}
    return PromptBatch(input_ids=batch.input_ids[prompts], attention_mask=batch.attention_mask[prompts],
                       vision=vision, records=[batch.records[p] for p in prompts],
                       labels=None if batch.labels is None else batch.labels[prompts], vision_rows=vision_rows)
