"""CriticalEntropyCallback's measurement on hand-built responses, against a direct full forward.

A random-init model rarely samples "Wait", so the critical path is exercised here with response ids that
contain the tokenizer's encoding of " Wait" and " Hmm" at known places.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.make_data import write_dataset
from callbacks.critical_entropy import CriticalEntropyCallback, pool_entropy_sums, stats_from_sums
from datamodules.prompting import PromptCollator
from datamodules.vlm_datamodule import load_records
from modules.entropy import aggregate_entropy, entropy_from_logits
from modules.tiny import make_tiny


def grpo_module(model_dir, max_new_tokens: int, group_size: int = 2):
    """GRPOModule built in Python: the lazy_instance defaults only resolve under jsonargparse, so pass all."""
    from modules.advantages import GRPOAdvantage
    from modules.grpo_module import GRPOModule
    from modules.grpo_steps import Overlong
    from modules.losses import KLPenalty, PPOClipLoss, TokenMean
    from modules.rollout import HFRolloutEngine

    return GRPOModule(model_path=str(model_dir), group_size=group_size,
                      rollout=HFRolloutEngine(max_new_tokens=max_new_tokens), advantage=GRPOAdvantage(),
                      policy_loss=PPOClipLoss(), aggregation=TokenMean(), kl=KLPenalty(), overlong=Overlong())


@pytest.fixture(scope="module")
def module_and_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("ce_unit")
    model_dir = make_tiny(root / "tiny", "internvl")
    write_dataset(root / "data", n_train=32, n_val=16, quiet=True)
    torch.manual_seed(0)
    module = grpo_module(model_dir, max_new_tokens=8)
    module.configure_model()
    records, _ = load_records(str(root / "data" / "validation-*.parquet"), max_skip_fraction=0.0, limit=1)
    batch = PromptCollator(module.processor, mode="rl")(records)  # one prompt: no padding
    return module, batch


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _first_token_covering(tok, ids: list[int], char_index: int) -> int:
    """Smallest j such that the text of ids[:j+1] reaches past char_index."""
    return next(j for j in range(len(ids)) if len(tok.decode(ids[: j + 1])) > char_index)


def test_entropy_at_critical_tokens_matches_full_forward(module_and_batch):
    module, batch = module_and_batch
    tok = module.processor.tokenizer
    rows = [
        _encode(tok, "The square is red.") + _encode(tok, " Wait") + _encode(tok, ", it is blue."),
        _encode(tok, "Count the cells") + _encode(tok, " Hmm") + _encode(tok, " 4 cells, wait."),
    ]
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # [2, R]
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # [2, R]

    cb = CriticalEntropyCallback(chunk_size=3)  # several LM-head chunks
    entropies, positions, texts = cb.measure_responses(module.policy, tok, batch, ids, mask, group_size=2)

    # the critical words are found where they were put, from the ids themselves
    expected_pos = []
    for row, text in zip(rows, texts, strict=True):
        found = []
        for word in ("Wait", "Hmm", "wait"):
            at = text.find(word)
            if at >= 0:
                found.append((_first_token_covering(tok, row, at), {"wait": "Wait"}.get(word, word)))
        expected_pos.append(sorted(found))
    assert [sorted(p) for p in positions] == expected_pos
    assert [w for _, w in positions[0]] == ["Wait"] and {w for _, w in positions[1]} == {"Hmm", "Wait"}

    # direct full forward of prompt + response (no padding in the prompt, so default positions agree)
    p = batch.input_ids.shape[1]
    module.policy.eval()
    with torch.no_grad():
        for row in range(2):
            n = int(mask[row].sum())
            full = torch.cat([batch.input_ids[0], ids[row, :n]])[None]  # [1, P + n]
            logits = module.policy(input_ids=full, attention_mask=torch.ones_like(full), **batch.vision).logits
            direct = entropy_from_logits(logits[0, p - 1 : p - 1 + n])  # [n]: position P-1+t predicts token t
            torch.testing.assert_close(entropies[row], direct, rtol=1e-4, atol=1e-4)
            for i, _ in positions[row]:
                assert math.isclose(float(entropies[row][i]), float(direct[i]), rel_tol=1e-4, abs_tol=1e-4)
    module.policy.train()

    sums = pool_entropy_sums(list(zip(entropies, positions, strict=True)), cb.words, 2.0, 0)
    stats = stats_from_sums(sums, cb.words)
    assert stats["n_critical"] == 3 and math.isfinite(stats["critical"]) and "critical/Hmm" in stats


def test_pooled_sums_equal_aggregate_entropy():
    g = torch.Generator().manual_seed(0)
    responses = [
        (torch.rand(7, generator=g) * 5, [(0, "Wait"), (3, "Hmm"), (6, "Wait")]),
        (torch.rand(4, generator=g) * 5, []),
        (torch.rand(5, generator=g) * 5, [(4, "Alternatively")]),
    ]
    words = ["Wait", "Alternatively", "Hmm"]
    for shift in (0, 1):
        ref = aggregate_entropy(responses, high_entropy_threshold=2.5, shift=shift)
        got = stats_from_sums(pool_entropy_sums(responses, words, 2.5, shift), words)
        assert got.keys() == ref.keys()
        for key in ref:
            assert math.isclose(got[key], ref[key], rel_tol=1e-6), key
    none = stats_from_sums(pool_entropy_sums([(torch.ones(3), [])], words, 2.5, 0), words)
    assert math.isnan(none["critical"]) and none["n_critical"] == 0 and none["all_tokens"] == 1.0


def test_probe_sampling_leaves_training_generator_alone(module_and_batch):
    from callbacks.critical_entropy import _own_generator

    module, batch = module_and_batch
    engine = module.rollout
    engine.setup(module.policy, module.processor, torch.device("cpu"), seed=123)
    before = engine.generator.get_state().clone()
    global_before = torch.get_rng_state().clone()
    outs = []
    for _ in range(2):
        probe = torch.Generator().manual_seed(7)
        with _own_generator(engine, probe, torch.device("cpu")):
            outs.append(engine.generate(module.policy, batch, 2, temperature=1.0, max_new_tokens=6).response_ids)
    assert torch.equal(engine.generator.get_state(), before)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert torch.equal(outs[0], outs[1])  # same seed, same weights: same probe samples


def test_word_sets_and_validation():
    assert CriticalEntropyCallback(word_set="nowait").words[0] == "wait"
    assert CriticalEntropyCallback().words == ["Wait", "Alternatively", "Hmm"]
    with pytest.raises(ValueError):
        CriticalEntropyCallback(word_set="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CriticalEntropyCallback(samples_per_prompt=0)
    with pytest.raises(ValueError, match="high_entropy_ratio"):
        CriticalEntropyCallback(high_entropy_ratio=2.0)  # a share of ln |V|, not nats


def test_high_entropy_threshold_is_relative_to_the_logits_and_described(module_and_batch):
    module, _ = module_and_batch
    width = module.policy.lm_head.weight.shape[0]  # the logits' width (the tiny vocabulary, padded)
    cb = CriticalEntropyCallback(high_entropy_ratio=0.25)
    assert cb.high_entropy_threshold(module.policy) == pytest.approx(0.25 * math.log(width))
    tags = ["entropy/critical", "entropy/critical/Wait", "entropy/all_tokens", "entropy/high_entropy_frac",
            "entropy/critical_rate", "entropy/n_critical"]
    described = cb.descriptions(tags, module.policy)
    assert set(described) == set(tags)
    assert f"{0.25 * math.log(width):.3g} nats" in described["entropy/high_entropy_frac"]
    assert f"|V| = {width}" in described["entropy/high_entropy_frac"]
    assert "Wait" in described["entropy/critical/Wait"]
