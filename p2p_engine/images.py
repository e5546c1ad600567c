"""Image preparation as the reference's `load_512`, tensor <-> PIL, pictures (strips, heat maps), PNG files.

The reference reads an image, applies crop offsets, centre-crops to a square and
resizes to 512 with PIL's default resampling (bicubic); pixels go to [-1, 1] by
x / 127.5 - 1. Here the side is the model's native image size (512 for SD 1.5).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def load_image(x):
    """A path, PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB array."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        try:
            with Image.open(path) as im:
                im.load()
                x = im.copy()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image file {path}: {e}") from None
    if isinstance(x, Image.Image) and (x.mode == "I" or x.mode.startswith("I;16")):
        # 16-bit greyscale (PIL's convert("RGB") clips it to white): scaled to 8 bits
        x = Image.fromarray((np.asarray(x, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if isinstance(x, Image.Image):
        # Palette, greyscale, RGBA, CMYK...: RGB like the reference's [:, :, :3] on an RGB(A) file.
        return np.asarray(x.convert("RGB"))
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (H, W, 3); got dtype {x.dtype}")
        if x.ndim == 2:
            x = np.repeat(x[:, :, None], 3, axis=2)
        if x.ndim != 3 or x.shape[2] not in (1, 3, 4) or 0 in x.shape:
            raise ValueError(f"image arrays must be (H, W, 3) uint8 with H, W > 0; got shape {x.shape}")
        if x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        return np.ascontiguousarray(x[:, :, :3])
    raise TypeError(f"image must be a path, a PIL image or an (H, W, 3) uint8 array; got {type(x).__name__}")


def crop_square(image: np.ndarray, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0) -> np.ndarray:
    """The reference's offset crop then centre crop to a square. (H, W, 3) -> (S, S, 3)."""
    h, w, _ = image.shape
    left = min(left, w - 1)
    right = min(right, w - left - 1)
    # The reference clamps top with `left` (`top = min(top, h - left - 1)`); kept so crops match it.
    top = min(top, h - left - 1)
    bottom = min(bottom, h - top - 1)
    image = image[top:h - bottom, left:w - right]
    h, w, _ = image.shape
    if h < w:
        offset = (w - h) // 2
        image = image[:, offset:offset + h]
    elif w < h:
        offset = (h - w) // 2
        image = image[offset:offset + w]
    return image


def prepare(x, size: int = 512, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0) -> torch.Tensor:
    """`load_512` generalised to `size`: -> (1, 3, size, size) float32 in [-1, 1]."""
    from PIL import Image

    image = crop_square(load_image(x), left, right, top, bottom)
    if image.shape[0] != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    t = torch.from_numpy(np.array(image, dtype=np.float32)) / 127.5 - 1
    return t.permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image

    if images.dim() == 3:
        images = images[None]
    x = ((images.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]


def strip(images, labels=None, pad: int = 4, min_height: int = 192):
    """Images side by side (e.g. input | VAE reconstruction | null-text reconstruction | edits).

    Args:
        images: PIL images, or a (B, 3, H, W) tensor in [-1, 1]; resized to the first one's height.
        labels: optional captions written under each picture.
        min_height: smaller pictures (the toy model's 64 x 64) are enlarged by a whole factor, pixels kept
            sharp, so that they can be seen and their labels fit under them.
    """
    from PIL import Image, ImageDraw

    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    images = [im if isinstance(im, Image.Image) else to_pil(im)[0] for im in images]
    if not images:
        raise ValueError("strip needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"strip got {len(images)} images but {len(labels)} labels")
    h = images[0].height
    images = [im.convert("RGB") if im.height == h else im.convert("RGB").resize((round(im.width * h / im.height), h))
              for im in images]
    if h < min_height:
        k = -(-min_height // h)
        images = [im.resize((im.width * k, h * k), Image.NEAREST) for im in images]
        h *= k
    text_h = 16 if labels else 0
    width = sum(im.width for im in images) + pad * (len(images) - 1)
    out = Image.new("RGB", (width, h + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for k, im in enumerate(images):
        out.paste(im, (x, 0))
        if labels:
            draw.text((x + 2, h + 2), str(labels[k]), fill=(0, 0, 0))
        x += im.width + pad
    return out


def side_by_side(images):
    """One PIL image with `images` left to right, no gaps: P images of W pixels give P * W."""
    from PIL import Image
    w = sum(im.width for im in images)
    h = max(im.height for im in images)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return canvas


def prompt_tokens(tokenizer, ids: list[int]) -> list[tuple[int, str]]:
    """(position, text) of the prompt's own tokens: BOS, EOS and padding left out; positions count BOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for pos, tok in enumerate(ids):
        if pos == 0 and tok == bos:
            continue
        if tok == eos:
            break
        text = tokenizer.decode([tok]).strip() or tokenizer.convert_ids_to_tokens(tok)
        out.append((pos, text))
    return out


def heat_row(image, maps, tokens):
    """[image, heat map of token 1 over the image, ...]; each map scaled to its own max, as the reference shows."""
    from PIL import Image

    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    h, w = base.shape[:2]
    tiles = [(image.convert("RGB"), "image")]  # the row's first tile: the generated image itself
    for pos, text in tokens:
        m = maps[..., pos].float()[None, None]  # (1, 1, res, res)
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)
        heat = _colormap(m.cpu().numpy())  # (H, W, 3)
        mixed = 0.45 * base + 0.55 * heat
        tiles.append((Image.fromarray((mixed * 255).round().astype(np.uint8)), text))
    return tiles


def _colormap(v):
    """A small blue-cyan-yellow-red ramp for values in [0, 1] -> (H, W, 3) floats."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def stack_rows(rows):
    """Labelled tiles, one prompt per row, into one picture."""
    from PIL import Image, ImageDraw

    label_h = 14
    tile_w = max(im.width for row in rows for im, _ in row)
    tile_h = max(im.height for row in rows for im, _ in row)
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * tile_w, len(rows) * (tile_h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (tile_h + label_h)
        for c, (im, text) in enumerate(row):
            canvas.paste(im, (c * tile_w, y))
            draw.text((c * tile_w + 2, y + tile_h + 1), text[: max(1, tile_w // 6)], fill="black")
    return canvas


def save_image_atomic(img, path) -> None:
    """Write a PIL image (or (1, 3, H, W) tensor) through the atomic writer (`files.atomic_write`), in the
    format its name says (PNG, or JPEG at PIL's default quality for .jpg/.jpeg, as the PIE reference does)."""
    from .files import atomic_write

    if isinstance(img, torch.Tensor):
        img = to_pil(img)[0]
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_write(path) as f:
        img.convert("RGB").save(f, format=fmt)
