"""Controlled attention on SD 1.5's layer shapes: our fused Triton kernels against torch.

GPU only. Batch 4 = 2 prompts with CFG at 512 x 512 (64 x 64 latents), 8 heads, T = 77 text tokens; one
case per distinct layer shape (N queries, head dim D), with how many UNet layers have it:
- cross: ours with emit + inject (store, Refine mapper, mix, equalizer, gate) against a
  materialised-probability path (what diffusers' AttnProcessor plus a controller does: fp16 scores,
  softmax, controller edits on the (B, H, N, T) map, bmm) and against SDPA with no control at all;
- cross, diagnostic rows: the store alone and the injection alone;
- cross, the store without atomics (`store_way="heads"`: a program per query block loops over the heads)
  against the atomics and against SDPA;
- cross, a re-edit from an edit cache: the targets' rows only (batch 2), p_src read from the cache's table
  of calls at a device row index (what a captured re-edit runs), against the pure-torch path on the same
  plan (the re-edit's path before the kernel took cached sources) and SDPA on those rows without control;
- self: ours without and with source injection against SDPA with no control, and what the engine runs
  for an injection (SDPA on the source's q, k; p2p_engine.attention).
Each case first passes a correctness gate (ours vs the fp32 reference, within 2x torch's own fp16 drift),
then is timed with CUDA events (warm-up, median of repeats). Peak memory is the most allocated during the
timed calls. Floor (napkin math): max(FLOPs / measured matmul rate, bytes / measured copy bandwidth),
FLOPs = 4 B H N M D (q k^T and p v), bytes = q, k, v read + o written (+ the fp32 store, + the
materialised map's round trips for that path).

    python -m benchmarks.bench_attention      or      p2p-engine bench --only attention
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import Row, Timing, check_close, experiment, matmul_flops_per_s, run_suite, seconds_left
from p2p_engine.attention import attention
from p2p_engine.kernels import cross_attention, cross_attention_reference, self_attention, self_attention_reference
from p2p_engine.plan import CrossPlan, SelfPlan, inject_cross

P, B, H, T = 2, 4, 8, 77
# (N, D, number of UNet layers with this shape): 64, 32, 16 px levels have 5 layers each (2 down + 3 up), mid 8 px.
SD15_SHAPES = [(4096, 40, 5), (1024, 80, 5), (256, 160, 5), (64, 160, 1)]
NO_GPU = "no GPU: nothing measured (bench_attention times Triton kernels, which only mean something on CUDA)"


def time_events(fn, *, warmup: int = 10, repeats: int = 100) -> Timing:
    """Per-call ms from CUDA events (median-able samples) and the peak allocated during the timed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
    return Timing(samples, torch.cuda.max_memory_allocated(), "cuda")


def copy_bytes_per_s() -> float:
    """Measured device bandwidth: bytes read + written by a 512 MiB clone."""
    x = torch.empty(2**28, dtype=torch.float16, device="cuda")
    t = time_events(lambda: x.clone(), warmup=3, repeats=10)
    return 2 * x.numel() * x.element_size() / (min(t.samples_ms) / 1e3)


def cross_plan(N: int, device) -> CrossPlan:
    """Every control at once: store, a Refine mapper (one-hot, one unaligned token), mix, equalizer, gate."""
    gen = torch.Generator().manual_seed(N)
    idx = torch.randint(0, T, (P - 1, T), generator=gen)
    mapper = torch.zeros(P - 1, T, T).scatter_(1, idx[:, None, :], 1.0)
    mapper[:, :, 5] = 0
    eq = torch.ones(P - 1, T)
    eq[:, 3] = 2.0
    gate = torch.ones(P - 1, T)
    gate[:, 6] = 0.0
    return CrossPlan(num_prompts=P, store=torch.zeros(P, N, T, device=device), mapper=mapper.to(device),
                     mix=torch.rand(P - 1, T, generator=gen).to(device), equalizer=eq.to(device),
                     gate=gate.to(device))


def materialised_cross(q, k, v, plan: CrossPlan, scale: float) -> torch.Tensor:
    """diffusers AttnProcessor + a P2P controller: the whole (B, H, N, T) map in q's dtype, edited, then bmm."""
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, H, N, T)
    plan.store.add_(p[P:].float().mean(dim=1))
    src, tgt = p[P:P + 1], p[P + 1:]
    mix, eq, gate = (x[:, None, None, :].to(p.dtype) for x in (plan.mix, plan.equalizer, plan.gate))
    injected = (src @ plan.mapper[:, None].to(p.dtype)) * mix + tgt * (1 - mix)
    p[P + 1:] = injected * eq * gate + tgt * (1 - gate)
    return p @ v


def materialised_cached(q, k, v, plan: CrossPlan, scale: float) -> torch.Tensor:
    """The same on a re-edit's rows (every conditional row a target, p_src from the plan), all in q's dtype."""
    R = plan.num_prompts
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    plan.store.add_(p[R:].float().mean(dim=1))
    p[R:] = inject_cross(plan.source_probs().to(p.dtype), p[R:], plan.mapper, plan.mix, plan.equalizer, plan.gate)
    return p @ v


def cached_source_rows(q, k, v, N: int, case: str, scale: float, floor_ms, repeats: int) -> list[Row]:
    """A re-edit's cross call: rows [uncond, cond] of the one target, p_src the row of a 41-call fp32 table (the
    default window of 50 steps) that a device index picks, as `static_control.StaticCachedControl` hands it over."""
    rows_t = [1, P + 1]  # the target's rows of the edit's batch [uncond x P, cond x P]
    qt, kt, vt = q[rows_t], k[rows_t], v[rows_t]

    table = torch.rand(41, 1, H, N, T, device=q.device)
    table /= table.sum(-1, keepdim=True)
    row = torch.tensor([17], device=q.device)

    def plan() -> CrossPlan:  # a fresh store each, the edit's mapper, mix, equalizer and gate
        c = cross_plan(N, q.device)
        return CrossPlan(P - 1, c.store[1:].clone(), c.mapper, c.mix, c.equalizer, c.gate, table, row)

    p_ours, p_ref, p_base = plan(), plan(), plan()
    with torch.inference_mode():
        ours = cross_attention(qt, kt, vt, p_ours, scale)
        ref = cross_attention_reference(qt.float(), kt.float(), vt.float(), p_ref, scale)
        bases = [cross_attention_reference(qt, kt, vt, p_base, scale), materialised_cached(qt, kt, vt, p_base, scale)]
    check = check_close("cross from a cached source", ours, ref, bases, q.dtype)
    fused = time_events(lambda: cross_attention(qt, kt, vt, p_ours, scale), repeats=repeats)
    torch_path = time_events(lambda: cross_attention_reference(qt, kt, vt, p_ref, scale), repeats=repeats)
    sdpa = time_events(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale), repeats=repeats)
    # p_src read once in fp32 and the store read + written: H N T x 4 + 2 x N T x 4 bytes beyond q, k, v, o
    fl = floor_ms(T, 4.0 * H * N * T + 8.0 * N * T, batch=2)
    name = "fused emit+inject from a cached source, batch 2"
    return [Row(case, name, fused, "torch path on the cached source", torch_path, fl, check),
            Row(case, name, fused, "SDPA, no control, batch 2", sdpa, fl, check)]


def cached_self_rows(q, k, v, N: int, case: str, scale: float, floor_ms, repeats: int) -> list[Row]:
    """A re-edit's self call: rows [uncond, cond] of the one target, q_src and k_src the rows of two 20-call
    tables (the default self window of 50 steps) that a device index picks, as a captured re-edit hands them over;
    the kernel reads them in place, the engine's path above SELF_KERNEL_MAX_N copies them out for SDPA."""
    rows_t = [1, P + 1]
    qt, kt, vt = q[rows_t], k[rows_t], v[rows_t]
    gen = torch.Generator(device=q.device).manual_seed(N)
    tables = tuple(torch.randn(20, 1, H, N, q.shape[-1], device=q.device, dtype=q.dtype, generator=gen)
                   for _ in range(2))
    plan = SelfPlan(P - 1, True, source=tables, source_row=torch.tensor([7], device=q.device))
    with torch.inference_mode():
        ours = self_attention(qt, kt, vt, plan, scale)
        ref = self_attention_reference(qt.float(), kt.float(), vt.float(),
                                       SelfPlan(P - 1, True, source=tuple(t.float() for t in tables),
                                                source_row=plan.source_row), scale)
        base = self_attention_reference(qt, kt, vt, plan, scale)  # SDPA in fp16 on the copied-out q_src, k_src
    check = check_close("self inject from a cached source", ours, ref, base, q.dtype)
    fused = time_events(lambda: self_attention(qt, kt, vt, plan, scale), repeats=repeats)
    swapped = time_events(lambda: self_attention_reference(qt, kt, vt, plan, scale), repeats=repeats)
    sdpa = time_events(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale), repeats=repeats)
    fl = floor_ms(N, batch=2)
    name = "fused inject from cached q, k, batch 2"
    return [Row(case, name, fused, "SDPA on the copied-out source q, k (the engine above SELF_KERNEL_MAX_N)",
                swapped, fl, check),
            Row(case, name, fused, "SDPA, no control, batch 2", sdpa, fl, check)]


def run(device: torch.device, smoke: bool = False, repeats: int = 100) -> list[Row]:
    if device.type != "cuda":
        print(NO_GPU)
        return []
    dtype = torch.float16
    flop_rate = matmul_flops_per_s(device, dtype)
    bandwidth = copy_bytes_per_s()
    shapes = SD15_SHAPES[-2:] if smoke else SD15_SHAPES
    repeats = 10 if smoke else repeats
    rows = []
    for N, D, count in shapes:
        if seconds_left() < 8:
            print(f"[attention] N={N} and smaller left out: {max(seconds_left(), 0):.0f} s left before "
                  "P2P_BENCH_DEADLINE", flush=True)
            break
        scale = D ** -0.5
        gen = torch.Generator(device=device).manual_seed(N + D)
        q = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen)
        kc, vc = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
        ks, vs = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
        elem = q.element_size()

        def floor_ms(M: int, extra_bytes: float = 0.0, batch: int = B) -> float:
            flops = 4.0 * batch * H * N * M * D
            bytes_ = elem * batch * H * (2 * N * D + 2 * M * D) + extra_bytes
            return 1e3 * max(flops / flop_rate, bytes_ / bandwidth)

        # -- cross: correctness gate, then time
        with torch.inference_mode():
            ours = cross_attention(q, kc, vc, cross_plan(N, device), scale)
            ref = cross_attention_reference(q.float(), kc.float(), vc.float(), cross_plan(N, device), scale)
            base = materialised_cross(q, kc, vc, cross_plan(N, device), scale)
        check = check_close("cross emit+inject", ours, ref, base, dtype)
        plan = cross_plan(N, device)
        store_bytes = 2 * 4.0 * P * N * T  # fp32 store read + written once (the heads' atomics meet in L2)
        fused = time_events(lambda: cross_attention(q, kc, vc, plan, scale), repeats=repeats)
        mat = time_events(lambda: materialised_cross(q, kc, vc, plan, scale), repeats=repeats)
        sdpa = time_events(lambda: F.scaled_dot_product_attention(q, kc, vc, scale=scale), repeats=repeats)
        case = f"cross N={N} D={D} (x{count} layers)"
        fl = floor_ms(T, store_bytes)
        rows.append(Row(case, "fused emit+inject", fused, "materialised p + controller", mat, fl, check))
        rows.append(Row(case, "fused emit+inject", fused, "SDPA, no control", sdpa, fl, check))
        # where the fused time goes: the store alone (atomics of 8 heads into one map), the injection alone
        store_only = CrossPlan(num_prompts=P, store=torch.zeros(P, N, T, device=device))
        inject_only = cross_plan(N, device)
        inject_only.store = None
        part = time_events(lambda: cross_attention(q, kc, vc, store_only, scale), repeats=repeats)
        rows.append(Row(case, "fused, store only", part, "SDPA, no control", sdpa, fl, check))
        part = time_events(lambda: cross_attention(q, kc, vc, inject_only, scale), repeats=repeats)
        rows.append(Row(case, "fused, inject only", part, "SDPA, no control", sdpa, floor_ms(T), check))
        # the store without atomics: one program per query block loops over the 8 heads and writes each
        # store entry once (H x fewer programs); side by side with the atomics, the winner becomes STORE_WAY
        # (not yet run on a GPU: an experiment whose failure leaves the other rows standing)
        with experiment("attention", f"cross store without atomics, N={N}"):
            with torch.inference_mode():
                heads_out = cross_attention(q, kc, vc, cross_plan(N, device), scale, store_way="heads")
            heads_check = check_close("cross emit+inject, heads in program", heads_out, ref, base, dtype)
            heads = time_events(lambda: cross_attention(q, kc, vc, plan, scale, store_way="heads"), repeats=repeats)
            rows.append(Row(case, "fused emit+inject, heads in program", heads, "fused emit+inject, atomics", fused,
                            fl, heads_check))
            rows.append(Row(case, "fused emit+inject, heads in program", heads, "SDPA, no control", sdpa, fl,
                            heads_check + "; goal: within 2x of SDPA at N = 4096"))
        with experiment("attention", f"cross from a cached source, N={N}"):
            rows += cached_source_rows(q, kc, vc, N, case, scale, floor_ms, repeats)

        # -- self: correctness gate, then time
        inject = SelfPlan(num_prompts=P, inject=True)
        with torch.inference_mode():
            ours = self_attention(q, ks, vs, inject, scale)
            ref = self_attention_reference(q.float(), ks.float(), vs.float(), inject, scale)
            base = self_attention_reference(q, ks, vs, inject, scale)  # SDPA in fp16 on swapped q, k
        check = check_close("self inject", ours, ref, base, dtype)
        sdpa = time_events(lambda: F.scaled_dot_product_attention(q, ks, vs, scale=scale), repeats=repeats)
        plain = time_events(lambda: self_attention(q, ks, vs, None, scale), repeats=repeats)
        injected = time_events(lambda: self_attention(q, ks, vs, inject, scale), repeats=repeats)
        case = f"self N={N} D={D} (x{count} layers)"
        rows.append(Row(case, "fused, no control", plain, "SDPA, no control", sdpa, floor_ms(N), check))
        rows.append(Row(case, "fused, inject", injected, "SDPA, no control", sdpa, floor_ms(N), check))
        # what the engine runs for a self injection: SDPA on the source's q, k (p2p_engine.attention)
        with torch.inference_mode():
            swapped = attention(q, ks, vs, inject, is_cross=False, backend="triton")
        engine_check = check_close("engine self inject", swapped, ref, base, dtype)
        engine = time_events(lambda: attention(q, ks, vs, inject, is_cross=False, backend="triton"), repeats=repeats)
        rows.append(Row(case, "engine: SDPA on source q, k, inject", engine, "SDPA, no control", sdpa, floor_ms(N),
                        engine_check))
        with experiment("attention", f"self from a cached source, N={N}"):
            rows += cached_self_rows(q, ks, vs, N, case, scale, floor_ms, repeats)
        del q, kc, vc, ks, vs
    for r in rows:
        r.extra["median_of"] = len(r.ours.samples_ms)
        r.extra["ours_over_baseline"] = statistics.median(r.ours.samples_ms) / r.baseline.median
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    return run_suite(only=["attention"], smoke=args.smoke, device="cuda", record=True)


if __name__ == "__main__":
    raise SystemExit(main())
