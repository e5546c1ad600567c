"""The one attention seam: every attention layer of the UNet and VAE calls `attention`.

With no plan it is plain scaled-dot-product attention. With a control plan
(`p2p_engine.plan`) it stores, injects and re-weights maps: through the
pure-torch references (backend "torch") or the fused Triton kernels (backend
"triton"), which live side by side in `p2p_engine.kernels`.
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
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if backend == "torch" or (plan is None and (needs_grad or q.shape[1] == 1)):
        # The kernels have no backward: null-text inversion's uncontrolled, differentiated calls
        # go through SDPA, which has one. Single-head (VAE) attention also stays on SDPA.
        if plan is None:
            return _sdpa(q, k, v, upcast)
        kern = _kernels()
        ref = kern.cross_attention_reference if is_cross else kern.self_attention_reference
        return ref(q, k, v, plan, q.shape[-1] ** -0.5)
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kern = _kernels()
    op = kern.cross_attention if is_cross else kern.self_attention
    return op(q, k, v, plan, q.shape[-1] ** -0.5)
