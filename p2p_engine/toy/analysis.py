"""Procedural analysis of an image of shapes: background, largest blob, its colour, shape and mask.

Used by the quality tests to judge generated images against their captions; pure numpy.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .dataset import BACKGROUNDS, COLORS


@dataclass(frozen=True)
class Blob:
    mask: np.ndarray  # (H, W) bool
    color: str  # nearest named colour of the mean
    mean_rgb: tuple[float, float, float]
    shape: str  # "circle", "square" or "triangle"
    fill: float  # area / bbox area


def background_colors(image: np.ndarray) -> list[np.ndarray]:
    """Background estimate: the border's dominant colour, plus a second one for two-tone backgrounds.

    The border is split into left and right halves (the dataset's two tones split that way); each half's
    median is a candidate and both are kept when they differ.
    """
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    left = np.concatenate([img[0, : w // 2], img[-1, : w // 2], img[:, 0]])
    right = np.concatenate([img[0, w // 2:], img[-1, w // 2:], img[:, -1]])
    a, b = np.median(left, 0), np.median(right, 0)
    return [a] if np.abs(a - b).max() < 40 else [a, b]


def foreground_mask(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels farther than `threshold` (RGB distance) from every background colour."""
    img = image.astype(np.float64)
    d = np.stack([np.linalg.norm(img - c, axis=-1) for c in background_colors(image)]).min(0)
    return d > threshold


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, largest first, each as an (H, W) bool mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if labels[r0, c0]:
            continue
        k = len(out) + 1
        labels[r0, c0] = k
        q = deque([(r0, c0)])
        while q:
            r, c = q.popleft()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = k
                    q.append((rr, cc))
        out.append(labels == k)
    return sorted(out, key=lambda m: -int(m.sum()))


def nearest_color(rgb) -> str:
    names = list(COLORS)
    d = [np.linalg.norm(np.asarray(rgb, np.float64) - COLORS[n]) for n in names]
    return names[int(np.argmin(d))]


def nearest_background(rgb) -> str:
    names = list(BACKGROUNDS)
    d = [np.linalg.norm(np.asarray(rgb, np.float64) - BACKGROUNDS[n]) for n in names]
    return names[int(np.argmin(d))]


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape class from the fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2."""
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(mask.sum() / box)
    if fill > 0.9:
        return "square", fill
    if fill > 0.64:
        return "circle", fill
    return "triangle", fill


def largest_blob(image: np.ndarray, min_pixels: int = 12) -> Blob | None:
    """The largest non-background blob of an (H, W, 3) uint8 image, or None if there is none."""
    comps = [m for m in components(foreground_mask(image)) if m.sum() >= min_pixels]
    if not comps:
        return None
    m = comps[0]
    mean = image[m].astype(np.float64).mean(0)
    shape, fill = classify_shape(m)
    return Blob(m, nearest_color(mean), tuple(float(v) for v in mean), shape, fill)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def grid_cells(mask: np.ndarray, res: int, over: float = 0.5) -> np.ndarray:
    """A pixel mask averaged onto a res x res grid: the cells more than `over` covered (res, res) bool."""
    h, w = mask.shape
    return mask.reshape(res, h // res, res, w // res).mean(axis=(1, 3)) > over
