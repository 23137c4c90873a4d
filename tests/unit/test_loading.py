"""The loader on real tiny checkpoints of each family: forward/backward with images, per-part training, round trip.

Trainable counts are checked against counts computed here from parameter names (the module paths listed in
`modules.loading`'s docstring), not from `part_modules`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.prompting import PromptCollator
from datamodules.types import PromptRecord
from modules.loading import PARTS, ModelLoadError, load_vlm, parts_table, set_trainable_parts
from modules.tiny import FAMILIES, make_tiny


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8))


def batch_for(processor, seeds: list[list[int]]):
    """A left-padded RL batch, one prompt per entry of `seeds`, with one noise image per seed."""
    recs = [PromptRecord(id=str(i), question=" ".join(["<image>"] * len(s)) + " How many squares?", answer="1",
                         images=[noise_image(x) for x in s]) for i, s in enumerate(seeds)]
    return PromptCollator(processor, mode="rl")(recs)


def part_of(family: str, name: str) -> str:
    """Which role a parameter name belongs to, from the module paths alone."""
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.language_model."):
        return "language_model"
    if family == "qwen2_5_vl":
        if name.startswith("model.visual.merger."):
            return "connector"
        if name.startswith("model.visual."):
            return "vision"
    else:
        if name.startswith("model.multi_modal_projector."):
            return "connector"
        if name.startswith("model.vision_tower."):
            return "vision"
    raise AssertionError(f"{family}: parameter {name} is in no part")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_vlm(tiny_model_dir(family))
        model, processor = cache[family]
        model.zero_grad(set_to_none=True)
        model.eval()
        return model, processor

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_with_one_and_two_images(loaded, family):
    model, processor = loaded(family)
    set_trainable_parts(model, list(PARTS))
    batch = batch_for(processor, [[1], [2, 3]])
    assert batch.input_ids.shape[0] == 2
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision)
    assert out.logits.shape == (*batch.input_ids.shape, model.lm_head.out_features)
    assert torch.isfinite(out.logits).all()

    last = out.logits[:, -1].float().log_softmax(-1)
    loss = -last[:, processor.tokenizer.eos_token_id].mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for part in PARTS:
        got = [g for n, g in grads.items() if part_of(family, n) == part]
        assert got and all(torch.isfinite(g).all() for g in got), part
        assert max(g.abs().max().item() for g in got) > 0, f"{family}: no gradient reaches {part}"

    # The images are read: another image in the 2-image prompt changes its logits, not the other prompt's.
    other = batch_for(processor, [[1], [2, 4]])
    with torch.no_grad():
        logits2 = model(input_ids=other.input_ids, attention_mask=other.attention_mask, **other.vision).logits
    torch.testing.assert_close(logits2[0, -1], out.logits[0, -1].detach(), atol=1e-5, rtol=1e-5)
    assert (logits2[1, -1] - out.logits[1, -1].detach()).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("trainable", [["connector"], ["vision", "connector"], ["language_model", "lm_head"],
                                       list(PARTS)])
def test_trainable_parameter_counts(loaded, family, trainable):
    model, _ = loaded(family)
    rows = set_trainable_parts(model, trainable)

    expected = {part: 0 for part in PARTS}
    for name, p in model.named_parameters():
        expected[part_of(family, name)] += p.numel()
    assert all(expected[part] > 0 for part in PARTS)
    assert [r[0] for r in rows] == list(PARTS)
    assert {r[0]: r[1] for r in rows} == expected
    assert {r[0] for r in rows if r[2]} == set(trainable)

    trainable_now = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_now == sum(expected[part] for part in trainable)
    for name, p in model.named_parameters():
        assert p.requires_grad == (part_of(family, name) in trainable), name
    assert f"{trainable_now:,} trainable" in parts_table(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_gives_the_same_logits(loaded, family, tmp_path):
    model, processor = loaded(family)
    batch = batch_for(processor, [[5], [6, 7]])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = load_vlm(tmp_path)
    batch2 = batch_for(reprocessor, [[5], [6, 7]])
    assert torch.equal(batch.input_ids, batch2.input_ids)
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision).logits
        b = reloaded(input_ids=batch2.input_ids, attention_mask=batch2.attention_mask, **batch2.vision).logits
    assert (a - b).abs().max() <= 1e-6


def test_make_tiny_is_deterministic(tiny_model_dir, tmp_path):
    first = tiny_model_dir("qwen2_5_vl")
    again = make_tiny(tmp_path / "again", "qwen2_5_vl", seed=0)
    other = make_tiny(tmp_path / "other", "qwen2_5_vl", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_missing_folder_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="no such folder") as err:
        load_vlm(missing)
    assert str(missing) in str(err.value) and "make_tiny" in str(err.value)


def test_hub_id_is_refused_with_a_download_hint():
    with pytest.raises(ModelLoadError) as err:
        load_vlm("OpenGVLab/InternVL3-1B")
    msg = str(err.value)
    assert "OpenGVLab/InternVL3-1B" in msg and "hub id" in msg and "--local-dir" in msg


def test_text_only_folder_is_not_a_vlm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(ModelLoadError) as err:
        load_vlm(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "'qwen2'" in msg and "vision_config" in msg


def test_folder_without_config_and_file_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        load_vlm(tmp_path)
    assert str(tmp_path) in str(err.value)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_vlm(f)


def test_unknown_dtype_lists_the_valid_ones(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="dtype 'float8'.*float32.*bfloat16"):
        load_vlm(tiny_model_dir("llava"), dtype="float8")


def test_unknown_or_empty_part_names_the_valid_parts(loaded):
    model, _ = loaded("internvl")
    with pytest.raises(ValueError) as err:
        set_trainable_parts(model, ["connector", "projector"])
    msg = str(err.value)
    assert "'projector'" in msg and all(part in msg for part in PARTS)
    with pytest.raises(ValueError, match="empty"):
        set_trainable_parts(model, [])
