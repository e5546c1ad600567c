"""The loaded model: its parts, prompt encoding, and the entry points of the API.

`Pipeline` holds no global state; editing lives in `editing.py` and inversion in
`inversion.py`, and the methods here only forward to them.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .scheduler import DDIM


class Pipeline:
    def __init__(self, unet, vae, text_encoder, tokenizer, config: ModelConfig, *,
                 device: torch.device, dtype: torch.dtype, backend: str):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = backend
        self.scheduler = DDIM(prediction_type=config.prediction_type)

    @property
    def family(self) -> str:
        return self.config.family

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

    def edit(self, prompts, controller=None, **kwargs):
        from .editing import edit
        return edit(self, prompts, controller=controller, **kwargs)

    def generate(self, prompts, **kwargs):
        from .editing import edit
        return edit(self, prompts, controller=None, **kwargs)

    def invert(self, image, prompt, **kwargs):
        from .inversion import invert
        return invert(self, image, prompt, **kwargs)

    def release_memory(self) -> None:
        """Give back memory cached between calls (Python garbage; on CUDA the allocator's free blocks and
        captured null-text graphs). The weights stay: the pipeline is ready for the next call."""
        from .jobs import release_memory
        release_memory(self)

    def invert_batch(self, images, prompts, **kwargs):
        from .inversion import invert_batch
        return invert_batch(self, images, prompts, **kwargs)
