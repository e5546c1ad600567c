"""The Prompt-to-Prompt sampling loop: CFG over P prompts, DDIM, attention control, LocalBlend.

Reference loop (ptp_utils.text2image_ldm_stable): one start latent shared by
all prompts; the batch is [uncond("") x P, cond x P]; per step one UNet call
on the doubled latents, guidance, one DDIM step, then LocalBlend on the
latents. With an `Inversion`, the start latent is its latent_T and step i
uses null_embeddings[i] as every prompt's unconditional context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .control import check_prompts, compile_control


@dataclass
class EditOutput:
    images: list  # PIL images, source first
    latents: torch.Tensor  # (P, 4, h, w) final latents
    attention: object  # maps.AttentionMaps or None


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image
    x = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list:
    out = pipe.vae.decode(latents.to(pipe.dtype) / pipe.config.vae.scaling_factor)
    return to_pil(getattr(out, "sample", out))


@torch.no_grad()
def edit(pipe, prompts, controller=None, *, seed: int = 0, steps: int = 50, guidance: float = 7.5,
         height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None,
         local_blend=None, inversion=None, store: bool = True, progress: bool = True,
         decode_images: bool = True) -> EditOutput:
    """Generate (controller=None) or edit P prompts, prompt 0 the source.

    Args:
        latents: optional start noise (1, 4, h, w) shared by every prompt.
        inversion: an Inversion; its latent_T starts the loop and its null embeddings replace "".
        store: keep the cross maps of every layer (summed over steps) in `out.attention`.
    """
    prompts = check_prompts(prompts, pipe.tokenizer)
    P = len(prompts)
    device, dtype = pipe.device, pipe.dtype
    down = pipe.config.vae.downscale
    native = pipe.config.image_size
    height, width = height or native, width or native
    if height % down or width % down:
        raise ValueError(f"height and width must be multiples of {down}, got {height} x {width}")
    h, w = height // down, width // down
    channels = pipe.config.unet.in_channels

    if inversion is not None:
        if hasattr(inversion, "check_compatible"):
            inversion.check_compatible(pipe)
        null = inversion.null_embeddings.to(device, dtype)  # (steps, 77, D)
        if steps != null.shape[0]:
            steps = null.shape[0]  # the inversion fixes the schedule
        latents = inversion.latent_T
    if latents is None:
        g = torch.Generator(device=device).manual_seed(seed)
        latents = torch.randn((1, channels, h, w), generator=g, device=device, dtype=torch.float32)
    latents = latents.to(device, dtype)
    if latents.dim() != 4 or latents.shape[0] != 1:
        raise ValueError(f"latents must be (1, {channels}, h, w), shared by all prompts; got {tuple(latents.shape)}")
    h, w = latents.shape[-2:]
    latents = latents.expand(P, -1, -1, -1).clone()  # (P, 4, h, w)

    cond = pipe.encode_prompt(prompts)  # (P, 77, D)
    uncond = pipe.encode_prompt([""]).expand(P, -1, -1) if inversion is None else None

    layers = getattr(pipe.unet, "attn_layers", None)
    control = compile_control(controller, prompts, pipe.tokenizer, steps, device, layers=layers,
                              local_blend=local_blend, store=store)
    sched = pipe.scheduler
    timesteps = sched.timesteps(steps)
    it = enumerate(timesteps.tolist())
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=steps, desc="edit" if controller is not None else "generate")
    for i, t in it:
        u = null[i][None].expand(P, -1, -1) if inversion is not None else uncond
        context = torch.cat([u, cond])  # (2P, 77, D)
        x = torch.cat([latents, latents])
        out = pipe.unet(x, torch.tensor(t, device=device), context, control=control)
        out = getattr(out, "sample", out)
        out_u, out_c = out.chunk(2)
        noise = out_u + guidance * (out_c - out_u)
        latents = sched.step(noise, t, latents, steps)
        if control is not None:
            latents = control.end_step(latents)

    attention = control.attention((h, w), pipe.tokenizer) if (control is not None and store) else None
    images = decode(pipe, latents) if decode_images else []
    return EditOutput(images=images, latents=latents, attention=attention)
