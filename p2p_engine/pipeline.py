"""The loaded model: its parts, prompt and image encoding, and the entry points of the API.

`Pipeline` holds no global state; sampling and editing live in `editing.py` and
inversion in `inversion.py`, and the methods here only forward to them.

Text conditioning (`Text`): SD 1.x/2.x condition on the text encoder's last
hidden state (B, 77, D). SDXL conditions on both encoders' penultimate hidden
states side by side (B, 77, 768 + 1280) and, through the UNet's added
conditioning, on a pooled embedding (encoder 2's projected EOS output) and six
time ids (original h, w, crop top, left, target h, w; `time_ids`). Its empty
unconditional prompt is all zeros where the checkpoint says
`force_zeros_for_empty_prompt` (`unconditional`).
"""
from __future__ import annotations

import gc
import os

import torch

from .conditioning import Text
from .config import ModelConfig
from .scheduler import DDIM, SchedulerConfig


class Pipeline:
    def __init__(self, unet, vae, text_encoder, tokenizer, config: ModelConfig, *,
                 device: torch.device, dtype: torch.dtype, backend: str, schedule: SchedulerConfig | None = None,
                 text_encoder_2=None, tokenizer_2=None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2  # SDXL's second text encoder (with projection) and its tokenizer
        self.tokenizer_2 = tokenizer_2
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = backend
        # the checkpoint's noise schedule and timestep settings (scheduler.py); its samplers are in samplers.py
        self.scheduler = DDIM(schedule or SchedulerConfig(prediction_type=config.prediction_type))
        self._probe = None

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def default_guidance(self) -> float:
        """The family's guidance scale: 5.0 for SDXL, 7.5 for SD 1.x/2.x (the references')."""
        return 5.0 if self.family == "sdxl" else 7.5

    def weights_probe(self) -> torch.Tensor:
        """The middle entry of every weight matrix and kernel of the UNet and text encoder(s), float32 on the
        host, computed once: what an `Inversion` records, so that an edit from it can tell that it was made
        with other weights. The same model in another dtype gives the same values to its rounding."""
        if self._probe is None:
            self._probe = probe_weights(self.unet, self.text_encoder, self.text_encoder_2)
        return self._probe

    def self_max_queries(self, h: int, w: int) -> int:
        """Self-attention replacement's default limit for latents of h x w: the stable notebook's 16 x 16 layers
        for SD 1.x/2.x; for SDXL scaled with the latent size, (h/4)(w/4) (32 x 32 at 1024 x 1024)."""
        return (h // 4) * (w // 4) if self.family == "sdxl" else 16 * 16

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's own dtype: float32 for an SDXL VAE that asks to be upcast (`force_upcast`) in half
        precision, where it overflows; the pipeline's dtype otherwise."""
        return next(self.vae.parameters()).dtype

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype of latents between steps, of the scheduler's arithmetic and of optimised embeddings:
        float32 whatever the model's dtype (float64 for a float64 model: tests check loops with one, free
        of float32 rounding)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        """(B, 77) int64 token ids, padded with the checkpoint's pad token, truncated at 77 (tokenizer 1 unless
        another is given; token positions for P2P are always tokenizer 1's)."""
        tokenizer = tokenizer or self.tokenizer
        out = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return out.input_ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str] | str) -> Text:
        """The conditioning of the prompts in the pipeline's dtype (module docstring)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenize(prompts).to(self.device)
        if self.text_encoder_2 is None:  # SD 1.x/2.x: the last hidden state
            return Text(self.text_encoder(ids)[0].to(self.dtype))
        ids_2 = self.tokenize(prompts, self.tokenizer_2).to(self.device)
        h1 = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out = self.text_encoder_2(ids_2, output_hidden_states=True)
        return Text(torch.cat([h1, out.hidden_states[-2]], dim=-1).to(self.dtype), out.text_embeds.to(self.dtype))

    def encode_prompt(self, prompts: list[str] | str) -> torch.Tensor:
        """(B, 77, D) text embeddings: the context cross-attention reads (`encode_text` gives SDXL's pooled
        embedding beside it)."""
        return self.encode_text(prompts).context

    def unconditional(self) -> Text:
        """What the sampler's unconditional branch reads, for one row: the empty prompt's conditioning, or zeros
        where the checkpoint says `force_zeros_for_empty_prompt` (SDXL)."""
        text = self.encode_text([""])
        if self.config.force_zeros_for_empty_prompt:
            text = Text(torch.zeros_like(text.context), None if text.pooled is None else torch.zeros_like(text.pooled))
        return text

    def time_ids(self, height: int, width: int, rows: int) -> torch.Tensor | None:
        """(rows, 6) SDXL time ids of an image of height x width pixels, uncropped and not resized:
        (h, w, 0, 0, h, w) as diffusers' SDXL pipelines make them by default; None for SD 1.x/2.x."""
        if self.config.unet.addition_time_embed_dim is None:
            return None
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=self.dtype, device=self.device)
        return ids.expand(rows, -1)

    def predict(self, x: torch.Tensor, t, context: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output for latents `x` (B, 4, h, w), `context` (B, 77, D) (and for SDXL the pooled
        embedding and time ids) in the master dtype: the model runs in its own dtype, and inversion's optimised
        embeddings stay float32 master copies."""
        if pooled is not None:
            pooled = pooled.to(self.dtype)
        return self.unet(x.to(self.dtype), t, context.to(self.dtype), pooled=pooled, time_ids=time_ids
                         ).to(self.master_dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, h, w) latents in the master dtype: the VAE mean times the
        scaling factor, as the reference encodes a real image."""
        out = self.vae.encode(images.to(self.device, self.vae_dtype))
        return out.to(self.master_dtype) * self.config.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, H, W) float32 images in [-1, 1] (`images.to_pil` makes
        pictures of them)."""
        return self.vae.decode(latents.to(self.device, self.vae_dtype) / self.config.vae.scaling_factor).float()

    def edit(self, prompts, controller=None, **kwargs):
        from .editing import edit
        return edit(self, prompts, controller=controller, **_opened(kwargs))

    def generate(self, prompts, **kwargs):
        from .editing import edit
        return edit(self, prompts, controller=None, **_opened(kwargs))

    def edit_batch(self, requests, steps=50, guidance=7.5, sampler="ddim", height=None, width=None, capture=None,
                   progress=True, **kwargs):
        from .batch import edit_batch
        return edit_batch(self, requests, steps, guidance, sampler, height, width, capture, progress, **kwargs)

    def edit_cache(self, prompt, **kwargs):
        from .editing import edit_cache
        return edit_cache(self, prompt, **_opened(kwargs))

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


def _opened(kwargs: dict) -> dict:
    """The keyword arguments of an edit with an inversion given by its file's path loaded from it."""
    if isinstance(kwargs.get("inversion"), (str, os.PathLike)):
        from .inversion import Inversion
        kwargs = {**kwargs, "inversion": Inversion.load(kwargs["inversion"])}
    return kwargs


@torch.no_grad()
def probe_weights(*modules) -> torch.Tensor:
    """The middle entry of every weight matrix and kernel of the modules (None skipped), float32 on the host."""
    return torch.stack([p.reshape(-1)[p.numel() // 2] for m in modules if m is not None for p in m.parameters()
                        if p.dim() >= 2]).float().cpu()
