"""A toy PIE-Bench: the benchmark's format, built from held-out procedural scenes with exact masks.

    python -m p2p_engine.toy.pie OUT [--per-type 12] [--seed 31337]

writes OUT/mapping_file.json and OUT/annotation_images/<type folder>/<n>.png in PIE-Bench's schema (the
same keys, prompts with the edited words in [brackets], run-length masks over the image's own 64 x 64 grid)
and a marker, OUT/toy_pie.json, by which `p2p-engine pie-metrics` adds the edit-success measure below. Five
kinds of edit, `--per-type` of each, filed under PIE's edit type ids where the kind matches:

    6  change attribute color     the only object's colour               mask: the object
    1  change object              the only object's shape                mask: both shapes
    4  change attribute content   the only object's size, big to small   mask: the big shape
    8  change background          one tone for another (Replace) or      mask: the background
                                  for two (Refine: "white and gray")
    0  random editing             the colour of one object among two     mask: that object

Edit success (`edit_success`) reads the edited image where the mask says the edit is (grown by 2 pixels
for shifts): the largest foreground blob there has the target colour, shape or size, or the border shows
the target background; it is checked on the dataset's own renders of every source and target in
tests/test_toy_pie.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pie import mask_decode, mask_encode
from .analysis import background_colors, classify_shape, components, foreground_mask, nearest_background, \
    nearest_color
from .dataset import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, SIZES, Obj, _dilate, caption_for, shape_mask

SEED = 31337  # a stream neither the training (its own seeds) nor the evaluation (12345) draws
MARKER = "toy_pie.json"
KINDS = {"6": "6_change_attribute_color", "1": "1_change_object", "4": "4_change_attribute_content",
         "8": "8_change_background", "0": "0_random_two_objects"}


@dataclass
class Pair:
    entry: dict  # the mapping_file.json entry
    source: np.ndarray  # (64, 64, 3) uint8
    target: np.ndarray  # the dataset's own render of the edit's target
    mask: np.ndarray  # (64, 64) bool, the edited region the entry's run-length mask encodes


def _render(objects: list[Obj], background: tuple[str, ...]) -> np.ndarray:
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUNDS[background[0]]
    if len(background) == 2:
        image[:, IMAGE_SIZE // 2:] = BACKGROUNDS[background[1]]
    for o in objects:
        image[o.mask] = COLORS[o.color]
    return image


def _obj(shape: str, color: str, size: str, center) -> Obj:
    return Obj(shape, color, size, center, shape_mask(shape, center, SIZES[size], IMAGE_SIZE))


def _place(rng, size: str, occupied: np.ndarray):
    half = SIZES[size]
    lo, hi = half + 1, IMAGE_SIZE - half - 1
    for _ in range(200):
        center = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
        grown = _dilate(shape_mask("square", center, half, IMAGE_SIZE), 2)
        if not (grown & occupied).any():
            return center, grown
    raise RuntimeError("no room for another shape")


def _bracketed(source: str, target: str) -> str:
    """The target prompt with the words that differ from the source in [brackets] (PIE's editing_prompt)."""
    s, t = source.split(" "), target.split(" ")
    if len(s) == len(t):
        return " ".join(f"[{b}]" if a != b else b for a, b in zip(s, t))
    i = next(k for k in range(min(len(s), len(t))) if s[k] != t[k])  # an insertion: bracket what is new
    added = len(t) - len(s)
    return " ".join(t[:i] + ["[" + " ".join(t[i:i + added]) + "]"] + t[i + added:])


def make_pairs(per_type: int = 12, seed: int = SEED) -> list[Pair]:
    """`per_type` edits of each kind (module docstring), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    pairs = []
    for type_id, folder in KINDS.items():
        for n in range(per_type):
            bg = (backgrounds[int(rng.integers(len(backgrounds)))],)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = colors[int(rng.integers(len(colors)))]
            occupied = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
            center, grown = _place(rng, "big", occupied)
            src = [_obj(shape, color, "big", center)]
            tgt_bg = bg
            if type_id == "6":
                new = [c for c in colors if c != color][int(rng.integers(len(colors) - 1))]
                tgt, blended = [_obj(shape, new, "big", center)], f"{shape} {shape}"
                instruction = f"change the color of the {shape} to {new}"
            elif type_id == "1":
                new = [s for s in SHAPES if s != shape][int(rng.integers(len(SHAPES) - 1))]
                tgt, blended = [_obj(new, color, "big", center)], f"{shape} {new}"
                instruction = f"change the {shape} into a {new}"
            elif type_id == "4":
                tgt, blended = [_obj(shape, color, "small", center)], f"{shape} {shape}"
                instruction = f"make the {shape} small"
            elif type_id == "8":
                others = [b for b in backgrounds if b != bg[0]]
                other = others[int(rng.integers(len(others)))]
                tgt_bg = (other,) if n % 2 == 0 else (bg[0], other)
                tgt, blended = src, ""
                instruction = f"change the background to {' and '.join(tgt_bg)}"
            else:  # a second, small object of another shape changes colour
                occupied |= grown
                center2, _ = _place(rng, "small", occupied)
                shape2 = [s for s in SHAPES if s != shape][int(rng.integers(len(SHAPES) - 1))]
                color2 = colors[int(rng.integers(len(colors)))]
                new = [c for c in colors if c != color2][int(rng.integers(len(colors) - 1))]
                src = src + [_obj(shape2, color2, "small", center2)]
                tgt, blended = [src[0], _obj(shape2, new, "small", center2)], f"{shape2} {shape2}"
                instruction = f"change the color of the small {shape2} to {new}"
            if type_id == "8":
                mask = ~np.logical_or.reduce([o.mask for o in src])
            else:
                changed = [k for k, (a, b) in enumerate(zip(src, tgt)) if a.phrase != b.phrase]
                mask = np.logical_or.reduce([src[k].mask | tgt[k].mask for k in changed])
            source_caption, target_caption = caption_for(src, bg), caption_for(tgt, tgt_bg)
            entry = {"image_path": f"{folder}/{n:03d}.png", "original_prompt": source_caption,
                     "editing_prompt": _bracketed(source_caption, target_caption),
                     "editing_instruction": instruction, "editing_type_id": type_id, "blended_word": blended,
                     "mask": mask_encode(mask)}
            pairs.append(Pair(entry, _render(src, bg), _render(tgt, tgt_bg), mask))
    return pairs


def write(out, per_type: int = 12, seed: int = SEED) -> Path:
    """The toy PIE folder (module docstring); written whole or not at all."""
    from PIL import Image

    from ..files import atomic_folder, write_json
    from ..images import save_image_atomic
    from ..pie import IMAGE_FOLDER, MAPPING_FILE

    pairs = make_pairs(per_type, seed)
    out = Path(out)
    with atomic_folder(out) as tmp:
        for p in pairs:
            save_image_atomic(Image.fromarray(p.source), tmp / IMAGE_FOLDER / p.entry["image_path"])
        write_json(tmp / MAPPING_FILE, {f"{k:06d}": p.entry for k, p in enumerate(pairs)})
        write_json(tmp / MARKER, {"generator": "p2p_engine.toy.pie", "per_type": per_type, "seed": seed})
    return out


# -- edit success ------------------------------------------------------------------------------------

def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], tuple[str, ...]]:
    """'a big red circle and a small blue square on a white and gray background' ->
    ([("big", "red", "circle"), ("small", "blue", "square")], ("white", "gray"))."""
    objects, _, rest = caption.partition(" on a ")
    background = tuple(rest.removesuffix(" background").split(" and "))
    phrases = [p.split(" ") for p in objects.split(" and ")]
    return [(p[1], p[2], p[3]) for p in phrases], background


def _blob(image: np.ndarray, region: np.ndarray) -> np.ndarray | None:
    """The largest foreground component of `image` inside `region`, or None."""
    comps = [c for c in components(foreground_mask(image) & region) if c.sum() >= 6]
    return comps[0] if comps else None


def edit_success(entry, source: np.ndarray, edited: np.ndarray) -> float:
    """1.0 when the edited image shows the target's attribute where the mask says the edit is, else 0.0.
    `entry` is a `pie.Entry` of a toy PIE folder; `source` is unused (the signature of metrics.evaluate's extras)."""
    src_objects, src_bg = parse_caption(entry.source)
    tgt_objects, tgt_bg = parse_caption(entry.target)
    if tgt_bg != src_bg:
        found = [nearest_background(c) for c in background_colors(edited)]
        return float(found[0] == tgt_bg[0] and found[-1] == tgt_bg[-1])
    (k,) = [i for i, (a, b) in enumerate(zip(src_objects, tgt_objects)) if a != b]
    mask = mask_decode(entry.mask, edited.shape[:2]).astype(bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = False  # the decoder's border is not the object
    blob = _blob(edited, _dilate(mask, 2))
    if blob is None:
        return 0.0
    size, color, shape = tgt_objects[k]
    old_size, old_color, old_shape = src_objects[k]
    if color != old_color:
        return float(nearest_color(edited[blob].astype(np.float64).mean(0)) == color)
    if shape != old_shape:
        return float(classify_shape(blob)[0] == shape)
    areas = {s: shape_mask(shape, (32, 32), SIZES[s], IMAGE_SIZE).sum() for s in SIZES}
    return float(min(areas, key=lambda s: abs(int(blob.sum()) - areas[s])) == size)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write (replaced if it exists)")
    p.add_argument("--per-type", type=int, default=12, help="edits of each of the five kinds (default 12)")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    out = write(args.out, args.per_type, args.seed)
    print(f"wrote a toy PIE-Bench of {5 * args.per_type} edits to {out}; run it with\n"
          f"  p2p-engine pie {out} --model toy --methods ddim,null_text,negative_prompt,direct,proximal --out RESULTS\n"
          f"  p2p-engine pie-metrics {out} RESULTS")


if __name__ == "__main__":
    main()
