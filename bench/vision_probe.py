"""Does each image token carry what is in its cell? `python -m bench.vision_probe MODEL [MODEL ...]`.

A diagnostic for the embedded default (README, "Recipe evidence"): the synthetic images are grids of 28-px cells
with at most one shape each, and the tiny InternVL turns each cell into one projected image token. For every
image of the synthetic held-out split this takes the projected tokens (vision tower -> pixel shuffle ->
connector) and the cell contents from the row's `meta`, fits a linear probe (softmax regression) for the cell's
colour and for its shape on 75% of the tokens, and prints its accuracy on the other 25%. Accuracy near 1 means
the tokens carry the cells' contents and the remaining errors are the language model's reading of them; a
probe on shuffled cells (the same tokens, labels from a random other cell) gives the chance level to compare.
A third and fourth probe read each token's row and column (its place in the grid; chance is 1/4): they show
whether a token also says *where* its cell is, or whether the language model has to work that out from the
token's position in the sequence. (transformers initialises InternViT's absolute position embeddings to zeros,
OpenGVLab's reference code to N(0, 1): the embedded default's tokens start with no position at all.)
InternVL-family models only (their `get_image_features` returns one token per 2x2 patches).
"""

from __future__ import annotations

import argparse
import glob
import io
import json

import numpy as np
import torch
from PIL import Image

from datamodules.scenes import COLOURS, SHAPES

COLOUR_IDS = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0 = empty cell
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
GRID = 4  # the embedded default's 112-px images of 28-px cells (app.make_data's defaults)


def cell_labels(objs: list[dict], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """[grid*grid] colour and shape ids of each cell in reading order (0 = empty), from a scene's meta."""
    colour, shape = np.zeros(grid * grid, np.int64), np.zeros(grid * grid, np.int64)
    for o in objs:
        colour[o["row"] * grid + o["col"]] = COLOUR_IDS[o["colour"]]
        shape[o["row"] * grid + o["col"]] = SHAPE_IDS[o["shape"]]
    return colour, shape


@torch.no_grad()
def image_tokens(model, processor, rows: list[dict], grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected image tokens [N*grid*grid, D] of every image in `rows`, with colour and shape ids [N*grid*grid]."""
    feats, colours, shapes = [], [], []
    for row in rows:
        scenes = json.loads(row["meta"])["images"]
        for img, objs in zip(row["images"], scenes, strict=True):
            pixels = processor.image_processor(images=[Image.open(io.BytesIO(img["bytes"])).convert("RGB")],
                                               return_tensors="pt")["pixel_values"]
            out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                 vision_feature_select_strategy="default")
            tokens = out.pooler_output.reshape(-1, out.pooler_output.shape[-1])  # [grid*grid, D]
            if tokens.shape[0] != grid * grid:
                raise ValueError(f"{tokens.shape[0]} image tokens for a {grid}x{grid} grid: not one token per cell")
            c, s = cell_labels(objs, grid)
            feats.append(tokens.float())
            colours.append(torch.from_numpy(c))
            shapes.append(torch.from_numpy(s))
    return torch.cat(feats), torch.cat(colours), torch.cat(shapes)


def grid_positions(n_tokens: int, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column [n_tokens] of each token, for images of grid*grid tokens each in reading order."""
    if n_tokens % (grid * grid):
        raise ValueError(f"{n_tokens} tokens is not a whole number of {grid}x{grid} images")
    cell = torch.arange(n_tokens) % (grid * grid)
    return cell // grid, cell % grid


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train_frac: float = 0.75, steps: int = 300,
                   seed: int = 0) -> float:
    """Held-out accuracy of a softmax-regression probe x [N, D] -> y [N] trained on the first `train_frac`."""
    n = int(len(x) * train_frac)
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=gen)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(x[:n]), y[:n]).backward()
            opt.step()
    with torch.no_grad():
        return float((lin(x[n:]).argmax(-1) == y[n:]).float().mean())


def probe(model_dir: str, data: str, images: int, seed: int = 0) -> dict:
    """Colour and shape probe accuracies, the same on cell-shuffled labels (chance to compare), and row and column
    probe accuracies (chance 1/GRID)."""
    from datamodules.row_io import read_rows
    from modules.loading import load_vlm

    files = sorted(glob.glob(data))
    if not files:
        raise FileNotFoundError(f"no files match {data!r} (make one with `python -m app.make_data artifacts/data`)")
    rows: list[dict] = []
    n_images = 0
    # only the rows that hold the first `images` images are read (lazily, file by file) and go through the model
    for row in (raw for f in files for _, raw in read_rows(f)):
        if n_images >= images:
            break
        rows.append(row)
        n_images += len(row["images"])
    model, processor = load_vlm(model_dir)
    model.eval()
    x, colour, shape = image_tokens(model, processor, rows, GRID)
    keep = images * GRID * GRID  # the last row may hold one image more than asked for
    x, colour, shape = x[:keep], colour[:keep], shape[:keep]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    row, col = grid_positions(len(x), GRID)
    return {"model": model_dir, "tokens": len(x),
            "colour": probe_accuracy(x, colour, seed=seed), "shape": probe_accuracy(x, shape, seed=seed),
            "colour_shuffled": probe_accuracy(x, colour[perm], seed=seed),
            "shape_shuffled": probe_accuracy(x, shape[perm], seed=seed),
            "row": probe_accuracy(x, row, seed=seed), "column": probe_accuracy(x, col, seed=seed)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.vision_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="exported model folders (e.g. artifacts/tiny-vlm runs/demo/sft/export)")
    ap.add_argument("--data", default="artifacts/data/validation-*.parquet", help="synthetic files with `meta`")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for m in a.models:
        r = probe(m, a.data, a.images)
        print(f"{m}: {r['tokens']} tokens; colour {r['colour']:.3f} (shuffled cells {r['colour_shuffled']:.3f}), "
              f"shape {r['shape']:.3f} (shuffled cells {r['shape_shuffled']:.3f}); "
              f"row {r['row']:.3f}, column {r['column']:.3f} (chance {1 / GRID:.2f})", flush=True)


if __name__ == "__main__":
    main()
