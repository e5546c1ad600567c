"""SqueezeNet 1.1 with torchvision's parameter names, so `squeezenet1_1-*.pth` loads as it is.

Only `features` runs (LPIPS taps seven of its outputs); `classifier` is kept so the publisher's file loads
with strict key checking.

    features.0            Conv 3 -> 64, 3 x 3, stride 2                   } tap 1 after the ReLU (features.1)
    features.2            MaxPool 3, stride 2, ceil                        }
    features.3, .4        Fire(64 -> 16 -> 64 + 64), Fire(128 -> 16 -> ..)} tap 2
    features.5            MaxPool                                          }
    features.6, .7        Fire(128 -> 32 -> 128 + 128), Fire(256 -> 32 ..) } tap 3
    features.8            MaxPool                                          }
    features.9            Fire(256 -> 48 -> 192 + 192)                     } tap 4
    features.10           Fire(384 -> 48 -> 192 + 192)                     tap 5
    features.11           Fire(384 -> 64 -> 256 + 256)                     tap 6
    features.12           Fire(512 -> 64 -> 256 + 256)                     tap 7
"""
from __future__ import annotations

import torch
from torch import nn

# LPIPS' slices of `features`: [0, 2), [2, 5), [5, 8), [8, 10), [10, 11), [11, 12), [12, 13)
TAP_ENDS = (2, 5, 8, 10, 11, 12, 13)
TAP_CHANNELS = (64, 128, 256, 384, 384, 512, 512)


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool,
            Fire(64, 16, 64), Fire(128, 16, 64), pool,
            Fire(128, 32, 128), Fire(256, 32, 128), pool,
            Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, classes, 1))  # unused (docstring)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The seven feature maps LPIPS compares, for x (B, 3, H, W) after LPIPS' scaling layer."""
        out, start = [], 0
        for end in TAP_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out
