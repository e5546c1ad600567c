"""LPIPS with SqueezeNet (v0.1), as torchmetrics' LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
computes it for PnPInversion's evaluation.

    d(x0, x1) = sum over taps l of mean over (h, w) of  w_l . (n(f_l(s(x0))) - n(f_l(s(x1))))^2

x0, x1: images in [-1, 1] (the reference passes the unedited part, image / 255 x (1 - mask), as 2 x - 1);
s: LPIPS' scaling layer, (x - shift) / scale per channel; f_l: SqueezeNet 1.1's seven taps (squeezenet.py);
n: each feature vector divided by (its L2 norm over channels + 1e-10); w_l: the tap's 1 x 1 linear head
(no bias; its dropout is off in evaluation). The heads' names are the LPIPS file's (`lin{l}.model.1.weight`).
"""
from __future__ import annotations

import torch
from torch import nn

from .squeezenet import TAP_CHANNELS, SqueezeNet11

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class _Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LpipsHeads(nn.Module):
    """The seven linear heads, named as in LPIPS' squeeze.pth."""

    def __init__(self):
        super().__init__()
        for i, c in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{i}", _Head(c))

    def __getitem__(self, i: int) -> nn.Conv2d:
        return getattr(self, f"lin{i}").model[1]


class Lpips(nn.Module):
    def __init__(self, net: SqueezeNet11, heads: LpipsHeads):
        super().__init__()
        self.net, self.heads = net, heads
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> the seven unit-normalised feature maps."""
        x = (x - self.shift.to(x.device)) / self.scale.to(x.device)
        return [f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10) for f in self.net.taps(x)]

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """(B,) distances of x0 and x1, (B, 3, H, W) in [-1, 1]."""
        return self.distance(self.features(x0), x1)

    @torch.no_grad()
    def distance(self, f0: list[torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
        """(B,) distances of x1 from an image whose `features` are f0 (one source, many edits)."""
        total = 0
        for i, (a, b) in enumerate(zip(f0, self.features(x1))):
            total = total + self.heads[i]((a - b) ** 2).mean([2, 3], keepdim=True)
        return total.reshape(-1)
