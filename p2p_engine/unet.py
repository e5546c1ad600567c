"""The Stable Diffusion UNet (SD 1.x and 2.x), written from the architecture.

Attribute names follow diffusers' checkpoint keys, so a diffusers
`unet/diffusion_pytorch_model.safetensors` loads with no renaming. Every
attention layer goes through `p2p_engine.attention.attention` with the plan
its control object gives it (`control.plan(layer, n)`): that is the attention
seam. The decoder's resnets are the second, for features: each asks
`control.feature_plan(site)` (None, or a `plan.FeaturePlan` that replaces rows
of its residual branch, as Plug-and-Play injects the source's features).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .blocks import GroupNorm, ResnetBlock, Upsample, check_input
from .config import UNetConfig
from .plan import AttnLayer, ResnetSite


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cos first (diffusers' flip_sin_to_cos=True, freq_shift=0). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context_dim` is None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, layer: AttnLayer | None, upcast: bool):
        super().__init__()
        self.heads = heads
        self.layer = layer
        self.upcast = upcast
        self.backend = "torch"
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, control=None):
        # x: (B, N, C); context: (B, T, Dc) or None
        B, N, C = x.shape
        ctx = x if context is None else context
        # (B, N, H, D) viewed as (B, H, N, D): the kernels read the strided view without a copy
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        plan = control.plan(self.layer, N) if control is not None else None
        out = attention(q, k, v, plan, is_cross=context is not None, backend=self.backend, upcast=self.upcast)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))

    @staticmethod
    def hook_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, context) of a call to `forward`, from a forward hook's (args, kwargs) (`with_kwargs=True`)."""
        return args[0], kwargs.get("context", args[1] if len(args) > 1 else None)

    def probabilities(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The head-averaged attention probabilities (B, N, M) this layer forms for `x` and `context`
        (fp32 at least), with gradients: what the toy model's analysis and attention loss read (forward
        itself goes through `attention`, which may never form them)."""
        B, N, _ = x.shape
        ctx = x if context is None else context
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * q.shape[-1] ** -0.5
        return torch.softmax(scores, -1).mean(1)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # keys net.0.proj and net.2 (net.1 is a dropout in diffusers, parameter-free)
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, self_layer, cross_layer, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, self_layer, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, cross_layer, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, control):
        x = x + self.attn1(self.norm1(x), None, control)
        x = x + self.attn2(self.norm2(x), context, control)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    def __init__(self, ch, heads, cfg: UNetConfig, layers: list[tuple[AttnLayer, AttnLayer]]):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([  # one (self, cross) pair of layers per block
            TransformerBlock(ch, heads, cfg.cross_attention_dim, s, c, cfg.upcast_attention) for s, c in layers])
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context, control):
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context, control)
        if self.linear:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))
        return h + x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Block(nn.Module):
    """One down or up level: resnets, optional transformers, optional resampler."""

    def __init__(self, resnets, attentions, sampler_name, sampler):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        if sampler is not None:
            setattr(self, sampler_name, nn.ModuleList([sampler]))


# Whether `load` fuses the GroupNorms of a channels-last UNet on CUDA (`UNet.set_fused_norms`): off until the
# side-by-side rows of benchmarks/bench_unet.py on a GPU say the fused step is the faster.
FUSED_NORMS = False


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        n = len(ch)
        temb = ch[0] * 4
        g, eps = cfg.norm_num_groups, 1e-5
        self.attn_layers: list[AttnLayer] = []

        def layers(place, level, module):
            pair = tuple(AttnLayer(len(self.attn_layers) + i, place, i == 1, level, module) for i in range(2))
            self.attn_layers.extend(pair)
            return pair

        def transformer(c, heads, place, level, module=0):
            # SDXL stacks several blocks per module (cfg.depth); the layers are numbered in call order
            depth = cfg.depth(level if place != "mid" else n - 1)
            return Transformer2D(c, heads, cfg, [layers(place, level, module) for _ in range(depth)])

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_time_embed_dim is not None:  # SDXL: pooled text + 6 embedded time ids, added to temb
            self.add_embedding = TimestepEmbedding(cfg.pooled_dim + 6 * cfg.addition_time_embed_dim, temb)

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i in range(n):
            cin, cout = cout, ch[i]
            resnets, attns = [], []
            for j in range(cfg.layers_per_block):
                resnets.append(ResnetBlock(cin if j == 0 else cout, cout, temb, g, eps))
                if cfg.cross_attn[i]:
                    attns.append(transformer(cout, cfg.num_heads[i], "down", i, j))
            down = Downsample(cout) if i < n - 1 else None
            self.down_blocks.append(Block(resnets, attns, "downsamplers", down))

        self.mid_block = Block(
            [ResnetBlock(ch[-1], ch[-1], temb, g, eps), ResnetBlock(ch[-1], ch[-1], temb, g, eps)], [], None, None)
        self.mid_block.attentions = nn.ModuleList([transformer(ch[-1], cfg.num_heads[-1], "mid", n - 1)])

        self.up_blocks = nn.ModuleList()
        self.resnet_sites: list[list[ResnetSite]] = []  # per up block, its resnets' places (the feature seam)
        rch = list(reversed(ch))
        rheads = list(reversed(cfg.num_heads))
        rcross = list(reversed(cfg.cross_attn))
        cout = rch[0]
        for i in range(n):
            prev, cout = cout, rch[i]
            skip_in = rch[min(i + 1, n - 1)]
            level = n - 1 - i
            resnets, attns = [], []
            for j in range(cfg.layers_per_block + 1):
                res_skip = skip_in if j == cfg.layers_per_block else cout
                res_in = prev if j == 0 else cout
                resnets.append(ResnetBlock(res_in + res_skip, cout, temb, g, eps))
                if rcross[i]:
                    attns.append(transformer(cout, rheads[i], "up", level, j))
            self.resnet_sites.append([ResnetSite(level, j) for j in range(len(resnets))])
            up = Upsample(cout) if i < n - 1 else None
            self.up_blocks.append(Block(resnets, attns, "upsamplers", up))

        self.conv_norm_out = GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    channels_last = False  # whether the convolutions run in NHWC memory (`set_channels_last`)

    def set_channels_last(self, on: bool) -> None:
        """Keep the convolution weights, and run every forward's activations, in channels-last (NHWC) memory:
        cuDNN's layout on recent GPUs, which ran the SD 1.5 step 7-28% faster on an H200 (RESULTS.md). Inputs
        and outputs stay (B, C, h, w) in the usual layout; only the memory order inside the forward changes."""
        self.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.channels_last = bool(on)

    fused_norms = False  # whether each GroupNorm and its SiLU run as one Triton op (`set_fused_norms`)

    def set_fused_norms(self, on: bool) -> None:
        """Run every GroupNorm, with the SiLU after it, as `kernels.group_norm` where no gradient is needed: in
        the activations' own layout, so channels-last skips the NCHW copies torch's CUDA GroupNorm makes (one in,
        one back for the next convolution) and SiLU's pass. `load` turns it on with channels-last on CUDA when
        FUSED_NORMS says so; on the CPU the kernel runs interpreted (tests only)."""
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.fused = bool(on)
        self.fused_norms = bool(on)

    def set_backend(self, name: str) -> None:
        if name not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = name

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor, control=None,
                pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        # sample: (B, C, h, w); timestep: scalar, 0-d or (B,); context: (B, T, D)
        # SDXL only: pooled (B, pooled_dim) text embedding, time_ids (B, 6) (original h, w, crop top, left, target h, w)
        weight = self.conv_in.weight
        check_input("unet", "sample", sample, weight, "(B, C, h, w)", 1, self.cfg.in_channels)
        check_input("unet", "context", context, weight, "(B, T, D)", 2, self.cfg.cross_attention_dim)
        B = sample.shape[0]
        if context.shape[0] != B:
            raise ValueError(f"unet: context has {context.shape[0]} rows but sample has {B}: one prompt embedding per "
                             "sample row")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.numel() not in (1, B):
            raise ValueError(f"unet: timestep must be a scalar or ({B},), one per sample row; got {tuple(t.shape)}")
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        emb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(sample.dtype))
        if self.cfg.addition_time_embed_dim is not None:
            if pooled is None or time_ids is None:
                raise ValueError("this UNet (SDXL) needs the pooled text embedding and the time ids: "
                                 "unet(sample, t, context, pooled=..., time_ids=...)")
            ids = timestep_embedding(time_ids.reshape(-1), self.cfg.addition_time_embed_dim).reshape(B, -1)
            emb = emb + self.add_embedding(torch.cat([pooled, ids.to(pooled.dtype)], dim=-1).to(emb.dtype))

        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                x = res(x, emb)
                if block.attentions is not None:
                    x = block.attentions[j](x, context, control)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block.resnets[0](x, emb)
        x = self.mid_block.attentions[0](x, context, control)
        x = self.mid_block.resnets[1](x, emb)

        for block, sites in zip(self.up_blocks, self.resnet_sites):
            for j, res in enumerate(block.resnets):
                features = control.feature_plan(sites[j]) if control is not None else None
                x = res(torch.cat([x, skips.pop()], dim=1), emb, features)
                if block.attentions is not None:
                    x = block.attentions[j](x, context, control)
            if hasattr(block, "upsamplers"):
                # sizes that do not halve evenly: upsample to the skip's size, as diffusers does
                size = skips[-1].shape[-2:] if skips else None
                x = block.upsamplers[0](x, size)
        return self.conv_out(self.conv_norm_out(x, silu=True)).contiguous()
