"""The one attention seam: every attention layer of the UNet and VAE calls `attention`.

With no plan it is plain scaled-dot-product attention (SDPA), on every backend. With a
control plan (`p2p_engine.plan`) it stores, injects and re-weights maps: cross attention
through the pure-torch reference (backend "torch") or the fused Triton kernel (backend
"triton"); self attention through the reference on both, since an injection there is
SDPA on the source's queries and keys (see `attention`).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")


@functools.cache
def _kernels():
    # Without CUDA the kernels can only run in Triton's interpreter, which is read when the
    # kernels are decorated (at import), so it is switched on before the first import.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import kernels
    return kernels


def _sdpa(q, k, v, upcast: bool) -> torch.Tensor:
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan=None, *, is_cross: bool,
              backend: str = "torch", upcast: bool = False) -> torch.Tensor:
    """q: (B, H, N, D); k, v: (B, H, M, D) -> (B, H, N, D), softmax(q k^T / sqrt(D)) v under `plan`.

    `upcast` (SD 2.1) computes scores and softmax in fp32 for half inputs; the plan paths
    always build their probabilities in fp32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if plan is None or not (plan.injects or plan.store is not None):
        # Uncontrolled: SDPA on every backend. It has a backward (null-text inversion differentiates these
        # calls), and on an H200 it ran 2-8x faster than our kernels without control (benchmarks/RESULTS.md).
        return _sdpa(q, k, v, upcast)
    kern = _kernels()
    scale = q.shape[-1] ** -0.5
    if backend == "torch" or not is_cross:
        # Self attention: injection is SDPA with the targets' q, k swapped for the source's, which never
        # forms the N x N maps and ran 2.2x faster than the Triton self kernel on an H200; a store needs
        # the maps. The Triton self kernel stays in p2p_engine.kernels, tested and benchmarked.
        ref = kern.cross_attention_reference if is_cross else kern.self_attention_reference
        return ref(q, k, v, plan, scale)
    return kern.cross_attention(q, k, v, plan, scale)
