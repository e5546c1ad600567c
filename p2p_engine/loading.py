"""`load(path)`: a diffusers folder or one LDM single-file `.safetensors` -> `Pipeline`.

How: every module is built on the meta device, every key and shape is checked
against the file headers (safetensors headers give shapes without reading data)
before a single tensor is read, then tensors are taken one at a time from the
memory-mapped file, cast/moved only when dtype or device differ, and handed to
`load_state_dict(assign=True)`. So a bad checkpoint fails before anything is
loaded, and the weights exist in RAM once: on CPU at the file's dtype they stay
backed by the file mapping (pages are read on first use; `save_random_checkpoint`
replaces files by rename, so a loaded pipeline never sees a file change under it).

Family detection for single files (the weights do not say everything):
- SD 1.x: `cond_stage_model.transformer.*` (transformers CLIP); SD 2.x:
  `cond_stage_model.model.*` (OpenCLIP). SDXL/SD3-style keys are refused.
- Head counts, GroupNorm groups, attention upcast, native resolution and the
  prediction type are invisible in the weights. When the observable shapes match a
  preset in `config.PRESETS` its values are used; otherwise SD 1.x gets 8 heads,
  64x64 latents, epsilon, and SD 2.x head dim 64, upcast attention, 96x96
  latents and v-prediction (SD 2.1-768). Pass `prediction_type="epsilon"` for
  SD 2.x-base style checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

import torch

from . import keymap
from .config import PRESETS, SUPPORTED_FAMILIES, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .files import CheckpointError, SafetensorsFile, verify_checksums
from .scheduler import SchedulerConfig

BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREDICTION_TYPES = ("epsilon", "v_prediction")
DIFFUSERS_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors",
                   "vae": "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder": "text_encoder/model.safetensors"}


# LDM training files also hold the noise schedule, EMA copies and the VAE's training loss; never read.
LDM_SKIPPED = ("model_ema.", "first_stage_model.loss.", "alphas_cumprod", "betas", "posterior_", "sqrt_",
               "log_one_minus", "model.diffusion_model.betas")


# -- modules on the meta device ------------------------------------------------------------------------------------

def clip_config(text: TextConfig):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(**text.to_transformers())


def build_meta(cfg: ModelConfig) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder with parameters on the meta device (no memory, no init cost)."""
    from transformers import CLIPTextModel

    from .unet import UNet
    from .vae import VAE

    with torch.device("meta"):
        return {"unet": UNet(cfg.unet), "vae": VAE(cfg.vae), "text_encoder": CLIPTextModel(clip_config(cfg.text))}


def text_file_key(module_key: str) -> str:
    """Checkpoint files name CLIP weights `text_model.*`; transformers 5 modules drop that prefix."""
    return module_key if module_key.startswith("text_model.") else "text_model." + module_key


def expected_shapes(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part: file key (diffusers layout) -> shape, for every persistent parameter/buffer."""
    out = {}
    for part, m in modules.items():
        sd = m.state_dict()
        name = text_file_key if part == "text_encoder" else (lambda k: k)
        out[part] = {name(k): tuple(v.shape) for k, v in sd.items()}
    return out


def _check_keys(where: str, expected: dict[str, tuple], found: dict[str, tuple], what: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise CheckpointError(f"{where}: {len(keys)} {label} key(s) for a {what} checkpoint, first: "
                                  f"{keys[:5]}; the file does not match the model it describes")
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(found[k])}, expected {list(shape)} "
                                  f"for a {what} checkpoint")


# -- detecting a single file's configuration -----------------------------------------------------------------------

def _count(shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _observable(cfg: ModelConfig) -> tuple:
    """The configuration fields that tensor shapes reveal."""
    u, v, t = cfg.unet, cfg.vae, cfg.text
    return (cfg.family, u.block_out_channels, u.cross_attn, u.layers_per_block, u.cross_attention_dim,
            u.use_linear_projection, u.in_channels, u.out_channels, v.block_out_channels, v.layers_per_block,
            v.latent_channels, v.in_channels, v.out_channels, t.hidden_size, t.intermediate_size,
            t.num_hidden_layers, t.vocab_size, t.max_position_embeddings)


def detect_config(shapes: dict[str, tuple], where: str, prediction_type: str | None = None) -> ModelConfig:
    """ModelConfig of an LDM single-file checkpoint from its key names and shapes."""
    if any(k.startswith(("conditioner.", "model.diffusion_model.label_emb")) for k in shapes) or \
            any(k.startswith("model.diffusion_model.joint_blocks") for k in shapes):
        raise CheckpointError(f"{where}: looks like an SDXL/SD3 checkpoint; supported families are "
                              f"{', '.join(SUPPORTED_FAMILIES)} (Stable Diffusion 1.x and 2.x)")
    if keymap.SD1_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight" in shapes:
        family, tp = "sd1", keymap.SD1_TEXT_PREFIX + "text_model."
    elif keymap.SD2_TEXT_PREFIX + "token_embedding.weight" in shapes:
        family, tp = "sd2", keymap.SD2_TEXT_PREFIX
    else:
        raise CheckpointError(f"{where}: no known text encoder keys (`{keymap.SD1_TEXT_PREFIX}text_model.*` for SD 1.x "
                              f"or `{keymap.SD2_TEXT_PREFIX}*` for SD 2.x); supported families are "
                              f"{', '.join(SUPPORTED_FAMILIES)}")
    up, vp = keymap.UNET_PREFIX, keymap.VAE_PREFIX
    if up + "input_blocks.0.0.weight" not in shapes or vp + "encoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"{where}: missing the UNet ({up}input_blocks.*) or VAE ({vp}encoder.*) of an LDM "
                              f"checkpoint; supported families are {', '.join(SUPPORTED_FAMILIES)}")
    try:
        n = _count(shapes, rf"{re.escape(up)}input_blocks\.(\d+)\.0\.op\.weight") + 1
        n_in = _count(shapes, rf"{re.escape(up)}input_blocks\.(\d+)\.")
        L = n_in // n - 1
        chans = tuple(shapes[f"{up}input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight"][0] for i in range(n))
        cross = tuple(f"{up}input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in shapes for i in range(n))
        k_key = next(k for k in shapes if k.startswith(up) and k.endswith("attn2.to_k.weight"))
        proj_in = next(k for k in shapes if k.startswith(up) and k.endswith("proj_in.weight"))
        unet = UNetConfig(block_out_channels=chans, cross_attn=cross, layers_per_block=L,
                          cross_attention_dim=shapes[k_key][1], use_linear_projection=len(shapes[proj_in]) == 2,
                          in_channels=shapes[up + "input_blocks.0.0.weight"][1], out_channels=shapes[up + "out.2.weight"][0])
        vn = _count(shapes, rf"{re.escape(vp)}encoder\.down\.(\d+)\.")
        vae = VAEConfig(block_out_channels=tuple(shapes[f"{vp}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(vn)),
                        layers_per_block=_count(shapes, rf"{re.escape(vp)}encoder\.down\.0\.block\.(\d+)\."),
                        latent_channels=shapes[vp + "post_quant_conv.weight"][0],
                        in_channels=shapes[vp + "encoder.conv_in.weight"][1],
                        out_channels=shapes[vp + "decoder.conv_out.weight"][0])
        tok = shapes[tp + ("embeddings.token_embedding.weight" if family == "sd1" else "token_embedding.weight")]
        if family == "sd1":
            layers = _count(shapes, rf"{re.escape(tp)}encoder\.layers\.(\d+)\.")
            inter = shapes[tp + "encoder.layers.0.mlp.fc1.weight"][0]
            npos = shapes[tp + "embeddings.position_embedding.weight"][0]
        else:  # OpenCLIP keeps one more resblock than SD 2.x uses (penultimate-layer conditioning)
            layers = _count(shapes, rf"{re.escape(tp)}transformer\.resblocks\.(\d+)\.") - 1
            inter = shapes[tp + "transformer.resblocks.0.mlp.c_fc.weight"][0]
            npos = shapes[tp + "positional_embedding"][0]
    except (KeyError, StopIteration, ZeroDivisionError, IndexError) as e:
        raise CheckpointError(f"{where}: unknown UNet/VAE/text layout (no {e}); supported families are "
                              f"{', '.join(SUPPORTED_FAMILIES)} with the standard SD layouts") from None
    text = TextConfig(hidden_size=tok[1], intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, tok[1] // 64), vocab_size=tok[0], max_position_embeddings=npos,
                      hidden_act="quick_gelu" if family == "sd1" else "gelu", projection_dim=tok[1])
    if family == "sd1":
        cfg = ModelConfig(family="sd1", unet=dataclasses.replace(unet, num_heads=(8,) * n), vae=vae, text=text)
    else:
        cfg = ModelConfig(family="sd2", vae=vae, text=text, prediction_type="v_prediction", pad_token="!",
                          unet=dataclasses.replace(unet, num_heads=tuple(max(1, c // 64) for c in chans),
                                                   upcast_attention=True, sample_size=96))
    for preset in PRESETS.values():  # a preset fills in what the shapes cannot tell
        if _observable(preset) == _observable(cfg):
            cfg = preset
            break
    if prediction_type is not None:
        cfg = dataclasses.replace(cfg, prediction_type=prediction_type)
    return cfg


# -- the two layouts -----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a diffusers checkpoint folder needs model_index.json, "
                              f"unet/, vae/, text_encoder/, tokenizer/ and scheduler/") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _diffusers_config(root: Path, prediction_type: str | None) -> ModelConfig:
    u = _read_json(root / "unet" / "config.json")
    if u.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel" or u.get("addition_embed_type") \
            or u.get("encoder_hid_dim") or u.get("class_embed_type") or u.get("transformer_layers_per_block", 1) != 1:
        raise CheckpointError(f"{root / 'unet' / 'config.json'}: this UNet (SDXL or another variant) is not supported; "
                              f"supported families are {', '.join(SUPPORTED_FAMILIES)} (Stable Diffusion 1.x and 2.x)")
    unet = UNetConfig.from_diffusers(u)
    vae = VAEConfig.from_diffusers(_read_json(root / "vae" / "config.json"))
    t = _read_json(root / "text_encoder" / "config.json")
    names = {f.name for f in dataclasses.fields(TextConfig)}
    text = TextConfig(**{k: v for k, v in t.items() if k in names})
    sched = _schedule(root)
    pred = prediction_type or sched.prediction_type
    family = "sd2" if unet.use_linear_projection else "sd1"
    return ModelConfig(family=family, unet=unet, vae=vae, text=text, prediction_type=pred,
                       pad_token="!" if family == "sd2" else "<|endoftext|>")


def _schedule(root: Path, prediction_type: str | None = None) -> SchedulerConfig:
    """The folder's scheduler config (`scheduler/scheduler_config.json`), or SD's standard one without it."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.exists():
        sched = SchedulerConfig()
    else:
        try:
            sched = SchedulerConfig.from_diffusers(_read_json(path))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    return sched if prediction_type is None else dataclasses.replace(sched, prediction_type=prediction_type)


def _diffusers_sources(root: Path, expected):
    """Per part: {file key: (file, key in file)} after checking keys and shapes."""
    sources = {}
    for part, rel in DIFFUSERS_FILES.items():
        path = root / rel
        if not path.exists():
            raise CheckpointError(f"{path} is missing (only .safetensors weights are read; convert .bin files first)")
        f = SafetensorsFile(path)
        # Older transformers saved CLIP's position_ids buffer; it is recomputed, never read.
        found = {k: s for k, s in f.shapes.items() if not k.endswith("embeddings.position_ids")}
        if part == "text_encoder":
            found = {text_file_key(k): s for k, s in found.items()}
            rename = {text_file_key(k): k for k in f.shapes}
        else:
            rename = {k: k for k in found}
        _check_keys(str(path), expected[part], found, f"{part} of this config")
        sources[part] = {k: (f, rename[k], None) for k in expected[part]}
    return sources


def _single_file_sources(path: Path, f: SafetensorsFile, cfg: ModelConfig, expected):
    """Per part: {diffusers file key: (file, LDM key, fix)}; `fix` reshapes/slices LDM tensors."""
    shapes, where, sources = f.shapes, str(path), {}
    unet_map = keymap.unet_map(cfg.unet, expected["unet"])
    vae_map = keymap.vae_map(cfg.vae, expected["vae"])
    sources["unet"] = {k: (f, v, None) for k, v in unet_map.items()}
    sources["vae"] = {k: (f, v, _conv1x1_to_linear if keymap.is_vae_attn_matrix(k) else None) for k, v in vae_map.items()}
    used = set(unet_map.values()) | set(vae_map.values())
    if cfg.family == "sd1":
        prefix = keymap.SD1_TEXT_PREFIX
        text = {k: (f, prefix + k, None) for k in expected["text_encoder"]}
        ignored = (prefix + "text_model.embeddings.position_ids",)
    else:
        n = cfg.text.num_hidden_layers
        text = {}  # read in _materialize from the fused OpenCLIP tensors
        ignored = tuple(keymap.SD2_TEXT_PREFIX + s for s in keymap.sd2_text_keys_ignored(n))
    sources["text_encoder"] = text
    # Check every LDM key this config needs, and that nothing unknown is left over.
    need = set(used)
    if cfg.family == "sd1":
        need |= {src for _, src, _ in text.values()}
    else:
        need |= {keymap.SD2_TEXT_PREFIX + s for s in keymap.sd2_text_keys_used(cfg.text.num_hidden_layers)}
    missing = sorted(k for k in need if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in need and not k.startswith(ignored)
                        and not k.startswith(LDM_SKIPPED))
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise CheckpointError(f"{where}: {len(keys)} {label} key(s) for a {cfg.family} single-file checkpoint, "
                                  f"first: {keys[:5]}")
    if cfg.family == "sd2":  # shapes of the split q/k/v, computed on meta tensors from the header alone
        meta = keymap.sd2_text_from_ldm(lambda name: torch.empty(shapes[keymap.SD2_TEXT_PREFIX + name], device="meta"),
                                        cfg.text.num_hidden_layers)
        for k, t in meta.items():
            if tuple(t.shape) != expected["text_encoder"][k]:
                raise CheckpointError(f"{where}: OpenCLIP tensor for {k!r} has shape {list(t.shape)}, expected "
                                      f"{list(expected['text_encoder'][k])} for the detected sd2 configuration")
    for part in ("unet", "vae", "text_encoder") if cfg.family == "sd1" else ("unet", "vae"):
        for k, (_, src, fix) in sources[part].items():
            found = shapes[src]
            want = expected[part][k]
            if fix is not None:
                want = want + (1, 1)
            if tuple(found) != tuple(want):
                raise CheckpointError(f"{where}: tensor {src!r} has shape {list(found)}, expected {list(want)} "
                                      f"for the detected {cfg.family} configuration")
    return sources


def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1])


def _materialize(modules, sources, cfg: ModelConfig, single: SafetensorsFile | None, device, dtype):
    """Read every tensor once, cast and move it, assign it into the meta modules."""
    for part, m in modules.items():
        if part == "text_encoder" and cfg.family == "sd2" and single is not None:
            got = keymap.sd2_text_from_ldm(lambda name: single.get(keymap.SD2_TEXT_PREFIX + name, device, dtype),
                                           cfg.text.num_hidden_layers)
            tensors = {k: t.contiguous() for k, t in got.items()}
        else:
            tensors = {}
            for k, (f, src, fix) in sources[part].items():
                t = f.get(src, device, dtype)
                tensors[k] = fix(t) if fix is not None else t
        if part == "text_encoder":
            own = {text_file_key(k): k for k in m.state_dict()}
            tensors = {own[k]: t for k, t in tensors.items()}
        m.load_state_dict(tensors, strict=True, assign=True)
        del tensors
        _fill_nonpersistent(m, part, device)


def _fill_nonpersistent(m: torch.nn.Module, part: str, device) -> None:
    """Buffers not stored in checkpoints stay on meta after assign; recompute the known ones."""
    for name, buf in list(m.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = m.get_submodule(owner_name) if owner_name else m
        if attr == "position_ids":
            owner.register_buffer(attr, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
        else:
            raise RuntimeError(f"{part}: buffer {name!r} was not restored after loading (a bug of this package)")


# -- entry point -------------------------------------------------------------------------------------------------

def toy_path() -> Path:
    """Folder of the shipped toy model (p2p_engine/data/toy), whether or not it is present."""
    return Path(str(resources.files("p2p_engine") / "data" / "toy"))


def _resolve(path) -> tuple[str, Path]:
    if isinstance(path, str) and path == "toy":
        toy = toy_path()
        if not (toy / "model_index.json").exists():
            raise CheckpointError("the toy model is not shipped in this build of p2p_engine; pass a checkpoint path, or "
                                  "make a random one with p2p.save_random_checkpoint(path, 'tiny')")
        verify_checksums(toy)
        return "diffusers", toy
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").exists():
        return "diffusers", p
    if p.is_file() and p.suffix == ".safetensors":
        return "single_file", p
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; expected a diffusers checkpoint folder (with model_index.json) "
                              f"or one single-file .safetensors checkpoint")
    raise CheckpointError(f"{p} is neither a diffusers checkpoint folder (model_index.json, unet/, vae/, "
                          f"text_encoder/, tokenizer/) nor a single-file .safetensors checkpoint")


def load(path, device=None, dtype=torch.float32, backend: str = "auto", *, prediction_type: str | None = None):
    """Load a Stable Diffusion 1.x/2.x checkpoint into a `Pipeline`.

    Args:
        path: a diffusers folder, one LDM single-file `.safetensors`, or "toy".
        device: default "cuda" when available, else "cpu".
        dtype: torch.float32 / float16 / bfloat16; every floating tensor is cast on load.
        backend: "auto" (triton on CUDA, torch elsewhere), "torch" or "triton".
        prediction_type: "epsilon" or "v_prediction"; overrides the checkpoint's (single files cannot say).
    """
    from .pipeline import Pipeline
    from .tokenizer import clip_tokenizer, load_tokenizer

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"

    layout, root = _resolve(path)
    if layout == "diffusers":
        cfg = _diffusers_config(root, prediction_type)
        schedule = _schedule(root, cfg.prediction_type)
        modules = build_meta(cfg)
        expected = expected_shapes(modules)
        sources = _diffusers_sources(root, expected)
        single = None
        tokenizer = load_tokenizer(root / "tokenizer")
    else:
        single = SafetensorsFile(root)
        cfg = detect_config(single.shapes, str(root), prediction_type)
        schedule = SchedulerConfig(prediction_type=cfg.prediction_type)  # SD 1.x/2.x's standard config
        modules = build_meta(cfg)
        expected = expected_shapes(modules)
        sources = _single_file_sources(root, single, cfg, expected)
        tokenizer = clip_tokenizer(cfg.pad_token)
    # Everything is validated; from here on only reading can fail (a file truncated mid-data).
    _materialize(modules, sources, cfg, single, device, dtype)
    unet, vae, text = modules["unet"], modules["vae"], modules["text_encoder"]
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    unet.set_backend(backend)
    return Pipeline(unet, vae, text, tokenizer, cfg, device=device, dtype=dtype, backend=backend, schedule=schedule)
