"""Null-text inversion of toy scenes at the reference's settings, alone and in a batch, on the CPU.

    python benchmarks/cpu_inversion_batch.py             # 50 steps, 10 iterations at most, batches 1 and 4

With the reference's early stop the images of a batch stop at different iterations of a step. The eager loop
leaves a step once every image has stopped and runs the UNet on the images still optimising only
(p2p_engine.nulltext); this prints seconds per image and the iterations used, so the two can be compared
across versions of the engine (RESULTS.md has the figures). A 5-step batch first warms the process up.
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    import p2p_engine as p2p
    from p2p_engine.toy.dataset import make_scene

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = p2p.load("toy", device="cpu")
    scenes = [make_scene(7, k) for k in range(max(args.batches))]
    print(f"toy model, CPU ({args.threads} threads), {args.steps} steps, at most {args.inner_steps} iterations")
    for n in args.batches:
        images, prompts = [s.image for s in scenes[:n]], [s.caption for s in scenes[:n]]
        pipe.invert_batch(images, prompts, steps=5, inner_steps=2, progress=False)
        start = time.perf_counter()
        invs = pipe.invert_batch(images, prompts, steps=args.steps, inner_steps=args.inner_steps, progress=False)
        seconds = time.perf_counter() - start
        used = sum(int((~inv.losses.isnan()).sum()) for inv in invs)
        print(f"batch {n}: {seconds / n:.2f} s per image; iterations used {used} of "
              f"{n * args.steps * args.inner_steps}")


if __name__ == "__main__":
    main()
