"""Independent two-prompt edits in one `edit_batch` against the same edits one after another.

    python -m benchmarks.cpu_edit_batch                          # the toy model on the CPU: 8 edits, 50 steps
    python -m benchmarks.cpu_edit_batch --sizes 1 2 4 8 16       # time per edit at each batch size
    python -m benchmarks.cpu_edit_batch --preset sd15 --size 512 --device cuda --dtype float16   # a lent GPU

Each edit is the reference's Replace (cross 0.8, self 0.4) with LocalBlend and stored maps, of its own prompt
pair and seed. Before timing, every batched edit is checked against its own `edit` (latents, within the rounding
of a batched product: the mean relative difference is printed). Then `--runs` back-to-back pairs (sequential,
batched), after a warm-up of each; the ratio of each pair is printed with the median, so that the drift of a
shared machine shows as spread. On CUDA the peak memory above the loaded model is printed for both, and per
edit for the batch. `--sizes` times N = max(sizes) edits in batches of each size (the number `p2p-engine run
--batch-size` was chosen by).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey", "cyan",
           "gold", "silver", "violet", "olive"]
SHAPES = ["circle", "square", "triangle", "star"]


def requests(p2p, n: int, toy: bool) -> list:
    """n two-prompt Replace edits with LocalBlend, each of its own words and seed."""
    out = []
    for k in range(n):
        if toy:
            a, b, shape = COLOURS[k % len(COLOURS)], COLOURS[(k + 1) % len(COLOURS)], SHAPES[k % len(SHAPES)]
            prompts = [f"a big {a} {shape} on a white background", f"a big {b} {shape} on a white background"]
        else:
            a, b = ("cat", "dog") if k % 2 == 0 else ("dog", "fox")
            prompts = [f"a {a} riding a bicycle", f"a {b} riding a bicycle"]
        out.append(p2p.EditRequest(prompts, p2p.Replace(cross_steps=0.8, self_steps=0.4),
                                   local_blend=p2p.LocalBlend([a, b]), seed=k))
    return out


def main(argv=None) -> None:
    import p2p_engine as p2p

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint p2p.load reads (default: toy)")
    ap.add_argument("--preset", help="or a random checkpoint of this preset (sd15, ...)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default the model's)")
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3, help="timed back-to-back pairs")
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="also time max(sizes) edits per batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = ap.parse_args(argv)
    if args.model and args.preset:
        ap.error("give --model or --preset, not both")
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or (p2p.save_random_checkpoint(os.path.join(tmp, args.preset), args.preset, seed=0)
                              if args.preset else "toy")
        pipe = p2p.load(path, device=args.device, dtype=getattr(torch, args.dtype), backend="auto")
    toy = path == "toy"
    size = dict(height=args.size, width=args.size) if args.size else {}
    reqs = requests(p2p, args.edits, toy)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_by_one(rs, steps):
        return [pipe.edit(r.prompts, r.controller, local_blend=r.local_blend, seed=r.seed, steps=steps,
                          progress=False, **size) for r in rs]

    def batched(rs, steps, per_call=None):
        per_call = per_call or len(rs)
        return [o for k in range(0, len(rs), per_call)
                for o in pipe.edit_batch(rs[k:k + per_call], steps=steps, progress=False, max_rows=None, **size)]

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    def peak(fn) -> float:
        """GB of device memory above what the loaded model holds, at the peak of fn()."""
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30

    with torch.inference_mode():
        # warm-up, and the check before any timing: each batched edit against its own edit
        one_by_one(reqs[:1], 2)
        batched(reqs, 2)
        refs, outs = one_by_one(reqs, args.steps), batched(reqs, args.steps)
        # mean, not largest: LocalBlend's threshold may flip a pixel on rounding; another request's rows are O(1) off
        err = max(((o.latents - r.latents).abs().mean() / r.latents.abs().mean()).item() for o, r in zip(outs, refs))
        limit = 1e-4 if args.dtype == "float32" else 1e-2
        check = f"batched vs alone: mean relative difference {err:.1e} ({'ok' if err <= limit else 'FAILED'})"
        pairs = []
        for _ in range(args.runs):
            pairs.append((timed(lambda: one_by_one(reqs, args.steps))[0], timed(lambda: batched(reqs, args.steps))[0]))
    seq, bat = [p[0] for p in pairs], [p[1] for p in pairs]
    ratios = [s / b for s, b in pairs]
    name = "toy" if toy else f"{args.preset or args.model} ({pipe.config.image_size if not args.size else args.size} px)"
    print(f"{name}, {args.device} {args.dtype}, {args.threads} threads, {args.edits} two-prompt edits x {args.steps} "
          f"steps; {check}")
    print(f"one after another: {' / '.join(f'{t:.2f}' for t in seq)} s; in one edit_batch: "
          f"{' / '.join(f'{t:.2f}' for t in bat)} s")
    print(f"ratio per back-to-back pair: {' / '.join(f'{r:.2f}x' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    if cuda:
        with torch.inference_mode():
            p_seq = peak(lambda: one_by_one(reqs, args.steps))
            p_bat = peak(lambda: batched(reqs, args.steps))
        print(f"peak memory above the model: one after another {p_seq:.2f} GB, one edit_batch {p_bat:.2f} GB "
              f"({p_bat / args.edits:.3f} GB per edit)")
    if args.sizes:
        n = max(args.sizes)
        rs = requests(p2p, n, toy)
        with torch.inference_mode():
            for b in sorted(set(args.sizes)):
                t, _ = timed(lambda: batched(rs, args.steps, b))
                print(f"{n} edits in batches of {b}: {t:.2f} s, {t / n:.3f} s per edit")


if __name__ == "__main__":
    main()
