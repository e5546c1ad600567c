"""Cross attention with the control plan fused in: emit, inject, re-weight.

`cross_attention(q, k, v, plan, scale)` (Triton) and
`cross_attention_reference(q, k, v, plan, scale)` (pure torch) compute, for
q (B, H, N, D) and k, v (B, H, T, D) with B = 2P rows [uncond x P, cond x P],
out (B, H, N, D) = p_out @ v where p = softmax(q k^T * scale) over the T text
tokens and p_out follows `p2p_engine.plan` exactly:

    store[i] += mean_h p[P + i]                                   (pre-injection)
    injected = (p_src @ mapper[j-1]) * mix[j-1] + p_tgt * (1 - mix[j-1])
    injected = injected * equalizer[j-1]
    p_out    = injected * gate[j-1] + p_tgt * (1 - gate[j-1])     (targets only)

With a cached source (`plan.source`, a re-edit from an edit cache) p_src is read
from the plan, not computed from row P, and every conditional row is a target.

No backward: the kernels are forward-only. Null-text inversion back-propagates
through uncontrolled calls only, and the attention seam
(`p2p_engine.attention`) sends every gradient-requiring uncontrolled call to
SDPA, which has a fast backward; the launcher refuses tensors that need grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from p2p_engine.plan import CrossPlan, inject_cross, probabilities

from ._common import INTERPRET, check_inputs, check_plan_rows, new_output, next_pow2, source_table, unit_last_stride


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              plan: CrossPlan | None, scale: float) -> torch.Tensor:
    """Pure-torch cross attention under `plan`; q (B, H, N, D), k/v (B, H, T, D) -> (B, H, N, D).

    Rows no control touches go through SDPA; the conditional rows of a
    controlled call materialise p (P, H, N, T) in fp32.
    """
    store = plan.store if plan is not None else None
    injects = plan is not None and plan.injects
    if store is None and not injects:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    P = plan.num_prompts
    check_plan_rows("cross_attention_reference", q.shape[0], P)
    out = torch.empty_like(q)
    out[:P] = F.scaled_dot_product_attention(q[:P], k[:P], v[:P], scale=scale)

    p = probabilities(q[P:], k[P:], scale)  # (P, H, N, T)
    if store is not None:
        store.add_(p.mean(dim=1).to(store.dtype))  # (P, N, T)
    if injects and plan.source is not None:  # every row a target, p_src given
        p = inject_cross(plan.source_probs().to(p.dtype), p, plan.mapper, plan.mix, plan.equalizer, plan.gate)
    elif injects and P > 1:
        p_src, p_tgt = p[:1], p[1:]  # (1, H, N, T), (P-1, H, N, T)
        p = torch.cat([p_src, inject_cross(p_src, p_tgt, plan.mapper, plan.mix, plan.equalizer, plan.gate)])
    out[P:] = (p @ v[P:].to(p.dtype)).to(q.dtype)
    return out


@triton.jit
def _softmax_rows(q, k_ptrs, kv_mask, t_mask, scale, PREC: tl.constexpr):
    # q (BLOCK_N, BLOCK_D), k (BLOCK_T, BLOCK_D) -> p (BLOCK_N, BLOCK_T) fp32; padded tokens get 0.
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(t_mask[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _cross_head(Q, K, V, O, MAPPER, MIX, EQ, GATE, SRC, SRC_ROW, b, h, pid_n,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, ss_c, ss_h, ss_n,
                N, T, D, P, scale,
                BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_INJECT: tl.constexpr, HAS_MIX: tl.constexpr, HAS_EQ: tl.constexpr, HAS_GATE: tl.constexpr,
                SRC_CACHED: tl.constexpr, SRC_INDEXED: tl.constexpr,
                PREC: tl.constexpr, MAP_PREC: tl.constexpr, HALF_PV: tl.constexpr):
    # One (row b, head h, query block) of the output; returns the block's own pre-injection p for the store.
    # SRC_CACHED: p_src is read from SRC (C, 1, H, N, T) at row *SRC_ROW (SRC_INDEXED) or 0, and every
    # conditional row b >= P is a target; otherwise row P is the source and the targets follow it.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    t_mask = offs_t < T
    d_mask = offs_d < D
    q_mask = n_mask[:, None] & d_mask[None, :]
    kv_mask = t_mask[:, None] & d_mask[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_off = offs_n[:, None] * sq_n + offs_d[None, :]
    k_off = offs_t[:, None] * sk_n + offs_d[None, :]

    q = tl.load(Q + b64 * sq_b + h64 * sq_h + q_off, mask=q_mask, other=0.0)
    p = _softmax_rows(q, K + b64 * sk_b + h64 * sk_h + k_off, kv_mask, t_mask, scale, PREC)
    p_own = p
    if SRC_CACHED:
        first = P
    else:
        first = P + 1
    if HAS_INJECT:
        if b >= first:
            j = b - first
            if SRC_CACHED:
                if SRC_INDEXED:
                    row = tl.load(SRC_ROW).to(tl.int64)
                else:
                    row = tl.full([], 0, tl.int64)
                s_ptrs = SRC + row * ss_c + h64 * ss_h + offs_n[:, None].to(tl.int64) * ss_n + offs_t[None, :]
                p_src = tl.load(s_ptrs, mask=n_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
            else:
                # The source row (P) sits in this same launch but in another program, with no
                # ordering between programs; so the target recomputes p_src from q_src and
                # k_src (same head, same query block): T * D extra FLOPs per query, no sync.
                src = tl.full([], P, tl.int64)
                q_src = tl.load(Q + src * sq_b + h64 * sq_h + q_off, mask=q_mask, other=0.0)
                p_src = _softmax_rows(q_src, K + src * sk_b + h64 * sk_h + k_off, kv_mask, t_mask, scale, PREC)
            tt_off = offs_t[:, None] * T + offs_t[None, :]
            tt_mask = t_mask[:, None] & t_mask[None, :]
            mapper = tl.load(MAPPER + j * T * T + tt_off, mask=tt_mask, other=0.0)  # (T, T) fp32
            injected = tl.dot(p_src, mapper, input_precision=MAP_PREC)
            if HAS_MIX:
                mix = tl.load(MIX + j * T + offs_t, mask=t_mask, other=0.0)[None, :]
                injected = injected * mix + p * (1.0 - mix)
            if HAS_EQ:
                injected = injected * tl.load(EQ + j * T + offs_t, mask=t_mask, other=0.0)[None, :]
            if HAS_GATE:
                gate = tl.load(GATE + j * T + offs_t, mask=t_mask, other=0.0)[None, :]
                injected = injected * gate + p * (1.0 - gate)
            p = injected
    v = tl.load(V + b64 * sv_b + h64 * sv_h + offs_t[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    if HALF_PV:
        # Half inputs: p in v's dtype on the tensor cores, as SDPA / flash attention do.
        o = tl.dot(p.to(v.dtype), v)
    else:
        o = tl.dot(p, v, input_precision="ieee")
    o_off = b64 * so_b + h64 * so_h + offs_n[:, None] * so_n + offs_d[None, :]
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=q_mask)
    return p_own


@triton.jit
def _cross_fwd(Q, K, V, O, STORE, MAPPER, MIX, EQ, GATE, SRC, SRC_ROW,
               sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, ss_c, ss_h, ss_n,
               H, N, T, D, P, scale,
               BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_STORE: tl.constexpr, HAS_INJECT: tl.constexpr, HAS_MIX: tl.constexpr,
               HAS_EQ: tl.constexpr, HAS_GATE: tl.constexpr, SRC_CACHED: tl.constexpr, SRC_INDEXED: tl.constexpr,
               PREC: tl.constexpr, MAP_PREC: tl.constexpr, HALF_PV: tl.constexpr, HEADS_IN_PROGRAM: tl.constexpr):
    # q/o (B, H, N, D), k/v (B, H, T, D), any strides with unit D stride. Two ways to meet the store:
    # - grid (cdiv(N, BLOCK_N), B * H): one head per program, heads summed into the store by atomics;
    # - HEADS_IN_PROGRAM, grid (cdiv(N, BLOCK_N), B): the program loops over the heads, sums their p in
    #   registers and writes each store entry once (read, add, write: no other program owns it), with H
    #   times fewer programs to spread over the GPU.
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    nt_mask = (offs_n < N)[:, None] & (offs_t < T)[None, :]
    nt_off = offs_n[:, None] * T + offs_t[None, :]
    if HEADS_IN_PROGRAM:
        b = tl.program_id(1)
        p_sum = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        for h in range(H):
            # b * 0 + h: the head as a tensor (the interpreter's range() gives Python ints)
            p_sum += _cross_head(Q, K, V, O, MAPPER, MIX, EQ, GATE, SRC, SRC_ROW, b, b * 0 + h, pid_n,
                                 sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                                 ss_c, ss_h, ss_n, N, T, D, P, scale, BLOCK_N, BLOCK_T, BLOCK_D, HAS_INJECT,
                                 HAS_MIX, HAS_EQ, HAS_GATE, SRC_CACHED, SRC_INDEXED, PREC, MAP_PREC, HALF_PV)
        if HAS_STORE:
            if b >= P:
                ptrs = STORE + (b - P).to(tl.int64) * N * T + nt_off
                tl.store(ptrs, tl.load(ptrs, mask=nt_mask, other=0.0) + p_sum / H, mask=nt_mask)
    else:
        bh = tl.program_id(1)
        b = bh // H
        p = _cross_head(Q, K, V, O, MAPPER, MIX, EQ, GATE, SRC, SRC_ROW, b, bh % H, pid_n,
                        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                        ss_c, ss_h, ss_n, N, T, D, P, scale, BLOCK_N, BLOCK_T, BLOCK_D, HAS_INJECT,
                        HAS_MIX, HAS_EQ, HAS_GATE, SRC_CACHED, SRC_INDEXED, PREC, MAP_PREC, HALF_PV)
        if HAS_STORE:
            if b >= P:
                # The store sees every conditional row's own, pre-injection p; heads meet by atomics.
                tl.atomic_add(STORE + (b - P).to(tl.int64) * N * T + nt_off, p / H, mask=nt_mask)


def _plan_vector(name: str, x: torch.Tensor | None, shape: tuple, device) -> torch.Tensor | None:
    if x is None:
        return None
    if tuple(x.shape) != shape:
        raise ValueError(f"cross_attention: plan.{name} must have shape {shape}; got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32).contiguous()


def _config(dtype: torch.dtype, BLOCK_D: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps); static, checked to compile for sm_90 within its shared memory
    (tests/test_kernel_cross.py::test_gpu_configs_compile_for_sm90)."""
    if INTERPRET:
        return 16, 1  # ~16 ms per program instance: few, small programs
    if dtype == torch.float32:
        return (32, 4) if BLOCK_D <= 128 else (32, 8)
    return (64, 4) if BLOCK_D <= 128 else (32, 8)


STORE_WAYS = ("atomic", "heads")
# How a storing call meets its store (`_cross_fwd`'s two grids); "atomic" until the side-by-side timing of
# benchmarks/bench_attention.py on a GPU says otherwise (the heads-in-program way is not yet measured).
STORE_WAY = "atomic"


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    plan: CrossPlan | None, scale: float, store_way: str | None = None) -> torch.Tensor:
    """Triton cross attention under `plan`; q (B, H, N, D), k/v (B, H, T, D) -> (B, H, N, D).

    Same contract as `cross_attention_reference`. T <= 128. CUDA tensors, or CPU
    tensors with TRITON_INTERPRET=1 set before import. `store_way` (default STORE_WAY): "atomic" (a
    program per head, heads summed into the store by atomics) or "heads" (a program per query block
    loops over the heads and writes each store entry once); without a store both are one computation.
    """
    store_way = STORE_WAY if store_way is None else store_way
    if store_way not in STORE_WAYS:
        raise ValueError(f"cross_attention: store_way must be one of {STORE_WAYS}, got {store_way!r}")
    check_inputs("cross_attention", q, k, v)
    B, H, N, D = q.shape
    T = k.shape[2]
    if T > 128:
        raise ValueError(f"cross_attention: at most 128 text tokens; got T = {T}")
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    out = new_output(q)
    store = plan.store if plan is not None else None
    injects = plan is not None and plan.injects and plan.targets > 0
    P = plan.num_prompts if plan is not None else 0
    if plan is not None:
        check_plan_rows("cross_attention", B, P)
    if store is not None:
        if tuple(store.shape) != (P, N, T) or store.dtype != torch.float32 or store.device != q.device \
                or not store.is_contiguous():
            raise ValueError(f"cross_attention: plan.store must be a contiguous float32 ({P}, {N}, {T}) "
                             f"tensor on {q.device}; got {tuple(store.shape)} {store.dtype} {store.device}")
    mapper = mix = eq = gate = table = None
    if injects:
        J = plan.targets
        mapper = _plan_vector("mapper", plan.mapper, (J, T, T), q.device)
        mix = _plan_vector("mix", plan.mix, (J, T), q.device)
        eq = _plan_vector("equalizer", plan.equalizer, (J, T), q.device)
        gate = _plan_vector("gate", plan.gate, (J, T), q.device)
        if plan.source is not None:
            table = source_table("cross_attention", "plan.source", plan.source, plan.source_row, "H, N, T",
                                 (H, N, T), q.device, (torch.float32, torch.float16, torch.bfloat16))
    # Unused pointers still need a tensor; `out` is never read through them (flags are constexpr).
    dummy = out

    indexed = table is not None and plan.source_row is not None
    half = q.dtype in (torch.float16, torch.bfloat16)
    BLOCK_T, BLOCK_D = next_pow2(T), next_pow2(D)
    BLOCK_N, num_warps = _config(q.dtype, BLOCK_D)
    heads = store is not None and store_way == "heads"
    grid = (triton.cdiv(N, BLOCK_N), B if heads else B * H)
    _cross_fwd[grid](
        q, k, v, out, store if store is not None else dummy,
        mapper if mapper is not None else dummy, mix if mix is not None else dummy,
        eq if eq is not None else dummy, gate if gate is not None else dummy,
        table if table is not None else dummy, plan.source_row if table is not None and indexed else dummy,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *((table.stride(0), table.stride(2), table.stride(3)) if table is not None else (0, 0, 0)),
        H, N, T, D, P, float(scale),
        BLOCK_N=BLOCK_N, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        HAS_STORE=store is not None, HAS_INJECT=injects, HAS_MIX=mix is not None,
        HAS_EQ=eq is not None, HAS_GATE=gate is not None,
        SRC_CACHED=table is not None, SRC_INDEXED=indexed,
        # fp32 inputs would otherwise drop to tf32 on GPU; half inputs keep Triton's default
        # (their products are exact in the fp32 accumulator either way).
        PREC="tf32" if half else "ieee",
        # Half inputs carry ~11 bits anyway: tf32 (tensor cores) for p_src @ mapper costs no accuracy
        # that the half output keeps, and FMA fp32 would dominate the run time; fp32 inputs stay exact.
        MAP_PREC="tf32" if half else "ieee", HALF_PV=half, HEADS_IN_PROGRAM=heads,
        num_warps=num_warps,
    )
    return out
