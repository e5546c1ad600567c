"""Per-image cost of each inversion method as PIE-Bench runs it: inversion + a 2-prompt P2P edit, 50 steps.

GPU (full run): SD 1.5 architecture, random weights, 512 x 512, float16 (null-text inversion keeps its
embedding, Adam and losses in float32), the PIE protocol's edit (Replace at cross 0.4 / self 0.6 on layers up to
32 x 32, LocalBlend on the swapped word from 20% of the steps, the target word re-weighted by 2). Issue 15's goal:
a Direct Inversion edit under 1.5 s on an H200 with the eager loop. Null-text inversion is timed over 10 steps
with 10 iterations each and scaled by 5 (every step does the same work), plus the 50-step edit. The baseline
column is our own uncontrolled 50-step generation of the same two prompts: the part of the cost every method
pays. CPU smoke: the tiny preset, fp32, 3 steps.

Correctness before timing: a direct inversion's edit ends with its source row on the image's latent, bit for bit.

    python -m benchmarks.bench_methods [--smoke]     or     p2p-engine bench --only methods
"""
from __future__ import annotations

import tempfile
import time

import torch

from benchmarks.bench_inversion import photo_like
from benchmarks.common import CorrectnessError, Row, capture_failures, fallback_name, fallback_note, \
    matmul_flops_per_s, measure, measure_grad, save_checkpoint, script_main, seconds_left

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"


def run(device: torch.device, smoke: bool = False) -> list[Row]:
    import p2p_engine as p2p
    from p2p_engine.images import prepare

    on_gpu = device.type == "cuda"
    preset = "tiny" if smoke else "sd15"
    dtype = torch.float16 if on_gpu and not smoke else torch.float32
    steps, nti_steps, inner = (3, 3, 2) if smoke else (50, 10, 10)
    warmup, repeats = (0, 1) if smoke else (1, 3)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = p2p.load(save_checkpoint(tmp, preset), device=device, dtype=dtype)
    image = photo_like(pipe.config.image_size)
    prompts = [SOURCE, TARGET]
    controller = p2p.Reweight({"dog": 2.0}, prev=p2p.Replace(cross_steps=0.4, self_steps=0.6, self_max_queries=1024),
                              cross_steps=0.4, self_steps=0.6, self_max_queries=1024)
    blend = p2p.LocalBlend(["cat", "dog"], start=0.2)

    def invert_and_edit(method, n=steps, **kw):
        inv = pipe.invert(image, SOURCE, steps=n, method=method, progress=False, **kw)
        return inv, pipe.edit(prompts, controller, local_blend=blend, inversion=inv, progress=False,
                              decode_images=False)

    inv, out = invert_and_edit("direct")
    z0 = pipe.encode_images(prepare(image, pipe.config.image_size))
    if not torch.equal(out.latents[:1], z0):
        raise CorrectnessError("the direct inversion's edit does not end its source row on z0")
    check = "direct: source row == z0 bit for bit"

    from benchmarks.bench_unet import pipe_unet_flops
    fwd = pipe_unet_flops(pipe, SOURCE, device, dtype)
    rate = matmul_flops_per_s(device, dtype)
    gen = measure(lambda: pipe.generate(prompts, steps=steps, store=False, progress=False, decode_images=False),
                  device, warmup=warmup, repeats=repeats)
    rows = []
    for method in ("direct", "ddim", "negative_prompt"):
        if seconds_left() < 3 * gen.median / 1e3 * (repeats + warmup):
            print(f"[methods] {method} left out: too little time before P2P_BENCH_DEADLINE", flush=True)
            continue
        t = measure_grad(lambda: invert_and_edit(method), device, warmup=warmup, repeats=repeats)
        floor = (steps + steps * 2 * len(prompts)) * fwd / rate * 1e3
        rows.append(Row(f"{method}: inversion + 2-prompt edit, {steps} steps", "ours", t,
                        "ours: generation, 2 prompts", gen, floor, check=check if method == "direct" else ""))
    # null-text: the inversion over nti_steps steps of `inner` iterations, scaled to `steps`, plus the edit. Its
    # warm-up run is timed and sizes how many repeats fit before the deadline
    def invert_nti():
        return pipe.invert(image, SOURCE, steps=nti_steps, inner_steps=inner, early_stop=False, progress=False)

    if seconds_left() > 3 * gen.median / 1e3 * (repeats + warmup):
        edit_t = measure(lambda: pipe.edit(prompts, controller, local_blend=blend, inversion=inv, progress=False,
                                           decode_images=False), device, warmup=warmup, repeats=repeats)
        began = time.perf_counter()
        warm = invert_nti()  # the warm-up
        fits = int(min(repeats, seconds_left() / (1.5 * (time.perf_counter() - began))))
        if fits < 1:
            print("[methods] null_text left out: too little time before P2P_BENCH_DEADLINE", flush=True)
        else:
            timed = []
            inv_t = measure_grad(lambda: timed.append(invert_nti()), device, warmup=0, repeats=fits)
            failed = capture_failures(warm, *timed)  # the iteration's graph not recorded: it timed the eager loop
            scale = steps / nti_steps
            est = type(inv_t)([scale * a + b for a, b in zip(inv_t.samples_ms, edit_t.samples_ms)],
                              inv_t.peak_mem_bytes, inv_t.mem_kind)
            floor = (steps * (3 + 3 * inner) + steps * 2 * len(prompts)) * fwd / rate * 1e3
            rows.append(Row(f"null_text: inversion ({inner} iterations per step, timed over {nti_steps} steps, x"
                            f"{scale:g}) + 2-prompt edit, {steps} steps", fallback_name("ours", failed), est,
                            "ours: generation, 2 prompts", gen, floor,
                            check=fallback_note(failed) + "estimated from a shorter inversion; every step does the "
                            "same work"))
    return rows


def main(argv=None) -> int:
    return script_main("methods", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
