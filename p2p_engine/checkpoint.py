"""`save_random_checkpoint`: a checkpoint of deterministic random weights, in either layout.

Every tensor is drawn from its own generator seeded by (seed, part, diffusers
name), so the two layouts of one seed hold the same numbers whatever the write
order, and tensors are generated and streamed to disk one at a time (an SD 1.5
checkpoint is written with one tensor in RAM). Files and folders go through the
atomic writer (`files.py`). `write_configs` writes the JSON and tokenizer files of
a diffusers folder for any `ModelConfig`; the toy model's training uses it too.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from . import keymap
from .checks import is_int
from .config import PRESETS, ModelConfig, TextConfig
from .files import atomic_folder, atomic_write, write_json
from .loading import DIFFUSERS_FILES, build_meta, expected_shapes
from .singlefile import TEXT_LAYOUTS
from .tokenizer import write_tokenizer

LAYOUTS = ("diffusers", "single_file")
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def random_tensor(seed: int, part: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 weights with roughly the scale of a trained network, so outputs are neither zero nor huge.

    Norm weights ~ 1 + 0.1 N(0,1); biases and embeddings ~ 0.02 N(0,1); matrices/convs ~ N(0,1)/sqrt(fan_in).
    No tensor is zero (diffusers zero-initialises some convs; a zero conv would hide bugs behind it).
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{part}/{name}".encode())) % (2 ** 63))
    t = torch.randn(shape, generator=g)
    if len(shape) <= 1 and name.endswith("weight") and "norm" in name:
        return 1 + 0.1 * t
    if name.endswith("bias") or "embedding" in name or len(shape) <= 1:
        return 0.02 * t
    return t / math.sqrt(math.prod(shape[1:]))


def _write_safetensors(f: BinaryIO, entries: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]],
                       dtype: torch.dtype = torch.float32) -> None:
    """Stream a safetensors file: header from the shapes, then each tensor produced and written in turn."""
    header, offset = {}, 0
    for name, shape, _ in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, make in entries:
        t = make().to(dtype).contiguous()
        assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
        f.write(t.numpy().tobytes() if dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())


def _diffusers_entries(seed, part, shapes):
    return [(k, s, (lambda k=k, s=s: random_tensor(seed, part, k, s))) for k, s in sorted(shapes.items())]


def _single_file_entries(seed: int, cfg: ModelConfig, shapes) -> list:
    """LDM-named entries for the whole model through the keymap table."""
    entries = []
    for k, ldm in keymap.unet_map(cfg.unet, shapes["unet"]).items():
        entries.append((ldm, shapes["unet"][k], lambda k=k: random_tensor(seed, "unet", k, shapes["unet"][k])))
    for k, ldm in keymap.vae_map(cfg.vae, shapes["vae"]).items():
        s = shapes["vae"][k]
        if keymap.is_vae_attn_matrix(k):  # LDM keeps these as 1x1 convs
            entries.append((ldm, s + (1, 1), lambda k=k, s=s: random_tensor(seed, "vae", k, s).reshape(*s, 1, 1)))
        else:
            entries.append((ldm, s, lambda k=k, s=s: random_tensor(seed, "vae", k, s)))
    for layout in TEXT_LAYOUTS[cfg.family]:
        entries += _text_entries(seed, cfg, layout, shapes[layout.part])
    return sorted(entries, key=lambda e: e[0])


def _text_entries(seed: int, cfg: ModelConfig, layout, text: dict) -> list:
    """One text encoder's LDM-named entries: transformers' names below the prefix, or OpenCLIP's (fused q/k/v)."""
    part = layout.part
    if not layout.openclip:
        return [(layout.prefix + k, s, lambda k=k, s=s: random_tensor(seed, part, k, s)) for k, s in text.items()]
    n = (cfg.text if part == "text_encoder" else cfg.text_2).num_hidden_layers
    # SD 2.x: one extra resblock (index n), unused, so the file has OpenCLIP's N+1 blocks like a real one.
    all_shapes = dict(text)
    for extra_layer in range(n, n + layout.extra_resblocks):
        all_shapes.update({k.replace("text_model.encoder.layers.0.", f"text_model.encoder.layers.{extra_layer}."): s
                           for k, s in text.items() if k.startswith("text_model.encoder.layers.0.")})
    meta = {k: torch.empty(s, device="meta") for k, s in all_shapes.items()}
    hidden = all_shapes["text_model.final_layer_norm.weight"][0]
    extra = {"logit_scale": ()} if layout.projection else {"text_projection": (hidden, hidden), "logit_scale": ()}
    names = keymap.openclip_to_ldm(meta, {k: torch.empty(s, device="meta") for k, s in extra.items()}, layout.prefix)
    top_names = {v: k for k, v in keymap.OPENCLIP_TOP.items()}
    cache: dict[str, dict] = {}

    def make(ldm_name: str) -> torch.Tensor:
        short = ldm_name[len(layout.prefix):]
        if short == "logit_scale":
            return torch.tensor(math.log(1 / 0.07))
        if short == "text_projection":  # SDXL: the module's Linear, transposed; SD 2.x: unused, random
            if layout.projection:
                return random_tensor(seed, part, "text_projection.weight", all_shapes["text_projection.weight"]).t()
            return random_tensor(seed, part, short, extra[short])
        if not short.startswith("transformer.resblocks."):
            return random_tensor(seed, part, top_names[short], all_shapes[top_names[short]])
        # A block's fused q/k/v needs the whole block: convert one block through the keymap table and
        # keep it while its tensors are written (entries are sorted, so they come one after another).
        i, rest = short.split(".")[2], short.split(".", 3)[3]
        if i not in cache:
            cache.clear()
            src = f"text_model.encoder.layers.{i}."
            block = {k[len(src):]: random_tensor(seed, part, k, s) for k, s in all_shapes.items() if k.startswith(src)}
            cache[i] = keymap.openclip_block_to_ldm(block)
        return cache[i][rest]

    return [(name, tuple(t.shape), lambda name=name: make(name)) for name, t in names.items()]


def scheduler_config(cfg: ModelConfig) -> dict:
    """The DDIM scheduler config of Stable Diffusion 1.x/2.x checkpoints (scaled-linear betas 0.00085..0.012,
    1000 steps, steps offset 1), with the model's prediction type."""
    return {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "prediction_type": cfg.prediction_type, "timestep_spacing": "leading"}


def text_config_json(text: TextConfig, architecture: str = "CLIPTextModel") -> dict:
    """transformers' `config.json` of a CLIP text encoder."""
    return {"architectures": [architecture], "model_type": "clip_text_model", **text.to_transformers(),
            "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0}


def write_configs(folder, cfg: ModelConfig) -> None:
    """Every file of a diffusers folder but the weights: model_index.json, the parts' config.json, the
    scheduler config and the tokenizer(s)."""
    folder = Path(folder)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    if cfg.text_2 is not None:
        index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor",
                                                              "requires_safety_checker")}
        index.update(_class_name="StableDiffusionXLPipeline",
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=cfg.force_zeros_for_empty_prompt)
        write_json(folder / "text_encoder_2" / "config.json",
                   text_config_json(cfg.text_2, "CLIPTextModelWithProjection"))
        write_tokenizer(folder / "tokenizer_2", "!")
    write_json(folder / "model_index.json", index)
    write_json(folder / "unet" / "config.json", cfg.unet.to_diffusers())
    write_json(folder / "vae" / "config.json", cfg.vae.to_diffusers())
    write_json(folder / "text_encoder" / "config.json", text_config_json(cfg.text))
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    write_tokenizer(folder / "tokenizer", cfg.pad_token)


def save_random_checkpoint(path, preset: str, seed: int = 0, layout: str = "diffusers") -> Path:
    """Write a checkpoint of random weights for `preset` ("tiny", "tiny-v", "tiny-sdxl", "sd15", "sd21", "sdxl")
    in `layout`.

    layout "diffusers": a folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
    layout "single_file": one `.safetensors` with the original LDM key names (see keymap.py).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    cfg = PRESETS[preset]
    shapes = expected_shapes(build_meta(cfg))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "single_file":
        if path.suffix != ".safetensors":
            raise ValueError(f"a single-file checkpoint path must end in .safetensors, got {path}")
        with atomic_write(path) as f:
            _write_safetensors(f, _single_file_entries(seed, cfg, shapes))
        return path
    with atomic_folder(path) as tmp:
        write_configs(tmp, cfg)
        for part in shapes:
            with atomic_write(tmp / DIFFUSERS_FILES[part]) as f:
                _write_safetensors(f, _diffusers_entries(seed, part, shapes[part]))
    return path
