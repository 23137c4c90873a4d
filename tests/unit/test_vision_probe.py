"""bench.vision_probe: cell labels from a scene's meta, and a probe on a real tiny InternVL's image tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.vision_probe import (
    COLOUR_IDS,
    SHAPE_IDS,
    cell_labels,
    grid_positions,
    image_tokens,
    probe_accuracy,
)
from datamodules.synthetic import generate_items
from modules.loading import load_vlm


def test_cell_labels_reading_order():
    objs = [{"row": 0, "col": 1, "colour": "red", "shape": "square"},
            {"row": 3, "col": 3, "colour": "blue", "shape": "circle"}]
    colour, shape = cell_labels(objs, 4)
    want_c, want_s = np.zeros(16, np.int64), np.zeros(16, np.int64)
    want_c[1], want_s[1] = COLOUR_IDS["red"], SHAPE_IDS["square"]
    want_c[15], want_s[15] = COLOUR_IDS["blue"], SHAPE_IDS["circle"]
    assert (colour == want_c).all() and (shape == want_s).all()
    assert 0 not in COLOUR_IDS.values() and 0 not in SHAPE_IDS.values()  # 0 is kept for empty cells


def test_probe_on_separable_and_random_labels():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=gen)
    x = torch.nn.functional.one_hot(y, 3).float() + 0.05 * torch.randn(400, 3, generator=gen)
    assert probe_accuracy(x, y) > 0.95
    assert probe_accuracy(torch.randn(400, 3, generator=gen), y) < 0.6  # noise: near chance (1/3)


def test_tiny_internvl_tokens_carry_their_cells(tiny_model_dir):
    model, processor = load_vlm(tiny_model_dir("internvl"))
    rows = list(generate_items(40, seed=0, split="validation"))
    x, colour, shape = image_tokens(model, processor, rows)
    n_images = sum(len(json.loads(r["meta"])["images"]) for r in rows)
    assert x.shape[0] == colour.shape[0] == shape.shape[0] == 16 * n_images
    assert ((colour == 0) == (shape == 0)).all()  # a cell is empty for both labels or for neither
    acc = probe_accuracy(x, colour)
    shuffled = probe_accuracy(x, colour[torch.randperm(len(colour), generator=torch.Generator().manual_seed(0))])
    assert acc > 0.9, acc  # even random-init tokens carry their cell's colour (README, "Recipe evidence")
    assert acc > shuffled + 0.2, (acc, shuffled)  # and it is the cell's own colour, not the empty-cell majority


def test_grid_positions():
    row, col = grid_positions(32, 4)  # two 4x4 images
    assert row.tolist() == [r for _ in range(2) for r in range(4) for _ in range(4)]
    assert col.tolist() == [c for _ in range(2) for _ in range(4) for c in range(4)]
    with pytest.raises(ValueError, match="not a whole number of 4x4 images"):
        grid_positions(20, 4)


def test_row_probe_sees_position_embeddings(tiny_model_dir):
    """The tiny InternVL's position embeddings start at zero (transformers' init): its tokens do not say which row
    they are in. Drawn at random (InternViT's reference code uses N(0, 1); N(0, 0.1^2) leaves content the larger
    part of each token), they do, and the probe must tell the two apart."""
    model, processor = load_vlm(tiny_model_dir("internvl"))
    rows = list(generate_items(30, seed=0, split="validation"))
    pos = model.model.vision_tower.embeddings.position_embeddings
    assert float(pos.abs().max()) == 0.0
    x, _, _ = image_tokens(model, processor, rows)
    row, _ = grid_positions(len(x))
    blind = probe_accuracy(x, row)
    with torch.no_grad():
        pos.copy_(0.1 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(0)))
    x, _, _ = image_tokens(model, processor, rows)
    seeing = probe_accuracy(x, row)
    assert blind < 0.45, blind  # chance is 0.25
    assert seeing > 0.9, seeing
