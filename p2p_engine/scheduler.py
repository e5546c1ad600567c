"""The noise schedule a checkpoint was trained with, its timesteps, and the DDIM arithmetic.

`SchedulerConfig` is what a diffusers folder's `scheduler/scheduler_config.json`
says (read as diffusers reads it: a key the file leaves out takes the value the
scheduler class would default to), or, for single files, the family's standard
config: Stable Diffusion 1.x and 2.x ship DDIM/PNDM configs with scaled-linear
betas 0.00085..0.012, 1000 training steps, the final alpha alpha_cumprod[0]
(`set_alpha_to_one=False`) and "leading" timesteps with `steps_offset` 1, so 50
steps are t = 981, 961, ... 1 (the notebooks, diffusers' pipelines and
PIE-Bench run these). `steps_offset=0` gives this engine's earlier 980 .. 0.

`DDIM` holds the alphas and the DDIM step and inversion step (eta = 0) of the
reference; every coefficient can be a tensor, so a whole step is capturable.
The other samplers (PNDM, DPM-Solver++) live in `samplers.py` on the same alphas.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .checks import is_int

BETA_SCHEDULES = ("scaled_linear", "linear")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Keys of a scheduler config that change the noise schedule or the sampler's arithmetic beyond what the
# engine implements, with the value that is harmless. Anything else a config holds (its class name, PNDM's
# skip_prk_steps, Euler's interpolation type, clip_sample, which diffusers' Stable Diffusion pipelines turn
# off) does not enter the engine's samplers.
UNSUPPORTED = {"rescale_betas_zero_snr": False, "thresholding": False, "use_karras_sigmas": False,
               "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False}


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    # None: what the sampler's diffusers class defaults to ("leading" for DDIM and PNDM, "linspace" for
    # DPM-Solver++), as `Scheduler.from_config` leaves it when the file has no such key.
    timestep_spacing: str | None = "leading"
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; the engine knows "
                             f"{BETA_SCHEDULES} and trained_betas")
        if self.timestep_spacing not in SPACINGS + (None,):
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def from_diffusers(cls, d: dict) -> "SchedulerConfig":
        """From a `scheduler_config.json`. A missing `steps_offset` is 1: diffusers' Stable Diffusion pipelines
        set it to 1 on any scheduler they are given. Raises ValueError naming an unsupported setting."""
        for key, ok in UNSUPPORTED.items():
            if d.get(key, ok) != ok:
                raise ValueError(f"scheduler config sets {key}={d[key]!r}, which the engine's samplers do not "
                                 f"implement; set it to {ok!r} or remove it")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        kw.setdefault("timestep_spacing", None)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    def betas(self) -> torch.Tensor:
        """(num_train_timesteps,) float32, computed as diffusers computes them (bit for bit)."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float32)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2


def leading_timesteps(num_train_timesteps: int, steps: int, steps_offset: int) -> list[int]:
    """"leading" spacing: (steps - 1) * r + offset, ..., r + offset, offset with r = num_train // steps."""
    ratio = num_train_timesteps // steps
    return [int(i * ratio + steps_offset) for i in reversed(range(steps))]


class DDIM:
    """The alphas of a schedule, its DDIM timesteps, and the reference's DDIM step and inversion step."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.num_train_steps = self.config.num_train_timesteps
        self.prediction_type = self.config.prediction_type
        self.alphas_cumprod = torch.cumprod(1.0 - self.config.betas(), dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def settings(self) -> dict:
        """The schedule as a dict (saved with an inversion)."""
        return self.config.to_dict()

    def timesteps(self, steps: int, steps_offset: int | None = None) -> list[int]:
        """The DDIM timesteps, descending, as diffusers' DDIMScheduler.set_timesteps gives them (981 .. 1 at
        50 steps for SD). `steps_offset` overrides the config's (it applies to "leading" spacing)."""
        n = self.num_train_steps
        if not is_int(steps) or not 1 <= steps <= n:
            raise ValueError(f"steps must be an integer in [1, {n}], got {steps!r}")
        spacing = self.config.timestep_spacing or "leading"
        if steps_offset is not None and spacing != "leading":
            raise ValueError(f"steps_offset applies to 'leading' timesteps; this checkpoint's scheduler spaces "
                             f"them {spacing!r}")
        if spacing == "leading":
            offset = self.config.steps_offset if steps_offset is None else steps_offset
            most = n - 1 - (steps - 1) * (n // steps)  # the first timestep stays below num_train_timesteps
            if not is_int(offset) or not 0 <= offset <= most:
                whose = "the checkpoint's scheduler config has" if steps_offset is None else "got"
                raise ValueError(f"steps_offset must be an integer in [0, {most}] for {steps} steps ({whose} "
                                 f"{offset!r}: the first timestep would pass {n - 1}); use fewer steps or "
                                 f"another steps_offset")
            return leading_timesteps(n, steps, offset)
        if spacing == "trailing":
            return [int(t) - 1 for t in np.round(np.arange(n, 0, -n / steps)).astype(np.int64)]
        return [int(t) for t in np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)]

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_out: torch.Tensor, t: int, sample: torch.Tensor, steps: int) -> torch.Tensor:
        """One sampling step from t to t - num_train // steps."""
        a = self.alpha(t).to(sample.device)
        a_prev = self.alpha(t - self.num_train_steps // steps).to(sample.device)
        return ddim_step(model_out, sample, a, a_prev, self.prediction_type == "v_prediction")

    def inversion_step(self, model_out: torch.Tensor, t: int, sample: torch.Tensor, steps: int) -> torch.Tensor:
        """One inversion step from t - num_train // steps up to t, using the output predicted at t
        (the reference's `next_step`)."""
        cur_t = min(t - self.num_train_steps // steps, self.num_train_steps - 1)
        a = self.alpha(cur_t).to(sample.device)
        a_next = self.alphas_cumprod[t].to(sample.device)
        if self.prediction_type == "epsilon":
            eps = model_out
        else:  # the output was predicted for the noisier sample at t; read eps off it as the sampler would
            eps = a_next.sqrt() * model_out + (1 - a_next).sqrt() * sample
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def ddim_step(model_out: torch.Tensor, sample: torch.Tensor, a: torch.Tensor, a_prev: torch.Tensor,
              v_pred: bool) -> torch.Tensor:
    """The DDIM step (eta = 0) from the level with alpha_cumprod `a` to the one with `a_prev`.

    The one DDIM arithmetic of the engine: sampling, null-text inversion's inner loop and its advance all
    call it. `a`, `a_prev` are 0-d tensors (device tensors in a captured loop) or floats.
    """
    if v_pred:
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_out
        eps = a.sqrt() * model_out + (1 - a).sqrt() * sample
    else:
        eps = model_out
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def proximal_delta(delta: torch.Tensor, quantile: float) -> torch.Tensor:
    """Proximal guidance's soft threshold: `delta` - clamp(`delta`, -thr, thr), thr the `quantile` of |delta|
    over the whole tensor, interpolated linearly between the sorted values at rank `quantile` * (n - 1).

    Computed from a sort at positions known on the host, so that it reads nothing back from the device:
    torch.quantile checks its argument on the host in torch 2.11, which breaks a captured loop. torch.quantile
    itself differs between releases (2.13 rounds the rank to float32, 2.15 keeps it in float64, as this does);
    where the rank is exact in float32, as at the default 0.75 below 5.5 million latent entries (SD 1.5 at
    512 x 512: 16384 per prompt), all agree bit for bit (tests/test_samplers.py).
    """
    flat = delta.abs().flatten()
    if flat.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"proximal guidance runs in float32 or float64, got {flat.dtype}")
    rank = quantile * (flat.numel() - 1)
    below, above = math.floor(rank), math.ceil(rank)  # above <= n - 1 as quantile <= 1
    ordered = torch.sort(flat).values
    thr = torch.lerp(ordered[below], ordered[above], rank - below)
    return delta - delta.clamp(-thr, thr)
