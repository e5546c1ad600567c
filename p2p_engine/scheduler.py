"""DDIM sampling and inversion steps (eta = 0) with the reference settings.

1000 training steps, `scaled_linear` betas from 0.00085 to 0.012, no sample
clipping, the final alpha is alphas_cumprod[0] (`set_alpha_to_one=False`),
"leading" timestep spacing with no offset: 50 steps give t = 980, 960, ... 0.
Every coefficient can be taken as a tensor so that a whole step is capturable.
"""
from __future__ import annotations

import torch


class DDIM:
    def __init__(self, num_train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.num_train_steps = num_train_steps
        self.prediction_type = prediction_type
        self.beta_start, self.beta_end = beta_start, beta_end
        # Computed in fp32 like diffusers, so that the same coefficients come out bit for bit.
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_steps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = self.alphas_cumprod[0]

    def settings(self) -> dict:
        return {"num_train_steps": self.num_train_steps, "prediction_type": self.prediction_type,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    def timesteps(self, steps: int) -> torch.Tensor:
        """(steps,) int64, descending: 980, 960, ... 0 for 50 steps."""
        if not 1 <= steps <= self.num_train_steps:
            raise ValueError(f"steps must be in [1, {self.num_train_steps}], got {steps}")
        ratio = self.num_train_steps // steps
        return (torch.arange(steps, dtype=torch.int64) * ratio).flip(0)

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_out: torch.Tensor, t: int, sample: torch.Tensor, steps: int) -> torch.Tensor:
        """One sampling step from t to t - 1000 // steps."""
        a = self.alpha(t).to(sample.device)
        a_prev = self.alpha(t - self.num_train_steps // steps).to(sample.device)
        return ddim_step(model_out, sample, a, a_prev, self.prediction_type == "v_prediction")

    def inversion_step(self, model_out: torch.Tensor, t: int, sample: torch.Tensor, steps: int) -> torch.Tensor:
        """One inversion step from t - 1000 // steps up to t, using the output predicted at t
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
