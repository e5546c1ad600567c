"""Measure what the toy model's edits and inversions are worth, with the procedural analysis.

    python -m p2p_engine.toy.evaluate [--model toy] [--seeds 60] [--images 4] [--layers]

Prints one line per measure; `tests/test_toy_model.py` asserts the issue's thresholds on the same
functions. Every measure is deterministic for its seeds.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .analysis import grid_cells, largest_blob, iou
from .dataset import COLORS, SHAPES, make_scene

BACKGROUND_CYCLE = ("white", "black", "gray")
STEPS = 50
GUIDANCE = 7.5
FAST_STEPS = 20  # DPM-Solver++ steps of the fast edit: 40% of STEPS' UNet evaluations
# Replace's self-attention window for the toy's layout measure: the reference notebook's 0.4. P2P leaves
# both windows to the user; the longer the source's maps are injected, the more of its layout an edit keeps
# and the less it may change. `main` also reports the measure at 0.8 (the cross window's length).
REPLACE_SELF_STEPS = 0.4


def caption(color: str, shape: str, background: str) -> str:
    return f"a big {color} {shape} on a {background} background"


def _array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _cases(n: int, first: int = 0):
    """n (seed, color, shape, background) tuples from seed `first` on, covering every colour x shape pair in
    turn."""
    colors, out = list(COLORS), []
    for k in range(first, first + n):
        out.append((k, colors[k % len(colors)], SHAPES[(k // len(colors)) % len(SHAPES)],
                    BACKGROUND_CYCLE[(k // (len(colors) * len(SHAPES))) % len(BACKGROUND_CYCLE)]))
    return out


@dataclass
class Rate:
    hits: int
    total: int

    @property
    def value(self) -> float:
        return self.hits / max(1, self.total)

    def __str__(self) -> str:
        return f"{self.hits}/{self.total} = {self.value:.0%}"


def generation_follows_captions(pipe, n: int = 60, steps: int = STEPS) -> tuple[Rate, Rate, Rate]:
    """Largest blob of `generate(caption)` against the caption: (colour and shape, colour, shape) rates."""
    both = color_ok = shape_ok = 0
    for seed, color, shape, bg in _cases(n):
        img = pipe.generate([caption(color, shape, bg)], seed=seed, steps=steps, guidance=GUIDANCE,
                            store=False, progress=False).images[0]
        blob = largest_blob(_array(img))
        c = blob is not None and blob.color == color
        s = blob is not None and blob.shape == shape
        color_ok, shape_ok, both = color_ok + c, shape_ok + s, both + (c and s)
    return Rate(both, n), Rate(color_ok, n), Rate(shape_ok, n)


def _other_color(color: str, k: int) -> str:
    colors = [c for c in COLORS if c != color]
    return colors[k % len(colors)]


def replace_keeps_layout(pipe, n: int = 40, steps: int = STEPS, min_iou: float = 0.8,
                         self_steps: float = REPLACE_SELF_STEPS, first: int = 0, free: bool = True,
                         sampler: str = "ddim"):
    """Colour swaps with `Replace(cross_steps=0.8, self_steps)` on seeds first .. first + n - 1, `steps` steps of
    `sampler` (windows are fractions of its steps). Returns
    (layout kept with control, layout kept without control, target colour reached with control) as rates
    over seeds, then the two mean IoUs; layout kept means the largest blobs of source and edit overlap with
    IoU >= min_iou. free=False skips generating the target without control (its rate and IoU are then
    None)."""
    from ..controllers import Replace

    kept = kept_free = reached = 0
    ious, ious_free = [], []
    for seed, color, shape, bg in _cases(n, first):
        src = caption(color, shape, bg)
        new = _other_color(color, seed)
        tgt = caption(new, shape, bg)
        out = pipe.edit([src, tgt], controller=Replace(cross_steps=0.8, self_steps=self_steps), seed=seed,
                        steps=steps, guidance=GUIDANCE, sampler=sampler, store=False, progress=False)
        a, b = (largest_blob(_array(x)) for x in out.images)
        v = iou(a.mask, b.mask) if a is not None and b is not None else 0.0
        ious.append(v)
        kept += v >= min_iou
        reached += b is not None and b.color == new
        if free:
            f = largest_blob(_array(pipe.generate([tgt], seed=seed, steps=steps, guidance=GUIDANCE, sampler=sampler,
                                                  store=False, progress=False).images[0]))
            vf = iou(a.mask, f.mask) if a is not None and f is not None else 0.0
            ious_free.append(vf)
            kept_free += vf >= min_iou
    return (Rate(kept, n), Rate(kept_free, n) if free else None, Rate(reached, n), float(np.mean(ious)),
            float(np.mean(ious_free)) if free else None)


def _map_iou(m: np.ndarray, cells: np.ndarray) -> float:
    """IoU of a map thresholded at half its maximum with the shape's cells."""
    return iou(m >= 0.5 * m.max(), cells)


def attention_overlap(pipe, n: int = 30, steps: int = STEPS) -> dict[int, tuple[float, Rate]]:
    """Per stored cross-map resolution: (mean IoU, localised rate) of the shape word's map against the
    generated shape's mask averaged onto the map's grid (cells more than half covered).

    IoU: the map thresholded at half its maximum. Localised: the map's mean inside the shape is at least
    1.5x its mean outside (a flat map gives 1x)."""
    ious: dict[int, list[float]] = {}
    local: dict[int, int] = {}
    for seed, color, shape, bg in _cases(n):
        out = pipe.generate([caption(color, shape, bg)], seed=seed, steps=steps, guidance=GUIDANCE,
                            progress=False)
        blob = largest_blob(_array(out.images[0]))
        for res in out.attention.resolutions:
            m = out.attention.word_maps(0, shape, res=res).float().numpy()
            if blob is None:
                ious.setdefault(res, []).append(0.0)
                continue
            cells = grid_cells(blob.mask, res)
            ious.setdefault(res, []).append(_map_iou(m, cells))
            inside = m[cells].mean() if cells.any() else 0.0
            outside = m[~cells].mean() if not cells.all() else 0.0
            local[res] = local.get(res, 0) + bool(inside >= 1.5 * outside)
    return {res: (float(np.mean(v)), Rate(local.get(res, 0), n)) for res, v in ious.items()}


def attention_by_layer(pipe, n: int = 12, steps: int = 25) -> dict[str, tuple[int, float, float, float]]:
    """What each cross-attention layer does with the shape word, from forward hooks that recompute its
    head-averaged probabilities (conditional rows, every step): layer name -> (map side, mean IoU of the
    shape word's thresholded map with the shape as in `attention_overlap`, the shape word's mean share of
    a query's attention per step, the share of the tokens after the prompt's last word: EOS and padding,
    which see the whole caption through CLIP's causal mask). A diagnosis of where text acts locally."""
    from ..words import word_inds
    from ..unet import Attention

    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, kwargs, out):
            x, ctx = module.hook_inputs(args, kwargs)
            p = module.probabilities(x, ctx)
            sums[name] = sums.get(name, 0) + p[x.shape[0] // 2:].detach()  # the guided batch is [uncond, cond]
        return record

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in pipe.unet.named_modules()
               if isinstance(m, Attention) and name.endswith("attn2")]
    rows: dict[str, list[tuple[int, float, float, float]]] = {}
    try:
        for seed, color, shape, bg in _cases(n):
            sums.clear()
            text = caption(color, shape, bg)
            img = pipe.generate([text], seed=seed, steps=steps, guidance=GUIDANCE, store=False,
                                progress=False).images[0]
            blob = largest_blob(_array(img))
            if blob is None:
                continue
            tok = word_inds(text, shape, pipe.tokenizer)
            tail = max(word_inds(text, text.split()[-1], pipe.tokenizer)) + 1
            for name, total in sums.items():
                probs = total[0] / steps
                res = int(round(probs.shape[0] ** 0.5))
                m = probs[:, tok].mean(-1).reshape(res, res).numpy()
                rows.setdefault(name, []).append((res, _map_iou(m, grid_cells(blob.mask, res)),
                                                  float(probs[:, tok].sum(-1).mean()),
                                                  float(probs[:, tail:].sum(-1).mean())))
    finally:
        for h in handles:
            h.remove()
    return {name: (v[0][0], *(float(np.mean([r[i] for r in v])) for i in (1, 2, 3))) for name, v in rows.items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def inversion_quality(pipe, n: int = 4, steps: int = STEPS, seed: int = 12345):
    """Null-text inversion of held-out dataset scenes (a stream the training never read).

    Returns per-image dicts: PSNR of the VAE reconstruction, of the null-text reconstruction and of DDIM
    inversion followed by guided sampling; and the latent MSE (against the image's VAE latent) of the
    null-text and DDIM reconstructions."""
    from ..images import prepare, to_pil
    from ..inversion import invert_batch, reconstruct

    scenes = [make_scene(seed, k) for k in range(n)]
    images = [s.image for s in scenes]
    prompts = [s.caption for s in scenes]
    nti = invert_batch(pipe, images, prompts, steps=steps, progress=False)
    ddim = invert_batch(pipe, images, prompts, steps=steps, method="ddim", progress=False)
    rows = []
    for img, a, b in zip(images, nti, ddim):
        with torch.no_grad():
            z0 = pipe.encode_images(prepare(img, pipe.config.image_size))
            za, zb = reconstruct(pipe, a), reconstruct(pipe, b)
        vae_img, a_img, b_img = (_array(to_pil(pipe.decode_latents(z))[0]) for z in (z0, za, zb))
        rows.append({"psnr_vae": psnr(img, vae_img), "psnr_nti": psnr(img, a_img), "psnr_ddim": psnr(img, b_img),
                     "mse_nti": float(((za - z0) ** 2).mean()), "mse_ddim": float(((zb - z0) ** 2).mean())})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--seeds", type=int, default=60)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", action="store_true", help="only the per-layer attention diagnosis (12 seeds)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..loading import load

    t = time.perf_counter()
    load(args.model, backend="torch")
    first = time.perf_counter() - t
    t = time.perf_counter()
    pipe = load(args.model, backend="torch")
    print(f"load: {time.perf_counter() - t:.2f} s ({first:.2f} s the first time, which imports transformers' CLIP)")
    if args.layers:
        for name, (res, m, share, tail) in attention_by_layer(pipe).items():
            print(f"{name}: {res}x{res}, shape word's map IoU {m:.2f}, its share of attention {share:.3f}, "
                  f"EOS and padding's share {tail:.2f}")
        return
    t = time.perf_counter()
    both, color, shape = generation_follows_captions(pipe, args.seeds)
    print(f"generation follows captions: colour and shape {both}, colour {color}, shape {shape} "
          f"({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    n = max(1, args.seeds * 2 // 3)
    kept, free, reached, m, mf = replace_keeps_layout(pipe, n)
    print(f"Replace colour swap (self window {REPLACE_SELF_STEPS}): layout kept (IoU >= 0.8) {kept} with control, "
          f"{free} without; target colour reached {reached}; mean IoU {m:.3f} vs {mf:.3f} "
          f"({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    kept, _, reached, m, _ = replace_keeps_layout(pipe, n, self_steps=0.8, free=False)
    print(f"  at a self window of 0.8: layout kept {kept}; target colour reached {reached}; "
          f"mean IoU {m:.3f} ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    kept, _, reached, m, _ = replace_keeps_layout(pipe, n, steps=FAST_STEPS, sampler="dpmsolver++", free=False)
    print(f"  with {FAST_STEPS} DPM-Solver++ steps ({FAST_STEPS / STEPS:.0%} of the UNet evaluations): layout kept "
          f"{kept}; target colour reached {reached}; mean IoU {m:.3f} ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    for res, (m, loc) in sorted(attention_overlap(pipe, args.seeds // 2).items(), reverse=True):
        print(f"attention maps {res}x{res}: mean IoU of the shape word's map with the shape {m:.3f}; "
              f"localised (inside >= 1.5x outside) {loc}")
    print(f"  ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    rows = inversion_quality(pipe, args.images)
    for r in rows:
        print("inversion: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    mse_ratio = np.mean([r['mse_ddim'] for r in rows]) / np.mean([r['mse_nti'] for r in rows])
    print(f"inversion: mean PSNR gap VAE - NTI {np.mean([r['psnr_vae'] - r['psnr_nti'] for r in rows]):.2f} dB; "
          f"latent MSE DDIM / NTI {mse_ratio:.1f}x "
          f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
