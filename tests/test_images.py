"""Image preparation against a re-statement of the reference's load_512."""
import numpy as np
import pytest
import torch
from PIL import Image

from p2p_engine.images import load_image, prepare, save_image_atomic, strip, to_pil


def reference_load(image, size, left=0, right=0, top=0, bottom=0):
    """load_512 from null_text_w_ptp.ipynb, with 512 as a parameter."""
    h, w, c = image.shape
    left = min(left, w - 1)
    right = min(right, w - left - 1)
    top = min(top, h - left - 1)
    bottom = min(bottom, h - top - 1)
    image = image[top:h - bottom, left:w - right]
    h, w, c = image.shape
    if h < w:
        offset = (w - h) // 2
        image = image[:, offset:offset + h]
    elif w < h:
        offset = (h - w) // 2
        image = image[offset:offset + w]
    return np.array(Image.fromarray(image).resize((size, size)))


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw,crop", [((40, 70), (0, 0, 0, 0)), ((75, 33), (3, 5, 7, 2)), ((32, 32), (0, 0, 0, 0))])
def test_prepare_matches_load_512(hw, crop):
    a = _img(*hw)
    ref = torch.from_numpy(reference_load(a, 32, *crop).astype(np.float32)) / 127.5 - 1
    x = prepare(a, 32, *crop)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0].permute(1, 2, 0), ref, rtol=0, atol=0)
    assert -1 <= x.min() and x.max() <= 1


def test_modes_and_sources(tmp_path):
    a = _img(20, 30)
    rgb = Image.fromarray(a)
    assert np.array_equal(load_image(rgb), a)
    assert load_image(rgb.convert("L")).shape == (20, 30, 3)
    rgba = rgb.convert("RGBA")
    assert np.array_equal(load_image(rgba), a)
    assert load_image(rgb.convert("P")).shape == (20, 30, 3)
    assert load_image(a[:, :, 0]).shape == (20, 30, 3)
    rgba.save(tmp_path / "x.png")
    assert np.array_equal(load_image(tmp_path / "x.png"), a)
    assert np.array_equal(load_image(str(tmp_path / "x.png")), a)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


def test_to_pil_strip_and_atomic_save(tmp_path):
    x = prepare(_img(16, 16), 16)
    back = np.asarray(to_pil(x)[0])
    assert np.array_equal(back, _img(16, 16))  # [-1, 1] round trip is exact on uint8 values
    s = strip([to_pil(x)[0], x, Image.fromarray(_img(8, 8))], labels=["input", "vae", "nti"], min_height=16)
    assert s.height == 16 + 16 and s.width == 16 * 3 + 4 * 2
    big = strip([x, x], labels=["a", "b"], min_height=40)  # enlarged 3x, each pixel kept as a 3 x 3 block
    assert big.height == 48 + 16 and big.width == 48 * 2 + 4
    assert np.array_equal(np.asarray(big)[:48:3, :48:3], back)
    save_image_atomic(s, tmp_path / "d" / "strip.png")
    assert Image.open(tmp_path / "d" / "strip.png").size == s.size
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["strip.png"]
