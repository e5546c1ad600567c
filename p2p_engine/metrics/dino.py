"""Structure distance: DINO ViT-B/8 key self-similarity, as PnPInversion's evaluation computes it (its
`LossG.calculate_global_ssim_loss` with `VitExtractor`, from Splice / "Splicing ViT Features").

    d(src, edit) = mean over (i, j) of (S_edit[i, j] - S_src[i, j])^2,   S = cos(k_i, k_j)

k: the keys of the last block's self-attention, the 12 heads concatenated (768 per token), for every token,
CLS included (785 tokens for a 224 x 224 input); the cosine's denominator is clamped at 1e-8. No mask: the
whole images are compared.

The input, as the reference feeds it (keep this quirk to compare with the published table): the uint8 image
as float32 *0-255, not divided by 255*, resized so that its short side is 224 (the long side
int(224 x long / short), at most 480: torchvision's Resize(224, max_size=480)) by bilinear interpolation
without antialiasing (torchvision 0.13's tensor Resize, the reference's environment; torchvision >= 0.17
antialiases by default and would give other numbers), then ImageNet-normalised ((x - mean) / std with
mean 0.485, 0.456, 0.406 and std 0.229, 0.224, 0.225, meant for [0, 1] input). So the network sees values
up to about 1100; the published numbers were computed so.

The network is DINO's VisionTransformer (patch 8, dim 768, 12 blocks of 12 heads, qkv bias, LayerNorm eps
1e-6, exact GELU), its parameter names those of `dino_vitbase8_pretrain.pth`. Inputs whose token grid differs
from the trained 28 x 28 get DINO's bicubic interpolation of the position embedding. The last block's MLP and
the final norm never affect the keys, so they are loaded (strict keys) but not run.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SHORT_SIDE, MAX_LONG_SIDE = 224, 480
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every DINO ViT (S: 384 / 6, B: 768 / 12)
VIT_B8 = {"dim": 768, "depth": 12, "patch": 8, "grid": 28, "hidden": 3072}


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, D)
        attn = ((q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    def __init__(self, dim: int = 768, depth: int = 12, patch: int = 8, grid: int = 28, hidden: int = 3072):
        super().__init__()
        self.config = {"dim": dim, "depth": depth, "patch": patch, "grid": grid, "hidden": hidden}
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # unused (module docstring)

    @staticmethod
    def config_of(state: dict[str, torch.Tensor]) -> dict[str, int]:
        """The architecture a DINO state dict holds (KeyError if it is not one)."""
        n = state["pos_embed"].shape[1] - 1
        return {"dim": state["cls_token"].shape[-1],
                "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                "patch": state["patch_embed.proj.weight"].shape[-1], "grid": math.isqrt(n),
                "hidden": state["blocks.0.mlp.fc1.weight"].shape[0]}

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + tokens, dim) for an h x w input: DINO's interpolate_pos_encoding, which resamples unless the
        input is square and has the trained token count (so a 224 x 231 input is resampled to 28 x 28)."""
        grid, patch = self.config["grid"], self.config["patch"]
        rows, cols = h // patch, w // patch
        if rows * cols == grid * grid and h == w:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        patch_pos = self.pos_embed[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        # DINO adds 0.1 so that the floor of the output size lands on the token grid
        patch_pos = F.interpolate(patch_pos, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
                                  mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    @torch.no_grad()
    def last_keys(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) preprocessed -> (B, 1 + tokens, dim): the last block's attention keys, heads
        concatenated (the `k` third of its qkv projection)."""
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        t = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), t), dim=1)
        t = t + self._pos_embed(*x.shape[-2:])
        for block in self.blocks[:-1]:
            t = block(t)
        last = self.blocks[-1]
        dim = t.shape[-1]
        return last.attn.qkv(last.norm1(t))[..., dim:2 * dim]


def resized_size(h: int, w: int) -> tuple[int, int]:
    """torchvision's Resize(224, max_size=480) output size for an h x w image."""
    short, long = min(h, w), max(h, w)
    new_short, new_long = SHORT_SIDE, int(SHORT_SIDE * long / short)
    if new_long > MAX_LONG_SIDE:
        new_short, new_long = int(MAX_LONG_SIDE * new_short / new_long), MAX_LONG_SIDE
    return (new_long, new_short) if h > w else (new_short, new_long)


def preprocess(image: np.ndarray, device=None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 the way the reference feeds DINO (module docstring)."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None].to(device)  # 0-255: the quirk
    size = resized_size(*x.shape[-2:])
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN, device=x.device)[:, None, None]
    std = torch.tensor(STD, device=x.device)[:, None, None]
    return (x - mean) / std


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) cosine similarity, the denominator clamped at 1e-8."""
    norm = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(norm @ norm.T, min=1e-8)


class StructureDistance:
    def __init__(self, model: DinoViT):
        self.model = model
        self.device = model.pos_embed.device

    def similarity(self, image: np.ndarray) -> torch.Tensor:
        return self_similarity(self.model.last_keys(preprocess(image, self.device))[0])

    def __call__(self, source: np.ndarray, edited: np.ndarray, source_sim: torch.Tensor | None = None) -> float:
        """`source_sim`: `similarity(source)` when already computed (one source, many edits)."""
        a = self.similarity(source) if source_sim is None else source_sim
        return float(F.mse_loss(self.similarity(edited), a))
