"""The convolution blocks both Stable Diffusion models are built from: the UNet and the VAE import them.

Attribute names follow diffusers' checkpoint keys (`norm1`, `conv1`, `time_emb_proj`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import load_kernels
from .plan import BlockPlans, FeaturePlan, inject_features


def check_input(model: str, name: str, x: torch.Tensor, weight: torch.Tensor, shape: str, axis: int,
                size: int) -> None:
    """Raise an error that names what to fix when `x` cannot enter `model`: `x` must have len(`shape`)
    dimensions (`shape` spells them, e.g. "(B, 4, h, w)"), `size` entries on `axis`, and `weight`'s device and
    (outside autocast, which casts inputs itself) dtype. Metadata only: no device sync, so captured loops
    may call it."""
    dims = len(shape.strip("()").split(","))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: {name} must be a tensor {shape}, got {type(x).__name__}")
    if x.dim() != dims or x.shape[axis] != size:
        raise ValueError(f"{model}: {name} must be {shape} with {size} on dimension {axis}, got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{model}: {name} is on {x.device} but the weights are on {weight.device}: "
                         f"pass {name}.to({str(weight.device)!r})")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{model}: {name} is {x.dtype} but the weights are {weight.dtype}: "
                         f"pass {name}.to({weight.dtype})")


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (the same parameters and checkpoint keys) that also applies the SiLU after it when asked.
    With `fused` set (`UNet.set_fused_norms`) both run as one Triton op, `kernels.group_norm`, in the input's
    memory layout, wherever autograd does not need them (null-text inversion's gradient steps take torch's)."""

    fused = False

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        if self.fused and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return load_kernels().group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)
        y = super().forward(x)
        return F.silu(y) if silu else y


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, (+ time embedding), GroupNorm, SiLU, conv, plus the (projected) input. In the UNet's
    decoder the residual branch is the feature seam: a `FeaturePlan` (`plan.py`) replaces rows of it."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2 = GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb=None, plan: FeaturePlan | BlockPlans | None = None):
        h = self.conv1(self.norm1(x, silu=True))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(h, silu=True))
        if plan is not None:
            h = inject_features(h, plan)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
