"""The FSDP2 sharding policy's pure parts (the 2-process runs are in tests/integration/test_sharded*.py)."""

from __future__ import annotations

import pytest
import torch

from modules.sharding import (
    FSDP2Sharding,
    FSDP2Strategy,
    check_shardable,
    full_parameters,
    is_sharded,
    rank_state,
    shard_units,
)
from modules.tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_units_are_the_decoder_and_vision_layers(tiny_model_dir, family):
    from modules.loading import load_vlm

    model, _ = load_vlm(tiny_model_dir(family))
    units = shard_units(model)
    lm = list(model.model.language_model.layers)
    assert all(any(u is layer for u in units) for layer in lm)
    vision = [u for u in units if u not in lm]
    assert len(vision) == 2 and all("Decoder" not in type(u).__name__ for u in vision)  # tiny: 2 vision layers
    assert all(isinstance(u, torch.nn.Module) for u in units) and len(set(map(id, units))) == len(units)
    check_shardable(model)
    assert not is_sharded(model)


def test_tied_head_is_refused_with_advice(tiny_model_dir):
    from modules.loading import load_vlm

    model, _ = load_vlm(tiny_model_dir("internvl"))
    model.lm_head.weight = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tie_word_embeddings.*DDP"):
        check_shardable(model)


def test_full_parameters_of_an_unsharded_model_and_a_name_filter(tiny_model_dir):
    from modules.loading import load_vlm

    model, _ = load_vlm(tiny_model_dir("internvl"))
    named = dict(model.named_parameters())
    got = dict(full_parameters(model))
    assert got.keys() == named.keys() and all(torch.equal(got[k], named[k]) for k in got)
    assert not any(t.requires_grad for t in got.values())
    head = dict(full_parameters(model, {"lm_head.weight"}))
    assert list(head) == ["lm_head.weight"]


def test_rank_state_picks_own_entry_or_falls_back():
    ckpt = {"rollout_engine": "r0", "rollout_engine_ranks": ["r0", "r1"]}
    assert rank_state(ckpt, "rollout_engine", 1, 2) == "r1"
    assert rank_state(ckpt, "rollout_engine", 0, 4) == "r0"  # written by another world size: the shared entry
    assert rank_state({"rollout_engine": "x"}, "rollout_engine", 1, 2) == "x"


def test_strategy_defaults_shard_over_every_rank():
    s = FSDP2Strategy()
    assert s._data_parallel_size == "auto" and s._tensor_parallel_size == 1
    s.num_nodes, s.parallel_devices = 4, [torch.device("cpu")] * 8  # what the accelerator connector sets
    s._setup_distributed = lambda: None  # no process group here: only the size arithmetic is checked
    try:
        s.setup_environment()
    except Exception:  # the mesh needs a process group; the sizes are set before it is built
        pass
    assert s._data_parallel_size == 32


def test_sharding_options_build_fsdp2_policies():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kw = FSDP2Sharding(cpu_offload=True, param_dtype="bfloat16")._kwargs(mesh=None)
    assert isinstance(kw["offload_policy"], CPUOffloadPolicy)
    assert isinstance(kw["mp_policy"], MixedPrecisionPolicy) and kw["mp_policy"].param_dtype == torch.bfloat16
    assert kw["mp_policy"].reduce_dtype == torch.float32 and kw["reshard_after_forward"] is True
    assert "mp_policy" not in FSDP2Sharding()._kwargs(mesh=None)
