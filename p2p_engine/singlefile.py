"""Original (LDM) single-file checkpoints: which family a file is, its configuration, and where each tensor is.

The weights do not say everything, so the family and configuration are read from key names and shapes:
- SD 1.x: `cond_stage_model.transformer.*` (transformers' CLIP); SD 2.x: `cond_stage_model.model.*`
  (OpenCLIP); SDXL base: `conditioner.embedders.0.transformer.*` (CLIP ViT-L, transformers' names) and
  `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG with its text projection), and the UNet's
  `label_emb` (the added conditioning). SDXL refiners (OpenCLIP only) and SD3 files are refused.
- Head counts, GroupNorm groups, attention upcast, native resolution and the prediction type are invisible
  in the weights. When the observable shapes match a preset in `config.PRESETS` its values are used;
  otherwise SD 1.x gets 8 heads, 64x64 latents, epsilon; SD 2.x head dim 64, upcast attention, 96x96 latents
  and v-prediction (SD 2.1-768: pass `prediction_type="epsilon"` for SD 2.x-base style files); SDXL head dim
  64, 128x128 latents, epsilon.

Text encoders in OpenCLIP's layout (fused q/k/v) are converted by `keymap.py`; SD 2.x conditions on the
penultimate resblock (after `ln_final`), so its file holds one resblock more than the module reads.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import keymap
from .config import PRESETS, SUPPORTED_FAMILIES, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .files import CheckpointError, SafetensorsFile

# LDM training files also hold the noise schedule, EMA copies and the VAE's training loss; never read.
LDM_SKIPPED = ("model_ema.", "first_stage_model.loss.", "alphas_cumprod", "betas", "posterior_", "sqrt_",
               "log_one_minus", "model.diffusion_model.betas")


@dataclass(frozen=True)
class TextLayout:
    """Where one text encoder sits in a family's single file."""

    part: str  # "text_encoder" or "text_encoder_2"
    prefix: str
    openclip: bool  # OpenCLIP names (converted) rather than transformers'
    extra_resblocks: int = 0  # resblocks in the file beyond the module's (SD 2.x: its unused last one)
    projection: bool = False  # the module has `text_projection` (SDXL's encoder 2)


TEXT_LAYOUTS = {
    "sd1": (TextLayout("text_encoder", keymap.SD1_TEXT_PREFIX, False),),
    "sd2": (TextLayout("text_encoder", keymap.SD2_TEXT_PREFIX, True, extra_resblocks=1),),
    "sdxl": (TextLayout("text_encoder", keymap.SDXL_TEXT_PREFIX, False),
             TextLayout("text_encoder_2", keymap.SDXL_TEXT_2_PREFIX, True, projection=True)),
}


def _count(shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _observable(cfg: ModelConfig) -> tuple:
    """The configuration fields that tensor shapes reveal."""
    u, v = cfg.unet, cfg.vae

    def text(t):
        return None if t is None else (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size,
                                       t.max_position_embeddings)
    return (cfg.family, u.block_out_channels, u.cross_attn, u.layers_per_block, u.cross_attention_dim,
            u.use_linear_projection, u.in_channels, u.out_channels, u.addition_time_embed_dim, u.pooled_dim,
            tuple(u.depth(i) for i in range(len(u.block_out_channels)) if u.cross_attn[i]),
            v.block_out_channels, v.layers_per_block, v.latent_channels, v.in_channels, v.out_channels,
            text(cfg.text), text(cfg.text_2))


def _family(shapes, where: str) -> str:
    supported = f"supported families are {', '.join(SUPPORTED_FAMILIES)} (Stable Diffusion 1.x, 2.x and SDXL base)"
    if any(k.startswith("model.diffusion_model.joint_blocks") for k in shapes):
        raise CheckpointError(f"{where}: looks like an SD3 checkpoint; {supported}")
    if keymap.SDXL_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight" in shapes:
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise CheckpointError(f"{where}: looks like an SDXL refiner checkpoint (one OpenCLIP text encoder, aesthetic "
                              f"score conditioning), which the engine does not support; {supported}")
    if keymap.SD1_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight" in shapes:
        return "sd1"
    if keymap.SD2_TEXT_PREFIX + "token_embedding.weight" in shapes:
        return "sd2"
    raise CheckpointError(f"{where}: no known text encoder keys (`{keymap.SD1_TEXT_PREFIX}text_model.*` for SD 1.x, "
                          f"`{keymap.SD2_TEXT_PREFIX}*` for SD 2.x, `conditioner.embedders.*` for SDXL); {supported}")


def _text_config(shapes, layout: TextLayout) -> TextConfig:
    p = layout.prefix
    if not layout.openclip:
        p += "text_model."
        tok = shapes[p + "embeddings.token_embedding.weight"]
        return TextConfig(hidden_size=tok[1], intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
                          num_hidden_layers=_count(shapes, rf"{re.escape(p)}encoder\.layers\.(\d+)\."),
                          num_attention_heads=max(1, tok[1] // 64), vocab_size=tok[0],
                          max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
                          hidden_act="quick_gelu", projection_dim=tok[1])
    tok = shapes[p + "token_embedding.weight"]
    layers = _count(shapes, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.") - layout.extra_resblocks
    return TextConfig(hidden_size=tok[1], intermediate_size=shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                      num_hidden_layers=layers, num_attention_heads=max(1, tok[1] // 64), vocab_size=tok[0],
                      max_position_embeddings=shapes[p + "positional_embedding"][0], hidden_act="gelu",
                      projection_dim=shapes[p + "text_projection"][1] if layout.projection else tok[1])


def detect_config(shapes: dict[str, tuple], where: str, prediction_type: str | None = None) -> ModelConfig:
    """ModelConfig of an LDM single-file checkpoint from its key names and shapes."""
    family = _family(shapes, where)
    up, vp = keymap.UNET_PREFIX, keymap.VAE_PREFIX
    if up + "input_blocks.0.0.weight" not in shapes or vp + "encoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"{where}: missing the UNet ({up}input_blocks.*) or VAE ({vp}encoder.*) of an LDM "
                              f"checkpoint; supported families are {', '.join(SUPPORTED_FAMILIES)}")
    try:
        n = _count(shapes, rf"{re.escape(up)}input_blocks\.(\d+)\.0\.op\.weight") + 1
        n_in = _count(shapes, rf"{re.escape(up)}input_blocks\.(\d+)\.")
        L = n_in // n - 1
        first = [1 + i * (L + 1) for i in range(n)]  # each level's first input block
        chans = tuple(shapes[f"{up}input_blocks.{b}.0.out_layers.3.weight"][0] for b in first)
        cross = tuple(f"{up}input_blocks.{b}.1.proj_in.weight" in shapes for b in first)
        depth = tuple(_count(shapes, rf"{re.escape(up)}input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\.") or 1
                      for b in first)
        k_key = next(k for k in shapes if k.startswith(up) and k.endswith("attn2.to_k.weight"))
        proj_in = next(k for k in shapes if k.startswith(up) and k.endswith("proj_in.weight"))
        texts = [_text_config(shapes, layout) for layout in TEXT_LAYOUTS[family]]
        added = {}
        if family == "sdxl":
            pooled = texts[1].projection_dim
            added = dict(transformer_layers=depth, pooled_dim=pooled,
                         addition_time_embed_dim=(shapes[up + "label_emb.0.0.weight"][1] - pooled) // 6)
        unet = UNetConfig(block_out_channels=chans, cross_attn=cross, layers_per_block=L,
                          cross_attention_dim=shapes[k_key][1], use_linear_projection=len(shapes[proj_in]) == 2,
                          in_channels=shapes[up + "input_blocks.0.0.weight"][1],
                          out_channels=shapes[up + "out.2.weight"][0], **added)
        vn = _count(shapes, rf"{re.escape(vp)}encoder\.down\.(\d+)\.")
        vae = VAEConfig(block_out_channels=tuple(shapes[f"{vp}encoder.down.{i}.block.0.conv1.weight"][0]
                                                 for i in range(vn)),
                        layers_per_block=_count(shapes, rf"{re.escape(vp)}encoder\.down\.0\.block\.(\d+)\."),
                        latent_channels=shapes[vp + "post_quant_conv.weight"][0],
                        in_channels=shapes[vp + "encoder.conv_in.weight"][1],
                        out_channels=shapes[vp + "decoder.conv_out.weight"][0])
    except (KeyError, StopIteration, ZeroDivisionError, IndexError) as e:
        raise CheckpointError(f"{where}: unknown UNet/VAE/text layout (no {e}); supported families are "
                              f"{', '.join(SUPPORTED_FAMILIES)} with the standard SD layouts") from None
    head_dim_64 = tuple(max(1, c // 64) for c in chans)
    if family == "sd1":
        cfg = ModelConfig(family="sd1", unet=dataclasses.replace(unet, num_heads=(8,) * n), vae=vae, text=texts[0])
    elif family == "sd2":
        cfg = ModelConfig(family="sd2", vae=vae, text=texts[0], prediction_type="v_prediction", pad_token="!",
                          unet=dataclasses.replace(unet, num_heads=head_dim_64, upcast_attention=True,
                                                   sample_size=96))
    else:
        cfg = ModelConfig(family="sdxl", unet=dataclasses.replace(unet, num_heads=head_dim_64, sample_size=128),
                          vae=dataclasses.replace(vae, scaling_factor=0.13025, sample_size=1024), text=texts[0],
                          text_2=texts[1], force_zeros_for_empty_prompt=True)
    for preset in PRESETS.values():  # a preset fills in what the shapes cannot tell
        if _observable(preset) == _observable(cfg):
            cfg = preset
            break
    if prediction_type is not None:
        cfg = dataclasses.replace(cfg, prediction_type=prediction_type)
    return cfg


def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1])


def _text_layers(cfg: ModelConfig, layout: TextLayout) -> int:
    return (cfg.text if layout.part == "text_encoder" else cfg.text_2).num_hidden_layers


def sources(path: Path, f: SafetensorsFile, cfg: ModelConfig, expected) -> dict:
    """Per part: {diffusers file key: (file, LDM key, fix)} after checking every key and shape against the file
    header; `fix` reshapes an LDM tensor. Parts in OpenCLIP's layout map to None: `read_openclip` reads them."""
    shapes, where, out = f.shapes, str(path), {}
    unet_map = keymap.unet_map(cfg.unet, expected["unet"])
    vae_map = keymap.vae_map(cfg.vae, expected["vae"])
    out["unet"] = {k: (f, v, None) for k, v in unet_map.items()}
    out["vae"] = {k: (f, v, _conv1x1_to_linear if keymap.is_vae_attn_matrix(k) else None) for k, v in vae_map.items()}
    need, ignored = set(unet_map.values()) | set(vae_map.values()), []
    for layout in TEXT_LAYOUTS[cfg.family]:
        if layout.openclip:
            n = _text_layers(cfg, layout)
            out[layout.part] = None
            need |= {layout.prefix + s for s in keymap.openclip_keys_used(n, layout.projection)}
            ignored += [layout.prefix + s for s in keymap.openclip_keys_ignored(n, layout.projection)]
        else:
            out[layout.part] = {k: (f, layout.prefix + k, None) for k in expected[layout.part]}
            need |= {layout.prefix + k for k in expected[layout.part]}
            ignored.append(layout.prefix + "text_model.embeddings.position_ids")
    missing = sorted(k for k in need if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in need and not k.startswith(tuple(ignored))
                        and not k.startswith(LDM_SKIPPED))
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise CheckpointError(f"{where}: {len(keys)} {label} key(s) for a {cfg.family} single-file checkpoint, "
                                  f"first: {keys[:5]}")
    for layout in TEXT_LAYOUTS[cfg.family]:
        if layout.openclip:  # shapes of the split q/k/v, computed on meta tensors from the header alone
            meta = read_openclip(lambda name, p=layout.prefix: torch.empty(shapes[p + name], device="meta"),
                                 cfg, layout)
            for k, t in meta.items():
                if tuple(t.shape) != expected[layout.part][k]:
                    raise CheckpointError(f"{where}: OpenCLIP tensor for {k!r} has shape {list(t.shape)}, expected "
                                          f"{list(expected[layout.part][k])} for the detected {cfg.family} "
                                          f"configuration")
    for part, table in out.items():
        for k, (_, src, fix) in (table or {}).items():
            want = expected[part][k] + ((1, 1) if fix is not None else ())
            if tuple(shapes[src]) != tuple(want):
                raise CheckpointError(f"{where}: tensor {src!r} has shape {list(shapes[src])}, expected {list(want)} "
                                      f"for the detected {cfg.family} configuration")
    return out


def read_openclip(get, cfg: ModelConfig, layout: TextLayout) -> dict[str, torch.Tensor]:
    """The transformers tensors of an OpenCLIP text encoder; `get(name)` reads `layout.prefix + name`."""
    return keymap.openclip_from_ldm(get, _text_layers(cfg, layout), layout.projection)


def openclip_layout(cfg: ModelConfig, part: str) -> TextLayout | None:
    """The layout of a text encoder `part` when its single-file form is OpenCLIP's, else None."""
    return next((t for t in TEXT_LAYOUTS[cfg.family] if t.part == part and t.openclip), None)
