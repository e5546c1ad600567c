"""Inversion of real images: the `Inversion` file, DDIM inversion, and the methods built on it.

Every method first encodes the image (VAE mean * scaling) and runs DDIM inversion with the
conditional branch only (guidance 1), from z0 up the sampling timesteps: the pivot trajectory
z*_0 .. z*_T. Then, per method (REFERENCE.md):
- "null_text": per sampling step, the unconditional embedding is optimised so that guided DDIM from
  the current latent lands on the pivot (`nulltext.py`); edits use the per-step embeddings.
- "negative_prompt": the source prompt's own embedding is every step's unconditional context.
- "ddim": the plain "" embedding; edits start from z*_T and drift from the image.
- "direct" (Direct Inversion, PnP Inversion): the plain "" embedding and the pivot z*_{T-1} .. z*_0
  kept; an edit pins its source row to the pivot after every scheduler step, so the source ends on
  z0 and the targets follow it through the injected attention. No optimisation.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from . import graphs
from .checks import check_flags, check_guidance, is_int, is_number
from .editing import edit
from .files import atomic_write
from .images import prepare
from .nulltext import EPSILON, EPSILON_SLOPE, null_optimize, warn_bf16
from .scheduler import leading_timesteps

METHODS = ("null_text", "negative_prompt", "ddim", "direct")
FORMAT = "p2p_engine.inversion/1"
# The settings of `Inversion.scheduler` an edit from it must share with the pipeline's schedule.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "set_alpha_to_one")


@dataclass
class Inversion:
    latent_T: torch.Tensor  # (1, 4, h, w) float32
    null_embeddings: torch.Tensor  # (steps, 77, D) float32: the unconditional context of each sampling step
    prompt: str
    losses: torch.Tensor  # (steps, inner_steps) float32, NaN for iterations not run
    method: str = "null_text"
    steps: int = 50
    inner_steps: int = 10
    guidance: float = 7.5
    scheduler: dict = field(default_factory=dict)
    family: str = "sd1"
    text_dim: int = 768
    prediction_type: str = "epsilon"
    # The sampling timesteps (descending) the inversion was made for; an edit from it runs these. None: the
    # timesteps of files written before they were recorded, which this engine made at 980 .. 0 ("leading"
    # spacing, no offset).
    timesteps: list[int] | None = None
    # "direct" only: (steps, 4, h, w) float32, the pivot after each sampling step, z*_{T-1} .. z*_0.
    pivots: torch.Tensor | None = None
    # SDXL: (steps, P) the unconditional pooled embedding of each step (the sampler's, or the prompt's for
    # negative_prompt; optimised with the context when `pooled_optimized`).
    null_pooled: torch.Tensor | None = None
    pooled_optimized: bool = False
    # `Pipeline.weights_probe()` of the model it was made with (None in files from before it was recorded): an
    # edit on a model whose weights differ is refused.
    weights_probe: torch.Tensor | None = None
    # How null-text's inner iteration ran ("eager" or "graph", editing.LOOPS; "eager" for the methods that
    # optimise nothing) and why recording its graph failed, where it ran eagerly instead. Not saved: None in an
    # inversion loaded from a file.
    loop: str | None = None
    capture_failure: str | None = None

    def __post_init__(self):
        if self.timesteps is None:
            self.timesteps = leading_timesteps(self.scheduler.get("num_train_timesteps", 1000),
                                               self.null_embeddings.shape[0], 0)
        self.timesteps = [int(t) for t in self.timesteps]
        if len(self.timesteps) != self.null_embeddings.shape[0]:
            raise ValueError(f"an inversion of {self.null_embeddings.shape[0]} steps needs as many timesteps, "
                             f"got {len(self.timesteps)}")
        if (self.method == "direct") != (self.pivots is not None):
            raise ValueError("a 'direct' inversion holds the pivot latents, and only it does")
        if self.pivots is not None and self.pivots.shape[0] != self.null_embeddings.shape[0]:
            raise ValueError(f"an inversion of {self.null_embeddings.shape[0]} steps needs as many pivot latents, "
                             f"got {self.pivots.shape[0]}")

    def null_text(self):
        """The per-step unconditional conditioning (`conditioning.StepTexts`)."""
        from .conditioning import StepTexts
        return StepTexts(self.null_embeddings, self.null_pooled)

    def check_compatible(self, pipe) -> None:
        """Raise if this inversion was made with a model of another family or context width."""
        dim = pipe.config.unet.cross_attention_dim
        if (self.family, self.text_dim, self.prediction_type) != (pipe.config.family, dim,
                                                                   pipe.config.prediction_type):
            raise ValueError(
                f"this inversion was made with a {self.family} model (text dim {self.text_dim}, "
                f"{self.prediction_type}); the pipeline is {pipe.config.family} (text dim {dim}, "
                f"{pipe.config.prediction_type}). Invert the image again with this model.")
        if (self.null_pooled is None) != (pipe.config.unet.addition_time_embed_dim is None):
            raise ValueError("this inversion's pooled embeddings do not fit the pipeline's model (SDXL has them, "
                             "SD 1.x/2.x do not); invert the image again with this model")
        c = pipe.config.unet.in_channels
        if self.latent_T.shape[1] != c:
            raise ValueError(f"inversion latent has {self.latent_T.shape[1]} channels, the UNet expects {c}")
        mine = pipe.scheduler.settings()
        for key in SCHEDULE_KEYS:
            if key in self.scheduler and self.scheduler[key] != mine[key]:
                raise ValueError(f"this inversion was made with a noise schedule of {key} = {self.scheduler[key]!r}; "
                                 f"the pipeline's is {mine[key]!r}. Invert the image again with this model.")
        if self.weights_probe is not None:
            probe = pipe.weights_probe()
            # half precision rounds a weight by at most 2^-9 of it; another model's differ far more
            if probe.shape != self.weights_probe.shape or not torch.allclose(probe, self.weights_probe, rtol=1e-2,
                                                                              atol=1e-5):
                raise ValueError("this inversion was made with other weights than this pipeline's model (same "
                                 "architecture, different checkpoint). Invert the image again with this model.")

    def save(self, path) -> None:
        """One safetensors file: tensors plus the settings as JSON in the header; written atomically."""
        from safetensors.torch import save

        meta = {"format": FORMAT, "prompt": self.prompt, "method": self.method, "steps": self.steps,
                "inner_steps": self.inner_steps, "guidance": self.guidance, "scheduler": self.scheduler,
                "family": self.family, "text_dim": self.text_dim, "prediction_type": self.prediction_type,
                "timesteps": self.timesteps, "pooled_optimized": self.pooled_optimized}
        tensors = {"latent_T": self.latent_T, "null_embeddings": self.null_embeddings, "losses": self.losses}
        if self.pivots is not None:
            tensors["pivots"] = self.pivots
        if self.null_pooled is not None:
            tensors["null_pooled"] = self.null_pooled
        if self.weights_probe is not None:
            tensors["weights_probe"] = self.weights_probe
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        with atomic_write(path) as f:
            f.write(save(tensors, metadata={"p2p_inversion": json.dumps(meta)}))

    @classmethod
    def load(cls, path) -> "Inversion":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"inversion file not found: {path}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder: give the inversion's .safetensors file")
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("p2p_inversion")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"cannot read inversion file {path}: {e}") from None
        if raw is None:
            raise ValueError(f"{path} is not an inversion file (no 'p2p_inversion' metadata)")
        meta = json.loads(raw)
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: unknown inversion format; expected {FORMAT}")
        return cls(latent_T=tensors["latent_T"], null_embeddings=tensors["null_embeddings"],
                   losses=tensors["losses"], pivots=tensors.get("pivots"), null_pooled=tensors.get("null_pooled"),
                   weights_probe=tensors.get("weights_probe"), **meta)

    def unet_evaluations(self, prompts: int = 2) -> dict[str, int]:
        """What the inversion and one edit of `prompts` prompts from it cost, in UNet rows (one latent through
        the UNet once): {"inversion": forward rows, "inversion_backward": backward rows, "edit": forward rows}.
        Counted from the method and the iterations the optimisation ran (`losses`), not timed."""
        n = self.null_embeddings.shape[0]
        forward, backward = n, 0  # the DDIM inversion: one conditional row per step
        if self.method == "null_text":
            iterations = int((~self.losses.isnan()).sum())
            forward += n + iterations + n  # per step the conditional output, each iteration, the advance
            backward = iterations
        return {"inversion": forward, "inversion_backward": backward, "edit": n * 2 * prompts}


# -- the loops

@torch.no_grad()
def ddim_invert(pipe, z0: torch.Tensor, cond, timesteps: list[int], time_ids=None, on_step=None) -> list[torch.Tensor]:
    """Guidance-1 DDIM inversion up the sampling timesteps (descending, e.g. 981 .. 1) from their end.
    z0 (N, 4, h, w), cond the N prompts' `Text` -> [z*_0, ..., z*_T] (steps + 1 entries). `on_step(i)` is called
    after step i (from 1)."""
    sched = pipe.scheduler
    steps = len(timesteps)
    traj = [z0]
    z = z0
    for i, t in enumerate(reversed(timesteps)):  # 1, 21, ... 981
        out = pipe.predict(z, torch.tensor(t, device=pipe.device), cond.context, pooled=cond.pooled, time_ids=time_ids)
        z = sched.inversion_step(out, t, z, steps)
        traj.append(z)
        if on_step is not None:
            on_step(i + 1)
    return traj


def _check_options(*, inner_steps, epsilon, epsilon_slope, crop, flags: dict) -> None:
    """invert_batch's numeric and on/off options, refused by name before any work."""
    if not is_int(inner_steps) or inner_steps < 0:
        raise ValueError(f"inner_steps must be an integer >= 0 (optimiser iterations per step), got {inner_steps!r}")
    for name, value in (("epsilon", epsilon), ("epsilon_slope", epsilon_slope)):
        if not is_number(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not isinstance(crop, (tuple, list)) or len(crop) != 4 or not all(is_int(c) and c >= 0 for c in crop):
        raise ValueError(f"crop must be 4 pixel offsets >= 0, (left, right, top, bottom), got {crop!r}")
    check_flags(**flags)


def invert_batch(pipe, images, prompts, *, steps: int = 50, inner_steps: int = 10, guidance: float | None = None,
                 method: str = "null_text", early_stop: bool = True, progress: bool = True,
                 epsilon: float = EPSILON, epsilon_slope: float = EPSILON_SLOPE, use_graph: bool | None = None,
                 crop: tuple[int, int, int, int] = (0, 0, 0, 0), steps_offset: int | None = None,
                 optimize_pooled: bool = False, callback=None) -> list[Inversion]:
    """Invert N images at once, each with its own prompt, null embeddings and early stopping.

    Args:
        method: "null_text" (default), "negative_prompt", "ddim" or "direct" (module docstring).
        guidance: the edits' guidance the null text is optimised for (default the family's: 7.5, SDXL 5.0).
        optimize_pooled: SDXL null-text inversion also optimises the unconditional pooled embedding (by
            default it stays at what the sampler's unconditional branch uses, zeros for SDXL base).
        images: paths, PIL images, (H, W, 3) uint8 arrays, or prepared (1, 3, S, S) tensors in [-1, 1].
        steps_offset: overrides the checkpoint's for "leading" timesteps (the inversion records the ones used).
        epsilon, epsilon_slope: early stop when a step's loss < epsilon + i * epsilon_slope (reference values).
        use_graph: capture the inner iteration in a CUDA graph; default: when the device is CUDA.
        crop: (left, right, top, bottom) offsets applied before the centre crop, as `load_512`.
        callback: called as callback(step, total) after each step: the DDIM inversion's `steps`, then for
            "null_text" the optimisation's `steps` (total 2 * steps). An exception it raises stops the inversion
            there and propagates (how a server cancels one).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "getpixel") or getattr(images, "ndim", 4) < 4:
        raise TypeError(f"invert_batch takes a list of images (paths, PIL images or (H, W, 3) uint8 arrays), got "
                        f"one {type(images).__name__}; for one image, call invert")
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"invert_batch got {len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("invert_batch got no images")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"each image's prompt must be one string, got {[type(p).__name__ for p in prompts]}")
    _check_options(inner_steps=inner_steps, epsilon=epsilon, epsilon_slope=epsilon_slope, crop=crop,
                   flags=dict(early_stop=early_stop, progress=progress, optimize_pooled=optimize_pooled,
                              use_graph=True if use_graph is None else use_graph))
    if not early_stop:
        epsilon, epsilon_slope = -math.inf, 0.0
    check_guidance(guidance)
    guidance = pipe.default_guidance if guidance is None else guidance
    ts = pipe.scheduler.timesteps(steps, steps_offset)  # the sampling timesteps, 981 .. 1 for SD at 50 steps
    size = pipe.config.image_size
    x = torch.cat([im if _is_prepared(im, size) else prepare(im, size, *crop) for im in images])
    z0 = pipe.encode_images(x)  # (N, 4, h, w)
    n = len(prompts)
    cond = pipe.encode_text(list(prompts)).to(pipe.master_dtype)  # (N, 77, D), SDXL's pooled (N, P)
    uncond = pipe.unconditional().to(pipe.master_dtype).expand(n)
    time_ids = pipe.time_ids(x.shape[-2], x.shape[-1], n)  # SDXL: (N, 6)
    total = steps * (2 if method == "null_text" else 1)

    def phase(first: int):  # the callback of one phase: its step i is step first + i of the whole
        return None if callback is None else (lambda i: callback(first + i, total))
    with torch.no_grad():
        traj = ddim_invert(pipe, z0, cond.to(pipe.dtype), ts, time_ids, on_step=phase(0))
    if method == "null_text":
        warn_bf16(pipe)
        if use_graph is None:
            use_graph = graphs.can_capture(pipe.device)
        nulls, pooled, losses, (loop, failure) = null_optimize(pipe, traj, cond, uncond, ts, inner_steps, guidance,
                                                               epsilon, epsilon_slope, use_graph, progress, time_ids,
                                                               optimize_pooled, on_step=phase(steps))
    else:
        src = cond if method == "negative_prompt" else uncond
        nulls = src.context[None].expand(steps, -1, -1, -1)
        pooled = None if src.pooled is None else src.pooled[None].expand(steps, -1, -1)
        losses = torch.full((steps, 0, n), float("nan"))
        inner_steps = 0
        loop, failure = "eager", None
    nulls, losses, zT = nulls.float().cpu(), losses.float().cpu(), traj[-1].float().cpu()
    pooled = None if pooled is None else pooled.float().cpu()  # (steps, N, P)
    # direct: after sampling step i the source row sits on z*_{t_i - stride} = traj[steps - 1 - i]
    pivots = torch.stack(traj[-2::-1]).float().cpu() if method == "direct" else None  # (steps, N, 4, h, w)
    cfg = pipe.config
    return [Inversion(latent_T=zT[k:k + 1].clone(), null_embeddings=nulls[:, k].clone(), prompt=prompts[k],
                      losses=losses[:, :, k].clone(), method=method, steps=steps, inner_steps=inner_steps,
                      guidance=guidance, scheduler=pipe.scheduler.settings(), family=cfg.family,
                      text_dim=cfg.unet.cross_attention_dim, prediction_type=cfg.prediction_type, timesteps=ts,
                      pivots=None if pivots is None else pivots[:, k].clone(),
                      null_pooled=None if pooled is None else pooled[:, k].clone(),
                      pooled_optimized=method == "null_text" and optimize_pooled and pooled is not None,
                      weights_probe=pipe.weights_probe().clone(), loop=loop, capture_failure=failure)
            for k in range(n)]


def _is_prepared(image, size: int) -> bool:
    """Whether `image` is a float tensor as `images.prepare` makes it (raising if it is one of another shape or
    range); anything else is for prepare to read."""
    if not (isinstance(image, torch.Tensor) and image.is_floating_point()):
        return False
    if tuple(image.shape) != (1, 3, size, size):
        raise ValueError(f"a prepared image tensor must be (1, 3, {size}, {size}) in [-1, 1], got "
                         f"{tuple(image.shape)}; pass uint8 (H, W, 3) images to have them prepared")
    if image.min() < -1.001 or image.max() > 1.001:
        raise ValueError(f"a prepared image tensor must hold values in [-1, 1], got [{float(image.min()):.3g}, "
                         f"{float(image.max()):.3g}]")
    return True


def invert(pipe, image, prompt: str, **kw) -> Inversion:
    """Invert one image; see `invert_batch` for the arguments."""
    return invert_batch(pipe, [image], [prompt], **kw)[0]


def reconstruct(pipe, inv: Inversion, prompt: str | None = None, guidance: float | None = None,
                progress: bool = False) -> torch.Tensor:
    """Sampling from the inversion with one prompt (default the inverted one): the edit loop's final latent
    (1, 4, h, w), master dtype."""
    return edit(pipe, [prompt or inv.prompt], inversion=inv, guidance=guidance, store=False, progress=progress,
                decode_images=False).latents
