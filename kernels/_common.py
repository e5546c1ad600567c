"""What both kernels share: the interpreter switch and launcher checks."""
from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this
# package is imported; reading it here once keeps launcher and kernels agreed.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes (B, H, N, D) / (B, H, M, D) / (B, H, M, D); one device, one dtype."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be (B, H, N, D), (B, H, M, D), (B, H, M, D); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name}: CUDA kernel takes float16, bfloat16 or float32; got {q.dtype}")
    elif q.device.type == "cpu":
        if not INTERPRET:
            raise RuntimeError(
                f"{name}: got CPU tensors but Triton's interpreter is off. Set TRITON_INTERPRET=1 in the "
                "environment before importing p2p_engine.kernels, or use backend='torch'.")
        if q.dtype not in (torch.float16, torch.float32):
            # bf16 tl.dot is wrong in the interpreter (numpy has no bfloat16).
            raise TypeError(f"{name}: the Triton interpreter takes float16 or float32; got {q.dtype}")
    else:
        raise ValueError(f"{name}: unsupported device {q.device}")
    if q.requires_grad or k.requires_grad or v.requires_grad:
        if torch.is_grad_enabled():
            raise RuntimeError(f"{name}: the Triton kernels have no backward; route gradient-requiring "
                               "calls to SDPA (p2p_engine.attention does this for uncontrolled calls)")


def check_plan_rows(name: str, batch: int, num_prompts: int) -> None:
    if batch != 2 * num_prompts:
        raise ValueError(f"{name}: the batch must be [uncond x P, cond x P] = {2 * num_prompts} rows "
                         f"for P = {num_prompts}; got {batch}")


def next_pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << (int(x) - 1).bit_length())


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any (B, H, N) strides, e.g. the free (B, N, H, D) -> (B, H, N, D) transpose of a
    projection's output; only the head dim must be dense."""
    return x if x.stride(-1) == 1 else x.contiguous()


def new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) laid out as (B, N, H, D): the caller's merge of heads back to (B, N, H * D) is then a view."""
    B, H, N, D = q.shape
    return torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def source_table(name: str, what: str, src: torch.Tensor, row: torch.Tensor | None, dims: str, shape: tuple,
                 device, dtypes: tuple) -> torch.Tensor:
    """A plan's cached `what` as a (C, 1, *shape) table with unit last stride: `src` itself when `row` (a (1,)
    int64 device index into it) is given, else `src` (1, *shape) as a table of one. `dims` names shape's
    dimensions for the error, which says what the source must be."""
    table = src if row is not None else src.unsqueeze(0)
    if table.dim() != 2 + len(shape) or tuple(table.shape[1:]) != (1, *shape) or table.device != device \
            or table.dtype not in dtypes:
        want = f"a (C, 1, {dims}) table with source_row" if row is not None else f"(1, {dims})"
        kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: {what} must be {want} with ({dims}) = {tuple(shape)}, {kinds}, on {device}; "
                         f"got {tuple(src.shape)} {src.dtype} {src.device}")
    if row is not None and (row.shape != (1,) or row.dtype != torch.int64 or row.device != device):
        raise ValueError(f"{name}: plan.source_row must be a (1,) int64 tensor on {device}; got "
                         f"{tuple(row.shape)} {row.dtype} {row.device}")
    return unit_last_stride(table)
