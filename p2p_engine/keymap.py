"""The one table between original LDM single-file key names and diffusers' names.

`save_random_checkpoint(layout="single_file")` writes through it and the loader
reads through its inverse, so the two cannot drift apart. Each part's table is a
list of (diffusers prefix, LDM prefix, kind) rows built from the config; `kind`
picks the renaming of the names below the prefix (resnet / VAE attention). The
full-key maps come from applying the rows to the module's own key list.

Text encoders: SD 1.x stores transformers' CLIP text model under
`cond_stage_model.transformer.`; SD 2.x stores OpenCLIP's under
`cond_stage_model.model.` with fused q/k/v (`attn.in_proj_weight`). OpenCLIP's
ViT-H text tower has 24 resblocks but SD 2.x conditions on the penultimate one
(after `ln_final`), so diffusers keeps 23 layers: the loader reads resblocks
0..N-1 for an N-layer text encoder and ignores the last resblock, and the random
writer writes N+1 resblocks (the extra one random and unused) so the file looks
like a real one. `text_projection` and `logit_scale` are written and ignored too.
SDXL stores CLIP ViT-L in transformers' names under `conditioner.embedders.0.transformer.`
and OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`, all its resblocks used and
its `text_projection` (applied as x @ P) read into the Linear `text_projection` (P^T).
"""
from __future__ import annotations

import torch

from .config import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."

# Below-prefix renames, diffusers name -> LDM name.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def unet_rows(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for every sub-module of the UNet."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    rows = [("time_embedding.linear_1", "time_embed.0", "plain"), ("time_embedding.linear_2", "time_embed.2", "plain"),
            ("conv_in", "input_blocks.0.0", "plain"), ("conv_norm_out", "out.0", "plain"),
            ("conv_out", "out.2", "plain"),
            ("mid_block.resnets.0", "middle_block.0", "resnet"), ("mid_block.attentions.0", "middle_block.1", "plain"),
            ("mid_block.resnets.1", "middle_block.2", "resnet")]
    if cfg.addition_time_embed_dim is not None:  # SDXL's added conditioning
        rows += [("add_embedding.linear_1", "label_emb.0.0", "plain"),
                 ("add_embedding.linear_2", "label_emb.0.2", "plain")]
    for i in range(n):
        for j in range(L):  # input_blocks.0 is conv_in; each level adds L blocks and a downsampler
            b = 1 + i * (L + 1) + j
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{b}.0", "resnet"))
            if cfg.cross_attn[i]:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{b}.1", "plain"))
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (L + 1) + L}.0.op", "plain"))
    for i in range(n):  # up level i mirrors down level n-1-i and has L+1 blocks
        attn = cfg.cross_attn[n - 1 - i]
        for j in range(L + 1):
            b = i * (L + 1) + j
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{b}.0", "resnet"))
            if attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{b}.1", "plain"))
        if i < n - 1:
            b = i * (L + 1) + L
            rows.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{b}.{2 if attn else 1}.conv", "plain"))
    return rows


def vae_rows(cfg: VAEConfig) -> list[tuple[str, str, str]]:
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    rows = [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", "plain"), (f"{part}.conv_out", f"{part}.conv_out", "plain"),
                 (f"{part}.conv_norm_out", f"{part}.norm_out", "plain"),
                 (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "resnet"),
                 (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "attn"),
                 (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "resnet")]
    for i in range(n):
        for j in range(L):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < n - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", "plain"))
    for i in range(n):  # LDM numbers decoder levels from the lowest resolution up: reversed
        for j in range(L + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", "resnet"))
        if i < n - 1:
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", "plain"))
    return rows


def _apply_rows(keys, rows, renames: dict[str, dict[str, str]], ldm_prefix: str) -> dict[str, str]:
    """diffusers key -> LDM key for every key in `keys`; a key no row covers is an error of the table."""
    by_len = sorted(rows, key=lambda r: -len(r[0]))  # longest prefix wins ("conv_in" vs "conv_in..." is exact anyway)
    out = {}
    for key in keys:
        for dprefix, lprefix, kind in by_len:
            if key.startswith(dprefix + "."):
                rest = key[len(dprefix) + 1:]
                for d, l in renames.get(kind, {}).items():
                    if rest.startswith(d + "."):
                        rest = l + rest[len(d):]
                        break
                out[key] = ldm_prefix + lprefix + "." + rest
                break
        else:
            raise KeyError(f"keymap has no LDM name for {key!r}")
    return out


def unet_map(cfg: UNetConfig, keys) -> dict[str, str]:
    return _apply_rows(keys, unet_rows(cfg), {"resnet": UNET_RESNET}, UNET_PREFIX)


def vae_map(cfg: VAEConfig, keys) -> dict[str, str]:
    return _apply_rows(keys, vae_rows(cfg), {"resnet": VAE_RESNET, "attn": VAE_ATTN}, VAE_PREFIX)


def is_vae_attn_matrix(diffusers_key: str) -> bool:
    """VAE mid-block q/k/v/proj_out: LDM stores 1x1 conv weights (C, C, 1, 1), diffusers Linear (C, C)."""
    return ".mid_block.attentions.0.to_" in diffusers_key and diffusers_key.endswith(".weight")


# -- text encoder ---------------------------------------------------------------------------------------------------

# transformers name -> OpenCLIP name (below `cond_stage_model.model.`) outside the resblocks.
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}


def openclip_block_to_ldm(block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One CLIP layer, names relative to `encoder.layers.i.` -> relative to `transformer.resblocks.i.`."""
    out = {f"{l}.{s}": block[f"{d}.{s}"] for d, l in OPENCLIP_LAYER.items() for s in ("weight", "bias")}
    for s in ("weight", "bias"):  # OpenCLIP's nn.MultiheadAttention packs q, k, v along dim 0
        out[f"attn.in_proj_{s}"] = torch.cat([block[f"self_attn.{x}_proj.{s}"] for x in "qkv"])
    return out


def openclip_block_from_ldm(get) -> dict[str, torch.Tensor]:
    """Inverse of openclip_block_to_ldm; `get(relative OpenCLIP name)` returns a tensor."""
    out = {f"{d}.{s}": get(f"{l}.{s}") for d, l in OPENCLIP_LAYER.items() for s in ("weight", "bias")}
    for s in ("weight", "bias"):
        q, k, v = get(f"attn.in_proj_{s}").chunk(3, dim=0)
        out[f"self_attn.q_proj.{s}"], out[f"self_attn.k_proj.{s}"], out[f"self_attn.v_proj.{s}"] = q, k, v
    return out


def openclip_to_ldm(sd: dict[str, torch.Tensor], extra: dict[str, torch.Tensor],
                    prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model (keys `text_model.*`, optionally `text_projection.weight`) -> OpenCLIP names
    below `prefix`.

    `extra` holds, in OpenCLIP names, what diffusers drops (`text_projection` for SD 2.x, `logit_scale`).
    Every `text_model.encoder.layers.i` present becomes `transformer.resblocks.i`.
    """
    out = {prefix + l: sd[d] for d, l in OPENCLIP_TOP.items()}
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        block = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
        out.update({f"{prefix}transformer.resblocks.{i}.{k}": v for k, v in openclip_block_to_ldm(block).items()})
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].t()
    out.update({prefix + k: v for k, v in extra.items()})
    return out


def openclip_from_ldm(get, n_layers: int, projection: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP names -> transformers names for the first `n_layers` resblocks (and `text_projection.weight` when
    `projection`). `get(name)` returns the tensor stored under the text encoder's prefix + `name`."""
    out = {d: get(l) for d, l in OPENCLIP_TOP.items()}
    for i in range(n_layers):
        block = openclip_block_from_ldm(lambda name: get(f"transformer.resblocks.{i}.{name}"))
        out.update({f"text_model.encoder.layers.{i}.{k}": v for k, v in block.items()})
    if projection:
        out["text_projection.weight"] = get("text_projection").t()
    return out


def openclip_keys_used(n_layers: int, projection: bool = False) -> set[str]:
    """The OpenCLIP names (below the prefix) the loader reads for an `n_layers` text encoder."""
    seen: set[str] = set()

    def record(name):
        seen.add(name)
        return torch.empty(3, 3, device="meta")

    openclip_from_ldm(record, n_layers, projection)
    return seen


def openclip_keys_ignored(n_layers: int, projection: bool = False) -> tuple[str, ...]:
    """OpenCLIP names present in single files that the loader deliberately skips: resblocks past the ones it
    reads (SD 2.x's last), `logit_scale`, and `text_projection` where the module has none."""
    return (f"transformer.resblocks.{n_layers}.", "logit_scale") + (() if projection else ("text_projection",))
