"""The sampling loop: generation, Prompt-to-Prompt edits, and sampling from an inversion, all one loop.

Reference loop (ptp_utils.text2image_ldm_stable): one start latent shared by
all prompts; the batch is [uncond("") x P, cond x P]; per UNet call one forward
on the doubled latents, guidance, one scheduler step, then LocalBlend on the
latents. The sampler (`samplers.py`: DDIM by default, PNDM as the stable
notebook, DPM-Solver++) gives the calls' timesteps and steps. With an
`Inversion`, the loop is DDIM on the inversion's timesteps, the start latent is
its latent_T and step i uses null_embeddings[i] as every prompt's
unconditional context; a direct inversion's pivot replaces the source row after
every scheduler step, before LocalBlend. The reconstruction of an inverted
image is this loop with its one prompt.

Proximal guidance (`proximal="l0"`, ProxEdit; the reference's name): the
guided noise is e_u + g * d with d = e_c - e_u soft-thresholded at the
`quantile` of |d| over the whole (P, 4, h, w) batch: d := d - clamp(d, -thr, thr).

Precision: the UNet runs in the pipeline's dtype; the latents between steps,
the guidance and the scheduler's arithmetic stay in the master dtype
(`Pipeline.master_dtype`, float32), as null-text inversion optimised them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .control import compile_control
from .images import to_pil
from .conditioning import Text
from .samplers import make_sampler
from .words import check_prompts

DEFAULT_STEPS = 50
PROXIMAL = (None, "l0")


@dataclass
class EditOutput:
    images: list  # PIL images, source first
    latents: torch.Tensor  # (P, 4, h, w) final latents, master dtype
    attention: object  # maps.AttentionMaps or None


@torch.no_grad()
def edit(pipe, prompts, controller=None, *, seed: int = 0, steps: int | None = None, guidance: float | None = None,
         sampler: str = "ddim", steps_offset: int | None = None, height: int | None = None, width: int | None = None,
         latents: torch.Tensor | None = None, local_blend=None, inversion=None, proximal: str | None = None,
         quantile: float = 0.75, store: bool = True, progress: bool = True, decode_images: bool = True) -> EditOutput:
    """Generate (controller=None) or edit P prompts, prompt 0 the source.

    Args:
        steps: sampling steps (default 50; with an inversion, its own, and another number is an error).
        guidance: classifier-free guidance scale (default the family's, 7.5 or SDXL's 5.0; with an inversion, the
            one it was made with).
        sampler: "ddim", "pndm" (PLMS, steps + 1 UNet calls) or "dpmsolver++"; windows are fractions of steps.
        steps_offset: overrides the checkpoint's for "leading" timesteps (0 gives 980 .. 0 at 50 steps).
        latents: optional start noise (1, 4, h, w) shared by every prompt.
        inversion: an Inversion; its latent_T starts the loop and its null embeddings replace ""; a "direct"
            one also pins the source row to its pivot after every step.
        proximal: "l0" for proximal guidance at `quantile` (module docstring), None for plain guidance.
        store: keep the cross maps of every layer (summed over steps) in `out.attention`.
    """
    prompts = check_prompts(prompts, pipe.tokenizer)
    P = len(prompts)
    device, master = pipe.device, pipe.master_dtype
    channels = pipe.config.unet.in_channels
    if proximal not in PROXIMAL:
        raise ValueError(f"proximal must be one of {PROXIMAL}, got {proximal!r}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    null = timesteps = pivots = None
    if inversion is not None:
        inversion.check_compatible(pipe)
        n = inversion.null_embeddings.shape[0]
        if steps is not None and steps != n:
            raise ValueError(f"steps={steps}, but the inversion was made with {n} steps; an edit from it runs "
                             f"its {n} (leave steps out)")
        if sampler != "ddim":
            raise ValueError(f"sampler={sampler!r}: inversions are defined on DDIM, and an edit from one follows "
                             f"its DDIM trajectory; leave sampler out (or give 'ddim')")
        if steps_offset is not None:
            raise ValueError("steps_offset: the inversion fixes the timesteps it was made with; leave it out")
        if latents is not None:
            raise ValueError("give the start latent by `latents` or by `inversion`, not both")
        steps, latents, timesteps = n, inversion.latent_T, inversion.timesteps
        guidance = inversion.guidance if guidance is None else guidance
        null = inversion.null_text().to(device, pipe.dtype)  # (steps, 77, D) and SDXL's (steps, pooled)
        if inversion.pivots is not None:
            pivots = inversion.pivots.to(device, master)  # (steps, 4, h, w): z*_{T-1} .. z*_0
    steps = DEFAULT_STEPS if steps is None else steps
    guidance = pipe.default_guidance if guidance is None else guidance
    if latents is None:
        down = pipe.config.vae.downscale
        height, width = height or pipe.config.image_size, width or pipe.config.image_size
        if height % down or width % down:
            raise ValueError(f"height and width must be multiples of {down}, got {height} x {width}")
        g = torch.Generator(device=device).manual_seed(seed)
        latents = torch.randn((1, channels, height // down, width // down), generator=g, device=device,
                              dtype=torch.float32)
    latents = latents.to(device, master)
    if latents.dim() != 4 or latents.shape[0] != 1:
        raise ValueError(f"latents must be (1, {channels}, h, w), shared by all prompts; got {tuple(latents.shape)}")
    h, w = latents.shape[-2:]
    latents = latents.expand(P, -1, -1, -1).clone()  # (P, 4, h, w)

    cond = pipe.encode_text(prompts)  # (P, 77, D), SDXL's pooled (P, pooled)
    uncond = pipe.unconditional().expand(P) if null is None else None
    down = pipe.config.vae.downscale
    time_ids = pipe.time_ids(h * down, w * down, 2 * P)  # SDXL: (2P, 6); None for SD 1.x/2.x
    smp = make_sampler(sampler, pipe.scheduler, steps, device, steps_offset=steps_offset, timesteps=timesteps)
    control = compile_control(controller, prompts, pipe.tokenizer, steps, device, layers=pipe.unet.attn_layers,
                              local_blend=local_blend, store=store, calls=len(smp.timesteps),
                              self_max_queries=pipe.self_max_queries(h, w))
    calls = smp.timesteps
    if progress:
        from tqdm.auto import tqdm
        calls = tqdm(calls, desc="edit" if controller is not None else "sample")
    for i, t in enumerate(calls):
        u = null.step(i).expand(P) if null is not None else uncond
        text = Text.cat([u, cond])  # (2P, 77, D)
        x = torch.cat([latents, latents]).to(pipe.dtype)
        out = pipe.unet(x, torch.tensor(t, device=device), text.context, control=control, pooled=text.pooled,
                        time_ids=time_ids).to(master)
        out_u, out_c = out.chunk(2)
        delta = out_c - out_u
        if proximal == "l0":
            thr = torch.quantile(delta.abs().flatten(), quantile)
            delta = delta - delta.clamp(-thr, thr)
        latents = smp.step(i, out_u + guidance * delta, latents)
        if pivots is not None:  # before LocalBlend, as the reference's offsets are added
            latents[0] = pivots[i]
        if control is not None:
            latents = control.end_step(latents)

    attention = control.attention((h, w), pipe.tokenizer) if (control is not None and store) else None
    images = to_pil(pipe.decode_latents(latents)) if decode_images else []
    return EditOutput(images=images, latents=latents, attention=attention)
