"""Random stand-in weights in the publishers' file formats, for tests and the toy PIE grid.

    python -m p2p_engine.metrics.standins DIR [--seed 0]

writes DIR/dino_vitbase8_pretrain.pth (ViT-B/8, full size), DIR/squeezenet1_1-standin.pth, DIR/squeeze.pth
(plain state dicts saved with torch.save, as the publishers' files are), DIR/clip-vit-large-patch14/ (a small
random CLIP: 2 layers of width 64 in each tower, with the shipped tokenizer) and DIR/standins.json, by which
`pie-metrics` says that these numbers measure nothing. Deterministic in the seed.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from ..files import atomic_folder, atomic_write
from . import weights as w
from .dino import VIT_B8, DinoViT
from .lpips import LpipsHeads
from .squeezenet import SqueezeNet11


def random_dino(generator: torch.Generator, **config) -> dict[str, torch.Tensor]:
    """DINO's initialisation, roughly: weights N(0, 0.02), biases 0, LayerNorms 1 and 0."""
    with torch.device("meta"):  # shapes only
        model = DinoViT(**(config or VIT_B8))
    state = {}
    for k, v in model.state_dict().items():
        if "norm" in k:
            state[k] = torch.ones(v.shape) if k.endswith("weight") else torch.zeros(v.shape)
        elif k.endswith("bias"):
            state[k] = torch.zeros(v.shape)
        else:
            state[k] = torch.randn(v.shape, generator=generator) * 0.02
    return state


def random_squeezenet(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """He-scaled convolutions (so activations neither vanish nor blow up through the Fire modules), small biases."""
    with torch.device("meta"):
        model = SqueezeNet11()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight"):
            fan_in = v[0].numel()
            state[k] = torch.randn(v.shape, generator=generator) * (2 / fan_in) ** 0.5
        else:
            state[k] = torch.randn(v.shape, generator=generator) * 0.01
    return state


def random_heads(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Non-negative, as LPIPS' trained heads are (it clamps them at 0 in training)."""
    with torch.device("meta"):
        heads = LpipsHeads()
    return {k: torch.rand(v.shape, generator=generator) / v.shape[1] for k, v in heads.state_dict().items()}


def _save(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def write_clip(folder, seed: int = 0) -> Path:
    """A small random transformers CLIP folder (ViT patch 14 at 224, the shipped tokenizer)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from ..tokenizer import clip_tokenizer
    from .clip import _image_processor_class

    config = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=224, patch_size=14),
                        projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=_image_processor_class()(), tokenizer=clip_tokenizer())
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(folder)


def write(folder, seed: int = 0) -> Path:
    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    _save(folder / w.DINO.pattern, random_dino(g))
    _save(folder / "squeezenet1_1-standin.pth", random_squeezenet(g))
    _save(folder / w.LPIPS_HEADS.pattern, random_heads(g))
    write_clip(folder / w.CLIP_FOLDER, seed)
    with atomic_write(folder / w.STANDINS_MARKER, "w", encoding="utf-8") as f:
        json.dump({"generator": "p2p_engine.metrics.standins", "seed": seed}, f)
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"wrote random stand-in metric weights to {write(args.folder, args.seed)}")


if __name__ == "__main__":
    main()
