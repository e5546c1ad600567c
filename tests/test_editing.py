"""End-to-end P2P edits against an unfused restatement of the reference notebooks.

The reference side is diffusers' UNet2DConditionModel loaded from the same tiny
checkpoint, an attention processor that materialises the probabilities and
hands them to controllers written here the way the notebooks write them
(layer counting, cur_step per UNet call, in-place edits of the stored maps), and
diffusers' scheduler built from the checkpoint's own scheduler config (steps
offset 1: t = 981 .. 1 at 50 steps): DDIM, or PNDM with PLMS steps as the stable
notebook samples (N steps are N + 1 UNet calls, so cur_step reaches N and the
cross alpha table's N + 1 rows are all used).
"""
import functools

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from reference import RefBlend, RefNullBlend, RefRefine, RefReplace, RefReweight, equalizer, mappers, register
from reference import ref_word_inds as word_inds

STEPS = 4
SRC = "a cat riding a bicycle"
TGT = "a dog riding a bicycle"
LONG = "a cat riding a red bicycle"


@pytest.fixture(scope="module")
def ref_unet(tiny_ckpt):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_ckpt / "unet").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sched_config(tiny_ckpt):
    from diffusers import DDIMScheduler
    return DDIMScheduler.load_config(tiny_ckpt / "scheduler")


def ref_run(tiny_pipe, unet, config, prompts, ctrl, seed=0, steps=STEPS, guidance=7.5, size=None, pndm=False):
    """The notebooks' loop; `config` the checkpoint's scheduler config (DDIM, or PNDM's PLMS steps)."""
    from diffusers import DDIMScheduler, PNDMScheduler
    sched = PNDMScheduler.from_config(config, skip_prk_steps=True) if pndm else DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    register(unet, ctrl)
    P = len(prompts)
    ctx = torch.cat([tiny_pipe.encode_prompt([""] * P), tiny_pipe.encode_prompt(prompts)])
    s = size or tiny_pipe.config.latent_size
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, s, s), generator=g).expand(P, -1, -1, -1).clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=ctx).sample
            u, c = out.chunk(2)
            latents = sched.step(u + guidance * (c - u), t, latents).prev_sample
            latents = ctrl.step_callback(latents)
    return latents


def ours(tiny_pipe, prompts, controller, **kw):
    return tiny_pipe.edit(prompts, controller=controller, steps=STEPS, seed=0, progress=False,
                     decode_images=False, **kw).latents


def close(a, b):
    # Both sides run fp32 with different kernels: allow a few ulps of drift amplified over STEPS steps.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- comparisons with the reference -------------------------------------------------------------

def test_replace_matches_reference(tiny_pipe, ref_unet, sched_config):
    prompts = [SRC, TGT]
    M, _ = mappers(tiny_pipe, prompts)
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReplace(M, prompts, STEPS, 0.8, 0.5))
    close(ours(tiny_pipe, prompts, p2p.Replace(cross_steps=0.8, self_steps=0.5, self_max_queries=16 * 16)), ref)


def test_refine_matches_reference(tiny_pipe, ref_unet, sched_config):
    prompts = [SRC, LONG]
    _, (m, a) = mappers(tiny_pipe, prompts)
    ctrl = RefRefine(torch.as_tensor(m).long(), torch.as_tensor(a).float(), prompts, STEPS, (0.0, 0.6), (0.25, 0.75))
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, ctrl)
    close(ours(tiny_pipe, prompts, p2p.Refine(cross_steps=(0.0, 0.6), self_steps=(0.25, 0.75))), ref)


def test_reweight_matches_reference(tiny_pipe, ref_unet, sched_config):
    prompts = [SRC, SRC]
    eq = equalizer(tiny_pipe, SRC, "cat", 3.0)
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReweight(eq, None, prompts, STEPS, 0.8, 0.4))
    close(ours(tiny_pipe, prompts, p2p.Reweight({"cat": 3.0})), ref)


def test_reweight_on_refine_matches_reference(tiny_pipe, ref_unet, sched_config):
    prompts = [SRC, LONG]
    _, (m, a) = mappers(tiny_pipe, prompts)
    prev = RefRefine(torch.as_tensor(m).long(), torch.as_tensor(a).float(), prompts, STEPS, 0.8, 0.4)
    eq = equalizer(tiny_pipe, LONG, "red", 4.0)
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReweight(eq, prev, prompts, STEPS, 0.8, 0.4))
    close(ours(tiny_pipe, prompts, p2p.Reweight({"red": 4.0}, prev=p2p.Refine())), ref)


def test_local_blend_matches_reference(tiny_pipe, ref_unet, sched_config):
    prompts = [SRC, TGT]
    M, _ = mappers(tiny_pipe, prompts)
    alpha = torch.zeros(2, 1, 1, 1, 1, 77)
    for i, (p, w) in enumerate(zip(prompts, ("cat", "dog"))):
        alpha[i, :, :, :, :, word_inds(p, w, tiny_pipe.tokenizer)] = 1
    res = tiny_pipe.config.latent_size // 2  # tiny: no down/up cross layers at latent/4, so latent/2
    # The tiny model's maps are spread out: at the default threshold 0.3 its mask is everywhere (a blend that
    # changes nothing would pass), at 0.7 it is partial. start 0.4 of 4 steps: 1.6, rounded down as the reference.
    blend = RefBlend(alpha, res, start=int(0.4 * STEPS), th=0.7)
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReplace(M, prompts, STEPS, 0.8, 0.4, blend=blend))
    got = ours(tiny_pipe, prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], start=0.4, threshold=0.7))
    close(got, ref)
    assert (got - ours(tiny_pipe, prompts, p2p.Replace())).abs().max() > 1e-2, "the blend changed nothing"


def test_null_text_blend_with_subtract_matches_reference(tiny_pipe, ref_unet, sched_config):
    """The null-text notebook's LocalBlend, three prompts: each prompt's mask united with the source's, and a second
    word set subtracted. Cross window 0.4 (the targets' own maps from step 2 on, so their masks differ from the
    source's) and thresholds 0.8 / 0.6 give partial masks; the union and the subtraction each move the result."""
    prompts = [SRC, TGT, "a fox riding a bicycle"]
    M, _ = mappers(tiny_pipe, prompts)

    def table(ws):
        t = torch.zeros(len(prompts), 1, 1, 1, 1, 77)
        for i, (p, w) in enumerate(zip(prompts, ws)):
            t[i, ..., word_inds(p, w, tiny_pipe.tokenizer)] = 1
        return t

    def ref(subtract, union=True):
        blend = RefNullBlend(table(["cat", "dog", "fox"]), tiny_pipe.config.latent_size // 2, start=int(0.25 * STEPS),
                             th=(0.8, 0.6), substruct_layers=table(["bicycle"] * 3) if subtract else None, union=union)
        lat = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReplace(M, prompts, STEPS, 0.4, 0.4, blend=blend))
        fraction = blend.masks.mean((1, 2, 3))
        assert ((fraction > 0.1) & (fraction < 0.9)).all(), fraction  # partial masks
        return lat

    def engine(subtract):
        blend = p2p.LocalBlend(["cat", "dog", "fox"], subtract=[["bicycle"]] * 3 if subtract else None, start=0.25,
                               threshold=0.8, subtract_threshold=0.6)
        return ours(tiny_pipe, prompts, p2p.Replace(cross_steps=0.4, self_steps=0.4), local_blend=blend)

    got, unsubtracted = engine(True), engine(False)
    close(got, ref(True))
    close(unsubtracted, ref(False))
    assert (got - unsubtracted).abs().max() > 1e-2, "the subtraction changed nothing"
    assert (got - ref(True, union=False)).abs().max() > 1e-2, "the union changed nothing"


@pytest.mark.parametrize("steps", [STEPS, 7])
def test_pndm_replace_with_blend_matches_stable_notebook(tiny_pipe, ref_unet, sched_config, steps):
    """The stable notebook: PNDM (PLMS) sampling, the controller counting UNet calls (steps + 1 of them), its
    LocalBlend after every scheduler step."""
    prompts = [SRC, TGT]
    M, _ = mappers(tiny_pipe, prompts)
    alpha = torch.zeros(2, 1, 1, 1, 1, 77)
    for i, (p, w) in enumerate(zip(prompts, ("cat", "dog"))):
        alpha[i, :, :, :, :, word_inds(p, w, tiny_pipe.tokenizer)] = 1
    blend = RefBlend(alpha, tiny_pipe.config.latent_size // 2, start=0, th=0.7)  # 0.7: a partial mask
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReplace(M, prompts, steps, 0.8, 0.4, blend=blend),
                  steps=steps, pndm=True)
    kw = dict(sampler="pndm", steps=steps, seed=0, progress=False, decode_images=False)
    got = tiny_pipe.edit(prompts, controller=p2p.Replace(cross_steps=0.8, self_steps=0.4),
                         local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7), **kw).latents
    close(got, ref)
    unblended = tiny_pipe.edit(prompts, controller=p2p.Replace(cross_steps=0.8, self_steps=0.4), **kw).latents
    assert (got - unblended).abs().max() > 1e-2, "the blend changed nothing"
    ddim = tiny_pipe.edit(prompts, controller=p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"]), steps=steps,
                     seed=0, progress=False, decode_images=False).latents
    assert (got - ddim).abs().max() > 1e-2  # PNDM is not DDIM here


def test_pndm_refine_matches_stable_notebook(tiny_pipe, ref_unet, sched_config):
    prompts = [SRC, LONG]
    _, (m, a) = mappers(tiny_pipe, prompts)
    ctrl = RefRefine(torch.as_tensor(m).long(), torch.as_tensor(a).float(), prompts, STEPS, (0.2, 1.0), (0.0, 0.8))
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, ctrl, pndm=True)
    got = tiny_pipe.edit(prompts, controller=p2p.Refine(cross_steps=(0.2, 1.0), self_steps=(0.0, 0.8)), sampler="pndm",
                    steps=STEPS, seed=0, progress=False, decode_images=False).latents
    close(got, ref)


# -- invariants ----------------------------------------------------------------------------------

def test_identical_prompts_reproduce_source(tiny_pipe):
    lat = ours(tiny_pipe, [SRC, SRC], p2p.Replace())
    assert torch.equal(lat[0], lat[1])


def test_reweight_scale_one_is_noop(tiny_pipe):
    prompts = [SRC, LONG]
    assert torch.equal(ours(tiny_pipe, prompts, p2p.Reweight({"red": 1.0}, prev=p2p.Refine())),
                       ours(tiny_pipe, prompts, p2p.Refine()))


def test_zero_windows_give_uncontrolled_target(tiny_pipe):
    prompts = [SRC, TGT]
    plain = ours(tiny_pipe, prompts, None)
    assert torch.equal(ours(tiny_pipe, prompts, p2p.Replace(cross_steps=0.0, self_steps=0.0)), plain)
    alone = tiny_pipe.generate([TGT], steps=STEPS, progress=False, decode_images=False).latents
    close(plain[1:], alone)  # batch 1 vs 2 rounds differently; only fp32 drift is allowed


def test_stored_cross_maps_are_distributions(tiny_pipe):
    out = tiny_pipe.edit([SRC, TGT], controller=p2p.Store(self_maps=True), steps=STEPS, progress=False)
    att = out.attention
    assert len(out.images) == 2 and out.images[0].size == (tiny_pipe.config.image_size,) * 2
    for res in att.resolutions:
        m = att.cross(res)
        assert m.shape[:3] == (2, res, res) and m.shape[-1] == 77
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:3]))
    assert att.word_maps(1, "dog", att.resolutions[0]).shape == (att.resolutions[0],) * 2
    s = att.self_maps(att.resolutions[0])
    torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:2]))


@pytest.mark.parametrize("size,kept", [(256, True), (264, False)])
def test_self_maps_are_kept_up_to_32_by_32(tiny_pipe, size, kept):
    """Self maps are stored for layers of at most 32 x 32 queries (the reference's AttentionStore bound): at 256
    x 256 the tiny model's finest self layers have exactly 32 x 32 queries, at 264 x 264 33 x 33."""
    att = tiny_pipe.edit([SRC, TGT], p2p.Store(self_maps=True), steps=1, height=size, width=size, progress=False,
                         decode_images=False).attention
    finest = att.resolutions[0]
    assert finest == size // 8
    if kept:
        s = att.self_maps(finest)
        assert s.shape == (2, finest ** 2, finest ** 2)
        torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:2]))
    else:
        with pytest.raises(ValueError, match="no stored maps at resolution 33"):
            att.self_maps(finest)


def test_word_maps_average_a_word_s_tokens(tiny_pipe):
    """word_maps of a word of several tokens: the mean of its tokens' columns of `cross(res)`, at the positions the
    reference's get_word_inds gives."""
    prompt = "a zorblax riding a bicycle"
    inds = word_inds(prompt, "zorblax", tiny_pipe.tokenizer)
    assert len(inds) > 1
    att = tiny_pipe.edit([SRC, prompt], p2p.Store(), steps=STEPS, progress=False, decode_images=False).attention
    for res in att.resolutions:
        want = att.cross(res)[1][..., inds].mean(-1)
        assert torch.equal(att.word_maps(1, "zorblax", res), want)
        assert not torch.allclose(want, att.cross(res)[1][..., inds[0]])  # the tokens' maps differ


def _ref_maps(store, P, steps, res, places, kind):
    """The reference's aggregate_attention: the maps of `res` x `res` of the places' layers (the mid block's where
    they have none, as `AttentionMaps` falls back), averaged over layers, heads and steps. (P, res * res, T)."""
    maps = [m for p in places for m in store[f"{p}_{kind}"] if m.shape[1] == res * res]
    maps = maps or [m for m in store[f"mid_{kind}"] if m.shape[1] == res * res]
    return torch.cat([m.reshape(P, -1, *m.shape[1:]) for m in maps], 1).mean(1) / steps


@pytest.mark.parametrize("case", ["replace", "reweight on refine"])
def test_maps_after_injection_match_the_reference_store(tiny_pipe, ref_unet, sched_config, case):
    """injected_maps=True keeps what the reference's AttentionStore holds (its edit writes the injected maps
    through a view of the stored tensor): cross maps in the window and self maps replaced by the source's. The
    default keeps each prompt's own maps, which differ from the reference's for the targets."""
    if case == "replace":
        prompts = [SRC, TGT]
        M, _ = mappers(tiny_pipe, prompts)
        ref_ctrl = RefReplace(M, prompts, STEPS, 0.5, 0.5, self_max=64)
        controller = functools.partial(p2p.Replace, cross_steps=0.5, self_steps=0.5)
    else:
        prompts = [SRC, LONG]
        _, (m, a) = mappers(tiny_pipe, prompts)
        prev = RefRefine(torch.as_tensor(m).long(), torch.as_tensor(a).float(), prompts, STEPS, 0.8, 0.4)
        ref_ctrl = RefReweight(equalizer(tiny_pipe, LONG, "red", 4.0), prev, prompts, STEPS, 0.75, (0.25, 0.75),
                               self_max=64)
        controller = functools.partial(p2p.Reweight, {"red": 4.0}, prev=p2p.Refine(), cross_steps=0.75,
                                       self_steps=(0.25, 0.75))
    ref_run(tiny_pipe, ref_unet, sched_config, prompts, ref_ctrl)
    store = ref_ctrl.attention_store
    for injected in (True, False):
        att = tiny_pipe.edit(prompts, controller(self_max_queries=64, self_maps=True, injected_maps=injected),
                             steps=STEPS, seed=0, progress=False, decode_images=False).attention
        for res in att.resolutions:
            for kind, ours in (("cross", att.cross(res)), ("self", att.self_maps(res))):
                ref = _ref_maps(store, len(prompts), STEPS, res, ("down", "up"), kind)
                ours = ours.reshape(ref.shape)
                close(ours[0], ref[0])  # the source's own maps either way
                if injected:
                    close(ours, ref)
                elif kind == "cross" or res * res <= 64:  # the layers whose maps the edit replaced
                    assert (ours[1:] - ref[1:]).abs().max() > 1e-3, (res, kind)


def test_deterministic_and_bad_inputs(tiny_pipe):
    assert torch.equal(ours(tiny_pipe, [SRC], None), ours(tiny_pipe, [SRC], None))
    with pytest.raises(ValueError, match="empty"):
        tiny_pipe.edit([], steps=STEPS, progress=False)
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        tiny_pipe.edit(None, steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="'horse'"):
        tiny_pipe.edit([SRC, TGT], p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "horse"]), steps=STEPS,
                  progress=False)
    with pytest.raises(ValueError, match="0, 1"):
        tiny_pipe.edit([SRC, TGT], p2p.Replace(cross_steps=1.2), steps=STEPS, progress=False)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(controller=p2p.Reweight({"dog": float("nan")})), ValueError, "scale of 'dog'"),
    (dict(controller=p2p.Reweight({"dog": None})), ValueError, "scale of 'dog'"),
    (dict(controller=p2p.Reweight()), ValueError, "at least one word"),
    (dict(controller=p2p.Replace(self_steps=(0.6, 0.2))), ValueError, "starts after it ends"),
    (dict(controller=p2p.Replace(self_max_queries=-5)), ValueError, "self_max_queries"),
    (dict(controller=p2p.Store(self_maps="yes")), TypeError, "self_maps"),
    (dict(controller=p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], threshold=-1)), ValueError,
     "threshold"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(seed=True), ValueError, "seed"),
    (dict(guidance=True), ValueError, "guidance"),
    (dict(steps=True), ValueError, "steps must be an integer"),
    (dict(guidance="7.5"), ValueError, "guidance"),
    (dict(guidance=float("inf")), ValueError, "guidance"),
    (dict(steps=2.5), ValueError, "steps must be an integer"),
    (dict(steps_offset=-1), ValueError, "steps_offset"),
    (dict(steps_offset=500), ValueError, "steps_offset"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, "latents must be"),
    (dict(latents=torch.zeros(1, 4, 8, 8), height=128, width=128), ValueError, "leave height and width out"),
    (dict(inversion="a string that names no file"), FileNotFoundError, "inversion file"),
    (dict(inversion=42), TypeError, "p2p_engine.Inversion"),
    (dict(local_blend=["cat", "dog"]), TypeError, "local_blend must be a p2p_engine.LocalBlend"),
    (dict(height="64"), ValueError, "height must be a positive number of pixels"),
    (dict(width=0), ValueError, "width must be a positive number of pixels"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), TypeError, "latents must be a torch.Tensor"),
    (dict(proximal="l0", quantile="0.5"), ValueError, "quantile must be a number"),
    (dict(local_blend=p2p.LocalBlend(["cat", "dog"], threshold="0.3")), TypeError, "threshold must be a number"),
    (dict(local_blend=p2p.LocalBlend([["cat"], 3])), TypeError, "a word or a list of words, got 3"),
    (dict(capture="no"), TypeError, "capture must be True or False"),
    (dict(controller=p2p.Refine(injected_maps="yes")), TypeError, "injected_maps must be True or False"),
    (dict(store="no"), TypeError, "store must be True or False"),
    (dict(decode_images=0), TypeError, "decode_images must be True or False"),
])
def test_bad_arguments_name_what_to_fix(tiny_pipe, kwargs, error, match):
    """Misuse that would otherwise run on (NaN latents, an empty window, a shape error deep in the UNet) is
    refused before the loop, with the argument named."""
    args = dict(controller=p2p.Replace(), steps=STEPS, progress=False, decode_images=False) | kwargs
    with pytest.raises(error, match=match):
        tiny_pipe.edit([SRC, TGT], **args)


def test_reweight_equalizer_must_be_a_mapping():
    with pytest.raises(TypeError, match="equalizer maps words to scales"):
        p2p.Reweight(["fluffy"])


def test_misnamed_words_and_resolutions(tiny_pipe):
    """A word past the 77-token window is named as such, not as missing; a resolution must be an int, the blocks
    known ones, a prompt index one of the edit's."""
    long_tgt = " ".join(["a"] * 80) + " dog"
    with pytest.raises(ValueError, match="past the 77-token window"):
        tiny_pipe.edit([" ".join(["a"] * 80) + " cat", long_tgt], p2p.Reweight({"dog": 2.0}), steps=STEPS,
                       progress=False)
    att = tiny_pipe.edit([SRC], p2p.Store(), steps=STEPS, progress=False, decode_images=False).attention
    with pytest.raises(TypeError, match="an int"):
        att.cross(str(att.resolutions[0]))
    res = att.resolutions[0]
    with pytest.raises(ValueError, match="places must name blocks among"):
        att.cross(res, places=("left",))
    assert torch.equal(att.cross(res, places="up"), att.cross(res, places=("up",)))
    with pytest.raises(IndexError, match=r"prompt_index must be an int in \[0, 1\)"):
        att.word_maps(1, SRC.split(" ")[-1], res)
    assert torch.equal(att.word_maps(-1, SRC.split(" ")[-1], res), att.word_maps(0, SRC.split(" ")[-1], res))


# -- the fused kernels through Triton's interpreter ------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is off where CUDA is present; "
                    "tests/test_kernel_*.py run the compiled kernels")
def test_triton_backend_matches_reference(tiny_ckpt, tiny_pipe, ref_unet, sched_config):
    tpipe = p2p.load(tiny_ckpt, device="cpu", dtype=torch.float32, backend="triton")
    assert tpipe.backend == "triton"
    prompts = [SRC, TGT]
    M, _ = mappers(tiny_pipe, prompts)
    # Kept small for the interpreter: 8x8 latents (64 px), 2 steps, both windows covering step 0 only.
    ref = ref_run(tiny_pipe, ref_unet, sched_config, prompts, RefReplace(M, prompts, 2, 0.5, 0.5), steps=2, size=8)
    got = tpipe.edit(prompts, controller=p2p.Replace(cross_steps=0.5, self_steps=0.5), steps=2, seed=0,
                     height=8 * tiny_pipe.config.vae.downscale, width=8 * tiny_pipe.config.vae.downscale,
                     progress=False, decode_images=False).latents
    close(got, ref)


def _inversion(tiny_pipe, latent_T, null_embeddings):
    cfg = tiny_pipe.config
    return p2p.Inversion(latent_T=latent_T, null_embeddings=null_embeddings, prompt=SRC,
                         losses=torch.zeros(null_embeddings.shape[0], 0), steps=null_embeddings.shape[0],
                         family=cfg.family, text_dim=cfg.unet.cross_attention_dim, prediction_type=cfg.prediction_type,
                         timesteps=tiny_pipe.scheduler.timesteps(null_embeddings.shape[0]))


def test_inversion_supplies_start_latent_and_null_context(tiny_pipe):
    s = tiny_pipe.config.latent_size
    start = torch.randn((1, 4, s, s), generator=torch.Generator("cpu").manual_seed(0))
    # With the empty prompt's embedding as every step's null text, the loop is the plain one.
    inv = _inversion(tiny_pipe, start, tiny_pipe.encode_prompt([""]).expand(STEPS, -1, -1))
    prompts = [SRC, TGT]
    edit = dict(controller=p2p.Replace(), progress=False, decode_images=False)
    assert torch.equal(tiny_pipe.edit(prompts, inversion=inv, **edit).latents,
                       ours(tiny_pipe, prompts, p2p.Replace()))
    other = _inversion(tiny_pipe, start, inv.null_embeddings * 0.5)
    assert not torch.equal(tiny_pipe.edit(prompts, inversion=other, **edit).latents,
                           ours(tiny_pipe, prompts, p2p.Replace()))
    with pytest.raises(ValueError, match=f"made with {STEPS} steps"):
        tiny_pipe.edit(prompts, inversion=inv, steps=STEPS + 1, **edit)
    with pytest.raises(ValueError, match="leave height and width out"):
        tiny_pipe.edit(prompts, inversion=inv, height=2 * s * tiny_pipe.config.vae.downscale, **edit)


# -- defaults by the source's kind: a real image takes the null-text notebook's, a generated one the stable's -----

REAL_STEPS = 5  # LocalBlend's default start 0.2 of them is one step (at 4 steps it would round to none)


@pytest.fixture(scope="module")
def pipe256(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a native size of 256 x 256 (latents 32 x 32, as an inversion is made at the native
    size): its first level's self layers have 32 x 32 queries, replaced by one of the two defaults only."""
    import json
    import shutil
    folder = tmp_path_factory.mktemp("tiny256") / "tiny256"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 32}))
    pipe = p2p.load(folder, device="cpu", dtype=torch.float32, backend="torch")
    assert pipe.config.latent_size == 32
    return pipe


def ref_inverted_run(tiny_pipe, unet, config, prompts, ctrl, inv):
    """The null-text notebook's editing loop: the inversion's start latent, its null embedding of step i as every
    prompt's unconditional context, its guidance, DDIM on its timesteps."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(len(inv.timesteps))
    assert sched.timesteps.tolist() == inv.timesteps
    register(unet, ctrl)
    P = len(prompts)
    cond = tiny_pipe.encode_prompt(prompts)
    latents = inv.latent_T.expand(P, -1, -1, -1).clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            ctx = torch.cat([inv.null_embeddings[i][None].expand(P, -1, -1), cond])
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=ctx).sample
            u, c = out.chunk(2)
            latents = sched.step(u + inv.guidance * (c - u), t, latents).prev_sample
            latents = ctrl.step_callback(latents)
    return latents


@pytest.fixture(scope="module")
def real_inversion(pipe256):
    image = (torch.rand(256, 256, 3, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    return pipe256.invert(image.numpy(), SRC, steps=REAL_STEPS, inner_steps=2, progress=False)


def _blend_alpha(tiny_pipe, prompts, words):
    alpha = torch.zeros(len(prompts), 1, 1, 1, 1, 77)
    for i, (p, w) in enumerate(zip(prompts, words)):
        alpha[i, ..., word_inds(p, w, tiny_pipe.tokenizer)] = 1
    return alpha


def test_real_image_defaults_are_the_null_text_notebook_s(pipe256, ref_unet, sched_config, real_inversion):
    """An edit from a null-text inversion with the controller's and LocalBlend's defaults equals the null-text
    notebook: self replacement in layers of up to 32 x 32 queries and LocalBlend after 20% of the steps; each of
    the two defaults moves the result (the stable notebook's 16 x 16, or a blend from the first step, differ).
    The output states the values used, and explicit values win."""
    prompts, inv = [SRC, TGT], real_inversion
    M, _ = mappers(pipe256, prompts)
    res = pipe256.config.latent_size // 2  # LocalBlend's level: latent / 2 on the tiny model
    blend = RefNullBlend(_blend_alpha(pipe256, prompts, ["cat", "dog"]), res, start=int(0.2 * REAL_STEPS),
                         th=(0.7, 0.3))  # 0.7: a partial mask on the tiny model (not a default under test)
    ref = ref_inverted_run(pipe256, ref_unet, sched_config, prompts,
                           RefReplace(M, prompts, REAL_STEPS, 0.8, 0.4, blend=blend, self_max=32 ** 2), inv)
    kw = dict(inversion=inv, progress=False, decode_images=False)
    out = pipe256.edit(prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7), **kw)
    close(out.latents, ref)
    assert (out.self_max_queries, out.blend_start) == (32 * 32, 0.2)
    stable_self = pipe256.edit(prompts, p2p.Replace(self_max_queries=16 * 16),
                                 local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7), **kw)
    from_first = pipe256.edit(prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], start=0.0,
                                                                                   threshold=0.7), **kw)
    for other in (stable_self, from_first):
        assert (other.latents - out.latents).abs().max() > 1e-2, "a default changed nothing"
    assert (stable_self.self_max_queries, stable_self.blend_start) == (16 * 16, 0.2)
    assert (from_first.self_max_queries, from_first.blend_start) == (32 * 32, 0.0)
    # in a batch too, beside a generated edit, each request takes its own source's defaults
    batch = pipe256.edit_batch([
        p2p.EditRequest(prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7),
                        inversion=inv),
        p2p.EditRequest(prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7))],
        steps=REAL_STEPS, progress=False, decode_images=False)
    assert [(o.self_max_queries, o.blend_start) for o in batch] == [(32 * 32, 0.2), (16 * 16, 0.0)]
    close(batch[0].latents, ref)


def test_generated_image_defaults_are_the_stable_notebook_s(pipe256, ref_unet, sched_config):
    """A generated edit at the same size keeps the stable notebook's defaults: 16 x 16 and LocalBlend from the
    first step."""
    prompts = [SRC, TGT]
    M, _ = mappers(pipe256, prompts)
    blend = RefBlend(_blend_alpha(pipe256, prompts, ["cat", "dog"]), pipe256.config.latent_size // 2, start=0,
                     th=0.7)
    ref = ref_run(pipe256, ref_unet, sched_config, prompts,
                  RefReplace(M, prompts, REAL_STEPS, 0.8, 0.4, blend=blend, self_max=16 ** 2), steps=REAL_STEPS)
    out = pipe256.edit(prompts, p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7),
                       steps=REAL_STEPS, seed=0, progress=False, decode_images=False)
    close(out.latents, ref)
    assert (out.self_max_queries, out.blend_start) == (16 * 16, 0.0)
    generation = pipe256.edit(prompts, steps=2, progress=False, decode_images=False)
    assert (generation.self_max_queries, generation.blend_start) == (None, None)  # nothing of the kind ran


def test_self_limit_defaults_by_family_and_source():
    """SD 1.x/2.x: 16 x 16 generated, 32 x 32 from an inversion; SDXL scales both with the latent side,
    (h/4)(w/4) and (h/2)(w/2)."""
    from types import SimpleNamespace

    from p2p_engine.pipeline import Pipeline
    for family, h, w, generated, inverted in (("sd1", 64, 64, 256, 1024), ("sd2", 96, 96, 256, 1024),
                                              ("sdxl", 128, 128, 32 * 32, 64 * 64), ("sdxl", 128, 96, 32 * 24, 64 * 48)):
        fake = SimpleNamespace(family=family)
        assert Pipeline.self_max_queries(fake, h, w) == generated
        assert Pipeline.self_max_queries(fake, h, w, inverted=True) == inverted
