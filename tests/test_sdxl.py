"""SDXL on the engine: every part against diffusers' and transformers' own modules loaded from the same
safetensors, generation against diffusers' StableDiffusionXLPipeline, P2P against the reference controllers
on diffusers' SDXL UNet, both checkpoint layouts, and inversion. The model is the "tiny-sdxl" preset: the
SDXL architecture (no attention at the first level, two transformer blocks at the last, "text_time" added
conditioning, two text encoders) at the tiny size."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from p2p_engine.images import prepare
from reference import (RefBlend, RefRefine, RefReplace, RefReweight, RefStore, equalizer, mappers, ref_word_inds,
                       register)

SRC, TGT, LONG = "a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a red bicycle"
STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return p2p.save_random_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", "tiny-sdxl", seed=1)


@pytest.fixture(scope="module")
def pipe(folder):
    return p2p.load(folder, device="cpu", dtype=torch.float32, backend="torch")


def _drift_check(ours, ref32, ref64):
    """err(ours, fp64) <= 2 * err(torch fp32, fp64) + eps: the bound is torch's own fp32 drift."""
    scale = ref64.abs().max()
    err_ref = ((ref32.double() - ref64).abs().max() / scale).item()
    err = ((ours.double() - ref64).abs().max() / scale).item()
    assert err <= 2 * err_ref + torch.finfo(torch.float32).eps, (err, err_ref)


# -- the parts ----------------------------------------------------------------------------------------

def test_parts_match_diffusers_and_transformers(folder, pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert pipe.family == "sdxl" and pipe.config.unet.transformer_layers == (1, 1, 2)
    g = torch.Generator().manual_seed(0)
    cfg = pipe.config
    x = torch.randn(2, 4, 16, 12, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 77, cfg.unet.cross_attention_dim, generator=g, dtype=torch.float64)
    pooled = torch.randn(2, cfg.unet.pooled_dim, generator=g, dtype=torch.float64)
    ids = torch.tensor([[128.0, 96, 0, 0, 128, 96], [64, 64, 4, 8, 96, 96]], dtype=torch.float64)
    t = torch.tensor([3, 777])
    units = {dt: UNet2DConditionModel.from_pretrained(folder / "unet").to(dt).eval() for dt in (torch.float32,
                                                                                               torch.float64)}
    with torch.no_grad():
        ref = {dt: m(x.to(dt), t, encoder_hidden_states=ctx.to(dt),
                     added_cond_kwargs={"text_embeds": pooled.to(dt), "time_ids": ids.to(dt)}).sample
               for dt, m in units.items()}
        got = pipe.unet(x.float(), t, ctx.float(), pooled=pooled.float(), time_ids=ids.float())
    _drift_check(got, ref[torch.float32], ref[torch.float64])

    img = torch.rand(1, 3, 64, 48, generator=g, dtype=torch.float64) * 2 - 1
    vaes = {dt: AutoencoderKL.from_pretrained(folder / "vae").to(dt).eval() for dt in (torch.float32, torch.float64)}
    with torch.no_grad():
        ref = {dt: m.encode(img.to(dt)).latent_dist.mean for dt, m in vaes.items()}
        _drift_check(pipe.vae.encode(img.float()), ref[torch.float32], ref[torch.float64])
        z = ref[torch.float64]
        ref = {dt: m.decode(z.to(dt)).sample for dt, m in vaes.items()}
        _drift_check(pipe.vae.decode(z.float()), ref[torch.float32], ref[torch.float64])

    ids1, ids2 = pipe.tokenize([SRC]), pipe.tokenize([SRC], pipe.tokenizer_2)
    assert ids2[0, -1] == 0 and ids1[0, -1] == 49407  # encoder 2 pads with "!", encoder 1 with EOS
    with torch.no_grad():
        for cls, sub, ids, ours in ((CLIPTextModel, "text_encoder", ids1, pipe.text_encoder),
                                    (CLIPTextModelWithProjection, "text_encoder_2", ids2, pipe.text_encoder_2)):
            ref = {dt: cls.from_pretrained(folder / sub, torch_dtype=dt).eval()(ids, output_hidden_states=True)
                   for dt in (torch.float32, torch.float64)}
            got = ours(ids, output_hidden_states=True)
            for k in range(len(got.hidden_states)):
                _drift_check(got.hidden_states[k], ref[torch.float32].hidden_states[k],
                             ref[torch.float64].hidden_states[k])
            if sub == "text_encoder_2":
                _drift_check(got.text_embeds, ref[torch.float32].text_embeds, ref[torch.float64].text_embeds)


def test_conditioning(pipe):
    text = pipe.encode_text([SRC, TGT])
    assert text.context.shape == (2, 77, 64) and text.pooled.shape == (2, 32)
    h1 = pipe.text_encoder(pipe.tokenize([SRC]), output_hidden_states=True).hidden_states[-2]
    out2 = pipe.text_encoder_2(pipe.tokenize([SRC], pipe.tokenizer_2), output_hidden_states=True)
    # batch of two vs one: equal up to the batch size's float rounding
    torch.testing.assert_close(text.context[:1], torch.cat([h1, out2.hidden_states[-2]], -1))
    torch.testing.assert_close(text.pooled[:1], out2.text_embeds)
    assert torch.equal(pipe.encode_prompt([SRC]), text.context[:1])
    u = pipe.unconditional()  # force_zeros_for_empty_prompt
    assert not u.context.any() and not u.pooled.any()
    assert pipe.time_ids(128, 96, 2).tolist() == [[128, 96, 0, 0, 128, 96]] * 2


def test_single_file_equals_folder(folder, pipe, tmp_path):
    from safetensors import safe_open

    single = p2p.save_random_checkpoint(tmp_path / "tiny-sdxl.safetensors", "tiny-sdxl", seed=1, layout="single_file")
    with safe_open(str(single), framework="pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in keys  # depth 2
    b = p2p.load(single, device="cpu")
    assert b.config == pipe.config
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(pipe, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_refiner_and_mismatched_parts_are_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    # a refiner folder: no first text encoder
    refiner = tmp_path / "refiner"
    shutil.copytree(folder, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index["text_encoder"], index["tokenizer"] = [None, None], [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(p2p.CheckpointError, match="refiner"):
        p2p.load(refiner)
    # a refiner single file: OpenCLIP under embedders.0, nothing under embedders.1
    tensors = load_file(str(p2p.save_random_checkpoint(tmp_path / "x.safetensors", "tiny-sdxl", layout="single_file")))
    moved = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in tensors.items()
             if not k.startswith("conditioner.embedders.0.")}
    save_file(moved, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(p2p.CheckpointError, match="refiner"):
        p2p.load(tmp_path / "refiner.safetensors")
    # a second text encoder from another model
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    cfg = json.loads((mixed / "text_encoder_2" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (mixed / "text_encoder_2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(p2p.CheckpointError, match="do not match the UNet"):
        p2p.load(mixed)


def test_half_precision_keeps_the_vae_in_float32(folder):
    half = p2p.load(folder, device="cpu", dtype=torch.float16)
    assert half.vae_dtype == torch.float32 and half.unet.conv_in.weight.dtype == torch.float16
    images = half.decode_latents(torch.randn(1, 4, 8, 8))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


# -- generation against diffusers' pipeline -----------------------------------------------------------

def test_generate_equals_stable_diffusion_xl_pipeline(folder, pipe):
    """DDIM from the checkpoint's config, at a non-square size (the time ids' order matters), guidance 5.0
    (SDXL's default), the empty negative prompt as zeros."""
    from diffusers import StableDiffusionXLPipeline

    start = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    outs = {}
    for dt in (torch.float32, torch.float64):
        sd = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dt)
        sd.set_progress_bar_config(disable=True)
        outs[dt] = sd(SRC, height=128, width=96, num_inference_steps=STEPS, guidance_scale=5.0,
                      latents=start.to(dt), output_type="latent").images
    got = pipe.generate([SRC], steps=STEPS, latents=start.float(), store=False, progress=False,
                        decode_images=False).latents
    _drift_check(got, outs[torch.float32], outs[torch.float64])
    square = pipe.generate([SRC], steps=STEPS, latents=start[..., :12, :].float(), store=False, progress=False,
                           decode_images=False).latents
    assert square.shape[-2:] == (12, 12)


# -- P2P against the reference controllers on diffusers' SDXL UNet --------------------------------------

@pytest.fixture(scope="module")
def ref_unet(folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)


def ref_run(pipe, unet, folder, prompts, ctrl, guidance=5.0):
    """The reference loop on diffusers' SDXL UNet: [zeros x P, cond x P] contexts and pooled embeddings, the same
    time ids for every row, DDIM from the checkpoint's config, the controller's step callback after each step."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler"))
    sched.set_timesteps(STEPS)
    register(unet, ctrl)
    P = len(prompts)
    cond = pipe.encode_text(prompts)
    ctx = torch.cat([torch.zeros_like(cond.context), cond.context])
    pooled = torch.cat([torch.zeros_like(cond.pooled), cond.pooled])
    ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2 * P)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(0)).expand(P, -1, -1, -1)
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            u, c = out.chunk(2)
            latents = ctrl.step_callback(sched.step(u + guidance * (c - u), t, latents).prev_sample)
    return latents


def ours(pipe, prompts, controller, **kw):
    return pipe.edit(prompts, controller=controller, steps=STEPS, seed=0, progress=False, decode_images=False,
                     **kw).latents


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # as tests/test_editing.py


# latent 16: the self window applies to layers of at most (16/4)^2 queries, LocalBlend reads 4 x 4 maps
SELF_MAX, BLEND_RES = 16, 4


def test_replace_with_blend_matches_reference(pipe, ref_unet, folder):
    prompts = [SRC, TGT]
    M, _ = mappers(pipe, prompts)
    alpha = torch.zeros(2, 1, 1, 1, 1, 77)
    for i, (p, w) in enumerate(zip(prompts, ("cat", "dog"))):
        alpha[i, :, :, :, :, ref_word_inds(p, w, pipe.tokenizer)] = 1
    blend = RefBlend(alpha, BLEND_RES, start=1, th=0.8)  # 0.8: a partial mask (at 0.3 it covers everything)
    ref = ref_run(pipe, ref_unet, folder, prompts, RefReplace(M, prompts, STEPS, 0.8, 0.5, blend=blend,
                                                              self_max=SELF_MAX))
    ctrl = p2p.Replace(cross_steps=0.8, self_steps=0.5)
    got = ours(pipe, prompts, ctrl, local_blend=p2p.LocalBlend(["cat", "dog"], start=0.25, threshold=0.8))
    close(got, ref)
    assert (got - ours(pipe, prompts, ctrl)).abs().max() > 1e-2, "the blend changed nothing"


def test_refine_and_reweight_match_reference(pipe, ref_unet, folder):
    prompts = [SRC, LONG]
    _, (m, a) = mappers(pipe, prompts)
    ref = ref_run(pipe, ref_unet, folder, prompts,
                  RefRefine(m.long(), a.float(), prompts, STEPS, (0.0, 0.6), (0.25, 0.75), self_max=SELF_MAX))
    close(ours(pipe, prompts, p2p.Refine(cross_steps=(0.0, 0.6), self_steps=(0.25, 0.75))), ref)
    prev = RefRefine(m.long(), a.float(), prompts, STEPS, 0.8, 0.4, self_max=SELF_MAX)
    ref = ref_run(pipe, ref_unet, folder, prompts,
                  RefReweight(equalizer(pipe, LONG, "red", 4.0), prev, prompts, STEPS, 0.8, 0.4, self_max=SELF_MAX))
    close(ours(pipe, prompts, p2p.Reweight({"red": 4.0}, prev=p2p.Refine())), ref)


def test_maps_at_every_resolution(pipe):
    out = pipe.edit([SRC, TGT], controller=p2p.Store(), steps=STEPS, progress=False, decode_images=False)
    assert out.attention.resolutions == [8, 4]  # the first level has no attention
    for res in out.attention.resolutions:
        m = out.attention.cross(res)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:3]))
    assert out.attention.word_maps(1, "dog", 8).shape == (8, 8)


def test_maps_with_a_mid_layer_average_down_and_up_only(pipe, ref_unet, folder):
    """At 4 x 4 the down, up and mid blocks all have cross attention: `cross(4)` averages the down and up layers
    only, as the reference's aggregate_attention(from_where=("up", "down")), over the reference store's maps."""
    prompts = [SRC, TGT]
    store = RefStore()
    ref_run(pipe, ref_unet, folder, prompts, store)
    store = store.attention_store

    def mean(places):  # (P, 4, 4, 77): over layers, heads and steps
        maps = [m for p in places for m in store[f"{p}_cross"] if m.shape[1] == 4 * 4]
        assert maps, places
        return torch.cat([m.reshape(2, -1, 4, 4, 77) for m in maps], 1).mean(1) / STEPS

    att = pipe.edit(prompts, controller=p2p.Store(), steps=STEPS, seed=0, progress=False, decode_images=False).attention
    close(att.cross(4), mean(("down", "up")))
    assert (mean(("down", "mid", "up")) - mean(("down", "up"))).abs().max() > 1e-3  # the mid layers would count
    close(att.cross(4, places="mid"), mean(("mid",)))


# -- inversion ------------------------------------------------------------------------------------------

def photo(seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:96] / 96
    img = np.stack([0.3 + 0.5 * xx, 0.2 + 0.6 * yy, 0.5 + 0.3 * np.sin(6 * xx + seed)], -1)
    img[(yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.05] = g.uniform(0, 1, 3)
    return (np.clip(img + g.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


def test_null_text_beats_ddim_and_keeps_pooled(pipe):
    from p2p_engine.inversion import reconstruct

    image = photo(0)
    z0 = pipe.encode_images(prepare(image, pipe.config.image_size))
    nti = pipe.invert(image, SRC, steps=STEPS, inner_steps=10, progress=False)
    ddim = pipe.invert(image, SRC, steps=STEPS, method="ddim", progress=False)
    assert nti.guidance == 5.0 and nti.null_embeddings.shape == (STEPS, 77, 64)
    assert not nti.null_pooled.any()  # kept at the sampler's unconditional pooled embedding: zeros
    assert nti.null_embeddings.abs().max() > 1e-3  # the context moved away from the zeros it started at
    err_nti = (reconstruct(pipe, nti) - z0).pow(2).mean()
    err_ddim = (reconstruct(pipe, ddim) - z0).pow(2).mean()
    assert err_nti < 0.75 * err_ddim, (err_nti, err_ddim)  # measured 0.63x on this random model
    used = (~nti.losses.isnan()).sum(1)
    first, last = nti.losses[:, 0], nti.losses[torch.arange(STEPS), used - 1]
    assert (last < first).all()  # each step's optimisation lowered its loss
    both = pipe.invert(image, SRC, steps=STEPS, inner_steps=4, optimize_pooled=True, progress=False)
    assert both.pooled_optimized and both.null_pooled.abs().max() > 1e-3
    neg = pipe.invert(image, SRC, steps=STEPS, method="negative_prompt", progress=False)
    text = pipe.encode_text([SRC])
    assert torch.equal(neg.null_pooled[0], text.pooled[0]) and torch.equal(neg.null_embeddings[0], text.context[0])


def test_save_load_and_direct(pipe, tmp_path):
    image = photo(1)
    inv = pipe.invert(image, SRC, steps=STEPS, inner_steps=2, optimize_pooled=True, progress=False)
    inv.save(tmp_path / "x.safetensors")
    back = p2p.Inversion.load(tmp_path / "x.safetensors")
    assert back.pooled_optimized and torch.equal(back.null_pooled, inv.null_pooled)
    kw = dict(controller=p2p.Replace(), progress=False, decode_images=False)
    assert torch.equal(pipe.edit([SRC, TGT], inversion=back, **kw).latents,
                       pipe.edit([SRC, TGT], inversion=inv, **kw).latents)
    direct = pipe.invert(image, SRC, steps=STEPS, method="direct", progress=False)
    z0 = pipe.encode_images(prepare(image, pipe.config.image_size))
    assert torch.equal(pipe.edit([SRC, TGT], inversion=direct, **kw).latents[:1], z0)


@pytest.fixture(scope="module")
def pipe64(folder, load_float64):
    return load_float64(folder)


def test_batch_equals_singles(pipe64):
    """As for SD 1.x (tests/test_inversion.py), in float64 so that only the batching logic is compared."""
    images = [photo(s) for s in (2, 3)]
    prompts = [SRC, "two birds in a tree"]
    kw = dict(steps=STEPS, inner_steps=3, progress=False, optimize_pooled=True)
    batch = pipe64.invert_batch(images, prompts, **kw)
    for b, (im, p) in zip(batch, zip(images, prompts)):
        s = pipe64.invert(im, p, **kw)
        ulp = torch.finfo(torch.float32).eps
        for x, y in ((b.null_embeddings, s.null_embeddings), (b.null_pooled, s.null_pooled)):
            assert ((x - y).norm() / y.norm()).item() <= ulp
        assert math.isclose(float(b.losses.nansum()), float(s.losses.nansum()), rel_tol=1e-6)


def test_cached_re_edit_equals_uncached(pipe64, capture_way):
    """A re-edit from an edit cache (tests/test_cache.py for SD 1.x) carries SDXL's pooled embeddings and time ids
    for the targets' rows; float64, so that only the logic is compared."""
    prompts, ctrl = [SRC, TGT], p2p.Replace()
    kw = dict(local_blend=p2p.LocalBlend(["cat", "dog"]), progress=False)
    source = dict(seed=4, steps=STEPS, height=128, width=96)
    ref = pipe64.edit(prompts, ctrl, **source, **kw)
    cache = pipe64.edit_cache(SRC, progress=False, **source)
    assert cache.self_qk  # SDXL's default self limit (h/4)(w/4) takes its coarsest layers
    out = pipe64.edit(prompts, ctrl, cache=cache, **kw)
    assert ((out.latents - ref.latents).abs().max() / ref.latents.abs().max()).item() < 1e-10
    # the recording run on static state (p2p_engine.recording) over SDXL's layers (several per transformer,
    # heads by level) and its time ids: the same cache, bit for bit
    static = pipe64.edit_cache(SRC, progress=False, capture=True, **source)
    for name in ("cross", "level_maps", "cross_sum"):
        ours, theirs = getattr(static, name), getattr(cache, name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert static.self_qk.keys() == cache.self_qk.keys()
    assert all(torch.equal(a, b) for k in cache.self_qk for a, b in zip(static.self_qk[k], cache.self_qk[k]))
    assert torch.equal(static.latents, cache.latents)
    capture_way()


def test_static_loop_equals_eager(pipe64, capture_way):
    """The captured loop's static step (tests/test_captured.py for SD 1.x) with SDXL's pooled embeddings, time ids
    and a null-text inversion's per-step pooled null; a non-square size, so the buffers allocated up front take
    each level's own height and width; float64."""
    img = (torch.rand(80, 112, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    inv = pipe64.invert(img, SRC, steps=STEPS, inner_steps=1, progress=False)
    for source in (dict(seed=4, steps=STEPS, height=128, width=96), dict(inversion=inv)):
        kw = dict(local_blend=p2p.LocalBlend(["cat", "dog"]), progress=False, **source)
        ref = pipe64.edit([SRC, TGT], p2p.Replace(), capture=False, **kw)
        out = pipe64.edit([SRC, TGT], p2p.Replace(), capture=True, **kw)
        assert ((out.latents - ref.latents).abs().max() / ref.latents.abs().max()).item() < 1e-12
        assert out.attention.layers == ref.attention.layers
    capture_way()


def test_pie_protocol_scales_its_self_limit_and_keeps_its_guidance(pipe, tiny_pipe, tmp_path, monkeypatch):
    """PIE-Bench's protocol on SDXL: self replacement on layers of up to (L/2)^2 queries (the null-text notebook's
    32 x 32 at L = 64, scaled by REFERENCE.md's SDXL rule) and guidance 7.5, not the family's 5.0."""
    from p2p_engine import jobs, pie, pie_runs

    entry = {"image_path": "1_x/a.png", "original_prompt": SRC, "editing_prompt": "a [dog] riding a bicycle",
             "editing_instruction": "", "editing_type_id": "1", "blended_word": "cat dog", "mask": []}
    (tmp_path / pie.MAPPING_FILE).write_text(json.dumps({"000": entry}))
    seen = []

    def fake_run_jobs(job_file, pipe_, folder, **kw):
        seen.append((json.loads(job_file.read_text()), kw))
        return jobs.Summary(ok=1)

    monkeypatch.setattr(jobs, "run_jobs", fake_run_jobs)
    side = pipe.config.latent_size
    assert pipe.default_guidance == 5.0 and (side // 2) ** 2 != 32 * 32
    # SD 1.x/2.x keep the notebook's absolute 32 x 32
    for model, limit in ((pipe, (side // 2) ** 2), (tiny_pipe, 32 * 32)):
        seen.clear()
        pie_runs.run_pie(tmp_path, model, tmp_path / "out", ["direct"], progress=False)
        (job, kw), = seen
        assert job["controller"]["self_max_queries"] == limit and kw["guidance"] == pie.GUIDANCE == 7.5
