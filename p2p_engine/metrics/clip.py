"""CLIP similarity as torchmetrics' CLIPScore computes it for PnPInversion's evaluation.

    score(image, prompt) = max(100 * <f_img / |f_img|, f_txt / |f_txt|>, 0)

with openai/clip-vit-large-patch14 through transformers (`CLIPModel.get_image_features` /
`get_text_features`, float32) from a local folder; nothing is downloaded. The image goes to the processor as
the reference passes it, a (3, H, W) uint8 tensor; the prompt's tokens are cut at the text model's 77
positions when longer (torchmetrics' truncation). CLIP whole: the edited image against the editing prompt
(brackets removed); CLIP edited: uint8(edited x mask) against the same prompt.

The image processor is transformers' PIL backend (`CLIPImageProcessorPil`: PIL bicubic resize of the short
side to 224, centre crop, OpenAI's mean and std), the slow processor of the reference's time, chosen
whether or not torchvision is installed (transformers would otherwise pick its torchvision backend, whose
antialiased resize differs slightly).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VIT_L14 = {"hidden_size": 1024, "patch_size": 14, "image_size": 224}


def _image_processor_class():
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers releases before the split into backends: the slow processor is PIL's
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


def _processor(path: Path):
    from transformers import CLIPProcessor, CLIPTokenizer

    return CLIPProcessor(image_processor=_image_processor_class().from_pretrained(str(path), local_files_only=True),
                         tokenizer=CLIPTokenizer.from_pretrained(str(path), local_files_only=True))


class ClipScore:
    """`ClipScore(folder)(image, prompt, mask=None)`: the score above for an (H, W, 3) uint8 image; with a
    (H, W) 0/1 `mask`, of uint8(image x mask)."""

    def __init__(self, path, device=None):
        from transformers import CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers CLIP folder (config.json, weights, tokenizer and "
                                    f"preprocessor files): give the folder of openai/clip-vit-large-patch14")
        self.device = torch.device(device or "cpu")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
            self.processor = _processor(path)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot load a transformers CLIP model from it ({e}); give the folder of "
                             f"openai/clip-vit-large-patch14") from None
        self.model = self.model.to(self.device).eval()
        vision = self.model.config.vision_config
        self.architecture = {k: getattr(vision, k) for k in VIT_L14}

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> float:
        if mask is not None:
            image = np.uint8(image * mask[:, :, None])
        pixels = torch.tensor(image).permute(2, 0, 1)  # (3, H, W) uint8, a copy (images may be read-only)
        inputs = self.processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True)
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        limit = self.model.config.text_config.max_position_embeddings
        txt = self.model.get_text_features(input_ids=inputs["input_ids"][..., :limit].to(self.device),
                                           attention_mask=inputs["attention_mask"][..., :limit].to(self.device))
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5 returns output objects
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        return max(float(100 * (img * txt).sum(dim=-1)[0]), 0.0)
