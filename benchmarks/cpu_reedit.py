"""A re-edit from an edit cache against the uncached edit, timed on whatever device is at hand (the CPU here).

    python benchmarks/cpu_reedit.py --model toy --steps 50               # the shipped toy model, 64 x 64
    python benchmarks/cpu_reedit.py --preset sd15 --size 256 --steps 4   # SD 1.5's architecture, random weights

Each variant runs three times (the toy) or twice (a preset: SD 1.5 takes 14 s per 512 x 512 forward on 2
cores); the first run is a warm-up and the fastest of the others is kept. The edit is the reference's Replace
(cross 0.8, self 0.4) with LocalBlend and stored maps; the re-edit runs the targets' rows only. On the GPU,
`p2p-engine bench --only pipeline` times the same pair at 512 x 512 and 50 steps; this script is for the CPU,
where the suite runs its smoke sizes only.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main(argv=None) -> None:
    import p2p_engine as p2p

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint p2p.load reads (e.g. toy)")
    ap.add_argument("--preset", help="or a random checkpoint of this preset (sd15, ...)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default the model's)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if (args.model is None) == (args.preset is None):
        ap.error("give --model or --preset")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or p2p.save_random_checkpoint(os.path.join(tmp, args.preset), args.preset, seed=0)
        pipe = p2p.load(path, device=args.device, backend="auto")
    toy = args.model == "toy"
    src, tgt = (("a big red circle on a white background", "a big blue circle on a white background") if toy
                else ("a cat riding a bicycle", "a dog riding a bicycle"))
    words = ["red", "blue"] if toy else ["cat", "dog"]
    size = dict(height=args.size, width=args.size) if args.size else {}
    source = dict(seed=0, steps=args.steps, **size)
    edit_kw = dict(controller=p2p.Replace(cross_steps=0.8, self_steps=0.4), local_blend=p2p.LocalBlend(words),
                   progress=False)
    runs = 3 if toy else 2

    def best(fn):
        times, out = [], None
        for _ in range(runs):
            t0 = time.perf_counter()
            out = fn()
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times[1:]), out

    with torch.inference_mode():
        t_edit, ref = best(lambda: pipe.edit([src, tgt], **source, **edit_kw))
        t_cache, cache = best(lambda: pipe.edit_cache(src, progress=False, **source))
        t_re, out = best(lambda: pipe.edit([src, tgt], cache=cache, **edit_kw))
    err = ((out.latents - ref.latents).abs().max() / ref.latents.abs().max()).item()
    print(f"{args.model or args.preset + ' (random weights)'}, {pipe.config.image_size if not args.size else args.size}"
          f" px, {args.steps} steps, {pipe.device}, {args.threads} threads: edit {t_edit:.3f} s, cache made in "
          f"{t_cache:.3f} s ({cache.nbytes / 2**20:.1f} MB), re-edit {t_re:.3f} s = {t_re / t_edit:.2f}x the edit; "
          f"re-edit vs edit max relative difference {err:.1e}")


if __name__ == "__main__":
    main()
