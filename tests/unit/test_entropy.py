"""Token entropy and critical-token positions (modules/entropy.py)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from modules.entropy import (
    DEFAULT_CRITICAL_WORDS,
    NOWAIT_WORDS,
    aggregate_entropy,
    chunked_logits_entropy,
    chunked_logp_and_entropy,
    chunked_token_entropy,
    critical_entropy_stats,
    critical_word_positions,
    entropy_from_logits,
    incremental_decode_offsets,
    selective_log_softmax,
)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------------------------------
# Entropy maths
# ----------------------------------------------------------------------------------------------------
def test_entropy_known_values() -> None:
    # uniform over V = 7: H = ln 7 = 1.945910
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)
    # one-hot (one logit +inf-like, others -inf): H = 0
    assert entropy_from_logits(torch.tensor([0.0, -float("inf"), -float("inf")])).item() == 0.0
    assert entropy_from_logits(torch.tensor([1e4, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    # p = (0.25, 0.75) from logits (ln 1, ln 3): H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    #   = 0.25 * 1.386294 + 0.75 * 0.287682 = 0.346574 + 0.215762 = 0.562335
    two = torch.tensor([0.0, math.log(3.0)])
    assert entropy_from_logits(two).item() == pytest.approx(0.562335, abs=1e-6)
    # shift invariance, batching, bf16 input computed in fp32
    assert entropy_from_logits(two + 100.0).item() == pytest.approx(0.562335, abs=1e-5)
    batched = entropy_from_logits(torch.stack([torch.zeros(2), two]).to(torch.bfloat16))
    assert batched.dtype == torch.float32 and batched.shape == (2,)


def test_entropy_matches_loop(gen: torch.Generator) -> None:
    logits = torch.randn(3, 4, 11, generator=gen, dtype=torch.float64) * 3
    got = entropy_from_logits(logits)
    for i in range(3):
        for t in range(4):
            z = [math.exp(v) for v in logits[i, t].tolist()]
            p = [v / sum(z) for v in z]
            assert got[i, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)


def test_selective_log_softmax(gen: torch.Generator) -> None:
    logits = torch.randn(2, 5, 13, generator=gen)
    ids = torch.randint(0, 13, (2, 5), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    for chunk in (1, 3, 1024):
        torch.testing.assert_close(selective_log_softmax(logits, ids, chunk_size=chunk), expected)
    # bf16 logits: computed in fp32 from the bf16 values
    bf = logits.to(torch.bfloat16)
    ref = torch.log_softmax(bf.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(bf, ids), ref)


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_chunked_matches_direct(gen: torch.Generator, chunk: int) -> None:
    n, t, h, v = 3, 9, 8, 50
    hidden = torch.randn(n, t, h, generator=gen)
    head = torch.nn.Linear(h, v, bias=False)
    torch.nn.init.normal_(head.weight, generator=gen)
    ids = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.3
    logits = head(hidden)  # [N, T, V]
    direct_ent = torch.where(mask, entropy_from_logits(logits), 0.0)
    direct_logp = torch.where(mask, torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0], 0.0)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_entropy(hidden, head, mask, chunk), direct_ent)
        torch.testing.assert_close(chunked_logits_entropy(logits, mask, chunk), direct_ent)
    logp, ent = chunked_logp_and_entropy(hidden, head, ids, mask, chunk)
    torch.testing.assert_close(logp, direct_logp)
    torch.testing.assert_close(ent, direct_ent)
    # gradients flow through the chunks like through the direct computation
    logp.sum().backward()
    chunked_grad = head.weight.grad.clone()
    head.weight.grad = None
    direct_logp.sum().backward()
    torch.testing.assert_close(chunked_grad, head.weight.grad)


def test_chunked_never_sees_more_than_chunk_positions(gen: torch.Generator) -> None:
    seen: list[int] = []

    def head(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return h @ torch.ones(h.shape[-1], 5)

    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 3:] = False  # 33 kept positions
    chunked_token_entropy(torch.randn(4, 10, 2, generator=gen), head, mask, chunk_size=8)
    assert seen == [8, 8, 8, 8, 1]
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logits_entropy(torch.zeros(1, 1, 2), torch.ones(1, 1), chunk_size=0)


# ----------------------------------------------------------------------------------------------------
# Critical word positions on hand-built offsets
# ----------------------------------------------------------------------------------------------------
def _spans(pieces: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Concatenate token strings and return (text, offsets)."""
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    return "".join(pieces), offsets


def test_positions_hand_built() -> None:
    # tokens:  0:"Wait"  1:","  2:" so"  3:" Al"  4:"tern"  5:"atively"  6:" hmm"  7:"."  8:" wait"
    text, offsets = _spans(["Wait", ",", " so", " Al", "tern", "atively", " hmm", ".", " wait"])
    got = critical_word_positions(text, offsets, DEFAULT_CRITICAL_WORDS)
    # start of text; a word split over 3 tokens maps to its first piece; lower-case forms keep the
    # canonical spelling; " hmm" spans its leading space
    assert got == [(0, "Wait"), (3, "Alternatively"), (6, "Hmm"), (8, "Wait")]


def test_positions_whole_words_only() -> None:
    text, offsets = _spans(["I", " awaited", " waiting", " Waits", " hmmm", " WAIT", "!"])
    # "awaited", "waiting", "Waits", "hmmm" are not the words; "WAIT" is
    assert critical_word_positions(text, offsets, DEFAULT_CRITICAL_WORDS) == [(5, "Wait")]


def test_positions_split_word_and_space_token() -> None:
    # the space is its own token (1), the word starts inside token 2 "Wa" and ends in token 3 "it"
    text, offsets = _spans(["ok", " ", "Wa", "it", ", no", "\nHm", "m"])
    assert critical_word_positions(text, offsets, ["Wait", "Hmm"]) == [(2, "Wait"), (5, "Hmm")]


def test_positions_first_covering_token_and_special_tokens() -> None:
    # a special token with an empty (0, 0) span must not steal position 0; overlapping spans (byte-level
    # pieces of one character) resolve to the first covering token
    text = "Wait é wait"
    offsets = [(0, 0), (0, 4), (4, 6), (5, 6), (6, 11)]
    assert critical_word_positions(text, offsets, ["wait"]) == [(1, "wait"), (4, "wait")]


def test_positions_nowait_longest_match() -> None:
    text, offsets = _spans(["Let", " me", " double", "-check", " again", ": but", " re-check", " another"])
    got = critical_word_positions(text, offsets, NOWAIT_WORDS)
    # "double-check" wins over "check"; "re-check" is a compound, not "check"
    assert got == [(2, "double-check"), (4, "again"), (5, "but"), (7, "another")]
    assert critical_word_positions(text, offsets, []) == []


# ----------------------------------------------------------------------------------------------------
# Critical word positions with a real (tiny, trained-in-test) byte-level BPE tokenizer
# ----------------------------------------------------------------------------------------------------
SENTENCES = [
    "Wait, the angle is 30 degrees. Alternatively, use the sine rule.",
    "Hmm, that gives 12. Wait, let me check the area again.",
    "So the answer is B. Alternatively the triangle is isosceles, hmm.",
    "We awaited the result; waiting is not Wait. Café côté naïve.",
]


@pytest.fixture(scope="module", params=[False, True], ids=["span-with-space", "trimmed-span"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=request.param)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


TEXT = "Wait, is it 12? Hmm... wait — alternatively we awaited; Alternatively: WAIT. Café, hmm"
EXPECTED_WORDS = ["Wait", "Hmm", "Wait", "Alternatively", "Alternatively", "Wait", "Hmm"]


def _check_positions(tokenizer: PreTrainedTokenizerFast, ids: list[int], positions: list) -> None:
    assert [w for _, w in positions] == EXPECTED_WORDS
    for index, word in positions:
        first = tokenizer.decode(ids[index : index + 1]).lstrip()
        rest = tokenizer.decode(ids[index:]).lstrip()
        assert first, "position points at a whitespace-only token"
        assert rest.lower().startswith(word.lower())


def test_positions_with_real_tokenizer_offsets(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = tokenizer(TEXT, return_offsets_mapping=True, add_special_tokens=False)
    ids = enc["input_ids"]
    text = tokenizer.decode(ids)
    assert text == TEXT
    assert any(len(tokenizer.decode([i]).strip()) < 4 for i in ids)  # tiny vocab: words are split
    positions = critical_word_positions(text, enc["offset_mapping"], DEFAULT_CRITICAL_WORDS)
    _check_positions(tokenizer, ids, positions)


def test_positions_with_incremental_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    # generated ids (no re-tokenisation): offsets come from incremental decoding; multi-byte characters
    # ("é", "—") are split over byte tokens, which get empty spans until the character completes
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text, offsets = incremental_decode_offsets(lambda x: tokenizer.decode(x, skip_special_tokens=True), ids)
    assert text == TEXT
    assert len(offsets) == len(ids) and offsets[-1][0] == offsets[-1][1]  # eos adds no text
    assert any(s == e for s, e in offsets[:-1])  # a byte token that completes no character
    positions = critical_word_positions(text, offsets, DEFAULT_CRITICAL_WORDS)
    _check_positions(tokenizer, ids, positions)


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def test_critical_entropy_stats_hand_computed() -> None:
    ent = torch.tensor([0.5, 2.0, 0.1, 3.0, 0.2])
    positions = [(1, "Wait"), (3, "Hmm"), (4, "Wait")]
    s0 = critical_entropy_stats(ent, positions)
    # shift 0: (2.0 + 3.0 + 0.2) / 3 = 1.733333; Wait: (2.0 + 0.2) / 2 = 1.1; Hmm: 3.0
    assert s0["critical"] == pytest.approx(5.2 / 3)
    assert s0["critical/Wait"] == pytest.approx(1.1)
    assert s0["critical/Hmm"] == pytest.approx(3.0)
    assert s0["n_critical"] == 3
    # shift 1 reads the next step: positions 2, 4 (position 5 is past the end): (0.1 + 0.2) / 2
    s1 = critical_entropy_stats(ent.tolist(), positions, shift=1)
    assert s1["critical"] == pytest.approx(0.15)
    assert s1["n_critical"] == 2
    assert math.isnan(critical_entropy_stats(ent, [])["critical"])


def test_aggregate_entropy_hand_computed() -> None:
    responses = [
        (torch.tensor([1.0, 7.0, 2.0, 0.0]), [(1, "Wait")]),
        (torch.tensor([8.0, 0.5]), [(0, "Alternatively"), (1, "Wait")]),
        (torch.tensor([3.0, 3.5]), []),
    ]
    s = aggregate_entropy(responses, high_entropy_threshold=6.8)
    # critical: (7 + 8 + 0.5) / 3 = 5.166667; Wait: (7 + 0.5) / 2 = 3.75; Alternatively: 8
    assert s["critical"] == pytest.approx(15.5 / 3)
    assert s["critical/Wait"] == pytest.approx(3.75)
    assert s["critical/Alternatively"] == pytest.approx(8.0)
    # all tokens: (10 + 8.5 + 6.5) / 8 = 3.125; above 6.8: {7, 8} -> 2 / 8 = 0.25
    assert s["all_tokens"] == pytest.approx(3.125)
    assert s["high_entropy_frac"] == pytest.approx(0.25)
    # 3 critical words in 8 tokens = 375 per 1000 tokens
    assert s["critical_rate"] == pytest.approx(375.0)
    assert s["n_critical"] == 3
    empty = aggregate_entropy([(torch.tensor([1.0]), [])], high_entropy_threshold=6.8)
    assert math.isnan(empty["critical"]) and empty["n_critical"] == 0 and empty["all_tokens"] == 1.0


def test_aggregate_equals_loop(gen: torch.Generator) -> None:
    responses = []
    for length in (5, 1, 17, 9):
        ent = torch.rand(length, generator=gen) * 10
        idx = torch.randperm(length, generator=gen)[: max(1, length // 4)].sort().values.tolist()
        responses.append((ent, [(i, "Wait" if i % 2 else "Hmm") for i in idx]))
    s = aggregate_entropy(responses, high_entropy_threshold=5.0)
    crit = [float(e[i]) for e, pos in responses for i, _ in pos]
    tokens = [float(v) for e, _ in responses for v in e]
    assert s["critical"] == pytest.approx(sum(crit) / len(crit))
    assert s["all_tokens"] == pytest.approx(sum(tokens) / len(tokens))
    assert s["high_entropy_frac"] == pytest.approx(sum(v > 5.0 for v in tokens) / len(tokens))
    assert s["critical_rate"] == pytest.approx(1000 * len(crit) / len(tokens))
