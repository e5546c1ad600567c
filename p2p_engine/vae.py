"""The Stable Diffusion VAE (AutoencoderKL): encoder to the latent mean, decoder back.

Attribute names follow diffusers' checkpoint keys. The mid-block attention
(one head over all channels) goes through the same attention seam as the UNet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import VAEConfig
from .blocks import ResnetBlock, Upsample, check_input

EPS = 1e-6


class VAEAttention(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        q, k, v = (lin(h)[:, None] for lin in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C)
        out = attention(q, k, v, None, is_cross=False)[:, 0]
        return self.to_out[0](out).transpose(1, 2).reshape(B, C, H, W) + x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original VAE


class Level(nn.Module):
    def __init__(self, resnets, sampler_name=None, sampler=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))


class Mid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, None, groups, EPS), ResnetBlock(ch, ch, None, groups, EPS)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, c in enumerate(ch):
            cin, cout = cout, c
            res = [ResnetBlock(cin if j == 0 else cout, cout, None, g, EPS) for j in range(cfg.layers_per_block)]
            last = i == len(ch) - 1
            self.down_blocks.append(Level(res, "downsamplers", None if last else Downsample(cout)))
        self.mid_block = Mid(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            for res in level.resnets:
                x = res(x)
            if hasattr(level, "downsamplers"):
                x = level.downsamplers[0](x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = Mid(ch[0], g)
        self.up_blocks = nn.ModuleList()
        cout = ch[0]
        for i, c in enumerate(ch):
            cin, cout = cout, c
            res = [ResnetBlock(cin if j == 0 else cout, cout, None, g, EPS) for j in range(cfg.layers_per_block + 1)]
            last = i == len(ch) - 1
            self.up_blocks.append(Level(res, "upsamplers", None if last else Upsample(cout)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            for res in level.resnets:
                x = res(x)
            if hasattr(level, "upsamplers"):
                x = level.upsamplers[0](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> latent mean (B, latent, H/f, W/f), before scaling."""
        check_input("vae.encode", "x", x, self.quant_conv.weight, "(B, 3, H, W)", 1, self.cfg.in_channels)
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.cfg.latent_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent, h, w), unscaled -> (B, 3, h*f, w*f), roughly in [-1, 1]."""
        check_input("vae.decode", "z", z, self.post_quant_conv.weight, "(B, latent, h, w)", 1, self.cfg.latent_channels)
        return self.decoder(self.post_quant_conv(z))
