"""The loaded model: its parts, prompt and image encoding, and the entry points of the API.

`Pipeline` holds no global state; sampling and editing live in `editing.py` and
inversion in `inversion.py`, and the methods here only forward to them.
"""
from __future__ import annotations

import gc

import torch

from .config import ModelConfig
from .scheduler import DDIM, SchedulerConfig


class Pipeline:
    def __init__(self, unet, vae, text_encoder, tokenizer, config: ModelConfig, *,
                 device: torch.device, dtype: torch.dtype, backend: str, schedule: SchedulerConfig | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = backend
        # the checkpoint's noise schedule and timestep settings (scheduler.py); its samplers are in samplers.py
        self.scheduler = DDIM(schedule or SchedulerConfig(prediction_type=config.prediction_type))

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype of latents between steps, of the scheduler's arithmetic and of optimised embeddings:
        float32 whatever the model's dtype (float64 for a float64 model: tests check loops with one, free
        of float32 rounding)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) int64 token ids, padded with the checkpoint's pad token, truncated at 77."""
        out = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return out.input_ids

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> torch.Tensor:
        """(B, 77, D) text embeddings (the text encoder's last hidden state) in the pipeline's dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def predict(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """The UNet's output for latents `x` (B, 4, h, w) and `context` (B, 77, D) in the master dtype: the model
        runs in its own dtype, and inversion's optimised embeddings stay float32 master copies."""
        return self.unet(x.to(self.dtype), t, context.to(self.dtype)).to(self.master_dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, h, w) latents in the master dtype: the VAE mean times the
        scaling factor, as the reference encodes a real image."""
        out = self.vae.encode(images.to(self.device, self.dtype))
        return out.to(self.master_dtype) * self.config.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, H, W) float32 images in [-1, 1] (`images.to_pil` makes
        pictures of them)."""
        return self.vae.decode(latents.to(self.device, self.dtype) / self.config.vae.scaling_factor).float()

    def edit(self, prompts, controller=None, **kwargs):
        from .editing import edit
        return edit(self, prompts, controller=controller, **kwargs)

    def generate(self, prompts, **kwargs):
        from .editing import edit
        return edit(self, prompts, controller=None, **kwargs)

    def invert(self, image, prompt, **kwargs):
        from .inversion import invert
        return invert(self, image, prompt, **kwargs)

    def invert_batch(self, images, prompts, **kwargs):
        from .inversion import invert_batch
        return invert_batch(self, images, prompts, **kwargs)

    def release_memory(self) -> None:
        """Give back memory cached between calls. The weights stay: the pipeline is ready for the next
        call. What a long-lived process calls between job files."""
        release_memory(self.device)


def release_memory(device=None) -> None:
    """Python garbage and, on CUDA (`device` None: wherever CUDA is present), the caching allocator's free
    blocks. Everything a run makes is freed when it returns; this gives the cached blocks back."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()
