"""Per-image cost of each editor as PIE-Bench runs it with Direct Inversion: inversion + a 2-prompt edit, 50 steps.

GPU (full run, prepared in gpu_session.sh and not yet timed on a GPU): SD 1.5 architecture, random weights,
512 x 512, float16. Editors: Prompt-to-Prompt with the PIE protocol's edit (Replace at cross 0.4 / self 0.6 on
layers up to 32 x 32, LocalBlend on the swapped word from 20% of the steps, the target word re-weighted by 2);
MasaCtrl (run_editing_masactrl.py: the empty prompt inverted and as the source, start step 4, blocks 10 .. 15,
whose keys and values every row reads: the fused self-attention kernel up to 32 x 32 queries, SDPA on the
gathered rows at 64 x 64); Plug-and-Play (run_editing_pnp.py: features at up_blocks[1].resnets[1] for 40
steps, self-attention queries and keys in eight decoder modules for 25, the reference's negative prompt).
The baseline column is our own uncontrolled 50-step generation of the same two prompts, the part every editor
pays; the floor is the UNet's matmul FLOPs (inversion: one row per step; edit: four rows per step) at the
device's measured matmul rate. CPU smoke: the tiny preset, fp32, 3 steps.

Correctness before timing: each editor's edit ends with its source row on the image's latent, bit for bit (the
direct inversion's pin), and moves its target away from the uncontrolled edit's.

    python -m benchmarks.bench_editors [--smoke]     or     p2p-engine bench --only editors
"""
from __future__ import annotations

import tempfile

import torch

from benchmarks.bench_inversion import photo_like
from benchmarks.common import CorrectnessError, Row, matmul_flops_per_s, measure, measure_grad, save_checkpoint, \
    script_main, seconds_left

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"


def editors(smoke: bool):
    """(name, the source prompt the reference inverts and edits with, controller, local blend); the smoke run's
    3 steps start MasaCtrl at step 1 (its step 4 would leave them all uncontrolled)."""
    import p2p_engine as p2p

    p2p_edit = p2p.Reweight({"dog": 2.0}, prev=p2p.Replace(cross_steps=0.4, self_steps=0.6, self_max_queries=1024),
                            cross_steps=0.4, self_steps=0.6, self_max_queries=1024)
    return [("p2p", SOURCE, p2p_edit, p2p.LocalBlend(["cat", "dog"], start=0.2)),
            ("masactrl", "", p2p.MasaCtrl(start_step=1 if smoke else 4), None),
            ("pnp", SOURCE, p2p.PlugAndPlay(), None)]


def run(device: torch.device, smoke: bool = False) -> list[Row]:
    import p2p_engine as p2p
    from p2p_engine.images import prepare

    on_gpu = device.type == "cuda"
    preset = "tiny" if smoke else "sd15"
    dtype = torch.float16 if on_gpu and not smoke else torch.float32
    steps = 3 if smoke else 50
    warmup, repeats = (0, 1) if smoke else (1, 3)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = p2p.load(save_checkpoint(tmp, preset), device=device, dtype=dtype)
    image = photo_like(pipe.config.image_size)
    z0 = pipe.encode_images(prepare(image, pipe.config.image_size))

    def invert_and_edit(source, controller, blend):
        inv = pipe.invert(image, source, steps=steps, method="direct", progress=False)
        return pipe.edit([source, TARGET], controller, local_blend=blend, inversion=inv, progress=False,
                         decode_images=False)

    checks = {}
    for name, source, controller, blend in editors(smoke):
        out = invert_and_edit(source, controller, blend)
        if not torch.equal(out.latents[:1], z0):
            raise CorrectnessError(f"{name}: the direct inversion's edit does not end its source row on z0")
        plain = invert_and_edit(source, None, None)
        if torch.equal(out.latents[1:], plain.latents[1:]):
            raise CorrectnessError(f"{name}: the edit's target is the uncontrolled one")
        checks[name] = "source row == z0 bit for bit; target moved"

    from benchmarks.bench_unet import pipe_unet_flops
    fwd = pipe_unet_flops(pipe, SOURCE, device, dtype)
    rate = matmul_flops_per_s(device, dtype)
    gen = measure(lambda: pipe.generate([SOURCE, TARGET], steps=steps, store=False, progress=False,
                                        decode_images=False), device, warmup=warmup, repeats=repeats)
    floor = (steps + steps * 4) * fwd / rate * 1e3
    rows = []
    for name, source, controller, blend in editors(smoke):
        if seconds_left() < 3 * gen.median / 1e3 * (repeats + warmup):
            print(f"[editors] {name} left out: too little time before P2P_BENCH_DEADLINE", flush=True)
            continue
        t = measure_grad(lambda: invert_and_edit(source, controller, blend), device, warmup=warmup,
                         repeats=repeats)
        rows.append(Row(f"{name}: direct inversion + 2-prompt edit, {steps} steps", "ours", t,
                        "ours: generation, 2 prompts", gen, floor, check=checks[name]))
    return rows


def main(argv=None) -> int:
    return script_main("editors", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
