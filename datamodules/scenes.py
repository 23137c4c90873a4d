"""Scenes of grid-aligned shapes: the objects, what to count, sampling a scene and rendering it to a PNG.

An image is a square grid of `cell`-px cells on white; each cell holds at most one shape (circle, square or
triangle in one of four saturated colours) whose centre is jittered by up to `MAX_JITTER` px. `sample_scene`
places the counted groups and distractors with a numpy Generator; `render_image` draws without anti-aliasing and
`encode_png` writes fixed-setting PNG bytes, so the same seed gives the same bytes. The tasks, traces and items
built on these scenes are in `datamodules.synthetic`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 190, 0),
}  # fmt: skip
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_FRACTION = 0.64  # shape side / cell side: 18 px in a 28 px cell leaves room for the ±2 px jitter
MAX_JITTER = 2


@dataclass(frozen=True)
class Obj:
    """One drawn shape: colour, shape, grid cell (0-based row/col) and pixel jitter of its centre."""

    colour: str
    shape: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Query:
    """What to count: a colour, a shape, or both (a conjunction). At least one is set."""

    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: Obj) -> bool:
        return (self.colour is None or obj.colour == self.colour) and (
            self.shape is None or obj.shape == self.shape
        )

    def noun(self, plural: bool = True) -> str:
        """'red shapes', 'circles', 'red circles' (or the singular)."""
        base = self.shape or "shape"
        base = base + "s" if plural else base
        return f"{self.colour} {base}" if self.colour else base


# ----------------------------------------------------------------------------------------------- sampling helpers
def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def randint(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def sample_query(rng: np.random.Generator, colour: bool, shape: bool, avoid: Query | None = None) -> Query:
    """A random query; with `avoid`, its set attributes differ from avoid's so the two groups are disjoint."""
    colours = [c for c in COLOURS if avoid is None or c != avoid.colour]
    shapes = [s for s in SHAPES if avoid is None or s != avoid.shape]
    return Query(pick(rng, colours) if colour else None, pick(rng, shapes) if shape else None)


def sample_scene(
    rng: np.random.Generator, groups: list[tuple[Query, int]], distractors: tuple[int, int], grid: int
) -> list[Obj]:
    """Place `count` objects for each (query, count) plus distractors matching no query, one per cell.

    Returns the objects in reading order (row, then column).
    """
    wanted = sum(k for _, k in groups)
    n_extra = min(randint(rng, distractors), grid * grid - wanted)
    cells = rng.permutation(grid * grid)[: wanted + n_extra]
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    others = [(c, s) for c, s in combos if not any(q.matches(Obj(c, s, 0, 0)) for q, _ in groups)]
    kinds: list[tuple[str, str]] = []
    for q, k in groups:
        for _ in range(k):
            kinds.append((q.colour or pick(rng, list(COLOURS)), q.shape or pick(rng, SHAPES)))
    kinds += [pick(rng, others) for _ in range(n_extra)]
    objs = []
    for (colour, shape), cell in zip(kinds, cells, strict=True):
        dx, dy = (int(v) for v in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
        objs.append(Obj(colour, shape, int(cell) // grid, int(cell) % grid, dx, dy))
    return sorted(objs, key=lambda o: (o.row, o.col))


def render_image(objs: list[Obj], image_size: int, cell: int) -> Image.Image:
    """Draw the objects on a white RGB canvas (no anti-aliasing, so pixels are deterministic)."""
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    grid = image_size // cell
    offset = (image_size - grid * cell) // 2
    half = round(cell * SHAPE_FRACTION) // 2
    for o in objs:
        cx = offset + o.col * cell + cell // 2 + o.dx
        cy = offset + o.row * cell + cell // 2 + o.dy
        box = [cx - half, cy - half, cx + half, cy + half]
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes with fixed settings and no metadata chunks: same pixels give the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
