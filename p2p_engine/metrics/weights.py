"""The metrics' weights: which files, where to get them, and reading them into modules without a download.

`--metric-weights DIR` holds the files as their publishers ship them (nothing is renamed or converted):

    DIR/dino_vitbase8_pretrain.pth        DINO ViT-B/8 (structure distance)
    DIR/squeezenet1_1-*.pth               torchvision's SqueezeNet 1.1 ImageNet weights (LPIPS' features)
    DIR/squeeze.pth                       LPIPS v0.1's linear heads for SqueezeNet
    DIR/clip-vit-large-patch14/           a transformers folder of openai/clip-vit-large-patch14 (CLIP)

A `.safetensors` file of the same name and keys may stand in for any `.pth`. `.pth` files are read with
`torch.load(weights_only=True)`: tensors only, no code from the file runs. A module is built on the meta
device and filled with `load_state_dict(strict=True, assign=True)` after every key and shape is checked, so a
wrong file fails naming the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import CheckpointError


@dataclass(frozen=True)
class WeightsFile:
    pattern: str  # a glob below DIR (the publisher's file name)
    what: str
    source: str  # where to get it

    def find(self, folder) -> Path | None:
        """The file in `folder` (the .pth or a .safetensors of the same name), or None."""
        folder = Path(folder)
        for pattern in (self.pattern, self.pattern.removesuffix(".pth") + ".safetensors"):
            hits = sorted(p for p in folder.glob(pattern) if p.is_file())
            if hits:
                return hits[0]
        return None

    def missing(self, folder) -> str:
        return f"{Path(folder) / self.pattern} ({self.what}) not found: get it from {self.source}"


DINO = WeightsFile("dino_vitbase8_pretrain.pth", "DINO ViT-B/8",
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth")
SQUEEZENET = WeightsFile("squeezenet1_1-*.pth", "torchvision's SqueezeNet 1.1",
                         "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth")
LPIPS_HEADS = WeightsFile("squeeze.pth", "LPIPS v0.1 linear heads for SqueezeNet",
                          "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/squeeze.pth "
                          "(also in the lpips package, lpips/weights/v0.1/squeeze.pth)")
CLIP_FOLDER = "clip-vit-large-patch14"
CLIP_SOURCE = ("https://huggingface.co/openai/clip-vit-large-patch14 (e.g. `hf download "
               "openai/clip-vit-large-patch14 --local-dir DIR/clip-vit-large-patch14`)")
STANDINS_MARKER = "standins.json"  # written by `python -m p2p_engine.metrics.standins`


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` (torch.load, weights only) or `.safetensors` file, on the CPU."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code in it, not a torch file at all
        raise CheckpointError(f"{path}: cannot read it as a weights file ({type(e).__name__}: {e}); download it "
                              f"again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def fill(module: torch.nn.Module, state: dict[str, torch.Tensor], path, device=None) -> torch.nn.Module:
    """`module` (built on meta) with every parameter and buffer taken from `state`, float32 on `device`.
    Raises CheckpointError naming `path` and the first missing, unexpected or misshapen key."""
    want = module.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        raise CheckpointError(f"{path}: keys do not match {type(module).__name__}: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}; is it the right file?")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    device = torch.device(device or "cpu")
    module.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in state.items()},
                           strict=True, assign=True)
    return module.eval().requires_grad_(False)
