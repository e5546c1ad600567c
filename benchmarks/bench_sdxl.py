"""SDXL: a UNet step against diffusers, a 50-step Prompt-to-Prompt edit, and null-text inversion's peak memory.

GPU (full run): the SDXL base architecture with random weights made on the GPU (no checkpoint file: writing
10 GB of random weights would take the lease; timing does not depend on the values), float16, 1024 x 1024.
- UNet step, batch 2 (one prompt with guidance): ours eager against diffusers' UNet2DConditionModel (SDPA)
  holding the same weights; the floor is the step's FLOPs at the measured matmul rate.
- A 50-step edit of 2 prompts (Replace + LocalBlend, maps stored), against our own 50-step generation of the
  same two prompts (the part every edit pays).
- Null-text inversion of one image, float16 UNet with a float32 embedding and Adam (2 steps x 2 iterations:
  the peak does not grow with steps), peak memory measured with diffusers' copy released, so the process holds
  one model (issue 17's goal: fits in 24 GB).
CPU smoke: the tiny-sdxl preset, fp32, 3 steps.

    python -m benchmarks.bench_sdxl [--smoke]     or     p2p-engine bench --only sdxl
"""
from __future__ import annotations

import math

import torch

from benchmarks.bench_inversion import photo_like
from benchmarks.common import Row, check_close, matmul_flops_per_s, measure, measure_grad, script_main, seconds_left

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"


def random_pipeline(preset: str, device: torch.device, dtype: torch.dtype):
    """A Pipeline of `preset` with random weights made on `device` (scaled as save_random_checkpoint's)."""
    from p2p_engine.config import PRESETS
    from p2p_engine.loading import build_meta
    from p2p_engine.pipeline import Pipeline
    from p2p_engine.tokenizer import clip_tokenizer

    cfg = PRESETS[preset]
    modules = build_meta(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    for part, m in modules.items():
        m.to_empty(device=device)
        with torch.no_grad():
            for name, p in m.named_parameters():
                r = torch.randn(p.shape, generator=g, device=device)
                if p.dim() <= 1 and "norm" in name:
                    p.copy_(1 + 0.1 * r)
                elif p.dim() <= 1 or "embedding" in name:
                    p.copy_(0.02 * r)
                else:
                    p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
            for name, buf in m.named_buffers():  # to_empty left them uninitialised: CLIP's position ids
                if name.endswith("position_ids"):
                    buf.copy_(torch.arange(buf.shape[-1], device=device).expand(buf.shape))
        keep_fp32 = part == "vae" and cfg.vae.force_upcast and dtype != torch.float32
        m.to(torch.float32 if keep_fp32 else dtype).eval().requires_grad_(False)
    modules["unet"].set_backend("triton" if device.type == "cuda" else "torch")
    return Pipeline(modules["unet"], modules["vae"], modules["text_encoder"], clip_tokenizer(), cfg, device=device,
                    dtype=dtype, backend="triton" if device.type == "cuda" else "torch",
                    text_encoder_2=modules["text_encoder_2"], tokenizer_2=clip_tokenizer("!"))


def run(device: torch.device, smoke: bool = False) -> list[Row]:
    import p2p_engine as p2p
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from benchmarks.bench_unet import unet_flops

    on_gpu = device.type == "cuda"
    preset = "tiny-sdxl" if smoke else "sdxl"
    dtype = torch.float16 if on_gpu and not smoke else torch.float32
    hi = torch.float32 if dtype == torch.float16 else torch.float64
    steps = 3 if smoke else 50
    warmup, repeats = (0, 1) if smoke else (1, 3)
    pipe = random_pipeline(preset, device, dtype)
    cfg = pipe.config
    s = cfg.latent_size
    with torch.device(device):
        dunet = UNet2DConditionModel(**{k: v for k, v in cfg.unet.to_diffusers().items() if k != "_class_name"})
    dunet.load_state_dict(pipe.unet.state_dict())
    dunet = dunet.to(dtype).eval()
    dunet.set_attn_processor(AttnProcessor2_0())

    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 4, s, s, generator=g, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    text = pipe.encode_text([SOURCE, SOURCE])
    ids = pipe.time_ids(s * 8, s * 8, 2)
    added = {"text_embeds": text.pooled, "time_ids": ids}
    with torch.inference_mode():
        d_hi = dunet.to(hi)
        ref_hi = d_hi(x.to(hi), t, encoder_hidden_states=text.context.to(hi),
                      added_cond_kwargs={k: v.to(hi) for k, v in added.items()}).sample
        dunet = d_hi.to(dtype)
        base = dunet(x, t, encoder_hidden_states=text.context, added_cond_kwargs=added).sample
        check = check_close("SDXL UNet vs diffusers", pipe.unet(x, t, text.context, pooled=text.pooled, time_ids=ids),
                            ref_hi, base, dtype)
        fwd = unet_flops(lambda a, b, encoder_hidden_states: dunet(a, b, encoder_hidden_states=encoder_hidden_states,
                                                                    added_cond_kwargs={k: v[:1] for k, v in
                                                                                       added.items()}),
                         x[:1], t[:1], text.context[:1])
    del d_hi, ref_hi
    rate = matmul_flops_per_s(device, dtype)
    rows = []
    mine = measure(lambda: pipe.unet(x, t, text.context, pooled=text.pooled, time_ids=ids), device, warmup=2,
                   repeats=5 if smoke else 20)
    theirs = measure(lambda: dunet(x, t, encoder_hidden_states=text.context, added_cond_kwargs=added), device,
                     warmup=2, repeats=5 if smoke else 20)
    rows.append(Row(f"UNet step, batch 2, {s * 8} x {s * 8}", "ours", mine, "diffusers SDPA", theirs,
                    2 * fwd / rate * 1e3, check))
    del dunet
    if on_gpu:
        torch.cuda.empty_cache()

    prompts = [SOURCE, TARGET]
    if seconds_left() > 60:
        gen = measure(lambda: pipe.generate(prompts, steps=steps, store=False, progress=False, decode_images=False),
                      device, warmup=warmup, repeats=repeats)
        edit = measure(lambda: pipe.edit(prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"]),
                                         steps=steps, progress=False, decode_images=False),
                       device, warmup=warmup, repeats=repeats)
        rows.append(Row(f"P2P edit (Replace+Store+LocalBlend), 2 prompts, {steps} steps", "ours", edit,
                        "ours: generation, 2 prompts", gen, steps * 4 * fwd / rate * 1e3,
                        check="goal: edit <= 1.3x generation"))
    if seconds_left() > 30:
        image = photo_like(cfg.image_size)
        pipe.invert(image, SOURCE, steps=2, inner_steps=2, early_stop=False, progress=False, use_graph=False)  # warm
        t_inv = measure_grad(lambda: pipe.invert(image, SOURCE, steps=2, inner_steps=2, early_stop=False,
                                                 progress=False, use_graph=False), device, warmup=0, repeats=1)
        peak = t_inv.peak_mem_bytes
        rows.append(Row("null-text inversion, 1 image, 2 steps x 2 iterations: peak memory", "ours", t_inv,
                        floor_ms=None, check=f"goal: fits in 24 GB ({'-' if peak is None else f'{peak / 2**30:.1f}'} "
                                             f"GB, {t_inv.mem_kind})"))
    return rows


def main(argv=None) -> int:
    return script_main("sdxl", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
