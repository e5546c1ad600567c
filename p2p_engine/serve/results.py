"""An edit's output as the files of its results folder and the `result` of its job record.

Per-word maps: the word's cross-attention map (`AttentionMaps.word_maps`: the mean over its tokens, heads,
layers and steps) at 16 x 16 where the model has maps of that size, else at a quarter of the latent side (SDXL's
32 x 32 at 1024 x 1024), as `p2p-engine maps` picks. The PNG is the map scaled to its own maximum (grey levels,
one pixel per map cell; the page enlarges it); the JSON holds the values themselves.
"""
from __future__ import annotations

import io
import json
from urllib.parse import quote

import numpy as np


def map_resolution(attention, latent_side: int) -> int:
    have = attention.resolutions
    return next((r for r in (16, latent_side // 4) if r in have), have[0])


def word_maps(attention, prompts: list[str], tokenizer, latent_side: int) -> tuple[int, list[list[dict]]]:
    """(res, per prompt: [{"index", "word", "map" (res_h, res_w) float32 array}]) for each distinct word that has
    tokens; computed on the worker's thread, where the maps live."""
    from ..words import word_inds

    res = map_resolution(attention, latent_side)
    out = []
    for p, prompt in enumerate(prompts):
        words, seen = [], set()
        for i, word in enumerate(prompt.split(" ")):
            if word in seen or not word_inds(prompt, i, tokenizer):
                continue
            seen.add(word)
            m = attention.word_maps(p, word, res)
            words.append({"index": i, "word": word, "map": m.float().cpu().numpy()})
        out.append(words)
    return res, out


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _map_png(m: np.ndarray) -> bytes:
    from PIL import Image

    top = float(m.max())
    grey = np.zeros(m.shape, np.uint8) if top <= 0 else (np.clip(m / top, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def edit_files(job_id: str, prompts: list[str], images: list, maps) -> tuple[dict[str, bytes], dict]:
    """(files of results/<job_id>/, the job's `result`) from the output's PIL images (source first) and
    `word_maps`' (res, words) or None."""
    base = f"/v1/results/{job_id}"
    files = {f"{k}.png": png_bytes(im) for k, im in enumerate(images)}
    result = {"images": [f"{base}/{k}.png" for k in range(len(images))], "prompts": prompts, "maps": None}
    if maps is not None:
        res, per_prompt = maps
        listed = []
        for p, words in enumerate(per_prompt):
            entries = []
            for w in words:
                stem = f"maps/{p}/{w['index']}"
                files[f"{stem}.png"] = _map_png(w["map"])
                files[f"{stem}.json"] = json.dumps({
                    "prompt_index": p, "word": w["word"], "word_index": w["index"], "shape": list(w["map"].shape),
                    "map": w["map"].astype(np.float64).tolist()}).encode()  # the float32 values exactly
                url = f"{base}/maps/{p}/{quote(w['word'], safe='')}"
                entries.append({"word": w["word"], "index": w["index"], "png": f"{url}.png", "json": f"{url}.json"})
            listed.append(entries)
        result["maps"] = {"res": res, "prompts": listed}
    return files, result
