"""Pure GRPO/PPO loss pieces: clipped surrogate, KL estimators and loss aggregation.

Shapes: N = sequences in the (micro-)batch (B·G rollouts), T = padded response length. Every tensor
input is per token; ``mask`` [N, T] marks real response tokens (1/True) versus padding (0/False).

Choices made here and why:
- The importance ratio is taken against pi_old (recipe.md section 2.2: eq. 7's pi_ref is a typo). With one
  gradient step per rollout batch (the R1V3 setting) logp == old_logp, the ratio is 1 and clipping
  never fires; the loss reduces to REINFORCE with group-normalised advantages.
- Clip-Higher (eps_high != eps_low) and verl-style dual clip are options, off by default (R1V3 used a
  symmetric eps = 0.2 and no dual clip).
- KL is a separate, optional per-token penalty (``KLPenalty``; coef 0 in R1V3).
- Normalisation is a separate class chosen by ``class_path``; R1V3 eq. 7 is ``SeqMeanTokenMean``.
- Masked reductions use ``torch.where`` rather than multiplication, so NaN/inf garbage at padded
  positions cannot leak into a loss or its gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "K3_CAP",
    "LOG_RATIO_CLAMP",
    "KLPenalty",
    "LossAggregation",
    "PPOClipLoss",
    "SeqMeanTokenMean",
    "SeqMeanTokenSumNorm",
    "TokenMean",
    "count_seqs",
    "count_tokens",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "ppo_clip_token_loss",
]

LOG_RATIO_CLAMP = 20.0
"""Bound on |logp - old_logp| before exponentiating: exp(20) ~ 4.9e8 is finite in bf16/fp32, and a
ratio that large is clipped anyway, so the clamp only prevents inf/NaN."""

K3_CAP = 10.0
"""Upper bound on the per-token k3 value, verl's ``low_var_kl`` convention: past it (ref - logp > ~2.61 nats)
the token's KL gradient is 0 instead of growing as e^(ref - logp) (up to ~5e8 at the log-ratio clamp)."""

KLEstimator = Literal["k1", "k2", "k3"]


# ----------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set; masked entries contribute exactly 0 even if NaN/inf.

    Args:
        x: any shape, e.g. [N, T].
        mask: broadcastable to ``x``; bool or 0/1 (float weights are honoured).
        dim: reduce over this dim, or everything when None.
    """
    weights = mask.to(x.dtype)  # [N, T]
    kept = torch.where(mask.bool(), x * weights, torch.zeros_like(x))  # [N, T]
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over masked entries (all of them, or along ``dim``); 0 where the mask is empty.

    Args:
        x: any shape, e.g. [N, T].
        mask: broadcastable to ``x``; bool or 0/1.
        dim: reduce over this dim, or everything when None.

    Returns:
        A scalar (dim=None) or ``x`` reduced along ``dim``.
    """
    weights = mask.to(x.dtype).expand_as(x)  # [N, T]
    num = masked_sum(x, mask, dim)
    den = weights.sum() if dim is None else weights.sum(dim=dim)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(num))


def count_tokens(mask: Tensor) -> Tensor:
    """Number of response tokens in [N, T] ``mask`` (a scalar); all-reduce it for ``global_tokens``."""
    return mask.to(torch.float32).sum()


def count_seqs(mask: Tensor) -> Tensor:
    """Number of rows of [N, T] ``mask`` with at least one token; all-reduce it for ``global_seqs``."""
    return mask.bool().any(dim=-1).to(torch.float32).sum()


# ----------------------------------------------------------------------------------------------------
# Clipped surrogate and KL estimators
# ----------------------------------------------------------------------------------------------------
def ppo_clip_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO clipped surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``.

    Dual clip (Ye et al. 2020, as verl's ``clip_ratio_c``): for A < 0 the loss is further capped at
    ``-A * dual_clip`` so a huge ratio on a bad token cannot blow up the update.

    Args:
        logp: [N, T] log-probs of the sampled tokens under the current policy.
        old_logp: [N, T] same under the policy that generated them (no gradient flows into it).
        adv: [N] per-sequence or [N, T] per-token advantages.
        eps_low: lower clip range, ratio floor 1 - eps_low.
        eps_high: upper clip range, ratio ceiling 1 + eps_high (Clip-Higher when > eps_low).
        dual_clip: constant c > 1, or None to disable.

    Returns:
        loss: [N, T] per-token loss (not yet masked or aggregated).
        clipped: [N, T] bool, True where a clip is active (the token's gradient is cut).
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # [N, 1], broadcasts over T
    adv = adv.to(logp.dtype)
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [N, T]
    ratio = torch.exp(log_ratio)  # [N, T]
    unclipped = -adv * ratio  # [N, T]
    clipped_loss = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    loss = torch.maximum(unclipped, clipped_loss)  # [N, T]
    clipped = clipped_loss > unclipped  # [N, T] the constant branch won
    if dual_clip is not None:
        cap = -adv * dual_clip  # [N, T] (broadcast)
        dual_active = (adv < 0) & (cap < loss)  # [N, T]
        loss = torch.where(dual_active, cap.expand_as(loss), loss)  # [N, T]
        clipped = clipped | dual_active
    return loss, clipped


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k1 estimator of KL(pi || ref) on samples from pi: ``logp - ref_logp``. [N, T]."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k2: ``0.5 * (logp - ref_logp)^2`` (biased, low variance, >= 0). [N, T]."""
    return 0.5 * (logp - ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0), capped at ``K3_CAP``. [N, T].

    The log-ratio is clamped to +-``LOG_RATIO_CLAMP`` so the exponential stays finite, and the value is
    capped at ``K3_CAP`` = 10 as verl's ``low_var_kl`` does, so a token far below the reference
    (ref - logp > 2.61) contributes a constant and no gradient; the per-token gradient is thus bounded
    by e^2.61 - 1 = 12.6. The cap makes k3 biased low only where the policy is already far from the
    reference on that token.
    """
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [N, T]
    return (torch.exp(d) - d - 1.0).clamp(max=K3_CAP)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class PPOClipLoss:
    """Per-token PPO-clip policy loss with detached stats; aggregation is a separate object.

    Args:
        eps_low: lower clip range (ratio floor 1 - eps_low). R1V3: 0.2.
        eps_high: upper clip range (ratio ceiling 1 + eps_high); > eps_low is DAPO's Clip-Higher.
            R1V3: 0.2 (Clip-Higher was tried and rejected).
        dual_clip: verl-style dual-clip constant c > 1 for negative advantages, or None (off).
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None) -> None:
        if not 0.0 <= eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
        if eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {eps_high}")
        if dual_clip is not None and dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
        self.eps_low = eps_low
        self.eps_high = eps_high
        self.dual_clip = dual_clip

    def __call__(
        self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the [N, T] token loss and detached scalar stats over masked tokens.

        Args:
            logp: [N, T] current log-probs. old_logp: [N, T]. adv: [N] or [N, T]. mask: [N, T].

        Returns:
            loss_tokens: [N, T] (aggregate with a ``LossAggregation``).
            stats: ``clip_frac`` (share of tokens where a clip is active), ``ratio_mean`` and
                ``approx_kl`` (k3 estimate of KL(pi_old || pi) on the sampled tokens), all 0-dim and
                detached (no host sync; call ``.item()`` when logging).
        """
        loss, clipped = ppo_clip_token_loss(logp, old_logp, adv, self.eps_low, self.eps_high, self.dual_clip)
        with torch.no_grad():
            log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [N, T]
            stats = {
                "clip_frac": masked_mean(clipped.to(logp.dtype), mask),
                "ratio_mean": masked_mean(torch.exp(log_ratio), mask),
                "approx_kl": masked_mean(kl_k3(old_logp, logp), mask),
            }
        return loss, {k: v.detach() for k, v in stats.items()}

    def __repr__(self) -> str:
        return f"PPOClipLoss(eps_low={self.eps_low}, eps_high={self.eps_high}, dual_clip={self.dual_clip})"


class KLPenalty:
    """Optional per-token KL(pi || pi_ref) penalty, added to the policy loss before aggregation.

    ``kl(logp, ref_logp)`` returns the *unweighted* estimate; ``kl.penalty(...)`` = ``coef * kl(...)``.

    Args:
        coef: weight beta of the penalty; 0 disables it (R1V3: 0, so no reference model is needed).
        estimator: Schulman's "k1", "k2" or "k3" estimator (k3: unbiased and non-negative).
    """

    def __init__(self, coef: float = 0.0, estimator: KLEstimator = "k3") -> None:
        if coef < 0:
            raise ValueError(f"coef must be >= 0, got {coef}")
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
        self.coef = coef
        self.estimator = estimator

    @property
    def enabled(self) -> bool:
        """True when coef > 0, i.e. when a reference model must be kept and queried."""
        return self.coef > 0

    def __call__(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        """Unweighted per-token KL estimate [N, T]; gradient flows into ``logp`` only.

        The caller adds ``coef * kl`` to the token loss (and can log ``kl`` itself), or uses ``penalty``.
        """
        return KL_ESTIMATORS[self.estimator](logp, ref_logp.detach())

    def penalty(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        """Weighted per-token penalty ``coef * KL`` [N, T], ready to add to the token loss."""
        return self.coef * self(logp, ref_logp)

    def __repr__(self) -> str:
        return f"KLPenalty(coef={self.coef}, estimator={self.estimator!r})"


# ----------------------------------------------------------------------------------------------------
# Aggregation: [N, T] token losses -> scalar
# ----------------------------------------------------------------------------------------------------
class LossAggregation:
    """Base class: reduce [N, T] token losses under a [N, T] mask to a scalar.

    Under DDP pass the global denominator (``count_tokens`` / ``count_seqs`` all-reduced over ranks)
    so that the sum over ranks of each rank's loss equals the single-process loss on the whole batch;
    DDP then averages gradients over W ranks, so multiply the loss by W or use a sum-reducing
    strategy. Without it each rank normalises by its own count (the usual, slightly biased, choice).
    """

    def __call__(
        self,
        loss: Tensor,
        mask: Tensor,
        global_tokens: float | Tensor | None = None,
        global_seqs: float | Tensor | None = None,
    ) -> Tensor:
        """Return a 0-dim loss. ``global_tokens`` / ``global_seqs`` override the local denominators."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _divide(num: Tensor, den: float | Tensor) -> Tensor:
    """``num / den`` with an empty denominator (0 tokens or sequences) giving 0 instead of NaN."""
    den_t = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return torch.where(den_t > 0, num / den_t.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


class TokenMean(LossAggregation):
    """Token-level mean: ``sum(loss * mask) / n_tokens`` (DAPO; long responses weigh more)."""

    def __call__(
        self,
        loss: Tensor,
        mask: Tensor,
        global_tokens: float | Tensor | None = None,
        global_seqs: float | Tensor | None = None,
    ) -> Tensor:
        """[N, T] losses, [N, T] mask -> 0-dim loss (see ``LossAggregation``)."""
        den = count_tokens(mask) if global_tokens is None else global_tokens
        return _divide(masked_sum(loss, mask), den)


class SeqMeanTokenMean(LossAggregation):
    """Mean over tokens within each sequence, then over sequences (GRPO as in R1V3 eq. 7).

    Rows without any response token are left out of the sequence count.
    """

    def __call__(
        self,
        loss: Tensor,
        mask: Tensor,
        global_tokens: float | Tensor | None = None,
        global_seqs: float | Tensor | None = None,
    ) -> Tensor:
        """[N, T] losses, [N, T] mask -> 0-dim loss (see ``LossAggregation``)."""
        per_seq = masked_mean(loss, mask, dim=-1)  # [N], 0 for empty rows
        den = count_seqs(mask) if global_seqs is None else global_seqs
        return _divide(per_seq.sum(), den)


class SeqMeanTokenSumNorm(LossAggregation):
    """Dr.GRPO: per-sequence token *sum* divided by a constant ``max_len``, then mean over sequences.

    verl's "seq-mean-token-sum-norm" divides the sum over all sequences by T without the mean over
    sequences; the two differ by the constant factor N only.

    Args:
        max_len: constant normaliser, normally the maximum response length (keep it fixed for a run).
    """

    def __init__(self, max_len: int = 4096) -> None:
        if max_len <= 0:
            raise ValueError(f"max_len must be > 0, got {max_len}")
        self.max_len = max_len

    def __call__(
        self,
        loss: Tensor,
        mask: Tensor,
        global_tokens: float | Tensor | None = None,
        global_seqs: float | Tensor | None = None,
    ) -> Tensor:
        """[N, T] losses, [N, T] mask -> 0-dim loss (see ``LossAggregation``)."""
        per_seq = masked_sum(loss, mask, dim=-1) / self.max_len  # [N]
        den = count_seqs(mask) if global_seqs is None else global_seqs
        return _divide(per_seq.sum(), den)
