"""Procedural scenes of coloured shapes with captions: the toy model's training data.

Every scene is a pure function of (seed, index), so any number of samples can be drawn, in any
order, and the same call always gives the same pixels. Shapes are rasterised without anti-aliasing
and never touch, so the ground-truth masks are exact and the analysis can be checked against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

# Fixed RGB values: far apart from each other and from the backgrounds so nearest-colour matching is robust.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Half-extent in pixels of a shape's bounding box at 64 x 64 (scaled with the image size).
SIZES = {"small": 7, "big": 14}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    center: tuple[int, int]  # (row, col) in pixels
    mask: np.ndarray  # (H, W) bool

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1), end-exclusive."""
        rows, cols = np.nonzero(self.mask)
        return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[Obj, ...]  # largest area first, in caption order
    background: tuple[str, ...]  # one name, or two for a two-tone (left/right) background
    caption: str


def shape_mask(shape: str, center: tuple[int, int], half: int, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape with bounding box of side 2*half centred at `center`."""
    r, c = center
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    dy, dx = yy - r, xx - c
    if shape == "circle":
        return dy * dy + dx * dx <= half * half
    if shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":
        # Apex up, base at the bottom of the box: half the box's area.
        inside_y = (dy >= -half) & (dy <= half)
        t = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
        return inside_y & (np.abs(dx) <= t * half)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def caption_for(objects, background: tuple[str, ...]) -> str:
    bg = background[0] if len(background) == 1 else f"{background[0]} and {background[1]}"
    return " and ".join(o.phrase for o in objects) + f" on a {bg} background"


def make_scene(seed: int, index: int, size: int = IMAGE_SIZE, max_objects: int = 3,
               two_tone_prob: float = 0.2) -> Scene:
    """The scene number `index` of the stream `seed`: one to `max_objects` non-touching shapes."""
    rng = np.random.default_rng([seed, index])
    scale = size / 64
    bg_names = list(BACKGROUNDS)
    if rng.random() < two_tone_prob:
        a, b = rng.choice(len(bg_names), 2, replace=False)
        background = (bg_names[a], bg_names[b])
    else:
        background = (bg_names[rng.integers(len(bg_names))],)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[background[0]]
    if len(background) == 2:
        image[:, size // 2:] = BACKGROUNDS[background[1]]

    n = int(rng.integers(1, max_objects + 1))
    sizes = sorted((["small", "big"][rng.integers(2)] for _ in range(n)), key=lambda s: s != "big")
    objects: list[Obj] = []
    occupied = np.zeros((size, size), bool)
    for sz in sizes:
        half = max(2, round(SIZES[sz] * scale))
        for _ in range(50):  # rejection sampling; a shape that cannot be placed is dropped
            r = int(rng.integers(half + 1, size - half - 1))
            c = int(rng.integers(half + 1, size - half - 1))
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            m = shape_mask(shape, (r, c), half, size)
            grown = _dilate(m, max(2, round(2 * scale)))  # a gap so components never merge
            if not (grown & occupied).any():
                occupied |= grown
                image[m] = COLORS[color]
                objects.append(Obj(shape, color, sz, (r, c), m))
                break
    # Caption order = area order, so "the largest blob" is the first object named (ties: equal areas).
    objects.sort(key=lambda o: -int(o.mask.sum()))
    return Scene(image, tuple(objects), background, caption_for(objects, background))


def _dilate(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def make_batch(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Images (count, H, W, 3) uint8 and captions of scenes start .. start+count-1."""
    scenes = [make_scene(seed, i, size) for i in range(start, start + count)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]
