"""GRPO math: advantages (modules/advantages.py) and losses (modules/losses.py).

Hand-computed cases carry their arithmetic in comments; vectorised code is checked against plain Python
loops on random inputs; properties are checked with hypothesis.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.advantages import (
    DrGRPOAdvantage,
    GRPOAdvantage,
    RLOOAdvantage,
    grpo_advantages,
    rloo_advantages,
    weight_negatives,
    zero_std_mask,
)
from modules.losses import (
    KLPenalty,
    PPOClipLoss,
    SeqMeanTokenMean,
    SeqMeanTokenSumNorm,
    TokenMean,
    count_seqs,
    count_tokens,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    ppo_clip_token_loss,
)

LN = math.log


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------
def test_grpo_hand_computed() -> None:
    # group [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3)
    # unbiased var = (4/9 + 1/9 + 1/9) / (3 - 1) = 1/3, std = 0.57735
    # adv = (2/3 / 0.57735, -1/3 / 0.57735) = (1.15470, -0.57735)
    # group [1, 0, 1] mirrors it; group [0.2, 0.2, 0.2] is constant -> 0
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.2, 0.2, 0.2]])
    expected = torch.tensor([[1.15470, -0.57735, -0.57735], [0.57735, -1.15470, 0.57735], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(GRPOAdvantage(eps=1e-6)(rewards), expected, atol=1e-4, rtol=0)
    # the constant group is exactly zero with the default eps (0 / (0 + eps))
    assert torch.equal(GRPOAdvantage()(rewards)[2], torch.zeros(3))


def test_drgrpo_and_rloo_hand_computed() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0]])
    # Dr.GRPO: r - mean = (1 - 1/3, -1/3, -1/3)
    torch.testing.assert_close(DrGRPOAdvantage()(rewards), torch.tensor([[2 / 3, -1 / 3, -1 / 3]]))
    # RLOO: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5; 0 - mean(1, 0) = -0.5
    torch.testing.assert_close(RLOOAdvantage()(rewards), torch.tensor([[1.0, -0.5, -0.5]]))
    # GRPOAdvantage(scale_by_std=False) is Dr.GRPO
    torch.testing.assert_close(GRPOAdvantage(scale_by_std=False)(rewards), DrGRPOAdvantage()(rewards))


def _grpo_loop(rewards: list[list[float]], eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        g = len(group)
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))
        out.append([(r - mean) / (std + eps) for r in group])
    return out


def _rloo_loop(rewards: list[list[float]]) -> list[list[float]]:
    out = []
    for group in rewards:
        out.append(
            [
                r - sum(o for j, o in enumerate(group) if j != i) / (len(group) - 1)
                for i, r in enumerate(group)
            ]
        )
    return out


@pytest.mark.parametrize(("b", "g"), [(1, 2), (3, 4), (5, 8), (2, 32)])
def test_advantages_match_loop(gen: torch.Generator, b: int, g: int) -> None:
    # mix of discrete rewards (ties, constant groups) and continuous ones
    rewards = torch.cat([torch.randint(0, 2, (b, g), generator=gen).float(), torch.rand(b, g, generator=gen)])
    rewards = rewards.double()
    as_list = rewards.tolist()
    torch.testing.assert_close(
        grpo_advantages(rewards, eps=1e-6), torch.tensor(_grpo_loop(as_list, 1e-6), dtype=torch.float64)
    )
    torch.testing.assert_close(
        rloo_advantages(rewards), torch.tensor(_rloo_loop(as_list), dtype=torch.float64)
    )
    expected_mask = [len(set(group)) == 1 for group in as_list]
    assert zero_std_mask(rewards).tolist() == expected_mask


reward_groups = st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=8), min_size=1, max_size=4
).map(lambda rows: [row[: min(len(r) for r in rows)] for row in rows])


@settings(max_examples=60, deadline=None)
@given(rows=reward_groups, shift=st.floats(-5, 5), scale=st.floats(0.5, 4))
def test_advantage_properties(rows: list[list[float]], shift: float, scale: float) -> None:
    r = torch.tensor(rows, dtype=torch.float64)  # [B, G]
    for est in (GRPOAdvantage(), DrGRPOAdvantage(), RLOOAdvantage()):
        adv = est(r)
        assert adv.shape == r.shape
        # zero-sum within each group (baseline is a group statistic)
        torch.testing.assert_close(
            adv.sum(dim=1), torch.zeros(r.shape[0], dtype=torch.float64), atol=1e-6, rtol=0
        )
        # constant groups carry no signal
        assert torch.all(adv[zero_std_mask(r)] == 0)
    # GRPO is invariant to shifting and (up to eps) to positive scaling of a group's rewards
    spread = r.std(dim=1) > 1e-2
    a = grpo_advantages(r)[spread]
    b = grpo_advantages(r * scale + shift)[spread]
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_group_size_checks() -> None:
    one = torch.tensor([[1.0], [0.0]])  # G = 1
    for est in (GRPOAdvantage(), RLOOAdvantage()):
        assert est.min_group_size == 2
        with pytest.raises(ValueError, match="at least 2"):
            est.check_group_size(1)
        with pytest.raises(ValueError, match="G=1"):
            est(one)
        est.check_group_size(2)
    assert DrGRPOAdvantage().min_group_size == 1
    assert torch.equal(DrGRPOAdvantage()(one), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        GRPOAdvantage()(torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        GRPOAdvantage(eps=-1.0)


def test_advantage_dtypes() -> None:
    # integer and bf16 rewards are computed in float32; float64 stays float64
    assert GRPOAdvantage()(torch.tensor([[1, 0]])).dtype == torch.float32
    assert GRPOAdvantage()(torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16)).dtype == torch.float32
    assert RLOOAdvantage()(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------------------------------
# PPO clip
# ----------------------------------------------------------------------------------------------------
def _ratios_to_logp(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """old_logp = ln 0.5 everywhere, logp = old + ln(ratio), so exp(logp - old) = ratio."""
    old = torch.full((1, len(ratios)), LN(0.5), dtype=torch.float64)
    return old + torch.tensor([[LN(x) for x in ratios]], dtype=torch.float64), old


def test_ppo_clip_hand_computed() -> None:
    # eps = 0.2 -> clip range [0.8, 1.2]; loss = max(-A r, -A clip(r))
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2  clipped (gain capped)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5  not clipped (pessimistic branch is the raw one)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8  clipped
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5  not clipped
    #   A=+2, r=1.1: max(-2.2, -2.2) = -2.2  inside the range
    logp, old = _ratios_to_logp([1.5, 0.5, 0.5, 1.5, 1.1])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    loss, clipped = ppo_clip_token_loss(logp, old, adv, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5, -2.2]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False, True, False, False]]


def test_ppo_clip_gradient_is_cut_only_where_clipped() -> None:
    logp, old = _ratios_to_logp([1.5, 0.5, 0.5, 1.5, 1.1])
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    loss, clipped = ppo_clip_token_loss(logp, old, adv.unsqueeze(0), 0.2, 0.2)
    loss.sum().backward()
    # d(-A r)/d logp = -A r where unclipped: (-, -0.5, -, 1.5, -2.2); 0 where clipped
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 0.0, 1.5, -2.2]], dtype=torch.float64))
    assert torch.equal(logp.grad == 0, clipped)


def test_clip_higher_asymmetry() -> None:
    # eps_low = 0.2, eps_high = 0.28 -> range [0.8, 1.28]
    #   A=+1, r=1.25: symmetric clips to -1.2; Clip-Higher keeps -1.25 (unclipped)
    #   A=-1, r=0.75: the floor is still 0.8 -> max(0.75, 0.8) = 0.8, clipped in both
    #   A=+1, r=1.4 : Clip-Higher caps at -1.28
    logp, old = _ratios_to_logp([1.25, 0.75, 1.4])
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    sym, sym_clipped = ppo_clip_token_loss(logp, old, adv.unsqueeze(0), 0.2, 0.2)
    asym, asym_clipped = ppo_clip_token_loss(logp, old, adv.unsqueeze(0), 0.2, 0.28)
    torch.testing.assert_close(sym, torch.tensor([[-1.2, 0.8, -1.2]], dtype=torch.float64))
    torch.testing.assert_close(asym, torch.tensor([[-1.25, 0.8, -1.28]], dtype=torch.float64))
    assert sym_clipped.tolist() == [[True, True, True]]
    assert asym_clipped.tolist() == [[False, True, True]]


def test_dual_clip() -> None:
    # c = 3:
    #   A=-1, r=5: standard max(5, 1.2) = 5; dual cap -A c = 3 -> min(5, 3) = 3 (clipped)
    #   A=-1, r=2: standard 2 < 3 -> 2 (not clipped)
    #   A=+1, r=5: positive advantage, dual clip ignored -> -1.2 (standard clip)
    #   A=-2, r=4: standard 8, cap 6 -> 6
    logp, old = _ratios_to_logp([5.0, 2.0, 5.0, 4.0])
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0]], dtype=torch.float64)
    loss, clipped = ppo_clip_token_loss(logp, old, adv, 0.2, 0.2, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2, 6.0]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False, True, True]]
    plain, _ = ppo_clip_token_loss(logp, old, adv, 0.2, 0.2)
    torch.testing.assert_close(plain, torch.tensor([[5.0, 2.0, -1.2, 8.0]], dtype=torch.float64))


def _ppo_loop(logp, old, adv, eps_low, eps_high, dual):  # noqa: ANN001, ANN202 (plain lists)
    loss, clip = [], []
    for i in range(len(logp)):
        row_l, row_c = [], []
        for t in range(len(logp[i])):
            a = adv[i][t]
            r = math.exp(max(-20.0, min(20.0, logp[i][t] - old[i][t])))
            raw, cl = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            value, was_clipped = max(raw, cl), cl > raw
            if dual is not None and a < 0 and -a * dual < value:
                value, was_clipped = -a * dual, True
            row_l.append(value)
            row_c.append(was_clipped)
        loss.append(row_l)
        clip.append(row_c)
    return loss, clip


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_ppo_clip_matches_loop(gen: torch.Generator, dual: float | None, per_token_adv: bool) -> None:
    n, t = 6, 9
    old = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    logp = old + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.7
    adv = (
        torch.randn(n, t, generator=gen, dtype=torch.float64)
        if per_token_adv
        else torch.randn(n, generator=gen, dtype=torch.float64)
    )
    adv_rows = adv.tolist() if per_token_adv else [[a] * t for a in adv.tolist()]
    loss, clipped = ppo_clip_token_loss(logp, old, adv, 0.2, 0.28, dual)
    exp_loss, exp_clip = _ppo_loop(logp.tolist(), old.tolist(), adv_rows, 0.2, 0.28, dual)
    torch.testing.assert_close(loss, torch.tensor(exp_loss, dtype=torch.float64))
    assert clipped.tolist() == exp_clip


def test_extreme_log_ratio_stays_finite() -> None:
    logp = torch.tensor([[0.0, -1000.0]])
    old = torch.tensor([[-1000.0, 0.0]])
    loss, _ = ppo_clip_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(kl_k3(logp, old)).all()


def test_ppo_loss_validation() -> None:
    with pytest.raises(ValueError, match="eps_low"):
        PPOClipLoss(eps_low=1.0)
    with pytest.raises(ValueError, match="eps_high"):
        PPOClipLoss(eps_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        PPOClipLoss(dual_clip=1.0)


def test_ratio_one_token_mean_is_minus_weighted_mean_advantage(gen: torch.Generator) -> None:
    # on-policy (one gradient step per batch, R1V3): r = 1, so loss_t = -A_i on every valid token and
    # TokenMean = -sum_i A_i n_i / sum_i n_i
    n, t = 5, 7
    logp = -torch.rand(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 2])
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T]
    loss_tokens, stats = PPOClipLoss()(logp, logp.clone(), adv, mask)
    expected = -(adv * lengths).sum() / lengths.sum()
    torch.testing.assert_close(TokenMean()(loss_tokens, mask), expected)
    assert stats["clip_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.0)


def test_masked_tokens_change_neither_loss_nor_gradient(gen: torch.Generator) -> None:
    n, t = 4, 6
    old = -torch.rand(n, t, generator=gen, dtype=torch.float64)
    base = old + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, t, generator=gen) > 0.4
    mask[:, 0] = True
    junk = torch.tensor([float("nan"), float("inf"), -1e6, 50.0], dtype=torch.float64).repeat(n * t)
    garbage = torch.where(mask, base, junk[: n * t].view(n, t))  # NaN/inf/huge at padded positions
    loss_fn, kl = PPOClipLoss(dual_clip=3.0), KLPenalty(coef=0.1)
    for agg in (TokenMean(), SeqMeanTokenMean(), SeqMeanTokenSumNorm(max_len=t)):
        results = []
        for logp_in in (base, garbage):
            logp = logp_in.clone().requires_grad_(True)
            tokens, stats = loss_fn(logp, old, adv, mask)
            total = agg(tokens + kl.penalty(logp, old), mask)
            total.backward()
            results.append((total.detach(), logp.grad[mask], stats))
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1])
        for key in results[0][2]:
            torch.testing.assert_close(results[0][2][key], results[1][2][key])
        assert torch.all(logp.grad[~mask] == 0)


def test_ppo_stats_hand_computed() -> None:
    # ratios (1.5, 0.5 | 1.0, masked); A = (+1 | -1): token 1 clipped, token 2 not, token 3 inside
    # clip_frac = 1/3; ratio_mean = (1.5 + 0.5 + 1) / 3 = 1.0
    # approx_kl = mean(r - 1 - ln r) = ((0.5 - 0.405465) + (-0.5 + 0.693147) + 0) / 3 = 0.095894
    logp, old = _ratios_to_logp([1.5, 0.5, 1.0, 7.0])
    logp, old = logp.view(2, 2), old.view(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    _, stats = PPOClipLoss()(logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.095894, abs=1e-6)
    assert not any(v.requires_grad for v in stats.values())


# ----------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_computed() -> None:
    # logp = ln 1 = 0, ref = ln 0.5: d = ref - logp = -0.693147
    # k1 = logp - ref = 0.693147; k2 = 0.5 * 0.693147^2 = 0.240227
    # k3 = e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[LN(0.5)]])
    assert kl_k1(logp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_k2(logp, ref).item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_k3(logp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    same = torch.randn(3, 4)
    for k in (kl_k1, kl_k2, kl_k3):
        assert torch.all(k(same, same) == 0)


def test_kl_estimators_are_unbiased_on_samples(gen: torch.Generator) -> None:
    # KL(p || q) for p = (0.7, 0.2, 0.1), q = (0.4, 0.4, 0.2):
    # 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2) = 0.391731 - 0.138629 - 0.069315 = 0.183787
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[samples][None], q.log()[samples][None]
    assert kl_k1(logp, ref).mean().item() == pytest.approx(0.183787, abs=5e-3)
    assert kl_k3(logp, ref).mean().item() == pytest.approx(0.183787, abs=5e-3)
    assert torch.all(kl_k3(logp, ref) >= 0)


def test_kl_penalty() -> None:
    assert not KLPenalty().enabled
    pen = KLPenalty(coef=0.5, estimator="k1")
    assert pen.enabled
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[LN(0.5)]])
    # __call__ is the unweighted k1 = 0.693147; penalty = 0.5 * k1 = 0.346574
    assert pen(logp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert pen.penalty(logp, ref).item() == pytest.approx(0.346574, abs=1e-6)
    # no gradient into the reference log-probs
    ref_g = ref.clone().requires_grad_(True)
    assert not pen(logp, ref_g).requires_grad
    with pytest.raises(ValueError, match="estimator"):
        KLPenalty(estimator="k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coef"):
        KLPenalty(coef=-1.0)


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def test_aggregations_hand_computed() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # third row empty
    # TokenMean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert TokenMean()(loss, mask).item() == pytest.approx(2.5)
    # SeqMeanTokenMean: (mean(1,2,3) + mean(4)) / 2 non-empty rows = (2 + 4) / 2 = 3
    assert SeqMeanTokenMean()(loss, mask).item() == pytest.approx(3.0)
    # SeqMeanTokenSumNorm(4): (6 / 4 + 4 / 4) / 2 = 1.25
    assert SeqMeanTokenSumNorm(max_len=4)(loss, mask).item() == pytest.approx(1.25)
    # explicit global denominators: 10 / 8 tokens, 6 / 4 sequences
    assert TokenMean()(loss, mask, global_tokens=8.0).item() == pytest.approx(1.25)
    assert SeqMeanTokenMean()(loss, mask, global_seqs=4.0).item() == pytest.approx(1.5)
    # an empty mask gives 0, not NaN
    for agg in (TokenMean(), SeqMeanTokenMean(), SeqMeanTokenSumNorm()):
        assert agg(loss, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="max_len"):
        SeqMeanTokenSumNorm(max_len=0)


def _aggregate_loop(
    loss: list[list[float]], mask: list[list[int]], max_len: int
) -> tuple[float, float, float]:
    tok_sum = sum(
        x * m for row_l, row_m in zip(loss, mask, strict=True) for x, m in zip(row_l, row_m, strict=True)
    )
    n_tok = sum(sum(row) for row in mask)
    seq_means, seq_norms = [], []
    for row_l, row_m in zip(loss, mask, strict=True):
        if sum(row_m):
            s = sum(x * m for x, m in zip(row_l, row_m, strict=True))
            seq_means.append(s / sum(row_m))
            seq_norms.append(s / max_len)
    return tok_sum / n_tok, sum(seq_means) / len(seq_means), sum(seq_norms) / len(seq_norms)


@pytest.mark.parametrize(("n", "t"), [(1, 1), (4, 7), (16, 33)])
def test_aggregations_match_loop(gen: torch.Generator, n: int, t: int) -> None:
    loss = torch.randn(n, t, generator=gen, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=gen) > 0.3).long()
    mask[0, 0] = 1
    expected = _aggregate_loop(loss.tolist(), mask.tolist(), max_len=t + 3)
    got = (TokenMean()(loss, mask), SeqMeanTokenMean()(loss, mask), SeqMeanTokenSumNorm(t + 3)(loss, mask))
    for g, e in zip(got, expected, strict=True):
        assert g.item() == pytest.approx(e)


@pytest.mark.parametrize("world", [2, 3])
def test_global_denominators_make_ranks_sum_to_one_process(gen: torch.Generator, world: int) -> None:
    # each "rank" gets a slice of rows; with all-reduced counts the per-rank losses sum to the full loss
    loss = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(12, 5, generator=gen) > 0.5
    mask[:, 0] = True
    shards = [(loss[r::world], mask[r::world]) for r in range(world)]
    g_tok = sum(count_tokens(m) for _, m in shards)
    g_seq = sum(count_seqs(m) for _, m in shards)
    for agg in (TokenMean(), SeqMeanTokenMean(), SeqMeanTokenSumNorm(max_len=5)):
        per_rank = sum(agg(x, m, global_tokens=g_tok, global_seqs=g_seq) for x, m in shards)
        torch.testing.assert_close(per_rank, agg(loss, mask))


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 5.0, 7.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # overall: (1 + 2) / 2 = 1.5; per row: (1.5, 0 for the empty row); per column: (1, 2, 0)
    assert masked_mean(x, mask).item() == 1.5
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0]
    assert masked_mean(x, mask, dim=0).tolist() == [1.0, 2.0, 0.0]


def test_negative_weight_scales_only_below_average_responses() -> None:
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> advantages ±0.5*sqrt(3) = ±0.8660
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    a = 0.5 * 3**0.5
    plain = GRPOAdvantage(eps=0.0)(r)
    torch.testing.assert_close(plain, torch.tensor([[a, -a, -a, a]], dtype=torch.float64))
    weighted = GRPOAdvantage(eps=0.0, negative_weight=0.25)(r)
    torch.testing.assert_close(weighted, torch.tensor([[a, -0.25 * a, -0.25 * a, a]], dtype=torch.float64))
    assert torch.equal(weight_negatives(plain, 1.0), plain)
    assert torch.equal(weight_negatives(plain, 0.0), plain.clamp(min=0))
    with pytest.raises(ValueError, match="negative_weight"):
        GRPOAdvantage(negative_weight=1.5)


# ----------------------------------------------------------------------------------------------------
# Issue 22: exact zeros for equal-reward groups, capped k3
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [8, 32])
@pytest.mark.parametrize("value", [0.0, 0.2, 0.8, 1.0])
def test_equal_reward_groups_get_exactly_zero_advantage_in_fp32(g: int, value: float) -> None:
    # the paper's reward values (0.2 = formatted but wrong, 0.8 = right but unformatted) at its G;
    # fp32 mean of eight 0.2s is one ulp off, which (r - mean) / (std + eps) used to blow up to -0.0147
    rewards = torch.full((2, g), value, dtype=torch.float32)
    rewards[1] = torch.linspace(0, 1, g)  # a varied group beside it keeps its signal
    for est in (GRPOAdvantage(), DrGRPOAdvantage(), RLOOAdvantage(), GRPOAdvantage(negative_weight=0.5)):
        adv = est(rewards)
        assert torch.equal(adv[0], torch.zeros(g)), (type(est).__name__, adv[0])
        assert adv[1].abs().max() > 0.1
    assert zero_std_mask(rewards).tolist() == [True, False]


def test_k3_is_capped_like_verl_low_var_kl() -> None:
    # verl's low_var_kl clamps the k3 value to [-10, 10]; beyond the cap the per-token gradient is 0.
    # d = ref - logp = 3: k3 = e^3 - 3 - 1 = 16.0855 > 10 -> 10, gradient 0
    # d = 2: k3 = e^2 - 2 - 1 = 4.389056 (under the cap), d k3 / d logp = -(e^2 - 1) = -6.389056
    ref = torch.tensor([[3.0, 2.0, 25.0]])
    logp = torch.zeros(1, 3, requires_grad=True)
    k3 = kl_k3(logp, ref)
    assert k3.tolist()[0] == pytest.approx([10.0, 4.389056, 10.0], abs=1e-5)
    k3.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -6.389056, 0.0], abs=1e-5)
    # the penalty's per-token gradient stays bounded for any log-ratio: the cap is reached at d* with
    # e^d* - d* - 1 = 10, d* = 2.6093, so |grad| <= e^d* - 1 = 12.609 (uncapped it reached e^20 ~ 5e8)
    logp2 = torch.linspace(-30, 30, 6001)[None].requires_grad_(True)
    KLPenalty(coef=0.2, estimator="k3").penalty(logp2, torch.zeros_like(logp2)).sum().backward()
    assert logp2.grad.abs().max().item() <= 0.2 * 12.61
