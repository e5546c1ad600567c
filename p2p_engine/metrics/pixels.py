"""The unedited part of an image and the metrics that need no weights: PSNR, MSE and SSIM, as PnPInversion's
evaluation computes them (evaluation/evaluate.py, matrics_calculator.py).

The mask recipe: PIE's run-length mask is decoded with its border rows and columns set to 1 (edited;
`pie.mask_decode`). Both images, float32 in [0, 1] (uint8 / 255), are multiplied by (1 - mask) and the metric
is taken over the whole image, the zeroed edited region included (so it counts as a perfect match). An entry
whose 1 - mask is all zero (everything edited) has no unedited part: NaN, skipped in means.

The arithmetic is torchmetrics' (the 1.2 line, the reference's time), in float32 on (1, 3, H, W) tensors:
- MSE: sum((a - b)^2) / numel (MeanSquaredError).
- PSNR: -ln(MSE) * 10 / ln 10 with data range 1 (PeakSignalNoiseRatio(data_range=1.0)); +inf for equal images.
- SSIM: StructuralSimilarityIndexMeasure(data_range=1.0): an 11 x 11 Gaussian window (sigma 1.5, the outer
  product of the normalised 1-D taps) over images reflect-padded by 5; the five local statistics from one
  grouped convolution; k1 0.01, k2 0.03; the index map cropped by 5 on each side and averaged. The
  variances are not clamped at 0 (torchmetrics clamps them from 1.3.2 on, March 2024; the difference is
  float32 rounding where a region is flat).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIZE, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def unedited_part(image: np.ndarray, mask: np.ndarray) -> torch.Tensor | None:
    """(H, W, 3) uint8 image and (H, W) 0/1 mask -> (1, 3, H, W) float32 image / 255 x (1 - mask), or None
    when the mask covers the whole image."""
    keep = (1 - mask).astype(np.float32)
    if keep.sum() == 0:
        return None
    x = image.astype(np.float32) / 255 * keep[:, :, None]
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = a - b
    return float(torch.sum(diff * diff) / a.numel())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = a - b
    m = torch.sum(diff * diff) / a.numel()
    return float(-torch.log(m) * (10 / torch.log(torch.tensor(10.0))))


def gaussian_window(size: int = SSIM_SIZE, sigma: float = SSIM_SIGMA, dtype=torch.float32) -> torch.Tensor:
    """(size, size): the outer product of the normalised 1-D Gaussian taps."""
    d = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=dtype)
    g = torch.exp(-torch.pow(d / sigma, 2) / 2)
    g = (g / g.sum())[None]  # (1, size)
    return g.t() @ g


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of (1, C, H, W) images in [0, 1]; H and W must exceed 5 (the reflect padding)."""
    c, pad = a.shape[1], (SSIM_SIZE - 1) // 2
    if min(a.shape[-2:]) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad} x {pad}; got {tuple(a.shape[-2:])}")
    a, b = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (a, b))
    window = gaussian_window(dtype=a.dtype).to(a.device).expand(c, 1, SSIM_SIZE, SSIM_SIZE)
    stats = F.conv2d(torch.cat((a, b, a * a, b * b, a * b)), window, groups=c)  # (5, C, H, W)
    mu_a, mu_b, aa, bb, ab = stats.split(a.shape[0])
    mu_aa, mu_bb, mu_ab = mu_a.pow(2), mu_b.pow(2), mu_a * mu_b
    var_a, var_b, cov = aa - mu_aa, bb - mu_bb, ab - mu_ab
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    index = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    return float(index[..., pad:-pad, pad:-pad].reshape(index.shape[0], -1).mean(-1))


def unedited_metrics(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR, MSE and SSIM of the unedited part (module docstring); NaN each when nothing is unedited."""
    a, b = unedited_part(source, mask), unedited_part(edited, mask)
    if a is None:
        return {"psnr": math.nan, "mse": math.nan, "ssim": math.nan}
    return {"psnr": psnr(a, b), "mse": mse(a, b), "ssim": ssim(a, b)}  # (source, edit) as the reference orders them
