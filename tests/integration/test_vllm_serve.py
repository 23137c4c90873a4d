"""vLLM serves what this app exports (tier `vllm`): for LLaVA and Qwen2.5-VL (InternVL: test_vllm_sync.py),
`export_hf`'s folder opens in stock transformers with torchvision (the stock processor with its video processor)
and a real vLLM engine loads it, samples G responses to a prompt with an image, takes a full weight push under
the stock names, and agrees with the trainer's log-probs (mean |gap| < 1e-3, fp32)."""

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
from modules.loading import load_vlm  # noqa: E402
from modules.vllm_engine import VLLMRolloutEngine  # noqa: E402
from tests.unit.test_stock_export import assert_stock, stock_report  # noqa: E402


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vllm_serves_the_export(family, tmp_path, tiny_model_dir):
    model, processor = load_vlm(tiny_model_dir(family))
    folder = export_hf(model, processor, tmp_path / "export")
    (report,) = stock_report([folder])
    assert report["torchvision"], "the vLLM venv has torchvision"
    assert_stock(report, family)

    policy, processor = load_policy(str(folder), ALL_PARTS, "float32", "sdpa", False, False)
    engine = VLLMRolloutEngine(**ENGINE_ARGS)
    engine.setup(policy, processor, torch.device("cpu"), seed=0)
    try:
        batch = image_batch(processor, 1)
        rollouts = engine.generate(policy, batch, 2)  # pushes every weight first (the engine starts stale)
        assert len(engine.last_pushed) == len(list(policy.parameters()))
        assert rollouts.response_ids.shape[0] == 2 and rollouts.response_mask.sum() > 0
        gap = mean_gap(rollouts.logprobs, trainer_logprobs(policy, batch, rollouts), rollouts.response_mask)
        print(f"\n{family}: vLLM vs trainer log-probs, mean |gap| {gap:.2e}")
        assert gap < SYNC_TOLERANCE
    finally:
        engine.close()
