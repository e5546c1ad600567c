"""GroupNorm, and the SiLU after it, on channels-last activations without layout copies.

`group_norm(x, weight, bias, groups, eps, silu)` (Triton) and
`group_norm_reference(...)` (pure torch): x (B, C, H, W) -> the same shape,
dtype and memory layout; y = (x - mean_g) / sqrt(var_g + eps) * weight + bias
per group g of C / groups channels over all H x W positions (the biased
variance, as torch's), then y * sigmoid(y) when `silu`. Statistics and the
affine step are computed in fp32 whatever x's dtype.

Why: PyTorch's CUDA GroupNorm makes its input NCHW-contiguous, so a UNet that
keeps its activations channels-last (cuDNN's fast layout) pays a copy into
NCHW before each of SD 1.5's 61 GroupNorms, one back before the convolution
after it, and SiLU's own pass: about eight passes over the activation where
three will do. Here, in the memory the convolutions use (any layout whose
H and W flatten into one position stride; channels-last makes the loads
contiguous along C):

1. `_gn_partials`, grid (S, B, C blocks): each program reads CHUNK positions
   x BLOCK_C channels once and keeps, per channel, their mean and sum of
   squared deviations, merged over sub-blocks by Chan's parallel update (no
   E[x^2] - E[x]^2 cancellation);
2. `_gn_finish`, grid (B,): merges the S chunks and the channels of each
   group the same way into its mean and 1 / sqrt(var + eps);
3. `_gn_apply`, grid (position blocks, B, C blocks): y = x * a + b with
   a = rstd * weight and b = bias - mean * a per channel (torch's CUDA kernel
   forms the same a and b), SiLU'd in registers, written once.

Bytes: x read twice, y written once. No backward: forward-only (the UNet's
`GroupNorm` takes torch's path where autograd needs one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import INTERPRET, next_pow2


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool = False) -> torch.Tensor:
    """torch's GroupNorm, then SiLU when `silu`: what `group_norm` computes."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


@triton.jit
def _gn_partials(X, MEAN, M2, sx_b, sx_c, sx_p, HW, C, S,
                 CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per (chunk s, row b, channel block): the chunk's per-channel mean and M2 -> MEAN, M2 (B, S, C) fp32.
    s = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    base = X + b.to(tl.int64) * sx_b + offs_c[None, :].to(tl.int64) * sx_c
    start = s * CHUNK
    left = tl.maximum(HW - start, 0)  # positions of this chunk that exist
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK_P):
        rows = start + off + tl.arange(0, BLOCK_P)
        mask = (rows < HW)[:, None] & c_mask[None, :]
        x = tl.load(base + rows[:, None].to(tl.int64) * sx_p, mask=mask, other=0.0).to(tl.float32)
        n_a = tl.minimum(left, off).to(tl.float32)  # positions merged so far
        n_b = tl.minimum(tl.maximum(left - off, 0), BLOCK_P).to(tl.float32)  # ... and in this sub-block
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        # Chan et al.: merge (n_a, mean, m2) with (n_b, mean_b, sum d^2)
        w = n_b / tl.maximum(n_a + n_b, 1.0)
        delta = mean_b - mean
        mean = mean + delta * w
        m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * n_a * w
    out = (b * S + s).to(tl.int64) * C + offs_c
    tl.store(MEAN + out, mean, mask=c_mask)
    tl.store(M2 + out, m2, mask=c_mask)


@triton.jit
def _gn_finish(MEAN, M2, STATS, HW, C, S, G, CPG, total, eps, CHUNK: tl.constexpr,
               BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    # Per row b: each group's mean and rstd over its CPG channels and S chunks (`total` = HW x CPG values)
    # -> STATS (B, 2, G) fp32.
    b = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    mask = (g < G)[:, None] & (j < CPG)[None, :]
    ch = g[:, None] * CPG + j[None, :]  # (group, channel of the group)
    acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    for s in range(0, S):  # the group means: the chunks' means weighted by their sizes
        n_s = tl.minimum(HW - s * CHUNK, CHUNK).to(tl.float32)
        m = tl.load(MEAN + (b * S + s).to(tl.int64) * C + ch, mask=mask, other=0.0)
        acc += n_s * tl.sum(m, axis=1)
    gmean = acc / total
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for s in range(0, S):  # the group M2: the chunks' M2 plus their means' spread about the group mean
        n_s = tl.minimum(HW - s * CHUNK, CHUNK).to(tl.float32)
        off = (b * S + s).to(tl.int64) * C + ch
        d = tl.where(mask, tl.load(MEAN + off, mask=mask, other=0.0) - gmean[:, None], 0.0)
        m2 += tl.sum(tl.load(M2 + off, mask=mask, other=0.0), axis=1) + n_s * tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    g_mask = g < G
    tl.store(STATS + (2 * b) * G + g, gmean, mask=g_mask)
    tl.store(STATS + (2 * b + 1) * G + g, rstd, mask=g_mask)


@triton.jit
def _gn_apply(X, Y, W, BIAS, STATS, sx_b, sx_c, sx_p, sy_b, sy_c, sy_p, HW, C, G, CPG,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
    # Per (position block, row b, channel block): y = x * a + b, SiLU'd when asked, in Y's dtype.
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    grp = offs_c // CPG
    mean = tl.load(STATS + (2 * b) * G + grp, mask=c_mask, other=0.0)
    rstd = tl.load(STATS + (2 * b + 1) * G + grp, mask=c_mask, other=0.0)
    a = rstd * tl.load(W + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.load(BIAS + offs_c, mask=c_mask, other=0.0).to(tl.float32) - mean * a
    mask = (rows < HW)[:, None] & c_mask[None, :]
    r64, c64 = rows[:, None].to(tl.int64), offs_c[None, :].to(tl.int64)
    x = tl.load(X + b.to(tl.int64) * sx_b + r64 * sx_p + c64 * sx_c, mask=mask, other=0.0).to(tl.float32)
    y = x * a[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + b.to(tl.int64) * sy_b + r64 * sy_p + c64 * sy_c, y.to(Y.dtype.element_ty), mask=mask)


def _config() -> tuple[int, int, int]:
    """(CHUNK, BLOCK_P, BLOCK_C); static, checked to compile for sm_90 (tests/test_kernel_norm.py)."""
    if INTERPRET:
        return 32, 16, 16  # ~16 ms per program instance: few, small programs, yet several chunks and sub-blocks
    return 256, 64, 64


def _positions(name: str, t: torch.Tensor) -> tuple[int, int, int]:
    """(row, channel, position) strides of a (B, C, H, W) tensor whose H and W flatten into one position."""
    H, W = t.shape[2:]
    if W == 1:
        return t.stride(0), t.stride(1), t.stride(2)
    if H > 1 and t.stride(2) != W * t.stride(3):
        raise ValueError(f"{name}: H and W must flatten into one position stride (channels-last or NCHW "
                         f"memory); got strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(3)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               silu: bool = False) -> torch.Tensor:
    """Triton GroupNorm (+ SiLU) of x (B, C, H, W); the same contract as `group_norm_reference`, and the
    output keeps x's memory layout (channels-last in, channels-last out)."""
    if x.dim() != 4:
        raise ValueError(f"group_norm: x must be (B, C, H, W); got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if C % groups:
        raise ValueError(f"group_norm: {C} channels do not split into {groups} groups")
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"group_norm: weight and bias must be ({C},); got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if not (x.device == weight.device == bias.device):
        raise ValueError(f"group_norm: x, weight and bias must be on one device; got {x.device}, "
                         f"{weight.device}, {bias.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or (x.device.type == "cpu" and
                                                                         x.dtype == torch.bfloat16):
        raise TypeError(f"group_norm: takes float16, bfloat16 (CUDA only) or float32; got {x.dtype}")
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("group_norm: got CPU tensors but Triton's interpreter is off; set TRITON_INTERPRET=1 "
                           "before importing p2p_engine, or use torch's GroupNorm")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        raise RuntimeError("group_norm: the Triton kernel has no backward; use torch's GroupNorm where "
                           "gradients are needed")
    HW, CPG = H * W, C // groups
    weight, bias = weight.contiguous(), bias.contiguous()  # read at unit stride
    y = torch.empty_like(x)  # x's memory format
    sx, sy = _positions("group_norm", x), _positions("group_norm", y)
    CHUNK, BLOCK_P, BLOCK_C = _config()
    S = triton.cdiv(HW, CHUNK)
    mean = torch.empty(B, S, C, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    stats = torch.empty(B, 2, groups, device=x.device, dtype=torch.float32)
    cblocks = triton.cdiv(C, BLOCK_C)
    _gn_partials[(S, B, cblocks)](x, mean, m2, *sx, HW, C, S, CHUNK=CHUNK, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    _gn_finish[(B,)](mean, m2, stats, HW, C, S, groups, CPG, float(HW * CPG), float(eps), CHUNK=CHUNK,
                     BLOCK_G=next_pow2(groups, 1), BLOCK_J=next_pow2(CPG, 1))
    _gn_apply[(triton.cdiv(HW, BLOCK_P), B, cblocks)](x, y, weight, bias, stats, *sx, *sy, HW, C, groups, CPG,
                                                      BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, SILU=silu)
    return y
