"""Weight sync into a real vLLM engine on CPU (tier `vllm`): after optimiser steps, vLLM's sampler log-probs of
its tokens equal the trainer's under the new weights (mean |gap| < 1e-3 in fp32) and differ from the old
weights'; an engine that skips the push is caught; the connector-only stage pushes only the connector.

One engine serves the module (vLLM starts in ~10-60 s here), on the InternVL export `export_hf` writes, so this
is also the InternVL "export served by vLLM" check.
"""

from __future__ import annotations

import pytest
import torch

from tests.vllm_support import (
    ENGINE_ARGS,
    SKIP_REASON,
    SYNC_TOLERANCE,
    image_batch,
    mean_gap,
    trainer_logprobs,
)

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason=SKIP_REASON)

from modules.common import export_hf, load_policy  # noqa: E402
from modules.grpo_module import ALL_PARTS  # noqa: E402
from modules.loading import load_vlm, set_trainable_parts  # noqa: E402
from modules.vllm_engine import VLLMRolloutEngine  # noqa: E402

G = 2


class NoPushEngine(VLLMRolloutEngine):
    """A broken sync: the trainer's steps never reach vLLM."""

    def sync_weights(self, model) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    model, processor = load_vlm(tiny_model_dir("internvl"))
    folder = export_hf(model, processor, tmp_path_factory.mktemp("vllm-sync") / "export")
    policy, processor = load_policy(str(folder), ALL_PARTS, "float32", "sdpa", False, False)
    engine = VLLMRolloutEngine(**ENGINE_ARGS)
    engine.setup(policy, processor, torch.device("cpu"), seed=0)
    yield policy, processor, engine
    engine.close()


def sgd_steps(policy, rollouts, batch, steps: int = 2, lr: float = 1e-3) -> None:
    """Real optimiser steps: raise the log-prob of the sampled tokens."""
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    from modules.policy import response_hidden, token_logprobs

    for _ in range(steps):
        opt.zero_grad()
        hidden = response_hidden(policy, batch, rollouts.response_ids, rollouts.response_mask, rollouts.group_size)
        logp = token_logprobs(policy, hidden, rollouts.response_ids)[0]
        (-(logp * rollouts.response_mask).sum() / rollouts.response_mask.sum()).backward()
        opt.step()


def test_vllm_samples_g_per_prompt_in_sync_and_follows_optimiser_steps(served):
    policy, processor, engine = served
    batch = image_batch(processor, 2)
    first = engine.generate(policy, batch, G)
    assert first.response_ids.shape[0] == 2 * G and first.logprobs.shape == first.response_ids.shape
    assert first.response_mask.sum(1).min() > 0
    gap0 = mean_gap(first.logprobs, trainer_logprobs(policy, batch, first), first.response_mask)
    assert gap0 < SYNC_TOLERANCE, f"vLLM vs trainer at the exported weights: mean |gap| {gap0:.2e}"

    sgd_steps(policy, first, batch)
    engine.sync_weights(policy)
    after = engine.generate(policy, batch, G)
    new = trainer_logprobs(policy, batch, after)
    gap_new = mean_gap(after.logprobs, new, after.response_mask)
    print(f"\nvLLM sampler vs trainer log-probs after 2 AdamW steps: mean |gap| {gap_new:.2e} (fp32, CPU)")
    assert gap_new < SYNC_TOLERANCE

    # the same tokens under the old weights: the sampler must not agree with those
    old_policy, _ = load_policy(str(policy.name_or_path), ALL_PARTS, "float32", "sdpa", False, False)
    gap_old = mean_gap(after.logprobs, trainer_logprobs(old_policy, batch, after), after.response_mask)
    assert gap_old > 10 * SYNC_TOLERANCE, f"the steps barely moved the weights (gap to old {gap_old:.2e})"


def test_a_broken_sync_is_caught(served):
    policy, processor, engine = served
    batch = image_batch(processor, 1)
    broken = NoPushEngine.__new__(NoPushEngine)
    broken.__dict__.update(engine.__dict__)  # the same running engine, with the push switched off
    broken._stale = False
    rollouts = broken.generate(policy, batch, G)
    sgd_steps(policy, rollouts, batch)
    broken.sync_weights(policy)
    stale = broken.generate(policy, batch, G)
    gap = mean_gap(stale.logprobs, trainer_logprobs(policy, batch, stale), stale.response_mask)
    assert gap > 10 * SYNC_TOLERANCE, f"an engine that never pushes went unnoticed (gap {gap:.2e})"
    engine._stale = True  # the shared engine catches up on the next generate


def test_connector_only_stage_pushes_only_the_connector(served):
    policy, processor, engine = served
    batch = image_batch(processor, 1)
    engine.generate(policy, batch, G)  # in sync with all parts first
    set_trainable_parts(policy, ["connector"])
    try:
        rollouts = engine.generate(policy, batch, G)
        sgd_steps(policy, rollouts, batch, lr=1e-2)
        engine.sync_weights(policy)
        after = engine.generate(policy, batch, G)
        connector = {n for n, _ in policy.model.multi_modal_projector.named_parameters()}
        assert engine.last_pushed and all(n.startswith("multi_modal_projector.") for n in engine.last_pushed)
        assert {n.removeprefix("multi_modal_projector.") for n in engine.last_pushed} == connector
        gap = mean_gap(after.logprobs, trainer_logprobs(policy, batch, after), after.response_mask)
        assert gap < SYNC_TOLERANCE
    finally:
        set_trainable_parts(policy, ALL_PARTS)
