"""The samplers of the sampling loop: DDIM, PNDM (PLMS steps) and DPM-Solver++ (2M), as diffusers runs them.

A sampler gives the loop its UNet calls' timesteps and takes one scheduler step
after each call: `sampler.timesteps[i]` is call i's timestep, `sampler.step(i,
model_out, sample)` the sample after it. `steps` is what the user asked for; the
attention-control windows are fractions of it.

- "ddim": one call per step (reference: the null-text notebook, PIE-Bench).
- "pndm": PLMS steps only (`skip_prk_steps`), SD 1.4's default and the stable
  notebook's sampler: N steps are N + 1 UNet calls (t = 981, 961, 961, 941, ..., 1
  at 50 steps), the second call a Heun-like correction of the first step. The
  reference's controller counts UNet calls, so its cross alpha table has N + 1
  rows; the engine's control counts them too.
- "dpmsolver++": the second-order multistep DPM-Solver++ (midpoint), first order
  on its first and last steps and a final sigma of zero, as diffusers'
  DPMSolverMultistepScheduler configured from the checkpoint's scheduler config.

Each matches the diffusers scheduler of the same config to float precision
(tests/test_samplers.py); the arithmetic runs in the sample's dtype (the loop's
master dtype, float32).
"""
from __future__ import annotations

import numpy as np
import torch

from .checks import is_int
from .scheduler import DDIM, ddim_step

SAMPLERS = ("ddim", "pndm", "dpmsolver++")


class DDIMSampler:
    def __init__(self, schedule: DDIM, steps: int, timesteps: list[int], device):
        self.steps, self.timesteps = steps, list(timesteps)
        self.v_pred = schedule.prediction_type == "v_prediction"
        stride = schedule.num_train_steps // steps
        # (calls,) alpha_t and alpha_{t - stride} as device tensors: no host sync inside the loop
        self.a = torch.stack([schedule.alpha(t) for t in self.timesteps]).to(device)
        self.a_prev = torch.stack([schedule.alpha(t - stride) for t in self.timesteps]).to(device)

    def step(self, i: int, model_out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return ddim_step(model_out, sample, self.a[i], self.a_prev[i], self.v_pred)


class PNDMSampler:
    """Pseudo linear multistep (PLMS): Adams-Bashforth on the model outputs of the last four calls."""

    def __init__(self, schedule: DDIM, steps: int, steps_offset: int | None):
        self.schedule, self.steps = schedule, steps
        self.stride = schedule.num_train_steps // steps
        base = schedule.timesteps(steps, steps_offset)[::-1]  # ascending, as diffusers' _timesteps
        self.timesteps = (base[:-1] + base[-2:-1] + base[-1:])[::-1]  # the first timestep's level twice
        self.outputs: list[torch.Tensor] = []  # diffusers' ets: model outputs of past steps
        self.first_sample = None

    def step(self, i: int, model_out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[i]
        prev_t = t - self.stride
        if i != 1:
            self.outputs = self.outputs[-3:] + [model_out]
        else:  # the correction of the first step: back at its start, with the two outputs averaged
            prev_t, t = t, t + self.stride
        ets = self.outputs
        if len(ets) == 1 and i == 0:
            self.first_sample = sample
        elif len(ets) == 1 and i == 1:
            model_out = (model_out + ets[-1]) / 2
            sample, self.first_sample = self.first_sample, None
        elif len(ets) == 2:
            model_out = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_out = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev_sample(sample, t, prev_t, model_out)

    def _prev_sample(self, sample, t: int, prev_t: int, model_out):
        # PNDM's formula (9):
        #   x_prev = sqrt(a_prev / a) x - (a_prev - a) eps / (a sqrt(1 - a_prev) + sqrt(a (1 - a) a_prev))
        a = self.schedule.alpha(t).to(sample.device)
        a_prev = self.schedule.alpha(prev_t).to(sample.device)
        b, b_prev = 1 - a, 1 - a_prev
        if self.schedule.prediction_type == "v_prediction":
            model_out = (a ** 0.5) * model_out + (b ** 0.5) * sample
        sample_coeff = (a_prev / a) ** 0.5
        denom = a * b_prev ** 0.5 + (a * b * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a) * model_out / denom


class DPMSolverPPSampler:
    """DPM-Solver++ 2M: data-prediction multistep of order 2 in log-SNR time."""

    def __init__(self, schedule: DDIM, steps: int, steps_offset: int | None):
        cfg = schedule.config
        self.steps, self.v_pred = steps, schedule.prediction_type == "v_prediction"
        n = cfg.num_train_timesteps
        spacing = cfg.timestep_spacing or "linspace"  # DPMSolverMultistepScheduler's own default
        if steps_offset is not None and spacing != "leading":
            raise ValueError(f"steps_offset applies to 'leading' timesteps; this checkpoint's scheduler spaces "
                             f"them {spacing!r}")
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = n // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            offset = cfg.steps_offset if steps_offset is None else steps_offset
            if not is_int(offset) or not 0 <= offset <= n - 1 - ts[0]:
                raise ValueError(f"steps_offset must be an integer in [0, {n - 1 - ts[0]}] for {steps} DPM-Solver++ "
                                 f"steps, got {offset!r} (the first timestep would pass {n - 1}); use fewer steps "
                                 f"or another steps_offset")
            ts += offset
        else:
            ts = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
        self.timesteps = [int(t) for t in ts]
        acp = schedule.alphas_cumprod
        all_sigmas = (((1 - acp) / acp) ** 0.5).numpy()
        sigmas = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # final sigma: zero
        self.x0_preds: list[torch.Tensor] = []

    def _alpha_sigma(self, i: int):
        sigma = self.sigmas[i]
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def step(self, i: int, model_out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        alpha_s0, sigma_s0 = self._alpha_sigma(i)
        x0 = alpha_s0 * sample - sigma_s0 * model_out if self.v_pred else (sample - sigma_s0 * model_out) / alpha_s0
        self.x0_preds = self.x0_preds[-1:] + [x0]
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        # first order on the first step (no history) and the last (its sigma is zero): a DDIM step
        if i == 0 or i == len(self.timesteps) - 1:
            return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        alpha_s1, sigma_s1 = self._alpha_sigma(i - 1)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        r0 = (lambda_s0 - lambda_s1) / h
        m0, m1 = self.x0_preds[-1], self.x0_preds[-2]
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)


def make_sampler(name: str, schedule: DDIM, steps: int, device, *, steps_offset: int | None = None,
                 timesteps: list[int] | None = None):
    """The sampler `name` for `steps` steps of `schedule`. `timesteps` (DDIM only) fixes the timesteps, as an
    inversion does; `steps_offset` overrides the checkpoint's for "leading" spacing."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    if name == "ddim":
        return DDIMSampler(schedule, steps, timesteps or schedule.timesteps(steps, steps_offset), device)
    if timesteps is not None:
        raise ValueError(f"fixed timesteps are DDIM's (an inversion's); the {name} sampler makes its own")
    if name == "pndm":
        return PNDMSampler(schedule, steps, steps_offset)
    if not is_int(steps) or not 1 <= steps < schedule.num_train_steps:
        raise ValueError(f"steps must be an integer in [1, {schedule.num_train_steps - 1}] for {name}, "
                         f"got {steps!r}")
    return DPMSolverPPSampler(schedule, steps, steps_offset)
