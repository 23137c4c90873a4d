"""VLLMRolloutEngine: the pure helpers on CPU (TIS weights, weights to push, response packing, prompt inputs),
the missing-vLLM error, and an end-to-end rollout that runs only with CUDA and vLLM installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from datamodules.types import PromptBatch
from modules.vllm_engine import (
    VLLMRolloutEngine,
    clean_name,
    pack_responses,
    placeholder_ids,
    prompt_inputs,
    tis_weights,
    weights_to_push,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_tis_weights_values_cap_and_mask():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    sampler = torch.tensor([[-1.0, -3.0, -0.4, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w, diff = tis_weights(trainer, sampler, mask, cap=2.0)
    assert w[0, 0] == pytest.approx(1.0)
    assert w[0, 1] == pytest.approx(2.0)  # exp(1) = 2.72 capped at 2
    assert w[0, 2] == pytest.approx(math.exp(-0.1), rel=1e-6)
    assert w[0, 3] == 0.0  # padding
    assert diff == pytest.approx((0.0 + 1.0 + 0.1) / 3, rel=1e-6)


def test_tis_weights_off_and_no_grad():
    trainer = torch.randn(3, 5, requires_grad=True)
    sampler = trainer.detach() + 0.01
    w, diff = tis_weights(trainer, sampler, torch.ones(3, 5), cap=None)
    assert torch.equal(w, torch.ones(3, 5))
    assert diff == pytest.approx(0.01, rel=1e-4)
    assert not w.requires_grad


def test_engine_rejects_bad_settings():
    with pytest.raises(ValueError, match="tis_cap"):
        VLLMRolloutEngine(tis_cap=0.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMRolloutEngine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_cache_gb"):
        VLLMRolloutEngine(kv_cache_gb=0)


def test_cpu_placement_takes_a_kv_cache_size_and_skips_sleep_with_a_note(caplog):
    from modules.vllm_engine import CpuPlacement, CudaPlacement

    engine = VLLMRolloutEngine(kv_cache_gb=0.5, gpu_memory_utilization=0.3)
    with caplog.at_level("INFO", logger="modules.vllm_engine"):
        cpu = engine.place(torch.device("cpu"))
    assert isinstance(cpu, CpuPlacement) and cpu.engine_args() == {"kv_cache_memory_bytes": 2**29}
    assert "sleep mode is CUDA-only" in caplog.text
    cpu.sleep(None), cpu.wake(None, ["weights"])  # no engine calls on CPU
    cuda = engine.place(torch.device("cuda"))
    assert isinstance(cuda, CudaPlacement)
    assert cuda.engine_args() == {"gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
    with pytest.raises(RuntimeError, match="CUDA or CPU"):
        engine.place(torch.device("meta"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from modules.common import load_policy
    from modules.tiny import make_tiny

    path = make_tiny(tmp_path_factory.mktemp("vllm") / "internvl")
    model, processor = load_policy(str(path), ["connector"], "float32", "sdpa", False, False)
    return path, model, processor


def test_weights_to_push_only_trainable(tiny):
    from safetensors import safe_open

    from modules.loading import set_trainable_parts

    path, model, _ = tiny
    set_trainable_parts(model, ["connector"])
    pushed = weights_to_push(model)
    assert pushed and all("multi_modal_projector" in n for n, _ in pushed)
    assert sum(t.numel() for _, t in pushed) == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # the names vLLM loaded the checkpoint from
        keys = set(f.keys())
    assert {n for n, _ in pushed} <= keys
    set_trainable_parts(model, ["vision", "connector", "language_model", "lm_head"])
    assert len(weights_to_push(model)) == len(list(model.parameters()))
    assert all(not t.requires_grad for _, t in weights_to_push(model))


def test_placeholder_ids_are_suppressed(tiny):
    _, model, _ = tiny
    assert placeholder_ids(model) == [model.config.image_token_id]


def test_clean_name_strips_wrappers():
    n = "model._fsdp_wrapped_module.language_model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert clean_name(n) == "model.language_model.layers.0.mlp.up_proj.weight"


def test_pack_responses_right_pads():
    ids, mask, truncated, lp = pack_responses([[5, 6, 2], [7]], [[-0.1, -0.2, -0.3], [-1.0]], [True, False], 0)
    assert ids.tolist() == [[5, 6, 2], [7, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert truncated.tolist() == [False, True]
    assert lp[1].tolist() == [-1.0, 0.0, 0.0]


def test_prompt_inputs_text_images_and_token_fallback():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    text_only = PromptBatch(input_ids=ids, attention_mask=mask, vision={}, records=[{"id": "a"}, {"id": "b"}])
    assert prompt_inputs(text_only, 0) == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8, 9, 10]}]
    image = object()
    with_images = PromptBatch(input_ids=ids, attention_mask=mask, vision={"pixel_values": torch.zeros(1)},
                              records=[{"id": "a", "prompt_text": "<IMG_CONTEXT>Q?", "images": [image]},
                                       {"id": "b", "prompt_text": "Q2"}])
    out = prompt_inputs(with_images, 0, ("<IMG_CONTEXT>", "<image>"))
    assert out[0] == {"prompt": "<image>Q?", "multi_modal_data": {"image": [image]}}
    assert out[1] == {"prompt": "Q2"}
    missing = PromptBatch(input_ids=ids, attention_mask=mask, vision={"pixel_values": torch.zeros(1)},
                          records=[{"id": "a"}, {"id": "b"}])
    with pytest.raises(ValueError, match="prompt_text"):
        prompt_inputs(missing, 0)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_setup_without_vllm_says_how_to_install(tiny):
    _, model, processor = tiny
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        VLLMRolloutEngine().setup(model, processor, torch.device("cpu"), 0)


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_rollout_end_to_end_cuda(tiny):
    """Sample with vLLM on the tiny model, push weights, and compare sampler and trainer log-probs."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from datamodules.prompting import PromptCollator
    from datamodules.types import PromptRecord
    from modules.policy import response_hidden, token_logprobs

    _, model, processor = tiny
    model = model.cuda()
    collator = PromptCollator(processor)
    recs = [PromptRecord(id="q1", question="What is 2+3?", answer="5")]
    batch = collator(recs)
    batch.records[0]["prompt_text"] = collator.prompt_text(recs[0])[0]
    batch = batch.to("cuda")
    engine = VLLMRolloutEngine(gpu_memory_utilization=0.2, max_new_tokens=16, dtype="float32")
    engine.setup(model, processor, torch.device("cuda"), seed=0)
    out = engine.generate(model, batch, group_size=4)
    assert out.response_ids.shape[0] == 4 and out.logprobs.shape == out.response_ids.shape
    with torch.no_grad():
        hidden = response_hidden(model, batch, out.response_ids, out.response_mask, 4)
        logp, _ = token_logprobs(model, hidden, out.response_ids)
    _, diff = tis_weights(logp, out.logprobs, out.response_mask, 2.0)
    assert diff < 0.05
    engine.sync_weights(model)
    engine.generate(model, batch, group_size=2)
