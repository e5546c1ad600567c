"""The one attention seam: every attention layer of the UNet and VAE calls `attention`.

With no plan it is plain scaled-dot-product attention (SDPA), on every backend: faster
than our kernels without control (measured). With a control plan (`p2p_engine.plan`)
it stores, injects and re-weights maps through the pure-torch references (backend
"torch") or the fused Triton kernels (backend "triton"), which live side by side in
`p2p_engine.kernels`; a large self-attention injection takes SDPA on the source's
queries and keys instead, which was faster there (see SELF_KERNEL_MAX_N). A plan
that carries its own attention (`plan.attend(q, k, v, scale)`: the edit cache's
recording plans, `p2p_engine.cache`) is called instead; a re-edit's plans are
`CrossPlan`s and `SelfPlan`s with a cached source, which both backends take. A batch of independent edits
gives a `BlockPlans`: each block of rows is attended under its own plan, as that edit alone would be.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .plan import BlockPlans

BACKENDS = ("torch", "triton")


def triton_interpreter() -> bool:
    """Switch Triton's interpreter on where there is no CUDA; returns whether the kernels run interpreted.

    The one place that sets TRITON_INTERPRET. Triton reads it when a function is decorated: our kernels
    when `p2p_engine.kernels` is first imported, and Triton's own library (`tl.max`, ...) when
    `triton.language` is, which other packages (transformers) may do first. So `import p2p_engine` calls
    this before anything else, and `load_kernels` checks before a kernel runs. A value the user
    set in the environment is left as it is.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these releases, or None. Triton before 3.7 reads a
    loop bound as int() of a 1-element array, which NumPy 2.4 refuses (seen with triton 3.6, torch 2.11's)."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (the kernels on the CPU) fails with NumPy {numpy_version}: "
                f"install numpy<2.4 or triton>=3.7, or use backend='torch'")
    return None


@functools.cache
def load_kernels():
    """`p2p_engine.kernels`, once Triton is known to run them (interpreted on the CPU: see `triton_interpreter`)."""
    if triton_interpreter():
        import numpy
        import triton
        import triton.language as tl
        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
        if type(tl.max).__name__ != "InterpretedFunction":
            raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set, so its library cannot run "
                               "interpreted on the CPU: import p2p_engine before other packages that use Triton, "
                               "set TRITON_INTERPRET=1 in the environment, or use backend='torch'")
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
    if isinstance(plan, BlockPlans):  # independent edits in one batch: each block of rows under its own plan
        return torch.cat([attention(q[a:b], k[a:b], v[a:b], p, is_cross=is_cross, backend=backend, upcast=upcast)
                          for a, b, p in plan.spans()])
    if plan is not None and hasattr(plan, "attend"):
        return plan.attend(q, k, v, q.shape[-1] ** -0.5)
    if plan is None or not (plan.injects or plan.store is not None):
        # Uncontrolled: SDPA on every backend. It has a backward (null-text inversion differentiates these
        # calls), and on an H200 it ran 2-8x faster than our kernels without control (benchmarks/RESULTS.md).
        return _sdpa(q, k, v, upcast)
    kern = load_kernels()
    scale = q.shape[-1] ** -0.5
    if backend == "torch":
        ref = kern.cross_attention_reference if is_cross else kern.self_attention_reference
        return ref(q, k, v, plan, scale)
    if is_cross:
        return kern.cross_attention(q, k, v, plan, scale)
    if plan.store is None and q.shape[2] > SELF_KERNEL_MAX_N:
        # A large injecting self attention: SDPA with the targets' q, k swapped for the source's (the
        # reference's way), which forms no N x N map either and beats our kernel there.
        return kern.self_attention_reference(q, k, v, plan, scale)
    return kern.self_attention(q, k, v, plan, scale)


# Self-attention injection, SD 1.5 shapes, batch 4, fp16, H200 (benchmarks/RESULTS.md, 2026-11-26): the Triton
# kernel took 0.053 / 0.057 / 0.100 / 0.736 ms at N = 64 / 256 / 1024 / 4096, SDPA on swapped q, k (two copies
# and a flash-attention call) 0.068 / 0.071 / 0.105 / 0.367 ms. Above this N the engine takes SDPA.
SELF_KERNEL_MAX_N = 1024
