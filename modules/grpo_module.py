"""GRPO for VLMs as a LightningModule (stage 2 of Skywork-R1V3).

Choices, after the paper (recipe.md section 2.2): group-normalised advantages (r - mean) / std; PPO clipped
surrogate with a ratio against the rollout policy; no KL by default (the reference model is only built when
`kl.coef` is non-zero); reward 0.8 accuracy + 0.2 format; every part trainable. One optimiser step per
mini-batch; with one epoch and one mini-batch the ratio is exactly 1 (fully on-policy, as in the paper).

Manual optimisation: a step is rollout -> score -> advantages -> (old log-probs) -> updates -> metrics.
Distributed: each rank owns whole groups (prompts are sharded, never rollouts), and the token-mean loss is
divided by the global token count, so DDP's gradient average (or FSDP2's averaging reduce-scatter, under
ModelParallelStrategy: modules/sharding.py) equals one process on all the data; logged metrics are reduced over
ranks the same way (grpo_steps.global_metrics).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from jsonargparse import lazy_instance
from lightning import LightningModule

from datamodules.ordering import run_seed
from datamodules.types import PromptBatch, Rollouts
from modules.advantages import AdvantageEstimator, GRPOAdvantage, zero_std_mask
from modules.common import (
    build_optimizer,
    check_compatible,
    fresh,
    load_policy,
    log_global_step,
    policy_state,
    total_training_steps,
    validate_model_path,
    warmup_cosine,
)
from modules.grpo_steps import (
    GroupScores,
    LossStats,
    Overlong,
    UpdatePlan,
    apply_overlong_penalty,
    score_rollouts,
)
from modules.losses import KLPenalty, LossAggregation, PPOClipLoss, TokenMean
from modules.policy import response_hidden, token_logprobs
from modules.rewards import Reward
from modules.rollout import HFRolloutEngine, RolloutEngine
from modules.sharding import FSDP2Sharding, all_ranks_state, rank_state, shard_for_strategy

ALL_PARTS = ["vision", "connector", "language_model", "lm_head"]


class GRPOModule(LightningModule):
    """GRPO on a vision-language model.

    Args:
        model_path: local Hugging Face folder (an export of the previous stage, or `python -m app.make_tiny`).
        trainable_parts: parts that train, from vision, connector, language_model, lm_head (paper: all).
        dtype: weight dtype (float32, bfloat16).
        attn_implementation: transformers attention implementation (sdpa, eager, flash_attention_2).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: allow Python code shipped with the checkpoint (off unless asked for).
        group_size: rollouts per prompt G (paper: 32); GRPO and RLOO need G >= 2.
        rollout: rollout engine (HF generate-style sampler, or vLLM).
        rewards: reward functions; `reward_weights` gives their weights (paper: accuracy 0.8, format 0.2).
        reward_weights: one weight per reward.
        advantage: advantage estimator (GRPO, Dr.GRPO, RLOO).
        policy_loss: PPO clipped surrogate (clip-low/high, dual clip).
        aggregation: how per-token losses become a scalar.
        kl: KL penalty to the initial policy (coef 0 = off, the paper's choice).
        entropy_coef: entropy bonus coefficient (0 = off).
        ppo_epochs: passes over each step's rollouts.
        mini_batch_prompts: prompts per optimiser step (None = all prompts of the step: one update per step).
        micro_batch_prompts: prompts per forward/backward inside an optimiser step (gradient accumulation;
            None = the whole mini-batch). Bounds activation memory; the loss is the same.
        dynamic_sampling: leave groups whose rewards are all equal out of the loss.
        overlong: what to do with responses that hit the length cap.
        share_prompt: compute each prompt once per group in the training forward (False copies it G times).
        autocast_bf16: bf16 autocast for the update (CPU and GPU).
        lr: learning rate (paper: 1e-5).
        weight_decay: AdamW weight decay.
        optimizer: adamw or adamw_8bit (bitsandbytes).
        warmup_ratio: share of steps with linear warmup.
        lr_schedule: constant or cosine after warmup.
        max_grad_norm: gradient clipping by global norm (0 = off).
        val_group_size: samples per validation prompt.
        val_temperature: sampling temperature at validation (0 = greedy).
        seed: seed of the rollout sampler's random generator (None: the run's `seed_everything`).
        sharding: FSDP2 options (CPU offload, bf16 compute) used when the strategy is ModelParallelStrategy
            (None: defaults); the policy and the reference model are sharded alike (modules/sharding.py).
    """

    def __init__(
        self,
        model_path: str,
        trainable_parts: list[str] = ALL_PARTS,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        group_size: int = 8,
        rollout: RolloutEngine = lazy_instance(HFRolloutEngine),
        rewards: list[Reward] | None = None,
        reward_weights: list[float] | None = None,
        advantage: AdvantageEstimator = lazy_instance(GRPOAdvantage),
        policy_loss: PPOClipLoss = lazy_instance(PPOClipLoss),
        aggregation: LossAggregation = lazy_instance(TokenMean),
        kl: KLPenalty = lazy_instance(KLPenalty),
        entropy_coef: float = 0.0,
        ppo_epochs: int = 1,
        mini_batch_prompts: int | None = None,
        micro_batch_prompts: int | None = None,
        dynamic_sampling: bool = False,
        overlong: Overlong = lazy_instance(Overlong),
        share_prompt: bool = True,
        autocast_bf16: bool = False,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        warmup_ratio: float = 0.0,
        lr_schedule: str = "constant",
        max_grad_norm: float = 1.0,
        val_group_size: int = 1,
        val_temperature: float = 1.0,
        seed: int | None = None,
        sharding: FSDP2Sharding | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["rollout", "rewards", "advantage", "policy_loss", "aggregation", "kl",
                                          "overlong", "sharding"])
        validate_model_path(model_path)
        advantage = fresh(advantage)
        if group_size < advantage.min_group_size:
            raise ValueError(f"group_size={group_size}: {type(advantage).__name__} needs at least "
                             f"{advantage.min_group_size} rollouts per prompt (set model.group_size)")
        self.automatic_optimization = False
        rollout, advantage, policy_loss, aggregation, kl, overlong = map(
            fresh, (rollout, advantage, policy_loss, aggregation, kl, overlong))
        self.rollout, self.advantage, self.policy_loss = rollout, advantage, policy_loss
        self.aggregation, self.kl, self.overlong = aggregation, kl, overlong
        self.rewards = self._weighted_rewards(rewards, reward_weights)
        self.sharding = sharding
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.processor: Any = None
        self.last_group_stats: dict[str, Any] = {}
        self.last_rollouts: Rollouts | None = None
        self._rollout_state: dict | None = None
        self._train_sampler_state: dict | None = None  # the training sampler's state while validation runs

    @staticmethod
    def _weighted_rewards(rewards: list[Reward] | None, weights: list[float] | None):
        from modules.rewards import WeightedRewards, default_rewards

        if rewards is None:
            if weights is not None:
                raise ValueError("reward_weights given without rewards")
            return default_rewards()
        return WeightedRewards(rewards, weights if weights is not None else [1.0] * len(rewards))

    # -- set-up ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        h = self.hparams
        self.policy, self.processor = load_policy(h.model_path, h.trainable_parts, h.dtype,
                                                  h.attn_implementation, h.gradient_checkpointing,
                                                  h.trust_remote_code)
        self.policy = shard_for_strategy(self.policy, self._trainer, self.sharding)
        if self.kl.enabled:
            from modules.loading import load_vlm

            self.ref_policy, _ = load_vlm(h.model_path, dtype=h.dtype, attn_implementation=h.attn_implementation,
                                          trust_remote_code=h.trust_remote_code)
            self.ref_policy.requires_grad_(False).eval()
            self.ref_policy = shard_for_strategy(self.ref_policy, self._trainer, self.sharding)

    def setup(self, stage: str) -> None:
        self.configure_model()

    def on_fit_start(self) -> None:
        self._setup_rollout()

    def on_train_start(self) -> None:
        self._setup_rollout()  # strategies that restore checkpoints after setup (FSDP, DeepSpeed) restore here

    def on_validation_start(self) -> None:
        # Validation samples from its own stream (seeded by the step), so it never moves the training sampler:
        # a run validated at other steps, or resumed from a checkpoint written around a validation, samples the
        # same training rollouts.
        self._setup_rollout()
        self._train_sampler_state = self.rollout.state_dict()
        self.rollout.reseed(run_seed(self.hparams.seed) + self.global_rank + 7919 * (self.global_step + 1))

    def on_validation_end(self) -> None:
        if self._train_sampler_state is not None:
            self.rollout.load_state_dict(self._train_sampler_state)
            self._train_sampler_state = None

    def _setup_rollout(self) -> None:
        self.rollout.setup(self.policy, self.processor, self.device, run_seed(self.hparams.seed) + self.global_rank)
        if self._rollout_state is not None:
            self.rollout.load_state_dict(self._rollout_state)
            self._rollout_state = None

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = build_optimizer(h.optimizer, params, h.lr, h.weight_decay)
        sched = warmup_cosine(opt, total_training_steps(self.trainer), h.warmup_ratio, h.lr_schedule)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollouts = self.rollout.generate(self.policy, batch, self.hparams.group_size)
        t_rollout = time.perf_counter() - t0
        scores = apply_overlong_penalty(score_rollouts(self.rewards, rollouts), rollouts, self.overlong,
                                        getattr(self.rollout, "max_new_tokens", rollouts.response_ids.shape[1]))
        advantages = self.advantage(scores.total)  # [B, G]
        plan = UpdatePlan.build(rollouts, advantages, scores, self.overlong, self.hparams.dynamic_sampling,
                                self.hparams.mini_batch_prompts)
        old_logp = self.old_logprobs(rollouts, plan)
        stats = self.update(rollouts, plan, old_logp)
        self.rollout.sync_weights(self.policy)
        self.record(rollouts, scores, stats, t_rollout, time.perf_counter() - t0 - t_rollout)

    @torch.no_grad()
    def old_logprobs(self, rollouts: Rollouts, plan: UpdatePlan) -> torch.Tensor | None:
        """Log-probs of the rollout policy, needed only when several updates reuse the same rollouts."""
        if self.hparams.ppo_epochs == 1 and plan.num_minibatches == 1:
            return None  # ratio is exactly 1: the fresh log-probs, detached, serve as old ones
        return self.logprobs(self.policy, rollouts, range(rollouts.num_prompts))[0]

    def logprobs(self, model: torch.nn.Module, rollouts: Rollouts, prompts, with_entropy: bool = False):
        """Response log-probs (and entropies) [n*G, R] for the chosen prompt indices."""
        idx = list(prompts)
        sub = rollouts_subset(rollouts, idx)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.autocast_bf16):
            hidden = response_hidden(model, sub.prompts, sub.response_ids, sub.response_mask, sub.group_size,
                                     self.hparams.share_prompt)
            return token_logprobs(model, hidden, sub.response_ids, with_entropy=with_entropy)

    def update(self, rollouts: Rollouts, plan: UpdatePlan, old_logp: torch.Tensor | None) -> LossStats:
        """ppo_epochs x mini-batches of: (micro-batches of log-probs -> loss -> backward) -> clip -> step."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        stats = LossStats()
        for _ in range(self.hparams.ppo_epochs):
            for prompts in plan.minibatches():
                counts = self.global_counts(plan.mask[plan.rows(prompts)])  # one denominator per optimiser step
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in plan.microbatches(prompts, self.hparams.micro_batch_prompts):
                    rows = plan.rows(micro)
                    logp, entropy = self.logprobs(self.policy, rollouts, micro, with_entropy=True)
                    old = logp.detach() if old_logp is None else old_logp[rows]
                    loss, parts = self.loss(logp, old, entropy, rollouts, plan, micro, counts)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss {loss.item()} at step {self.global_step}, batch ids "
                            f"{[rollouts.prompts.records[i]['id'] for i in micro]}; last good checkpoint kept")
                    self.manual_backward(loss)
                    step_loss += float(loss.detach())
                    stats.add_parts(parts, entropy, plan.mask[rows])
                stats.grad_norm.append(self.clip_gradients_norm(opt))
                opt.step()
                stats.losses.append(step_loss)
        sched.step()
        return stats

    def loss(self, logp, old_logp, entropy, rollouts: Rollouts, plan: UpdatePlan, prompts,
             counts: tuple[float, float]):
        """Policy loss (+ sampler correction, KL, entropy bonus) of some prompts' responses, aggregated with the
        optimiser step's global token/sequence counts so that micro-batches and ranks add up to one loss."""
        rows = plan.rows(prompts)
        mask, adv = plan.mask[rows], plan.advantages[rows]
        token_loss, parts = self.policy_loss(logp, old_logp, adv, mask)
        if rollouts.logprobs is not None:  # an engine with its own weights (vLLM): truncated importance sampling
            from modules.vllm_engine import tis_weights

            weights, gap = tis_weights(old_logp, rollouts.logprobs[rows], mask, getattr(self.rollout, "tis_cap", None))
            token_loss = token_loss * weights
            parts["logprob_diff"] = gap
            parts["tis_weight"] = float((weights * mask).sum() / mask.sum().clamp(min=1))
        if self.kl.enabled:
            with torch.no_grad():
                ref_logp, _ = self.logprobs(self.ref_policy, rollouts, prompts)
            kl = self.kl(logp, ref_logp)
            token_loss = token_loss + self.kl.coef * kl
            parts["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
        if self.hparams.entropy_coef:
            token_loss = token_loss - self.hparams.entropy_coef * entropy
        loss = self.aggregation(token_loss, mask, counts[0], counts[1]) * self.trainer.world_size
        return loss, parts

    def global_counts(self, mask: torch.Tensor) -> tuple[float, float]:
        """Tokens and non-empty sequences of this mini-batch summed over ranks (all ranks divide alike)."""
        n = torch.stack([mask.sum(), (mask.sum(1) > 0).sum()]).float()
        if self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        return float(n[0].clamp(min=1)), float(n[1].clamp(min=1))

    def clip_gradients_norm(self, opt) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.hparams.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # sharded: over DTensors, the global norm
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -- metrics --------------------------------------------------------------------------------------------
    def record(self, rollouts: Rollouts, scores: GroupScores, stats: LossStats, t_rollout: float,
               t_update: float) -> None:
        from modules.grpo_steps import global_metrics, step_metrics

        metrics = step_metrics(rollouts, scores, stats, t_rollout, t_update)
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["train/zero_std_frac"] = float(zero_std_mask(scores.total).float().mean())
        for name, value in self.rewards.pop_metrics().items():  # e.g. the model verifier's figures
            metrics[name if name.startswith("time/") else f"train/{name}"] = value
        metrics = global_metrics(metrics, stats, self.trainer)  # over all ranks, as one process would log
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=len(rollouts.prompts))
        self.log("reward", metrics["train/reward"], prog_bar=True, on_step=True, logger=False)
        log_global_step(self)  # the step checkpoints, selection.json and the callbacks' text and images use
        accuracy = scores.components.get("accuracy", scores.total)
        self.last_group_stats = {
            "ids": rollouts.prompts.ids,
            "pass_rates": (accuracy >= 0.5).float().mean(1).tolist(),
            "mean_reward": float(scores.total.mean()),
            "rewards": scores.total.tolist(),
            "reward_parts": {name: part.tolist() for name, part in scores.components.items()},  # [B][G] each
            "losses": stats.losses,
        }
        self.last_rollouts = rollouts

    # -- validation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        h = self.hparams
        rollouts = self.rollout.generate(self.policy, batch, h.val_group_size, temperature=h.val_temperature)
        scores = score_rollouts(self.rewards, rollouts)
        n = len(rollouts.texts)
        self.log("val/reward", scores.total.mean(), batch_size=n, sync_dist=True)
        self.log("val/accuracy", scores.components.get("accuracy", scores.total).mean(), batch_size=n,
                 sync_dist=True, prog_bar=True)
        self.log("val/format_rate", scores.components.get("format", scores.total).mean(), batch_size=n,
                 sync_dist=True)
        self.log("val/response_length", rollouts.response_mask.sum(1).float().mean(), batch_size=n,
                 sync_dist=True)
        for name, value in self.rewards.pop_metrics().items():
            self.log(f"val/{name}", float(value), batch_size=n, sync_dist=True)
        log_global_step(self, on_epoch=True)

    # -- checkpoint state -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the training sampler's state, also when saved during validation or before the restored state is applied
        state = self._train_sampler_state or self._rollout_state
        checkpoint["rollout_engine"] = state if state is not None else self.rollout.state_dict()
        if self.trainer.world_size > 1:  # rank 0 writes the file: keep every rank's sampler state in it
            checkpoint["rollout_engine_ranks"] = all_ranks_state(checkpoint["rollout_engine"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        if "state_dict" in checkpoint:  # a sharded checkpoint was loaded in place (strictly) by the strategy
            check_compatible(policy_state(checkpoint), self.policy, "the checkpoint being resumed")
        self._rollout_state = rank_state(checkpoint, "rollout_engine", self.global_rank, self.trainer.world_size)


def rollouts_subset(rollouts: Rollouts, prompts: list[int]) -> Rollouts:
    """The rollouts of some prompts (whole groups), vision tensors included."""
    if len(prompts) == rollouts.num_prompts:
        return rollouts
    from modules.grpo_steps import group_rows, select_prompts

    g = rollouts.group_size
    rows = group_rows(prompts, g)
    return Rollouts(prompts=select_prompts(rollouts.prompts, prompts), response_ids=rollouts.response_ids[rows],
                    response_mask=rollouts.response_mask[rows], truncated=rollouts.truncated[rows],
                    texts=[rollouts.texts[r] for r in rows], group_size=g,
                    logprobs=None if rollouts.logprobs is None else rollouts.logprobs[rows])
