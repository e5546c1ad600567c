"""Direct Inversion (PnP Inversion) and proximal guidance against re-statements of their reference code.

The reference side (cure-lab/PnPInversion: `DirectInversion.invert`, `offset_calculate`,
`direct_inversion_p2p_guidance_forward`; `proximal_guidance_forward`) runs on diffusers' UNet loaded from
the same tiny checkpoint, with diffusers' DDIMScheduler from the checkpoint's scheduler config and the P2P
controllers of tests/reference.py. Direct Inversion's reference adds per-step offsets computed in a separate
guided pass to the source row; the engine pins the source row to the pivot instead (REFERENCE.md): the two
agree to float precision, and the engine's source row ends on z0 exactly.
"""
import numpy as np
import pytest
import torch

import p2p_engine as p2p
from p2p_engine.images import prepare
from reference import RefBlend, RefRefine, RefReplace, mappers, ref_word_inds, register

STEPS = 5
SRC, TGT, LONG = "a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a red bicycle"


def photo(seed: int = 0, h: int = 70, w: int = 90) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.3 * np.cos(5 * xx)], -1)
    img[(yy - 0.4) ** 2 + (xx - 0.5) ** 2 < 0.04] = (0.9, 0.3, 0.1)
    return (np.clip(img + g.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ref_unet(tiny_ckpt):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_ckpt / "unet").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ref_sched(tiny_ckpt):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(DDIMScheduler.load_config(tiny_ckpt / "scheduler"))
    sched.set_timesteps(STEPS)
    return sched


class Plain:
    """No control: the inversion passes of the reference run without an attention controller."""

    num_att_layers = 0

    def __call__(self, attn, is_cross, place):
        return attn

    def step_callback(self, x):
        return x


def _alpha(sched, t):
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def ref_pivots(pipe, unet, sched, z0, prompt):
    """DirectInversion.ddim_loop: guidance-1 DDIM inversion with the source prompt, written out."""
    register(unet, Plain())
    cond = pipe.encode_prompt([prompt])
    stride = sched.config.num_train_timesteps // STEPS
    ts = sched.timesteps.tolist()
    latents, z = [z0], z0
    with torch.no_grad():
        for i in range(STEPS):
            t = ts[len(ts) - i - 1]
            eps = unet(z, t, encoder_hidden_states=cond).sample
            a, a_next = _alpha(sched, min(t - stride, 999)), sched.alphas_cumprod[t]
            x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
            z = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
            latents.append(z)
    return latents


def ref_direct_edit(pipe, unet, sched, z0, prompts, ctrl, guidance=7.5):
    """DirectInversion.offset_calculate, then direct_inversion_p2p_guidance_forward: offsets added to row 0."""
    P = len(prompts)
    pivots = ref_pivots(pipe, unet, sched, z0, prompts[0])
    context = torch.cat([pipe.encode_prompt([""] * P), pipe.encode_prompt(prompts)])
    stride = sched.config.num_train_timesteps // STEPS
    offsets, cur = [], pivots[-1].expand(P, -1, -1, -1)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps.tolist()):
            prev = pivots[len(pivots) - i - 2].expand(P, -1, -1, -1)
            u, c = unet(torch.cat([cur] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            eps = u + guidance * (c - u)
            a, a_prev = sched.alphas_cumprod[t], _alpha(sched, t - stride)
            x0 = (cur - (1 - a) ** 0.5 * eps) / a ** 0.5
            rec = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            offsets.append(prev - rec)
            cur = rec + offsets[-1]
        register(unet, ctrl)
        latents = pivots[-1].expand(P, -1, -1, -1).clone()
        for i, t in enumerate(sched.timesteps):
            u, c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            latents = sched.step(u + guidance * (c - u), t, latents).prev_sample
            latents = torch.cat([latents[:1] + offsets[i][:1], latents[1:]])
            latents = ctrl.step_callback(latents)
    return latents


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # as tests/test_editing.py


def _blend_alpha(pipe, prompts, words):
    alpha = torch.zeros(len(prompts), 1, 1, 1, 1, 77)
    for i, (p, w) in enumerate(zip(prompts, words)):
        alpha[i, :, :, :, :, ref_word_inds(p, w, pipe.tokenizer)] = 1
    return alpha


@pytest.fixture(scope="module")
def image_and_z0(tiny_pipe):
    image = photo()
    return image, tiny_pipe.encode_images(prepare(image, tiny_pipe.config.image_size))


@pytest.fixture(scope="module")
def direct(tiny_pipe, image_and_z0):
    return tiny_pipe.invert(image_and_z0[0], SRC, steps=STEPS, method="direct", progress=False)


def test_inversion_holds_the_pivot(tiny_pipe, direct, image_and_z0):
    _, z0 = image_and_z0
    assert direct.method == "direct" and direct.pivots.shape == (STEPS, 4, *z0.shape[-2:])
    assert torch.equal(direct.pivots[-1], z0[0])
    ddim = tiny_pipe.invert(image_and_z0[0], SRC, steps=STEPS, method="ddim", progress=False)
    assert torch.equal(direct.latent_T, ddim.latent_T) and torch.equal(direct.null_embeddings, ddim.null_embeddings)
    assert direct.unet_evaluations(2) == {"inversion": STEPS, "inversion_backward": 0, "edit": STEPS * 4}


@pytest.mark.parametrize("blend", [False, True])
def test_replace_matches_reference(tiny_pipe, ref_unet, ref_sched, image_and_z0, direct, blend):
    _, z0 = image_and_z0
    prompts = [SRC, TGT]
    M, _ = mappers(tiny_pipe, prompts)
    lb = RefBlend(_blend_alpha(tiny_pipe, prompts, ["cat", "dog"]), tiny_pipe.config.latent_size // 2,
                  start=int(0.2 * STEPS), th=0.7) if blend else None  # 0.7: a partial mask on the tiny model
    ref = ref_direct_edit(tiny_pipe, ref_unet, ref_sched, z0, prompts,
                          RefReplace(M, prompts, STEPS, 0.4, 0.6, blend=lb, self_max=32 ** 2))
    ctrl = p2p.Replace(cross_steps=0.4, self_steps=0.6, self_max_queries=32 ** 2)
    kw = dict(inversion=direct, progress=False, decode_images=False)
    got = tiny_pipe.edit(prompts, ctrl, local_blend=p2p.LocalBlend(["cat", "dog"], start=0.2, threshold=0.7)
                         if blend else None, **kw).latents
    close(got, ref)
    if blend:
        assert (got - tiny_pipe.edit(prompts, ctrl, **kw).latents).abs().max() > 1e-2, "the blend changed nothing"
    assert torch.equal(got[:1], z0)  # pinned: the source row ends on z0, bit for bit
    assert (got[1] - z0[0]).abs().max() > 1e-2  # the target was edited


def test_refine_matches_reference(tiny_pipe, ref_unet, ref_sched, image_and_z0, direct):
    _, z0 = image_and_z0
    prompts = [SRC, LONG]
    _, (m, a) = mappers(tiny_pipe, prompts)
    ref = ref_direct_edit(tiny_pipe, ref_unet, ref_sched, z0, prompts,
                          RefRefine(m.long(), a.float(), prompts, STEPS, 0.4, 0.6, self_max=32 ** 2))
    got = tiny_pipe.edit(prompts, p2p.Refine(cross_steps=0.4, self_steps=0.6, self_max_queries=32 ** 2),
                         inversion=direct, progress=False, decode_images=False).latents
    close(got, ref)
    assert torch.equal(got[:1], z0)


def test_pinning_does_not_depend_on_the_guidance(tiny_pipe, image_and_z0, direct):
    """The reference's offsets hold only for the guidance they were computed at; pinning holds for any."""
    _, z0 = image_and_z0
    prompts = [SRC, TGT]
    pinned = tiny_pipe.edit(prompts, p2p.Replace(), inversion=direct, guidance=3.0, progress=False,
                            decode_images=False).latents
    assert torch.equal(pinned[:1], z0)


def test_save_load_identical(tiny_pipe, direct, tmp_path):
    path = tmp_path / "d.inversion.safetensors"
    direct.save(path)
    back = p2p.Inversion.load(path)
    assert back.method == "direct" and torch.equal(back.pivots, direct.pivots)
    kw = dict(controller=p2p.Replace(), progress=False, decode_images=False)
    assert torch.equal(tiny_pipe.edit([SRC, TGT], inversion=back, **kw).latents,
                       tiny_pipe.edit([SRC, TGT], inversion=direct, **kw).latents)
    with pytest.raises(ValueError, match="pivot"):
        p2p.Inversion(latent_T=direct.latent_T, null_embeddings=direct.null_embeddings, prompt=SRC,
                      losses=direct.losses, method="direct", timesteps=direct.timesteps)


def test_proximal_guidance_matches_reference(tiny_ckpt, load_float64, ref_unet, ref_sched, image_and_z0):
    """proximal_guidance_forward with prox "l0" at quantile 0.75 after negative-prompt inversion: every row's
    unconditional context is the source prompt's embedding, d = e_c - e_u soft-thresholded at the quantile
    of |d| over the whole batch. In float64 on both sides: the threshold is an order statistic, and float32
    drift of 1e-6 in d can move it (and the rows it clips) by far more than the drift itself."""
    import copy

    pipe = load_float64(tiny_ckpt)
    image, _ = image_and_z0
    prompts = [SRC, TGT]
    inv = pipe.invert(image, SRC, steps=STEPS, method="negative_prompt", progress=False)
    M, _ = mappers(pipe, prompts)
    ctrl = RefReplace(M.double(), prompts, STEPS, 0.4, 0.6, self_max=32 ** 2)
    unet = copy.deepcopy(ref_unet).double()
    register(unet, ctrl)
    context = torch.cat([pipe.encode_prompt([SRC] * 2), pipe.encode_prompt(prompts)])
    latents = inv.latent_T.expand(2, -1, -1, -1).clone().double()
    with torch.no_grad():
        for t in ref_sched.timesteps:
            u, c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            d = c - u
            thr = d.abs().quantile(0.75)
            d = d - d.clamp(-thr, thr)
            latents = ref_sched.step(u + 7.5 * d, t, latents).prev_sample
            latents = ctrl.step_callback(latents)
    got = pipe.edit(prompts, p2p.Replace(cross_steps=0.4, self_steps=0.6, self_max_queries=32 ** 2),
                    inversion=inv, proximal="l0", quantile=0.75, progress=False, decode_images=False).latents
    # float64 on both sides; the schedules' alphas are float32 on both, their square roots rounded differently
    torch.testing.assert_close(got, latents, rtol=0, atol=1e-6)
    plain = pipe.edit(prompts, p2p.Replace(cross_steps=0.4, self_steps=0.6, self_max_queries=32 ** 2),
                      inversion=inv, progress=False, decode_images=False).latents
    assert (got - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="proximal"):
        pipe.edit(prompts, p2p.Replace(), inversion=inv, proximal="l2", progress=False)
