"""MasaCtrl and Plug-and-Play against re-statements of their reference code (tests/reference.py).

The reference side is diffusers' UNet loaded from the same checkpoint, SD 1.x's block layout at a tiny width
("tiny-sd": 16 transformer blocks, up_blocks[1..3] with three attention modules and three resnets each, so the
references' layer numbers and module names mean what they mean on SD 1.5), with diffusers' DDIM scheduler from the
checkpoint's config, driven the way cure-lab/PnPInversion's run_editing_masactrl.py (MasaCtrlPipeline,
MutualSelfAttentionControl, DirectInversion's offsets) and run_editing_pnp.py (Preprocess, PNP) drive it.
Both sides run in float64 and agree within 1e-10 from the same inversion (an `Inversion` keeps its latents and
its unconditional embedding in float32: its trajectory is checked against the reference's inversion to that
rounding, and the reference edits from what it stored); every comparison also shows that the reference with a layer, module or step window
moved by one lands far from the engine, so the test tells the windows apart.
"""
import dataclasses

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from numerics import rel_max_error
from p2p_engine.images import prepare
from reference import (RefMasaCtrl, RefPnP, ref_direct_offsets, ref_masactrl_invert, ref_masactrl_sample,
                       ref_pnp_edit, ref_pnp_invert, ref_pnp_reconstruct)

STEPS = 6
SRC, TGT = "a cat riding a bicycle", "a dog riding a bicycle"
TIGHT = 1e-10  # float64 on both sides
APART = 1e-4  # what a window or layer moved by one changes, at the least (measured: 1e-3 .. 1e-1)


def photo(seed: int = 0, h: int = 70, w: int = 90) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.3 * np.cos(5 * xx)], -1)
    img[(yy - 0.4) ** 2 + (xx - 0.5) ** 2 < 0.04] = (0.9, 0.3, 0.1)
    return (np.clip(img + g.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sd_ckpt(tmp_path_factory):
    return p2p.save_random_checkpoint(tmp_path_factory.mktemp("tiny-sd") / "ckpt", "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def pipe64(sd_ckpt, load_float64):
    return load_float64(sd_ckpt)


@pytest.fixture(scope="module")
def pipe32(sd_ckpt):
    return p2p.load(sd_ckpt, device="cpu", dtype=torch.float32, backend="torch")


@pytest.fixture(scope="module")
def unet64(sd_ckpt):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(sd_ckpt / "unet").eval().requires_grad_(False).double()


@pytest.fixture(scope="module")
def unet32(sd_ckpt):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(sd_ckpt / "unet").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sched(sd_ckpt):
    from diffusers import DDIMScheduler
    s = DDIMScheduler.from_config(DDIMScheduler.load_config(sd_ckpt / "scheduler"))
    s.set_timesteps(STEPS)
    return s


@pytest.fixture(scope="module")
def image():
    return photo()


def z0_of(pipe, image):
    return pipe.encode_images(prepare(image, pipe.config.image_size))


def edit(pipe, prompts, controller, **kw):
    kw.setdefault("steps", None if "inversion" in kw else STEPS)
    return pipe.edit(prompts, controller=controller, progress=False, decode_images=False, **kw).latents


def trajectory(pipe, unet, sched, image, inv, ref_latents=None):
    """[z0, .., zT] (float64) of an inversion as the engine stored it (latent_T and a direct one's pivots),
    checked against the reference's inversion `ref_latents` (default: Preprocess.ddim_inversion of the inverted
    prompt, which DirectInversion.ddim_loop also computes) to float32 storage."""
    ref = ref_latents or ref_pnp_invert(pipe, unet, sched, z0_of(pipe, image), inv.prompt)
    assert rel_max_error(inv.latent_T, ref[-1]) < 1e-6
    if inv.pivots is None:
        return [ref[0], *[None] * (len(ref) - 2), inv.latent_T.double()]
    stored = [*reversed(inv.pivots.double()[:, None]), inv.latent_T.double()]
    assert max(rel_max_error(a, b) for a, b in zip(stored, ref)) < 1e-6
    return stored


def stored_empty(pipe, inv):
    """The empty prompt's embedding as the inversion stored it (float32), what the edit's unconditional rows read;
    checked to be the empty prompt's."""
    stored = inv.null_embeddings[:1].double()
    assert inv.method in ("ddim", "direct") and rel_max_error(stored, pipe.encode_prompt([""])) < 1e-6
    return stored


def assert_matches(got, ref, wrongs, tol=TIGHT):
    """got equals ref within `tol` (relative), and is far from each reference run with a window moved."""
    err = rel_max_error(got, ref)
    assert err < tol, f"engine vs reference: {err:.3g}"
    for name, wrong in wrongs.items():
        apart = rel_max_error(got, wrong)
        assert apart > APART, f"the reference with {name} is as close ({apart:.3g}): the test cannot tell them apart"


# -- MasaCtrl ----------------------------------------------------------------------------------------------------

def test_masactrl_from_ddim_inversion_matches_reference(pipe64, unet64, sched, image):
    """run_editing_masactrl.py's DDIM path: the image inverted with the empty prompt (MasaCtrlPipeline.invert at
    guidance 7.5 on ["", ""]), then ["", target] with MutualSelfAttentionControl(start_step, start_layer)."""
    inv = pipe64.invert(image, "", steps=STEPS, method="ddim", progress=False)
    got = edit(pipe64, ["", TGT], p2p.MasaCtrl(start_step=2, start_layer=11), inversion=inv)
    ref_inv = ref_masactrl_invert(pipe64, unet64, sched, z0_of(pipe64, image), "")
    start = trajectory(pipe64, unet64, sched, image, inv, ref_inv)[-1]

    def ref(step, layer):
        return ref_masactrl_sample(pipe64, unet64, sched, start, ["", TGT], RefMasaCtrl(step, layer),
                                   uncond=stored_empty(pipe64, inv))

    assert_matches(got, ref(2, 11), {"start_step 1": ref(1, 11), "start_step 3": ref(3, 11),
                                     "start_layer 10": ref(2, 10), "start_layer 12": ref(2, 12)})


def test_masactrl_from_direct_inversion_matches_reference(pipe64, unet64, sched, image):
    """The Direct Inversion path: DirectInversion.invert(prompt=["", target]) (guidance-1 DDIM inversion of the
    empty prompt, offsets from an uncontrolled guided pass) and the offsets added to row 0 while MasaCtrl runs;
    the engine pins row 0 to the pivots instead (REFERENCE.md), equal in exact arithmetic."""
    inv = pipe64.invert(image, "", steps=STEPS, method="direct", progress=False)
    got = edit(pipe64, ["", TGT], p2p.MasaCtrl(), inversion=inv)
    pivots = trajectory(pipe64, unet64, sched, image, inv)
    empty = stored_empty(pipe64, inv)
    offsets = ref_direct_offsets(pipe64, unet64, sched, pivots, ["", TGT], uncond=empty)

    def ref(step, layer, offsets=offsets):
        return ref_masactrl_sample(pipe64, unet64, sched, pivots[-1], ["", TGT], RefMasaCtrl(step, layer),
                                   noise_loss_list=offsets, uncond=empty)

    assert_matches(got, ref(4, 10), {"start_step 3": ref(3, 10), "start_step 5": ref(5, 10),
                                     "start_layer 9": ref(4, 9), "start_layer 11": ref(4, 11),
                                     "no offsets": ref(4, 10, None)})
    assert torch.equal(got[0], inv.pivots[-1].double())  # the source row ends on the image's latent


def test_masactrl_with_the_source_prompt_matches_reference(pipe64, unet64, sched):
    """Generation from a seed with the source prompt as the source branch (MasaCtrl's own synthesis use);
    the default start_layer is the decoder's two finest resolutions, 10 of SD 1.x's 16 blocks."""
    got = edit(pipe64, [SRC, TGT], p2p.MasaCtrl(start_step=3), seed=1)
    g = torch.Generator().manual_seed(1)
    start = torch.randn((1, 4, 16, 16), generator=g, dtype=torch.float32).double()
    wrongs = {f"start_layer {n}": ref_masactrl_sample(pipe64, unet64, sched, start, [SRC, TGT], RefMasaCtrl(3, n))
              for n in (9, 11)}
    ref = ref_masactrl_sample(pipe64, unet64, sched, start, [SRC, TGT], RefMasaCtrl(3, 10))
    assert_matches(got, ref, wrongs)


# -- Plug-and-Play -----------------------------------------------------------------------------------------------

def _pnp_ref(pipe, unet, sched, feed, start, ctrl_args, **kw):
    return ref_pnp_edit(pipe, unet, sched, feed, start, TGT, RefPnP(unet, sched.timesteps.tolist(), *ctrl_args), **kw)


def test_pnp_from_direct_inversion_matches_reference(pipe64, unet64, sched, image):
    """run_editing_pnp.py's Direct Inversion path: the source branch fed the DDIM inversion's latents of the
    source prompt (Preprocess.extract_latents), the empty prompt's branch, the negative prompt for the target."""
    inv = pipe64.invert(image, SRC, steps=STEPS, method="direct", progress=False)
    source, got = edit(pipe64, [SRC, TGT], p2p.PlugAndPlay(feature_steps=0.5, self_steps=0.34), inversion=inv)
    lat = trajectory(pipe64, unet64, sched, image, inv)
    assert torch.equal(source, inv.pivots[-1].double())  # pinned to the pivots, as the reference feeds its branch

    def ref(*args, negative=p2p.controllers.PNP_NEGATIVE_PROMPT):  # conv_t, attn_t, RefPnP's attention / resnet
        return _pnp_ref(pipe64, unet64, sched, lambda i: lat[-1 - i], lat[-1], args, negative=negative,
                        branch=stored_empty(pipe64, inv))

    feature_t, attn_t = int(STEPS * 0.5), int(STEPS * 0.34)
    assert (feature_t, attn_t) == (3, 2)
    assert_matches(got, ref(feature_t, attn_t), {
        "feature_steps - 1": ref(feature_t - 1, attn_t), "feature_steps + 1": ref(feature_t + 1, attn_t),
        "self_steps - 1": ref(feature_t, attn_t - 1), "self_steps + 1": ref(feature_t, attn_t + 1),
        "up_blocks[1].attentions[0] too": ref(feature_t, attn_t, {1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}),
        "up_blocks[1].attentions[1] left out": ref(feature_t, attn_t, {1: [2], 2: [0, 1, 2], 3: [0, 1, 2]}),
        "up_blocks[1].resnets[0]": ref(feature_t, attn_t, None, (1, 0)),
        "up_blocks[1].resnets[2]": ref(feature_t, attn_t, None, (1, 2)),
        "no negative prompt": ref(feature_t, attn_t, negative=stored_empty(pipe64, inv)),
    })


def test_pnp_from_ddim_inversion_feeds_the_reconstruction(pipe64, unet64, sched, image):
    """The DDIM path: the source branch fed Preprocess.ddim_sample's reconstruction (the source prompt at guidance
    1), here advanced in the batch as row 0 at guidance 1. Departure (docs/editors.md): the reference feeds step i
    the reconstruction after step i and starts from the one after step 0, a step ahead of the timestep it
    denoises at; here step i reads the reconstruction at its own timestep, and the edit starts from z_T, as the
    reference's Direct Inversion path does."""
    inv = pipe64.invert(image, SRC, steps=STEPS, method="ddim", progress=False)
    source, got = edit(pipe64, [SRC, TGT], p2p.PlugAndPlay(), inversion=inv)
    lat = trajectory(pipe64, unet64, sched, image, inv)
    rec = ref_pnp_reconstruct(pipe64, unet64, sched, lat[-1], SRC)
    assert rel_max_error(source, rec[-1]) < TIGHT  # the source row is the reconstruction
    args = (int(STEPS * 0.8), int(STEPS * 0.5))
    empty = stored_empty(pipe64, inv)
    aligned = _pnp_ref(pipe64, unet64, sched, lambda i: lat[-1] if i == 0 else rec[i - 1], lat[-1], args,
                       branch=empty)
    ahead = _pnp_ref(pipe64, unet64, sched, lambda i: rec[i], rec[0], args, branch=empty)  # the reference's own
    cfg = edit(pipe64, [SRC, TGT], p2p.PlugAndPlay(), inversion=dataclasses.replace(inv, method="null_text"))[1]
    assert_matches(got, aligned, {"the reference's step-ahead feed": ahead, "the source row at guidance 7.5": cfg})


def test_pnp_prompt_branch_matches_reference(pipe64, unet64, sched, image):
    """branch="prompt": the source prompt's row is the branch (the reference's `pnp_guidance_embeds` given the
    source prompt); negative_prompt=None keeps the edit's own unconditional text (here the empty prompt)."""
    inv = pipe64.invert(image, SRC, steps=STEPS, method="direct", progress=False)
    got = edit(pipe64, [SRC, TGT], p2p.PlugAndPlay(branch="prompt", negative_prompt=None), inversion=inv)[1]
    lat = trajectory(pipe64, unet64, sched, image, inv)
    args = (int(STEPS * 0.8), int(STEPS * 0.5))

    def ref(branch):
        return _pnp_ref(pipe64, unet64, sched, lambda i: lat[-1 - i], lat[-1], args,
                        negative=stored_empty(pipe64, inv), branch=branch)

    assert_matches(got, ref(SRC), {"the empty branch": ref(stored_empty(pipe64, inv))})


# -- float32: within what torch itself drifts ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["masactrl", "pnp"])
def test_float32_matches_reference(pipe32, pipe64, unet32, sched, image, kind):
    """In float32 both sides round: the engine's distance from the float64 truth (the engine in float64, equal to
    the reference there: the tests above) within twice the float32 reference's own, plus a hair."""
    ctrl = p2p.MasaCtrl(start_step=2) if kind == "masactrl" else p2p.PlugAndPlay()
    prompts = ["", TGT] if kind == "masactrl" else [SRC, TGT]
    outs = []
    for pipe in (pipe32, pipe64):
        inv = pipe.invert(image, prompts[0], steps=STEPS, method="direct", progress=False)
        outs.append(edit(pipe, prompts, ctrl, inversion=inv))
    got, truth = outs if kind == "masactrl" else (o[1:] for o in outs)  # the PnP reference returns the target
    lat = ref_pnp_invert(pipe32, unet32, sched, z0_of(pipe32, image), prompts[0])
    if kind == "masactrl":
        offsets = ref_direct_offsets(pipe32, unet32, sched, lat, prompts)
        ref32 = ref_masactrl_sample(pipe32, unet32, sched, lat[-1], prompts, RefMasaCtrl(2, 10), noise_loss_list=offsets)
    else:
        ref32 = _pnp_ref(pipe32, unet32, sched, lambda i: lat[-1 - i], lat[-1], (int(STEPS * 0.8), int(STEPS * 0.5)))
    torch_err = rel_max_error(ref32, truth)
    assert 0 < torch_err < 1e-3
    assert rel_max_error(got, truth) <= 2 * torch_err + 1e-6, (rel_max_error(got, truth), torch_err)
