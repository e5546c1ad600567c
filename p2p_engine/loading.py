"""`load(path)`: a diffusers folder or one LDM single-file `.safetensors` -> `Pipeline`.

How: every module is built on the meta device, every key and shape is checked
against the file headers (safetensors headers give shapes without reading data)
before a single tensor is read, then tensors are taken one at a time from the
memory-mapped file, cast/moved only when dtype or device differ, and handed to
`load_state_dict(assign=True)`. So a bad checkpoint fails before anything is
loaded, and the weights exist in RAM once: on CPU at the file's dtype they stay
backed by the file mapping (pages are read on first use; `save_random_checkpoint`
replaces files by rename, so a loaded pipeline never sees a file change under it).

Families: SD 1.x and 2.x (one text encoder) and SDXL base (two: `text_encoder`,
CLIP ViT-L, and `text_encoder_2`, OpenCLIP ViT-bigG with a projection, each with
its tokenizer). A diffusers folder says its family in its configs; a single file
is read by `singlefile.py`. SDXL refiners are refused.
"""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import torch

from . import singlefile
from .config import SUPPORTED_FAMILIES, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .files import CheckpointError, SafetensorsFile, verify_checksums
from .scheduler import SchedulerConfig

BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREDICTION_TYPES = ("epsilon", "v_prediction")
DIFFUSERS_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors",
                   "vae": "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder": "text_encoder/model.safetensors",
                   "text_encoder_2": "text_encoder_2/model.safetensors"}
TEXT_PARTS = ("text_encoder", "text_encoder_2")


# -- modules on the meta device ------------------------------------------------------------------------------------

def clip_config(text: TextConfig):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(**text.to_transformers())


def build_meta(cfg: ModelConfig) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder(s) with parameters on the meta device (no memory, no init cost)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .unet import UNet
    from .vae import VAE

    with torch.device("meta"):
        modules = {"unet": UNet(cfg.unet), "vae": VAE(cfg.vae), "text_encoder": CLIPTextModel(clip_config(cfg.text))}
        if cfg.text_2 is not None:
            modules["text_encoder_2"] = CLIPTextModelWithProjection(clip_config(cfg.text_2))
    return modules


def text_file_key(module_key: str) -> str:
    """Checkpoint files name CLIP weights `text_model.*` (and `text_projection.*`); transformers 5's
    CLIPTextModel drops the `text_model.` prefix."""
    return module_key if module_key.startswith(("text_model.", "text_projection.")) else "text_model." + module_key


def expected_shapes(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part: file key (diffusers layout) -> shape, for every persistent parameter/buffer."""
    out = {}
    for part, m in modules.items():
        sd = m.state_dict()
        name = text_file_key if part in TEXT_PARTS else (lambda k: k)
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


# -- the two layouts -----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a diffusers checkpoint folder needs model_index.json, "
                              f"unet/, vae/, text_encoder/ and tokenizer/ (scheduler/ is optional)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _parsed(path: Path, parse):
    """`parse` of the JSON at `path`, a config that lacks a key or holds a wrong value named with its file."""
    raw = _read_json(path)
    try:
        return parse(raw)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: the config has no {e.args[0]!r}; is it the right part's config.json?") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None


def _text_config(path: Path) -> TextConfig:
    names = {f.name for f in dataclasses.fields(TextConfig)}
    return _parsed(path, lambda raw: TextConfig(**{k: v for k, v in raw.items() if k in names}))


def _diffusers_config(root: Path, prediction_type: str | None) -> ModelConfig:
    supported = f"supported families are {', '.join(SUPPORTED_FAMILIES)} (Stable Diffusion 1.x, 2.x and SDXL base)"
    index = _read_json(root / "model_index.json")
    u = _read_json(root / "unet" / "config.json")
    sdxl = u.get("addition_embed_type") == "text_time"
    if sdxl and not (index.get("text_encoder") and index["text_encoder"][0] and index.get("text_encoder_2")):
        raise CheckpointError(f"{root}: an SDXL refiner (or another SDXL variant without both text encoders) is not "
                              f"supported; {supported}")
    if u.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel" or u.get("encoder_hid_dim") \
            or u.get("class_embed_type") or (u.get("addition_embed_type") and not sdxl) \
            or (u.get("transformer_layers_per_block", 1) != 1 and not sdxl):
        raise CheckpointError(f"{root / 'unet' / 'config.json'}: this UNet variant is not supported; {supported}")
    unet = _parsed(root / "unet" / "config.json", UNetConfig.from_diffusers)
    vae = _parsed(root / "vae" / "config.json", VAEConfig.from_diffusers)
    text = _text_config(root / "text_encoder" / "config.json")
    pred = prediction_type or _schedule(root).prediction_type
    if sdxl:
        text_2 = _text_config(root / "text_encoder_2" / "config.json")
        widths = (text.hidden_size + text_2.hidden_size, text_2.projection_dim)
        if widths != (unet.cross_attention_dim, unet.pooled_dim):
            raise CheckpointError(f"{root}: the text encoders ({text.hidden_size} + {text_2.hidden_size} wide, pooled "
                                  f"{text_2.projection_dim}) do not match the UNet (context "
                                  f"{unet.cross_attention_dim}, pooled {unet.pooled_dim}); the folder's parts come "
                                  f"from different models")
        return ModelConfig(family="sdxl", unet=unet, vae=vae, text=text, text_2=text_2, prediction_type=pred,
                           force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
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
    for part in expected:
        path = root / DIFFUSERS_FILES[part]
        if not path.exists():
            raise CheckpointError(f"{path} is missing (only .safetensors weights are read; convert .bin files first)")
        f = SafetensorsFile(path)
        # Older transformers saved CLIP's position_ids buffer; it is recomputed, never read.
        found = {k: s for k, s in f.shapes.items() if not k.endswith("embeddings.position_ids")}
        if part in TEXT_PARTS:
            found = {text_file_key(k): s for k, s in found.items()}
            rename = {text_file_key(k): k for k in f.shapes}
        else:
            rename = {k: k for k in found}
        _check_keys(str(path), expected[part], found, f"{part} of this config")
        sources[part] = {k: (f, rename[k], None) for k in expected[part]}
    return sources


def _materialize(modules, sources, cfg: ModelConfig, single: SafetensorsFile | None, device, dtypes: dict):
    """Read every tensor once, cast and move it, assign it into the meta modules (`dtypes`: per part)."""
    for part, m in modules.items():
        dtype = dtypes[part]
        if sources[part] is None:  # a single file's OpenCLIP text encoder, converted while read
            layout = singlefile.openclip_layout(cfg, part)
            got = singlefile.read_openclip(lambda name: single.get(layout.prefix + name, device, dtype), cfg, layout)
            tensors = {k: t.contiguous() for k, t in got.items()}
        else:
            tensors = {}
            for k, (f, src, fix) in sources[part].items():
                t = f.get(src, device, dtype)
                tensors[k] = fix(t) if fix is not None else t
        if part in TEXT_PARTS:
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
            raise CheckpointError("the toy model is not shipped in this build of p2p_engine; pass a checkpoint path, "
                                  "or make a random one with p2p.save_random_checkpoint(path, 'tiny')")
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


def _device(device) -> torch.device:
    """The device asked for, refused with what to pass instead when this machine or torch build lacks it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cuda', 'cuda:1' or 'cpu', got {device!r}") from e
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(device.type)
    if backend is not None and not backend.is_available():
        raise ValueError(f"device {str(device)!r} is not available here (torch {torch.__version__}, "
                         f"{'no CUDA device or a CPU build' if device.type == 'cuda' else 'no MPS'}); "
                         "pass device='cpu' or leave device unset")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    return device


def load(path, device=None, dtype=torch.float32, backend: str = "auto", *, prediction_type: str | None = None,
         channels_last: bool | None = None):
    """Load a Stable Diffusion 1.x/2.x or SDXL base checkpoint into a `Pipeline`.

    Args:
        path: a diffusers folder, one LDM single-file `.safetensors`, or "toy".
        device: default "cuda" when available, else "cpu".
        dtype: torch.float32 / float16 / bfloat16; every floating tensor is cast on load (an SDXL VAE that
            says `force_upcast` stays float32 in half precision, where it overflows).
        backend: "auto" (triton on CUDA, torch elsewhere), "torch" or "triton".
        prediction_type: "epsilon" or "v_prediction"; overrides the checkpoint's (single files cannot say).
        channels_last: run the UNet's convolutions in channels-last memory (`UNet.set_channels_last`); default
            on CUDA, where it was faster, and off on the CPU.
    """
    from .pipeline import Pipeline
    from .tokenizer import clip_tokenizer, load_tokenizer

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    device = _device(device)
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
        tokenizers = [load_tokenizer(root / "tokenizer")]
        if cfg.text_2 is not None:
            tokenizers.append(load_tokenizer(root / "tokenizer_2"))
    else:
        single = SafetensorsFile(root)
        cfg = singlefile.detect_config(single.shapes, str(root), prediction_type)
        schedule = SchedulerConfig(prediction_type=cfg.prediction_type)  # SD's standard config
        modules = build_meta(cfg)
        expected = expected_shapes(modules)
        sources = singlefile.sources(root, single, cfg, expected)
        tokenizers = [clip_tokenizer(cfg.pad_token)] + ([clip_tokenizer("!")] if cfg.text_2 is not None else [])
    # Everything is validated; from here on only reading can fail (a file truncated mid-data).
    upcast = cfg.family == "sdxl" and cfg.vae.force_upcast and dtype != torch.float32
    dtypes = {part: (torch.float32 if part == "vae" and upcast else dtype) for part in modules}
    _materialize(modules, sources, cfg, single, device, dtypes)
    for m in modules.values():
        m.eval().requires_grad_(False)
    from . import unet
    modules["unet"].set_backend(backend)
    modules["unet"].set_channels_last(device.type == "cuda" if channels_last is None else channels_last)
    modules["unet"].set_fused_norms(unet.FUSED_NORMS and modules["unet"].channels_last and device.type == "cuda")
    return Pipeline(modules["unet"], modules["vae"], modules["text_encoder"], tokenizers[0], cfg, device=device,
                    dtype=dtype, backend=backend, schedule=schedule, text_encoder_2=modules.get("text_encoder_2"),
                    tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None)


def load_or_reuse(model, *, prediction_type: str | None = None, **kw):
    """`model` itself where it is a loaded `Pipeline` (a caller's, reused as loaded), else `load(model, ...)` with
    the other arguments (`check_reuse` first)."""
    from .pipeline import Pipeline

    check_reuse(model, prediction_type)
    return model if isinstance(model, Pipeline) else load(model, prediction_type=prediction_type, **kw)


def check_reuse(model, prediction_type: str | None) -> None:
    """Refuse a prediction_type beside a loaded Pipeline, which would ignore it."""
    from .pipeline import Pipeline

    if prediction_type is not None and isinstance(model, Pipeline):
        raise ValueError("prediction_type applies to a checkpoint being loaded; a loaded Pipeline keeps its own "
                         "(give it to p2p.load)")
