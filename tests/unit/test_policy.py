"""Prompt sharing is exact: one prompt forward per group gives the same log-probs, loss and gradients as G copies.

Real tiny models of all three families (InternVL and LLaVA: 1-D RoPE; Qwen2.5-VL: 3-D M-RoPE), real processors
and tokenizers, prompts with 1 and 2 images in one left-padded batch. Tolerances are for fp32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from datamodules.prompting import PromptCollator
from datamodules.types import PromptBatch, PromptRecord
from modules.entropy import entropy_from_logits
from modules.loading import load_vlm
from modules.policy import (
    SamplingParams,
    expand_batch,
    placeholder_ids,
    response_hidden,
    sample,
    token_logprobs,
)
from modules.tiny import FAMILIES

G = 3
LOGP_ATOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


def noise_image(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def records() -> list[PromptRecord]:
    """One 1-image and one 2-image prompt of different lengths (so one row is left-padded).

    The second image is 4:1, so Qwen2.5-VL's grid is not square and its M-RoPE text offset is not trivial.
    """
    return [
        PromptRecord(id="one", question="How many red circles are there?", answer="3", images=[noise_image(1)]),
        PromptRecord(id="two", question="Compare <image 2> with <image 1>. Which has more squares?",
                     answer="A", question_type="multiple-choice", options=["first", "second"],
                     images=[noise_image(2), noise_image(3, (224, 56))]),
    ]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """family -> (model, processor, batch), loaded once per module; tests reset grads and mode themselves."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model, processor = load_vlm(tiny_model_dir(family))
            cache[family] = (model, processor, PromptCollator(processor, mode="rl")(records()))
        model, processor, batch = cache[family]
        model.zero_grad(set_to_none=True)
        model.eval()
        return model, processor, batch

    return get


def hand_responses(tok, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, R] responses: full reply + EOS; a short reply + EOS then right padding; a reply cut off (no EOS)."""
    full = tok.encode("I count 3 red circles. Wait, 1, 2, 3. </think> The answer is \\boxed{3}.")
    short = tok.encode("Hmm, 2. </think> \\boxed{2}")
    r = len(full) + 1
    rows = [full + [tok.eos_token_id], short + [tok.eos_token_id], full[: r - 3]]
    ids = torch.full((n, r), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, r), dtype=torch.long)
    for i in range(n):
        row = rows[i % len(rows)]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def masked_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -(logp * mask).sum() / mask.sum()


def logp_loss_grads(model, batch, response, mask, share: bool):
    model.zero_grad(set_to_none=True)
    hidden = response_hidden(model, batch, response, mask, G, share_prompt=share)
    logp, _ = token_logprobs(model, hidden, response)
    loss = masked_loss(logp, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), loss.detach(), grads


def plain_logits(model, batch: PromptBatch, response: torch.Tensor, resp_mask: torch.Tensor) -> torch.Tensor:
    """A plain full-sequence model(...) forward on G copies of each prompt + its response: logits of the
    positions from the prompt's last token on, [B*G, R+1, V] (position t predicts response[:, t]).

    1-D RoPE families get positions cumsum(mask)-1 (written out here, independently of modules.policy);
    Qwen2.5-VL gets none and builds its M-RoPE positions itself from the mask and mm_token_type_ids.
    """
    ids, mask, vision = expand_batch(batch, G)
    p = ids.shape[1]
    full_ids, full_mask = torch.cat([ids, response], 1), torch.cat([mask, resp_mask], 1)
    kwargs = dict(vision)
    if "mm_token_type_ids" in kwargs:
        kwargs["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"], torch.zeros_like(response)], 1)
    else:
        kwargs["position_ids"] = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, **kwargs).logits
    return logits[:, p - 1:].float()


def reference_logits(model, batch: PromptBatch, response: torch.Tensor, resp_mask: torch.Tensor) -> torch.Tensor:
    """Logits that predict each response token, from one plain forward: [B*G, R, V]."""
    return plain_logits(model, batch, response, resp_mask)[:, :-1]


def eos_ids(tok) -> list[int]:
    return [tok.eos_token_id]


def test_batch_mixes_one_and_two_images_with_left_padding(loaded):
    _, _, batch = loaded("qwen2_5_vl")
    assert batch.vision_rows["image_grid_thw"] == [1, 2]
    pad = (batch.attention_mask == 0).sum(1)
    assert pad.min() == 0 and pad.max() > 0  # one row is left-padded


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_equals_copied_prompt_logprobs_loss_and_grads(loaded, family):
    model, processor, batch = loaded(family)
    model.train()
    response, mask = hand_responses(processor.tokenizer, len(batch) * G)

    logp_s, loss_s, grads_s = logp_loss_grads(model, batch, response, mask, share=True)
    logp_u, loss_u, grads_u = logp_loss_grads(model, batch, response, mask, share=False)

    on = mask.bool()
    assert logp_s.shape == response.shape
    assert torch.isfinite(logp_s[on]).all()
    assert (logp_s[on] - logp_u[on]).abs().max() <= LOGP_ATOL
    assert abs(loss_s.item() - loss_u.item()) <= LOSS_ATOL
    # Same parameters reached both ways; the only ones without a grad are LLaVA's SigLIP pooling head and
    # post-layernorm, which the model never calls (it reads the last hidden state before them).
    assert grads_s.keys() == grads_u.keys()
    unused = {n for n, p in model.named_parameters() if p.requires_grad} - grads_s.keys()
    assert all(n.startswith(("model.vision_tower.head.", "model.vision_tower.post_layernorm.")) for n in unused)
    assert bool(unused) == (family == "llava")
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_u[name], atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   msg=lambda m, n=name: f"{family} grad of {n}: {m}")
    # The comparison is not vacuous: the shared prompt forward carries gradient back into the vision encoder.
    vision_grads = [g for n, g in grads_s.items() if "vision_tower" in n or ".visual." in n]
    assert vision_grads and max(g.abs().max().item() for g in vision_grads) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_identical_with_and_without_prompt_sharing(loaded, family):
    model, processor, batch = loaded(family)
    tok = processor.tokenizer
    sp = SamplingParams(temperature=1.0, max_new_tokens=10)
    runs = [sample(model, batch, G, sp, eos_ids(tok), tok.pad_token_id, torch.Generator().manual_seed(7), share)
            for share in (True, False)]
    (ids_s, mask_s, trunc_s), (ids_u, mask_u, trunc_u) = runs
    assert ids_s.shape == (len(batch) * G, 10)
    assert torch.equal(ids_s, ids_u) and torch.equal(mask_s, mask_u) and torch.equal(trunc_s, trunc_u)
    # G samples of one prompt are not copies of each other (temperature 1, random tiny model).
    assert not torch.equal(ids_s[0], ids_s[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_plain_full_forward(loaded, family):
    """Sampled responses scored by the shared path equal log_softmax of one plain forward (positions check)."""
    model, processor, batch = loaded(family)
    tok = processor.tokenizer
    response, mask, _ = sample(model, batch, G, SamplingParams(temperature=1.0, max_new_tokens=10),
                               eos_ids(tok), tok.pad_token_id, torch.Generator().manual_seed(3))
    ref = torch.log_softmax(reference_logits(model, batch, response, mask), -1)  # [N, R, V]
    ref_logp = ref.gather(-1, response[..., None]).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    on = mask.bool()
    with torch.no_grad():
        for share in (True, False):
            hidden = response_hidden(model, batch, response, mask, G, share_prompt=share)
            logp, ent = token_logprobs(model, hidden, response, with_entropy=True, chunk=4)  # chunks of 4 of 10
            assert (logp[on] - ref_logp[on]).abs().max() <= LOGP_ATOL, f"share_prompt={share}"
            assert (ent[on] - ref_ent[on]).abs().max() <= 1e-4, f"share_prompt={share}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_sampling_takes_the_plain_forward_argmax(loaded, family):
    """Temperature 0 ignores the generator and each token is the argmax of the full-sequence forward.

    This checks the positions used while decoding with a KV cache (M-RoPE offsets included).
    """
    model, processor, batch = loaded(family)
    tok = processor.tokenizer
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    ids, mask, _ = sample(model, batch, G, sp, eos_ids(tok), tok.pad_token_id, torch.Generator().manual_seed(1))
    ids2, _, _ = sample(model, batch, G, sp, eos_ids(tok), tok.pad_token_id, torch.Generator().manual_seed(2),
                        share_prompt=False)
    assert torch.equal(ids, ids2)
    assert torch.equal(ids[0::G], ids[1::G])  # greedy: every sample of a group is the same
    reference = reference_logits(model, batch, ids, mask)
    reference[..., placeholder_ids(model)] = float("-inf")  # the sampler never emits image tokens
    greedy = reference.argmax(-1)
    assert torch.equal(greedy[mask.bool()], ids[mask.bool()])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_placeholder_tokens_are_never_sampled(tiny_model_dir, family):
    """Even when the image token is by far the likeliest, sampling avoids it, so the copied-prompt forward
    (which also gets the pixels) never mistakes a response token for an image slot."""
    model, processor = load_vlm(tiny_model_dir(family))
    model.eval()
    image_id = model.config.image_token_id
    assert image_id in placeholder_ids(model)
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[image_id] = 1e4  # the image token dominates every logit
    model.lm_head = head
    batch = PromptCollator(processor, mode="rl")(records())
    tok = processor.tokenizer
    for temperature in (0.0, 1.0):
        ids, mask, _ = sample(model, batch, G, SamplingParams(temperature=temperature, max_new_tokens=4),
                              [tok.eos_token_id], tok.pad_token_id, torch.Generator().manual_seed(0))
        assert not torch.isin(ids, torch.tensor(placeholder_ids(model))).any()
    with torch.no_grad():
        shared = response_hidden(model, batch, ids, mask, G, share_prompt=True)
        copied = response_hidden(model, batch, ids, mask, G, share_prompt=False)
    torch.testing.assert_close(shared[mask.bool()], copied[mask.bool()], atol=1e-5, rtol=1e-4)


def check_mask_contract(ids, mask, truncated, eos: list[int], pad_id: int, max_new: int):
    """mask is 1 up to and including the first EOS and 0 after (pad tokens there); truncated iff no EOS."""
    assert ids.shape == mask.shape and ids.shape[1] <= max_new
    for row_ids, row_mask, cut in zip(ids.tolist(), mask.tolist(), truncated.tolist(), strict=True):
        hits = [i for i, t in enumerate(row_ids) if t in eos]
        if hits:
            first = hits[0]
            assert row_mask == [1] * (first + 1) + [0] * (len(row_ids) - first - 1)
            assert all(t == pad_id for t in row_ids[first + 1:])
            assert not cut
        else:
            assert row_mask == [1] * len(row_ids)
            assert cut and len(row_ids) == max_new


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_sample_masks_and_truncation(loaded, family):
    model, processor, batch = loaded(family)
    pad = processor.tokenizer.pad_token_id
    vocab = model.lm_head.out_features
    n = len(batch) * G

    # A fifth of the vocabulary ends a response: some rows stop early, some run to the cap.
    eos = list(range(0, vocab, 5))
    ids, mask, cut = sample(model, batch, G, SamplingParams(max_new_tokens=6), eos, pad,
                            torch.Generator().manual_seed(0))
    check_mask_contract(ids, mask, cut, eos, pad, 6)
    assert 0 < int(cut.sum()) < n  # this seed gives both kinds of row

    # Every token is an EOS: one step, nothing truncated.
    ids, mask, cut = sample(model, batch, G, SamplingParams(max_new_tokens=6), list(range(vocab)), pad)
    assert ids.shape == (n, 1) and mask.eq(1).all() and not cut.any()

    # No EOS at all: everything runs to the cap and is truncated.
    ids, mask, cut = sample(model, batch, G, SamplingParams(max_new_tokens=5), [], pad)
    assert ids.shape == (n, 5) and mask.eq(1).all() and cut.all()


def test_one_token_responses_share_prompt(loaded):
    model, processor, batch = loaded("qwen2_5_vl")
    tok = processor.tokenizer
    response = torch.full((len(batch) * G, 1), tok.eos_token_id)
    mask = torch.ones_like(response)
    with torch.no_grad():
        shared = response_hidden(model, batch, response, mask, G, share_prompt=True)
        copied = response_hidden(model, batch, response, mask, G, share_prompt=False)
    assert shared.shape == copied.shape == (len(batch) * G, 1, model.config.text_config.hidden_size)
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=1e-4)


def test_shared_prompt_under_gradient_checkpointing(tiny_model_dir, loaded):
    """Checkpointed layers drop the KV cache; the shared path must still give the copied-prompt values."""
    model, processor, batch = loaded("llava")
    ckpt_model, _ = load_vlm(tiny_model_dir("llava"), gradient_checkpointing=True)
    ckpt_model.train()
    response, mask = hand_responses(processor.tokenizer, len(batch) * G)
    logp_c, loss_c, grads_c = logp_loss_grads(ckpt_model, batch, response, mask, share=True)
    logp_u, loss_u, grads_u = logp_loss_grads(model, batch, response, mask, share=False)
    assert (logp_c - logp_u)[mask.bool()].abs().max() <= LOGP_ATOL
    assert abs(loss_c.item() - loss_u.item()) <= LOSS_ATOL
    assert grads_c.keys() == grads_u.keys()
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_u[name], atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_token_logprobs_temperature_and_banned_tokens():
    """Temperature divides the logits; -inf logits (banned tokens) give finite entropy, not NaN."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.lm_head = nn.Linear(8, 6)
    with torch.no_grad():
        holder.lm_head.bias[4:] = float("-inf")  # tokens 4 and 5 are banned
    hidden, targets = torch.randn(2, 5, 8), torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 4]])
    logits = holder.lm_head(hidden)

    logp, ent = token_logprobs(holder, hidden, targets, temperature=0.7, with_entropy=True, chunk=2)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[:, :4], expected[:, :4])
    assert logp[1, 4] == float("-inf")  # a banned target has probability 0
    assert torch.isfinite(ent).all()
    allowed = torch.softmax(logits[..., :4] / 0.7, -1)
    torch.testing.assert_close(ent, -(allowed * allowed.log()).sum(-1))
    torch.testing.assert_close(ent, entropy_from_logits(logits / 0.7))


def test_rollout_engine_state_resumes_the_stream_and_refuses_a_foreign_device_state(loaded, caplog):
    """A restored engine samples what the original would have sampled next; a state saved on another kind of
    device (a CUDA run resumed on CPU) cannot seed this generator: sampling restarts from the seed, with a warning."""
    from modules.rollout import HFRolloutEngine

    model, processor, batch = loaded("internvl")
    first = HFRolloutEngine(max_new_tokens=6)
    first.setup(model, processor, torch.device("cpu"), seed=3)
    first.generate(model, batch, 2)
    state = first.state_dict()
    assert state["device"] == "cpu"
    expected = first.generate(model, batch, 2).response_ids

    resumed = HFRolloutEngine(max_new_tokens=6)
    resumed.setup(model, processor, torch.device("cpu"), seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.generate(model, batch, 2).response_ids, expected)

    restart = HFRolloutEngine(max_new_tokens=6)
    restart.load_state_dict({**state, "device": "cuda"})  # before setup: kept until the generator exists
    with caplog.at_level("WARNING", logger="modules.rollout"):
        restart.setup(model, processor, torch.device("cpu"), seed=3)
    assert "restarts from the seed" in caplog.text
    fresh = HFRolloutEngine(max_new_tokens=6)
    fresh.setup(model, processor, torch.device("cpu"), seed=3)
    assert torch.equal(restart.generate(model, batch, 2).response_ids, fresh.generate(model, batch, 2).response_ids)
