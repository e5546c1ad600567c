"""Does null-text inversion reach float32's losses with a half-precision UNet?

    python -m p2p_engine.toy.precision [--images 4] [--steps 50] [--threads 2]

Inverts held-out scenes of the toy dataset with the reference's settings (the optimised embedding, Adam
and the losses always float32) with the UNet in float32, in bfloat16 or float16 weights, and under
bfloat16 or float16 autocast; prints per variant the final loss of each step (mean, median, max), the
share of steps that stopped early, the inner iterations used and the reconstruction PSNR in the
variant's own precision. p2p_engine/toy/README.md and `nulltext.warn_bf16` quote its numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from .dataset import make_scene
from .evaluate import STEPS, _array, psnr

VARIANTS = (("float32", torch.float32, None), ("bfloat16 weights", torch.bfloat16, None),
            ("float16 weights", torch.float16, None), ("float32, bfloat16 autocast", torch.float32, torch.bfloat16),
            ("float32, float16 autocast", torch.float32, torch.float16))


def final_losses(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, inner) per-iteration losses, NaN after an early stop -> ((steps,) the last loss of each
    step, (steps,) the iterations it used)."""
    used = (~losses.isnan()).sum(1)
    return losses[torch.arange(losses.shape[0]), (used - 1).clamp(min=0)], used


def measure(model: str, dtype: torch.dtype, autocast, images, prompts, steps: int) -> dict:
    from ..images import to_pil
    from ..inversion import invert_batch, reconstruct
    from ..nulltext import EPSILON, EPSILON_SLOPE
    from ..loading import load

    pipe = load(model, dtype=dtype, backend="torch")
    precision = (lambda: torch.autocast(pipe.device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    t = time.perf_counter()
    with precision():
        invs = invert_batch(pipe, images, prompts, steps=steps, progress=False)
    seconds = time.perf_counter() - t
    last, used = (torch.stack(x) for x in zip(*(final_losses(inv.losses) for inv in invs)))  # (N, steps) each
    thresh = EPSILON + torch.arange(steps) * EPSILON_SLOPE
    used = used.float()
    psnrs = []
    for img, inv in zip(images, invs):
        with precision():
            psnrs.append(psnr(img, _array(to_pil(pipe.decode_latents(reconstruct(pipe, inv)))[0])))
    return {"mean": last.mean().item(), "median": last.median().item(), "max": last.max().item(),
            "early": (last < thresh).float().mean().item(), "inner": used.mean().item(),
            "psnr": float(np.mean(psnrs)), "seconds": seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenes = [make_scene(12345, k) for k in range(args.images)]  # the held-out stream of evaluate.py
    images, prompts = [s.image for s in scenes], [s.caption for s in scenes]
    print("| UNet precision | final loss mean | median | max | steps stopped early | inner its/step | PSNR | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, autocast in VARIANTS:
        r = measure(args.model, dtype, autocast, images, prompts, args.steps)
        print(f"| {name} | {r['mean']:.3e} | {r['median']:.3e} | {r['max']:.3e} | {r['early']:.0%} | "
              f"{r['inner']:.2f} | {r['psnr']:.2f} dB | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
