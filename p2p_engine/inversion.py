"""Null-Text Inversion of real images (reference: null_text_w_ptp.ipynb), batched and capturable.

Steps: encode (VAE mean * scaling), DDIM inversion with the conditional branch
only (the pivot trajectory z*_0 .. z*_T), then per sampling step i a few Adam
iterations on the unconditional ("null") embedding so that one guided DDIM step
from the current latent lands on z*_{t-1}. Reference order inside step i:
loss computed, Adam step taken, *then* `loss.item() < 1e-5 + i * 2e-5` breaks;
so the iteration that meets the threshold still updates the embedding.

Here the early stop lives on the device: a per-image `done` flag masks the Adam
update (parameter and state), so the inner loop needs no host sync and one
iteration can be captured in a CUDA graph and replayed. Adam is written out
with torch.optim.Adam's arithmetic (single-tensor path) and per-image state, so
N images in one batch equal N single runs.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from .editing import edit
from .files import atomic_write
from .images import prepare
from .scheduler import ddim_step, leading_timesteps

METHODS = ("null_text", "negative_prompt", "ddim")
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

    def __post_init__(self):
        if self.timesteps is None:
            self.timesteps = leading_timesteps(self.scheduler.get("num_train_timesteps", 1000),
                                               self.null_embeddings.shape[0], 0)
        self.timesteps = [int(t) for t in self.timesteps]
        if len(self.timesteps) != self.null_embeddings.shape[0]:
            raise ValueError(f"an inversion of {self.null_embeddings.shape[0]} steps needs as many timesteps, "
                             f"got {len(self.timesteps)}")

    def check_compatible(self, pipe) -> None:
        """Raise if this inversion was made with a model of another family or context width."""
        dim = pipe.config.unet.cross_attention_dim
        if (self.family, self.text_dim, self.prediction_type) != (pipe.config.family, dim,
                                                                   pipe.config.prediction_type):
            raise ValueError(
                f"this inversion was made with a {self.family} model (text dim {self.text_dim}, "
                f"{self.prediction_type}); the pipeline is {pipe.config.family} (text dim {dim}, "
                f"{pipe.config.prediction_type}). Invert the image again with this model.")
        c = pipe.config.unet.in_channels
        if self.latent_T.shape[1] != c:
            raise ValueError(f"inversion latent has {self.latent_T.shape[1]} channels, the UNet expects {c}")
        mine = pipe.scheduler.settings()
        for key in SCHEDULE_KEYS:
            if key in self.scheduler and self.scheduler[key] != mine[key]:
                raise ValueError(f"this inversion was made with a noise schedule of {key} = {self.scheduler[key]!r}; "
                                 f"the pipeline's is {mine[key]!r}. Invert the image again with this model.")

    def save(self, path) -> None:
        """One safetensors file: tensors plus the settings as JSON in the header; written atomically."""
        from safetensors.torch import save

        meta = {"format": FORMAT, "prompt": self.prompt, "method": self.method, "steps": self.steps,
                "inner_steps": self.inner_steps, "guidance": self.guidance, "scheduler": self.scheduler,
                "family": self.family, "text_dim": self.text_dim, "prediction_type": self.prediction_type,
                "timesteps": self.timesteps}
        tensors = {"latent_T": self.latent_T.detach().float().cpu().contiguous(),
                   "null_embeddings": self.null_embeddings.detach().float().cpu().contiguous(),
                   "losses": self.losses.detach().float().cpu().contiguous()}
        with atomic_write(path) as f:
            f.write(save(tensors, metadata={"p2p_inversion": json.dumps(meta)}))

    @classmethod
    def load(cls, path) -> "Inversion":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"inversion file not found: {path}")
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
                   losses=tensors["losses"], **meta)


# -- the loops

def _unet(pipe, x, t, context):
    """The UNet in the model's dtype, in and out of the master dtype: the optimised embedding stays an fp32
    master copy."""
    return pipe.unet(x.to(pipe.dtype), t, context.to(pipe.dtype)).to(pipe.master_dtype)


def _coeffs(sched, t: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_prev) as 0-d device tensors, so a captured step reads them from buffers."""
    prev_t = t - sched.num_train_steps // steps
    return sched.alpha(t).to(device).clone(), sched.alpha(prev_t).to(device).clone()


@torch.no_grad()
def ddim_invert(pipe, z0: torch.Tensor, cond: torch.Tensor, timesteps: list[int]) -> list[torch.Tensor]:
    """Guidance-1 DDIM inversion up the sampling timesteps (descending, e.g. 981 .. 1) from their end.
    z0 (N, 4, h, w), cond (N, 77, D) -> [z*_0, ..., z*_T] (steps + 1 entries)."""
    sched = pipe.scheduler
    steps = len(timesteps)
    traj = [z0]
    z = z0
    for t in reversed(timesteps):  # 1, 21, ... 981
        out = _unet(pipe, z, torch.tensor(t, device=pipe.device), cond)
        z = sched.inversion_step(out, t, z, steps)
        traj.append(z)
    return traj


class _Adam:
    """Batched Adam with per-image step counts and a per-image mask, matching torch.optim.Adam
    (single-tensor path, default betas, eps 1e-8) for each image. State is reset per sampling step,
    like the reference's fresh optimizer. All tensors live on the device; nothing reads back."""

    def __init__(self, param: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        n = param.shape[0]
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.count = torch.zeros(n, dtype=torch.float64, device=param.device)  # (N,) steps taken

    def reset(self):
        self.m.zero_(); self.v.zero_(); self.count.zero_()

    def step(self, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, active: torch.Tensor):
        """In place. param/grad (N, 77, D); lr 0-d fp64; active (N,) bool."""
        a = active.view(-1, 1, 1)
        self.count.add_(active.to(self.count.dtype))
        # Bias corrections in float64 then cast, as torch.optim.Adam computes them with Python floats.
        c = self.count.clamp(min=1)
        bc1 = 1 - self.b1 ** c
        bc2_sqrt = (1 - self.b2 ** c).sqrt()
        step_size = (lr / bc1).to(param.dtype).view(-1, 1, 1)
        bc2_sqrt = bc2_sqrt.to(param.dtype).view(-1, 1, 1)
        m = torch.lerp(self.m, grad, 1 - self.b1)
        v = self.v * self.b2 + (1 - self.b2) * grad * grad
        denom = v.sqrt() / bc2_sqrt + self.eps
        p = param - step_size * (m / denom)
        self.m.copy_(torch.where(a, m, self.m))
        self.v.copy_(torch.where(a, v, self.v))
        param.copy_(torch.where(a, p, param))


class _Iteration:
    """One inner iteration on static buffers: uncond forward, guided DDIM step, per-image MSE, backward,
    masked Adam step, done-flag update. Called eagerly, or captured once and replayed."""

    def __init__(self, pipe, param: torch.Tensor, latent: torch.Tensor, guidance: float):
        dev, dt = param.device, param.dtype
        self.pipe = pipe
        self.v_pred = pipe.config.prediction_type == "v_prediction"
        self.param = param  # (N, 77, D) fp32 null embeddings being optimised
        self.latent = latent.clone()  # (N, 4, h, w) z_t
        self.out_c = torch.zeros_like(latent)  # conditional model output at z_t
        self.target = torch.zeros_like(latent)  # pivot z*_{t-1}
        self.t = torch.zeros((), dtype=torch.int64, device=dev)
        self.a = torch.zeros((), dtype=dt, device=dev)
        self.a_prev = torch.zeros((), dtype=dt, device=dev)
        self.lr = torch.zeros((), dtype=torch.float64, device=dev)
        self.thresh = torch.zeros((), dtype=dt, device=dev)
        self.guidance = guidance
        self.done = torch.zeros(param.shape[0], dtype=torch.bool, device=dev)
        self.loss = torch.zeros(param.shape[0], dtype=dt, device=dev)  # (N,) this iteration's loss, NaN if done before
        self.adam = _Adam(param)

    def __call__(self):
        p = self.param.detach().requires_grad_(True)
        with torch.enable_grad():
            out_u = _unet(self.pipe, self.latent, self.t, p)
            noise = out_u + self.guidance * (self.out_c - out_u)
            prev = ddim_step(noise, self.latent, self.a, self.a_prev, self.v_pred)
            loss = ((prev - self.target) ** 2).mean(dim=(1, 2, 3))  # (N,) each image's own MSE
            (grad,) = torch.autograd.grad(loss.sum(), p)
        loss = loss.detach()
        active = ~self.done
        with torch.no_grad():
            self.adam.step(self.param, grad, self.lr, active)
            self.loss.copy_(torch.where(active, loss, torch.full_like(loss, float("nan"))))
            # Reference: the check follows the step, so the meeting iteration still updates.
            self.done.copy_(self.done | (active & (loss < self.thresh)))


def _graph_iteration(it: _Iteration):
    """Capture `it()` in a CUDA graph (warm-up on a side stream first). Returns a replay callable."""
    state = (it.param.clone(), it.adam.m.clone(), it.adam.v.clone(), it.adam.count.clone(), it.done.clone())
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                it()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            it()
    finally:
        # Warm-up and capture ran on live buffers: restore them (also for the eager fallback).
        for dst, src in zip((it.param, it.adam.m, it.adam.v, it.adam.count, it.done), state):
            dst.copy_(src)
    return g.replay


def _null_optimize(pipe, traj, cond, uncond, ts, inner_steps, guidance, eps0, eps_slope, use_graph, progress):
    """traj: [z*_0..z*_T] each (N, 4, h, w); cond/uncond (N, 77, D) fp32; ts the sampling timesteps.
    Returns null embeddings (steps, N, 77, D) and losses (steps, inner_steps, N)."""
    sched = pipe.scheduler
    dev = pipe.device
    n, steps = cond.shape[0], len(ts)
    param = uncond.detach().to(pipe.master_dtype).clone()
    latent = traj[-1]
    it = _Iteration(pipe, param, latent, guidance)
    run = None
    nulls = torch.empty((steps, n) + tuple(cond.shape[1:]), dtype=param.dtype, device=dev)
    losses = torch.full((steps, inner_steps, n), float("nan"), dtype=param.dtype, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="null-text inversion")
    for i, t in enumerate(ts):
        a, a_prev = _coeffs(sched, t, steps, dev)
        with torch.no_grad():
            it.latent.copy_(latent)
            it.out_c.copy_(_unet(pipe, latent, torch.tensor(t, device=dev), cond))
            it.target.copy_(traj[len(traj) - i - 2])
            it.t.fill_(t)
            it.a.copy_(a)
            it.a_prev.copy_(a_prev)
            it.lr.fill_(1e-2 * (1.0 - i / 100.0))
            it.thresh.fill_(eps0 + i * eps_slope)
            it.done.zero_()
            it.adam.reset()
        if run is None:  # capture once the buffers hold real values (step 0), so warm-up sees no NaN
            run = it
            if use_graph:
                try:
                    run = _graph_iteration(it)
                except Exception as e:  # a model part that is not capturable: go on eagerly, but say so
                    warnings.warn(f"CUDA-graph capture of the null-text iteration failed ({e}); "
                                  "using the eager loop")
                    run = it
        for j in range(inner_steps):
            run()
            losses[i, j].copy_(it.loss)
        with torch.no_grad():
            nulls[i].copy_(it.param)
            # Advance with the optimised embedding: guided step from z_t.
            out_u = _unet(pipe, latent, torch.tensor(t, device=dev), it.param)
            noise = out_u + guidance * (it.out_c - out_u)
            latent = ddim_step(noise, latent, a, a_prev, it.v_pred)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return nulls, losses


# The reference's early stop: step i stops once its loss < EPSILON + i * EPSILON_SLOPE.
EPSILON, EPSILON_SLOPE = 1e-5, 2e-5


def _warn_bf16(pipe) -> None:
    """Measured on toy models (4 held-out scenes, reference settings, fp32 master embedding; the table in
    p2p_engine/toy/README.md): an fp16 UNet ends each step within 4% of fp32's loss; a bf16 one (weights or
    autocast) 11-25% higher, with fewer steps stopping early. So bf16 is not offered for the optimisation:
    say so when it is asked."""
    dev = pipe.device.type
    autocast_bf16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
    if pipe.dtype == torch.bfloat16 or autocast_bf16:
        warnings.warn("null-text inversion in bfloat16 ends with higher losses than float32 (11-25% on the "
                      "toy models); load the model in float16 or float32 for inversion", stacklevel=3)


def invert_batch(pipe, images, prompts, *, steps: int = 50, inner_steps: int = 10, guidance: float = 7.5,
                 method: str = "null_text", early_stop: bool = True, progress: bool = True,
                 epsilon: float = EPSILON, epsilon_slope: float = EPSILON_SLOPE, use_graph: bool | None = None,
                 crop: tuple[int, int, int, int] = (0, 0, 0, 0), steps_offset: int | None = None) -> list[Inversion]:
    """Invert N images at once, each with its own prompt, null embeddings and early stopping.

    Args:
        images: paths, PIL images, (H, W, 3) uint8 arrays, or prepared (1, 3, S, S) tensors in [-1, 1].
        steps_offset: overrides the checkpoint's for "leading" timesteps (the inversion records the ones used).
        epsilon, epsilon_slope: early stop when a step's loss < epsilon + i * epsilon_slope (reference values).
        use_graph: capture the inner iteration in a CUDA graph; default: when the device is CUDA.
        crop: (left, right, top, bottom) offsets applied before the centre crop, as `load_512`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(images) != len(prompts):
        raise ValueError(f"invert_batch got {len(images)} images but {len(prompts)} prompts")
    if not early_stop:
        epsilon, epsilon_slope = -math.inf, 0.0
    ts = pipe.scheduler.timesteps(steps, steps_offset)  # the sampling timesteps, 981 .. 1 for SD at 50 steps
    size = pipe.config.image_size
    x = torch.cat([im if isinstance(im, torch.Tensor) else prepare(im, size, *crop) for im in images])
    z0 = pipe.encode_images(x)  # (N, 4, h, w)
    cond = pipe.encode_prompt(list(prompts)).to(pipe.master_dtype)  # (N, 77, D)
    uncond = pipe.encode_prompt([""]).to(pipe.master_dtype).expand_as(cond).contiguous()
    with torch.no_grad():
        traj = ddim_invert(pipe, z0, cond.to(pipe.dtype), ts)
    n = len(prompts)
    if method == "null_text":
        _warn_bf16(pipe)
        if use_graph is None:
            use_graph = pipe.device.type == "cuda"
        nulls, losses = _null_optimize(pipe, traj, cond, uncond, ts, inner_steps, guidance,
                                       epsilon, epsilon_slope, use_graph, progress)
    else:
        src = cond if method == "negative_prompt" else uncond
        nulls = src[None].expand(steps, -1, -1, -1)
        losses = torch.full((steps, 0, n), float("nan"))
        inner_steps = 0
    nulls, losses, zT = nulls.float().cpu(), losses.float().cpu(), traj[-1].float().cpu()
    cfg = pipe.config
    return [Inversion(latent_T=zT[k:k + 1].clone(), null_embeddings=nulls[:, k].clone(), prompt=prompts[k],
                      losses=losses[:, :, k].clone(), method=method, steps=steps, inner_steps=inner_steps,
                      guidance=guidance, scheduler=pipe.scheduler.settings(), family=cfg.family,
                      text_dim=cfg.unet.cross_attention_dim, prediction_type=cfg.prediction_type, timesteps=ts)
            for k in range(n)]


def invert(pipe, image, prompt: str, **kw) -> Inversion:
    """Invert one image; see `invert_batch` for the arguments."""
    return invert_batch(pipe, [image], [prompt], **kw)[0]


def reconstruct(pipe, inv: Inversion, prompt: str | None = None, guidance: float | None = None,
                progress: bool = False) -> torch.Tensor:
    """Sampling from the inversion with one prompt (default the inverted one): the edit loop's final latent
    (1, 4, h, w), master dtype."""
    return edit(pipe, [prompt or inv.prompt], inversion=inv, guidance=guidance, store=False, progress=progress,
                decode_images=False).latents
