"""One UNet forward (one sampling step at batch B): ours against diffusers.

GPU (full run): the SD 1.5 UNet with random weights, fp16, 64 x 64 latents, batch 1/2/4/8:
ours on the "triton" and "torch" backends (an uncontrolled forward runs SDPA on both, so these two rows
differ only by noise), the whole forward replayed from a CUDA graph (`p2p_engine.graphs`), and as an
experiment the torch path in channels-last (NHWC) memory, eager and graphed; against diffusers with SDPA
(AttnProcessor2_0) and with the materialised-probability processor (AttnProcessor, what reference P2P
hooks into).
CPU smoke: the tiny preset in fp32, batch 1 and 2, torch path only (Triton on CPU runs in its interpreter,
which times Python, not kernels).

Floor: the forward's FLOPs (torch.utils.flop_counter on the diffusers UNet, batch 1, times B) over the
device's measured dense-matmul rate: no implementation does that arithmetic faster.

    python -m benchmarks.bench_unet [--smoke]     or     p2p-engine bench --only unet
"""
from __future__ import annotations

import copy
import tempfile

import torch

from benchmarks.common import Row, check_close, experiment, matmul_flops_per_s, measure, save_checkpoint, script_main, \
    seconds_left

TIMESTEP = 500


def _out(x) -> torch.Tensor:
    """A UNet's output tensor, whether the module returns it bare (ours) or in an output object (diffusers)."""
    return getattr(x, "sample", x)


def load_diffusers_unet(path: str, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(f"{path}/unet", torch_dtype=dtype).to(device).eval()


def unet_flops(dunet, sample: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> int:
    """FLOPs of one diffusers UNet forward on these inputs (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        dunet(sample, t, encoder_hidden_states=ctx)
    return counter.get_total_flops()


def pipe_unet_flops(pipe, prompt: str, device, dtype) -> int:
    """FLOPs of one forward of the engine's UNet at the pipeline's native size, one latent, `prompt`'s context."""
    with torch.inference_mode():
        s = pipe.config.latent_size
        return unet_flops(lambda x, t, encoder_hidden_states: pipe.unet(x, t, encoder_hidden_states),
                          torch.randn(1, 4, s, s, device=device, dtype=dtype), torch.tensor([500], device=device),
                          pipe.encode_prompt([prompt]))


def inputs(cfg, batch: int, device, dtype, seed: int = 0):
    """(B, 4, h, w) latents, (B,) timesteps, (B, 77, D) context."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.unet.sample_size
    sample = torch.randn(batch, cfg.unet.in_channels, s, s, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cfg.unet.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), TIMESTEP, dtype=torch.int64, device=device)
    return sample, t, ctx


def run(device: torch.device, smoke: bool = False) -> list[Row]:
    import p2p_engine as p2p
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    on_gpu = device.type == "cuda"
    preset = "tiny" if smoke else "sd15"
    dtype = torch.float16 if on_gpu and not smoke else torch.float32
    hi = torch.float32 if dtype == torch.float16 else torch.float64  # the precision of the reference output
    batches = (1, 2) if smoke else (1, 2, 4, 8)
    backends = ("triton", "torch") if on_gpu else ("torch",)
    warmup, repeats = (1, 3) if smoke else (3, 20)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(tmp, preset)
        # the usual layout here; channels-last (the CUDA default since) is the experiment's rows below
        ours = {b: p2p.load(path, device=device, dtype=dtype, backend=b, channels_last=False) for b in backends}
        cfg = ours[backends[0]].config
        d_sdpa = load_diffusers_unet(path, device, dtype)
        d_sdpa.set_attn_processor(AttnProcessor2_0())
        d_mat = copy.deepcopy(d_sdpa)
        d_mat.set_attn_processor(AttnProcessor())
        d_hi = copy.deepcopy(d_sdpa).to(hi)

    # -- correctness before timing: each of ours against the baseline in higher precision, at batch 2
    sample, t, ctx = inputs(cfg, 2, device, dtype)
    with torch.inference_mode():
        ref_hi = d_hi(sample.to(hi), t, encoder_hidden_states=ctx.to(hi)).sample
        base_lo = d_sdpa(sample, t, encoder_hidden_states=ctx).sample
        checks = {b: check_close(f"{b} vs diffusers", _out(ours[b].unet(sample, t, ctx)), ref_hi, base_lo, dtype)
                  for b in backends}
    cl = fused = None
    if on_gpu:
        # The torch path with NHWC convolutions (cuDNN's layout on Hopper; `load`'s default on CUDA), and the
        # same with each GroupNorm + SiLU as one Triton op in NHWC (no NCHW copies around torch's GroupNorm)
        cl = copy.deepcopy(ours["torch"].unet)
        cl.set_channels_last(True)
        fused = copy.deepcopy(cl)
        fused.set_fused_norms(True)
        x_cl = sample.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            checks["channels-last"] = check_close("torch channels-last vs diffusers", _out(cl(x_cl, t, ctx)),
                                                  ref_hi, base_lo, dtype)
            with experiment("unet", "fused GroupNorm (not yet run on a GPU)"):
                checks["fused norms"] = check_close("channels-last + fused GroupNorm vs diffusers",
                                                    _out(fused(x_cl, t, ctx)), ref_hi, base_lo, dtype)
    graphed = {}
    if on_gpu:
        graphed[2] = _graph_or_none(ours[backends[0]].unet, sample, t, ctx)
        if graphed[2] is not None:
            with torch.inference_mode():
                checks["graph"] = check_close("CUDA graph vs diffusers", graphed[2](sample, t, ctx), ref_hi,
                                              base_lo, dtype)
    del d_hi, ref_hi
    if on_gpu:
        torch.cuda.empty_cache()

    s1, t1, c1 = inputs(cfg, 1, device, dtype)
    flops_b1 = unet_flops(d_sdpa, s1, t1, c1)
    rate = matmul_flops_per_s(device, dtype)

    rows = []
    for b in batches:
        if seconds_left() < 3 * b:
            print(f"[unet] batch {b} and larger left out: {max(seconds_left(), 0):.0f} s left before "
                  "P2P_BENCH_DEADLINE", flush=True)
            break
        sample, t, ctx = inputs(cfg, b, device, dtype)
        floor_ms = flops_b1 * b / rate * 1e3
        sdpa = measure(lambda: d_sdpa(sample, t, encoder_hidden_states=ctx), device, warmup=warmup, repeats=repeats)
        mat = measure(lambda: d_mat(sample, t, encoder_hidden_states=ctx), device, warmup=warmup, repeats=repeats)
        for backend in backends:
            unet = ours[backend].unet
            mine = measure(lambda: unet(sample, t, ctx), device, warmup=warmup, repeats=repeats)
            rows.append(Row(f"batch {b}", f"ours {backend}", mine, "diffusers SDPA", sdpa, floor_ms,
                            checks[backend], extra={"steps_per_s": 1e3 / mine.median}))
            rows.append(Row(f"batch {b}", f"ours {backend}", mine, "diffusers AttnProcessor", mat, floor_ms,
                            checks[backend]))
        if cl is not None:
            x_cl = sample.contiguous(memory_format=torch.channels_last)
            mine = measure(lambda: cl(x_cl, t, ctx), device, warmup=warmup, repeats=repeats)
            rows.append(Row(f"batch {b}", "ours torch, channels-last", mine, "diffusers SDPA", sdpa, floor_ms,
                            checks["channels-last"], extra={"steps_per_s": 1e3 / mine.median}))
            if "fused norms" in checks:  # its gate passed
                with experiment("unet", f"fused GroupNorm at batch {b}"):
                    fused_t = measure(lambda: fused(x_cl, t, ctx), device, warmup=warmup, repeats=repeats)
                    rows.append(Row(f"batch {b}", "ours torch, channels-last + fused GroupNorm", fused_t,
                                    "ours torch, channels-last", mine, floor_ms, checks["fused norms"],
                                    extra={"steps_per_s": 1e3 / fused_t.median}))
            g = _graph_or_none(cl, x_cl, t, ctx)
            if g is not None:
                mine = measure(lambda: g(x_cl, t, ctx), device, warmup=warmup, repeats=repeats)
                rows.append(Row(f"batch {b}", "ours torch, channels-last + CUDA graph", mine, "diffusers SDPA",
                                sdpa, floor_ms, checks["channels-last"], extra={"steps_per_s": 1e3 / mine.median}))
                # side by side, the row that decides unet.FUSED_NORMS
                plain, gf = mine, _graph_or_none(fused, x_cl, t, ctx) if "fused norms" in checks else None
                if gf is not None:
                    with experiment("unet", f"fused GroupNorm in a CUDA graph at batch {b}"):
                        fused_t = measure(lambda: gf(x_cl, t, ctx), device, warmup=warmup, repeats=repeats)
                        rows.append(Row(f"batch {b}", "ours torch, channels-last + fused GroupNorm + CUDA graph",
                                        fused_t, "ours torch, channels-last + CUDA graph", plain, floor_ms,
                                        checks["fused norms"], extra={"steps_per_s": 1e3 / fused_t.median}))
                del gf
            del g
        if "graph" in checks:
            g = graphed.get(b) or _graph_or_none(ours[backends[0]].unet, sample, t, ctx)
            if g is not None:
                mine = measure(lambda: g(sample, t, ctx), device, warmup=warmup, repeats=repeats)
                rows.append(Row(f"batch {b}", f"ours {backends[0]} + CUDA graph", mine, "diffusers SDPA", sdpa,
                                floor_ms, checks["graph"], extra={"steps_per_s": 1e3 / mine.median}))
            graphed.pop(b, None)
    return rows


def _graph_or_none(unet, sample, t, ctx):
    """The forward captured in a CUDA graph, or None (with the reason printed) where capture fails: the
    other rows of the benchmark still count."""
    from p2p_engine.graphs import GraphedUNet
    try:
        return GraphedUNet(unet, sample, t, ctx)
    except RuntimeError as e:  # capture refused an operation
        print(f"CUDA graph capture failed, graph rows left out: {e}")
        return None


def main(argv=None) -> int:
    return script_main("unet", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
