"""Self attention with source-map injection, flash-attention style.

`self_attention(q, k, v, plan, scale)` (Triton) and
`self_attention_reference(q, k, v, plan, scale)` (pure torch): q, k, v
(B, H, N, D) with B = 2P rows [uncond x P, cond x P] -> out (B, H, N, D).
When `plan.inject` (and `plan.gate`, if given, is non-zero on the device),
target rows P+1 .. 2P-1 get softmax(q_src k_src^T * scale) @ v_tgt (the
source's map on the target's values); every other row is plain attention.
With `plan.source` (a re-edit from an edit cache) q_src and k_src come from
the plan, read in place from its tables at `plan.source_row`, and every
conditional row P .. 2P-1 is a target. With `plan.rows` (other editors) every
row b reads from row rows[b] what `plan.take` names: the queries and keys
("qk", the source's map on the row's own values) or the keys and values ("kv",
MasaCtrl: the row's own queries on the source's keys and values), in both
guidance halves. `plan.store` (P, N, N) fp32 receives, added in place, the
head-averaged pre-injection maps of the conditional rows.

The kernel never materialises N x N (online softmax over key blocks), so a
stored map cannot come from it: a call whose plan stores falls back to the
reference, which is fine because only layers with N <= 32*32 store.

No backward: forward-only. The attention seam (`p2p_engine.attention`) sends
gradient-requiring uncontrolled calls (null-text inversion) to SDPA; the
launcher refuses tensors that need grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from p2p_engine.plan import SelfPlan, probabilities

from ._common import INTERPRET, check_inputs, check_plan_rows, new_output, next_pow2, source_table, unit_last_stride


def _source_queries_keys(q: torch.Tensor, k: torch.Tensor, plan: SelfPlan,
                         on: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, D) with the targets' rows holding the source's (row P's, or the plan's cached ones),
    where the gate `on` (None: always) is."""
    P, first = plan.num_prompts, 2 * plan.num_prompts - plan.targets
    source = plan.source_qk() if plan.source is not None else (q[P:P + 1], k[P:P + 1])
    out = []
    for own, src in zip((q, k), source):
        t = own.clone()
        src = src.to(own.dtype).expand_as(own[first:])
        t[first:] = src if on is None else torch.where(on, src, own[first:])
        out.append(t)
    return out[0], out[1]


TAKES = ("qk", "kv")


def check_rows(name: str, plan: SelfPlan, batch: int, device) -> None:
    """Raise naming what to fix when a plan's `rows` table cannot drive a batch of `batch` rows on `device`."""
    rows = plan.rows
    if plan.take not in TAKES:
        raise ValueError(f"{name}: plan.take must be one of {TAKES}, got {plan.take!r}")
    if plan.source is not None:
        raise ValueError(f"{name}: a plan takes its source from `rows` or from `source`, not both")
    if rows.shape != (batch,) or rows.dtype != torch.int64 or rows.device != device:
        raise ValueError(f"{name}: plan.rows must be a ({batch},) int64 tensor on {device}, one source row per "
                         f"batch row; got {tuple(rows.shape)} {rows.dtype} {rows.device}")


def _rows_taken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SelfPlan,
                on: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, D) with what `plan.take` names read from row plan.rows[b] for each row b, where the gate
    `on` (None: always) is."""
    def taken(t):
        other = t.index_select(0, plan.rows)
        return other if on is None else torch.where(on, other, t)

    return (q, taken(k), taken(v)) if plan.take == "kv" else (taken(q), taken(k), v)


def self_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             plan: SelfPlan | None, scale: float) -> torch.Tensor:
    """Pure-torch self attention under `plan`; q, k, v (B, H, N, D) -> (B, H, N, D).

    Injection without a store needs no map: it is SDPA with the targets' q, k
    swapped for the source's. Only a store materialises p (P, H, N, N) in fp32.
    """
    store = plan.store if plan is not None else None
    inject = plan is not None and plan.inject
    if store is None and not inject:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    P = plan.num_prompts
    check_plan_rows("self_attention_reference", q.shape[0], P)
    on = None if plan.gate is None or not inject else plan.gate.ne(0)  # (1,): the injection's device switch
    if inject and plan.rows is not None:
        check_rows("self_attention_reference", plan, q.shape[0], q.device)
        if store is not None:
            store.add_(probabilities(q[P:], k[P:], scale).mean(dim=1).to(store.dtype))  # (P, N, N), own maps
        return F.scaled_dot_product_attention(*_rows_taken(q, k, v, plan, on), scale=scale)
    if store is None:
        qs, ks = _source_queries_keys(q, k, plan, on)
        return F.scaled_dot_product_attention(qs, ks, v, scale=scale)
    out = torch.empty_like(q)
    out[:P] = F.scaled_dot_product_attention(q[:P], k[:P], v[:P], scale=scale)
    p = probabilities(q[P:], k[P:], scale)  # (P, H, N, N)
    store.add_(p.mean(dim=1).to(store.dtype))  # (P, N, N)
    if inject:
        # With no cached source row 0 is the source, so every row may take it: the source's own is unchanged.
        src = p[:1] if plan.source is None else probabilities(*plan.source_qk(), scale)
        p = src.expand_as(p) if on is None else torch.where(on, src.expand_as(p), p)
    out[P:] = (p @ v[P:].to(p.dtype)).to(q.dtype)
    return out


@triton.jit
def _self_fwd(Q, K, V, O, GATE, QS, KS, SRC_ROW, ROWS,
              sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
              sqs_c, sqs_h, sqs_n, sks_c, sks_h, sks_n,
              H, N, D, P, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              INJECT: tl.constexpr, HAS_GATE: tl.constexpr, SRC_CACHED: tl.constexpr, SRC_INDEXED: tl.constexpr,
              BY_ROWS: tl.constexpr, TAKE_KV: tl.constexpr, PREC: tl.constexpr):
    # Grid (cdiv(N, BLOCK_M), B * H); q, k, v, o (B, H, N, D), any strides with unit D stride; with SRC_CACHED
    # the source's q and k (C, 1, H, N, D) tables, read at row SRC_ROW (SRC_INDEXED) or 0; with BY_ROWS the
    # (B,) table ROWS of the row each row reads its k and v (TAKE_KV) or its q and k from.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H).to(tl.int64)
    Qb = Q + b.to(tl.int64) * sq_b + h * sq_h  # where this row's q and k are read, and their row strides
    Kb = K + b.to(tl.int64) * sk_b + h * sk_h
    q_sn, k_sn = sq_n, sk_n
    v_b = b
    if INJECT and BY_ROWS:
        src = tl.load(ROWS + b)
        if HAS_GATE:  # the plan's device-side switch: 0 leaves every row its own
            src = tl.where(tl.load(GATE) != 0, src, b)
        src = src.to(tl.int64)
        Kb = K + src * sk_b + h * sk_h
        if TAKE_KV:  # own queries on the other row's keys and values
            v_b = src
        else:  # the other row's map on own values
            Qb = Q + src * sq_b + h * sq_h
    elif INJECT:
        # Target rows score with the source's q and k (same head), values stay their own: row P's, after it;
        # or, with a cached source, the table's, on every conditional row.
        take = (b >= P) if SRC_CACHED else (b > P)
        if HAS_GATE:  # the plan's device-side switch: 0 leaves every row its own q and k
            take = take & (tl.load(GATE) != 0)
        if SRC_CACHED:
            c = tl.load(SRC_ROW) if SRC_INDEXED else 0
            Qb = tl.where(take, QS + c * sqs_c + h * sqs_h, Qb)
            Kb = tl.where(take, KS + c * sks_c + h * sks_h, Kb)
            q_sn, k_sn = tl.where(take, sqs_n, sq_n), tl.where(take, sks_n, sk_n)
        else:
            qk_b = tl.where(take, P, b)
            Qb = Q + qk_b.to(tl.int64) * sq_b + h * sq_h
            Kb = K + qk_b.to(tl.int64) * sk_b + h * sk_h
    v_base = v_b.to(tl.int64) * sv_b + h * sv_h

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = (offs_m < N)[:, None] & d_mask[None, :]
    q = tl.load(Qb + offs_m[:, None] * q_sn + offs_d[None, :], mask=q_mask, other=0.0)
    qk_scale = scale * 1.4426950408889634  # 1/log(2): exp2 is the fast path

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols < N)[:, None] & d_mask[None, :]
        k = tl.load(Kb + cols[:, None] * k_sn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where((cols < N)[None, :], s, float("-inf"))
        # -- update m_i, l_i, acc
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + v_base + cols[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        # p in v's dtype, as flash attention does: tensor cores for half inputs, exact for fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_off = b.to(tl.int64) * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :]
    tl.store(O + o_off, acc.to(O.dtype.element_ty), mask=q_mask)


def _config(dtype: torch.dtype, BLOCK_D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    Static configs, checked to compile for sm_90 within its shared memory
    (tests/test_kernel_cross.py::test_gpu_configs_compile_for_sm90); fp32 on
    GPU is a correctness path (no tensor cores), so it gets small tiles.
    """
    if INTERPRET:
        return 16, 16, 1, 1  # ~16 ms per program instance: few, small programs
    if dtype == torch.float32:
        return 64, 32, 4, 1
    if BLOCK_D <= 64:
        return 128, 64, 4, 3
    if BLOCK_D <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   plan: SelfPlan | None, scale: float) -> torch.Tensor:
    """Triton self attention under `plan`; q, k, v (B, H, N, D) -> (B, H, N, D).

    Same contract as `self_attention_reference`; a plan with a store runs the
    reference (see the module docstring). D <= 256.
    """
    check_inputs("self_attention", q, k, v)
    B, H, N, D = q.shape
    if k.shape[2] != N:
        raise ValueError(f"self_attention: q and k must have the same length; got {N} and {k.shape[2]}")
    if D > 256:
        raise ValueError(f"self_attention: head dim at most 256; got {D}")
    inject = plan is not None and plan.inject
    if plan is not None:
        check_plan_rows("self_attention", B, plan.num_prompts)
        if plan.store is not None:
            # Storing needs the N x N maps themselves, which this kernel never forms.
            return self_attention_reference(q, k, v, plan, scale)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    out = new_output(q)
    BLOCK_D = next_pow2(D)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config(q.dtype, BLOCK_D)
    grid = (triton.cdiv(N, BLOCK_M), B * H)
    gate = plan.gate if inject and plan.gate is not None else None
    if gate is not None and (gate.numel() != 1 or gate.device != q.device):
        raise ValueError(f"self_attention: the plan's gate must be one value on {q.device}, got "
                         f"{tuple(gate.shape)} on {gate.device}")
    qs = ks = row = rows = out  # `out` stands in for unused pointers, never read (the flags are constexpr)
    by_rows = inject and plan.rows is not None
    if by_rows:
        check_rows("self_attention", plan, B, q.device)
        rows = plan.rows
    cached = inject and plan.source is not None
    if cached:
        row = plan.source_row if plan.source_row is not None else out
        qs, ks = (source_table("self_attention", f"plan.source's {n}", t, plan.source_row, "H, N, D",
                               (H, N, D), q.device, (q.dtype,)) for n, t in zip(("q", "k"), plan.source))
    _self_fwd[grid](q, k, v, out, gate if gate is not None else out, qs, ks, row, rows,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                    *((qs.stride(0), qs.stride(2), qs.stride(3), ks.stride(0), ks.stride(2), ks.stride(3))
                      if cached else (0,) * 6),
                    H, N, D, plan.num_prompts if plan is not None else 0, float(scale),
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, INJECT=inject,
                    HAS_GATE=gate is not None, SRC_CACHED=cached, SRC_INDEXED=cached and plan.source_row is not None,
                    BY_ROWS=by_rows, TAKE_KV=by_rows and plan.take == "kv",
                    # fp32 inputs stay exact (no tf32); half inputs take Triton's default tensor-core path.
                    PREC="ieee" if q.dtype == torch.float32 else "tf32",
                    num_warps=num_warps, num_stages=num_stages)
    return out
