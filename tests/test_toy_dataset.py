"""The procedural dataset and analysis behind the toy model's quality tests."""
import numpy as np
import pytest

from p2p_engine.toy.analysis import components, foreground_mask, iou, largest_blob
from p2p_engine.toy.dataset import BACKGROUNDS, COLORS, SHAPES, make_batch, make_scene


def test_deterministic_for_a_seed():
    a, ca = make_batch(3, 10, 6)
    b, cb = make_batch(3, 10, 6)
    assert np.array_equal(a, b) and ca == cb
    # Random access: scene 12 alone equals the third of the batch; another seed differs.
    assert np.array_equal(make_scene(3, 12).image, a[2])
    c, _ = make_batch(4, 10, 6)
    assert not np.array_equal(a, c)


def _parse(caption):
    # A restatement of the caption grammar: "a SIZE COLOUR SHAPE and ... on a BG [and BG] background".
    objs, bg = caption.split(" on a ")
    assert bg.endswith(" background")
    bgs = tuple(bg[: -len(" background")].split(" and "))
    words = objs.split(" ")
    triples = []
    while words:
        assert words[0] == "a"
        triples.append(tuple(words[1:4]))
        words = words[5:]  # skip "and"
    return triples, bgs


def test_captions_match_scenes_and_pixels():
    for i in range(60):
        s = make_scene(0, i)
        triples, bgs = _parse(s.caption)
        assert triples == [(o.size, o.color, o.shape) for o in s.objects]
        assert bgs == s.background and 1 <= len(s.objects) <= 3
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS
            assert (s.image[o.mask] == COLORS[o.color]).all()  # the mask is exactly the painted pixels
        rest = ~np.any([o.mask for o in s.objects], axis=0)
        bg_rgb = {BACKGROUNDS[b] for b in s.background}
        assert {tuple(p) for p in s.image[rest]} <= bg_rgb
        areas = [int(o.mask.sum()) for o in s.objects]
        assert areas == sorted(areas, reverse=True)  # caption order is area order
        for a_ in s.objects:
            for b_ in s.objects:
                assert a_ is b_ or iou(a_.mask, b_.mask) == 0.0
        assert len(s.caption.split()) < 40  # far below CLIP's 77 tokens


def test_masks_are_separate_components():
    for i in range(40):
        s = make_scene(1, i)
        comps = components(foreground_mask(s.image))
        assert len(comps) == len(s.objects)
        for c, o in zip(comps, s.objects):
            assert c.sum() == o.mask.sum()


def test_analysis_classifies_ground_truth_renders():
    ok, n, ious = 0, 200, []
    for i in range(n):
        s = make_scene(2, i)
        b = largest_blob(s.image)
        top = int(s.objects[0].mask.sum())
        # Equal-area ties: any of the largest objects is a right answer.
        cands = [o for o in s.objects if int(o.mask.sum()) == top]
        best = max(cands, key=lambda o: iou(o.mask, b.mask))
        ious.append(iou(best.mask, b.mask))
        ok += b.color == best.color and b.shape == best.shape
    assert ok / n >= 0.95, ok
    assert np.mean(ious) > 0.99


def test_analysis_survives_noise():
    # Generated images are not exact; the analysis must tolerate moderate pixel noise.
    rng = np.random.default_rng(0)
    ok = 0
    for i in range(50):
        s = make_scene(5, i)
        noisy = np.clip(s.image + rng.normal(0, 12, s.image.shape), 0, 255).astype(np.uint8)
        b = largest_blob(noisy)
        top = int(s.objects[0].mask.sum())
        ok += any(b.color == o.color and b.shape == o.shape for o in s.objects if int(o.mask.sum()) == top)
    assert ok >= 45, ok


def test_iou():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(~a & a, ~a & a) == 1.0
