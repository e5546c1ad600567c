"""`pipe.edit_batch`: independent edits in one UNet batch, each equal to its own `pipe.edit`.

In float64 a batched edit and the same edit alone differ only by the rounding of a convolution or matrix product
over more rows, so latents and stored maps are held within 1e-10 relative; float32 is held to the drift torch's
batching itself has. The mixes cover generated and inverted sources (null-text, direct, negative prompt with
proximal guidance), every controller, word windows, LocalBlend on some requests only, different prompt counts,
re-edits from caches beside uncached edits, and SDXL; in the eager loop and on static state (call by call, and
recorded once and replayed as a CUDA graph is, `capture_way`). A control that reaches another request's rows
fails them (`test_a_control_that_reaches_another_request_is_caught`).
"""
import dataclasses

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import batch, captured, editing, graphs
from numerics import rel_max_error

SOURCE, TARGET, FOX = "a cat riding a bicycle", "a dog riding a bicycle", "a fox riding a bicycle"
STEPS = 4
SELF = dict(self_max_queries=64)  # the tiny model's 8 x 8 self layers are replaced (of 16 x 16 latents), as SD's
# 16 x 16 are of 64 x 64
TOL = 1e-10


@pytest.fixture(scope="module")
def pipe64(tiny_ckpt, load_float64):
    return load_float64(tiny_ckpt)


def photo(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def invs(pipe64):
    """One inversion of each method an edit treats differently, of different images."""
    return {m: pipe64.invert(photo(k), SOURCE, steps=STEPS, inner_steps=2, method=m, progress=False)
            for k, m in enumerate(("null_text", "direct", "negative_prompt"))}


def alone(pipe, r: p2p.EditRequest, *, steps=STEPS, guidance=7.5, **kw):
    """The request's own `pipe.edit`: what its batched output must equal (batch.py's guidance rule)."""
    if r.cache is not None:
        return pipe.edit(r.prompts, r.controller, local_blend=r.local_blend, cache=r.cache, store=r.store,
                         progress=False, **kw)
    source = dict(inversion=r.inversion) if r.inversion is not None else dict(seed=r.seed, steps=steps)
    g = r.guidance if r.guidance is not None or r.inversion is not None else guidance
    return pipe.edit(r.prompts, r.controller, local_blend=r.local_blend, latents=r.latents, proximal=r.proximal,
                     quantile=r.quantile, guidance=g, store=r.store, progress=False, **source, **kw)


def assert_same(out, ref, tol=TOL):
    """Latents and every stored map (cross and self, every layer) of two edits agree within `tol` relative."""
    assert out.latents.shape == ref.latents.shape
    err = rel_max_error(out.latents, ref.latents)
    assert err <= tol, err
    if ref.attention is None:
        assert out.attention is None
        return
    assert out.attention.prompts == ref.attention.prompts and out.attention.layers == ref.attention.layers
    for ours, theirs in [(out.attention._cross, ref.attention._cross), (out.attention._self, ref.attention._self)]:
        assert ours.keys() == theirs.keys()
        for k, buf in theirs.items():
            err = rel_max_error(ours[k], buf)
            assert err <= tol, (k, err)


def mixed(invs, cache) -> list:
    """Generated and inverted sources, every controller, word windows, LocalBlend on some requests only, one to
    three prompts, proximal guidance, a guidance of its own, a re-edit from a cache."""
    R = p2p.EditRequest
    return [
        R([SOURCE, TARGET], p2p.Replace(cross_steps={"default_": 0.8, "bicycle": 0.3}, self_steps=(0.25, 0.75),
                                        self_maps=True, **SELF),
          local_blend=p2p.LocalBlend(["cat", "dog"], start=0.25, threshold=0.7), seed=1),
        R([SOURCE, "a big cat riding a red bicycle", FOX], p2p.Refine(cross_steps=0.5, **SELF),
          inversion=invs["null_text"]),
        R([SOURCE], p2p.Store(self_maps=True), seed=2),
        R([SOURCE, TARGET], p2p.Reweight({"riding": 2.0}, prev=p2p.Replace(), cross_steps=0.75, **SELF),
          local_blend=p2p.LocalBlend(["cat", "dog"], subtract=["bicycle", "bicycle"], threshold=0.7),
          inversion=invs["direct"]),
        R([SOURCE, FOX], p2p.Replace(self_steps=0.5, **SELF), inversion=invs["negative_prompt"], proximal="l0",
          quantile=0.6, guidance=5.0),
        R([SOURCE, TARGET, FOX], p2p.Replace(**SELF), local_blend=p2p.LocalBlend(["cat", "dog", "fox"]),
          cache=cache),
        R([TARGET], seed=3, store=False, guidance=3.0),
    ]


@pytest.fixture(scope="module")
def cache(pipe64):
    return pipe64.edit_cache(SOURCE, seed=4, steps=STEPS, progress=False, **SELF)


@pytest.fixture(scope="module")
def references(pipe64, invs, cache):
    return [alone(pipe64, r) for r in mixed(invs, cache)]


def test_mixed_batch_equals_each_edit_alone(pipe64, invs, cache, references):
    outs = pipe64.edit_batch(mixed(invs, cache), steps=STEPS, progress=False)
    assert len(outs) == len(references)
    for out, ref in zip(outs, references):
        assert_same(out, ref)
        assert out.loop == "eager" and len(out.images) == len(ref.images)
    # the direct inversion's source row is pinned to its pivots, the re-edit's source row is the cache's
    assert torch.equal(outs[3].latents[0], invs["direct"].pivots[-1].to(outs[3].latents))
    assert torch.equal(outs[5].latents[0], cache.latents[-1][0])


def test_captured_batch_equals_each_edit_alone(pipe64, invs, cache, references, capture_way):
    """The static step over every request's rows (call by call, or recorded once and replayed): equal to each
    edit alone; a second batch of the same shapes with other inputs replays the kept loop."""
    captured.forget(pipe64)
    cache.kept_loops.clear()
    outs = pipe64.edit_batch(mixed(invs, cache), steps=STEPS, capture=True, progress=False)
    for out, ref in zip(outs, references):
        assert_same(out, ref)
    assert {o.loop for o in outs} == {"graph" if graphs.can_capture(pipe64.device) else "static"}
    [(_, kept, _)] = cache.kept_loops  # a loop that reads a cache is kept with it
    # other seeds, prompts, windows, words and inversions in the same shapes: served by the same loop
    swapped = mixed({"null_text": invs["null_text"], "direct": invs["direct"],
                     "negative_prompt": invs["negative_prompt"]}, cache)
    swapped[0] = p2p.EditRequest([FOX, TARGET], p2p.Replace(cross_steps={"default_": 0.5, "bicycle": 0.75},
                                                            self_steps=(0.0, 0.5), self_maps=True, **SELF),
                                 local_blend=p2p.LocalBlend(["fox", "dog"], start=0.5, threshold=0.7), seed=9)
    swapped[6] = p2p.EditRequest([FOX], seed=8, store=False, guidance=3.0)
    again = pipe64.edit_batch(swapped, steps=STEPS, capture=True, progress=False)
    assert [k for _, k, _ in cache.kept_loops] == [kept]
    for i in (0, 6):
        assert_same(again[i], alone(pipe64, swapped[i]))
    for out, ref in zip(outs, references):  # the first batch's outputs are copies, untouched by the second
        assert_same(out, ref)
    capture_way()


def test_a_control_that_reaches_another_request_is_caught(pipe64, invs):
    """The equality above fails when one request's control acts on another's rows: two requests' cross gates
    (open at every call, one with a word's window closed), or their LocalBlend words, swapped after compiling (as
    a batch that handed each block the other's plans or masks would run them) move both outputs far past the
    tolerance."""
    R = p2p.EditRequest
    requests = [R([SOURCE, TARGET], p2p.Replace(cross_steps={"default_": 1.0, "bicycle": 0.0}, **SELF),
                  local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.7), seed=1),
                R([SOURCE, FOX], p2p.Replace(cross_steps=1.0, **SELF), local_blend=p2p.LocalBlend(
                    ["bicycle", "bicycle"], threshold=0.7), inversion=invs["null_text"])]
    refs = [alone(pipe64, r) for r in requests]
    for swap in ("gate", "blend_words"):
        blocks = [batch._resolve(pipe64, i, r, STEPS, 7.5, "ddim", None, None) for i, r in enumerate(requests)]
        a, b = (blk.control.edit if swap == "gate" else blk.control for blk in blocks)
        t = getattr(a, swap).clone()
        setattr(a, swap, getattr(b, swap))
        setattr(b, swap, t)
        latents, _, _, _ = editing._run(pipe64, blocks, editing._sampler(pipe64, blocks[0].src), False,
                                        progress=False, desc="swapped")
        for z, ref in zip(latents, refs):
            assert rel_max_error(z, ref.latents) > 1e-6, swap  # 10^4 times the tolerance


def test_float32_batch_within_batching_drift(tiny_pipe, pipe64, invs):
    """float32: each batched edit is as far from float64 truth as the edit alone is, up to twice (torch's
    batched products round differently, as any float32 reassociation does)."""
    inv32 = pipe64.invert(photo(5), SOURCE, steps=STEPS, inner_steps=2, progress=False)
    requests = [p2p.EditRequest([SOURCE, TARGET], p2p.Replace(**SELF), local_blend=p2p.LocalBlend(["cat", "dog"]),
                                seed=5),
                p2p.EditRequest([SOURCE, "a big cat riding a red bicycle"], p2p.Refine(**SELF), inversion=inv32)]
    outs = tiny_pipe.edit_batch(requests, steps=STEPS, progress=False)
    eps = torch.finfo(torch.float32).eps
    for out, r in zip(outs, requests):
        truth, own = alone(pipe64, r).latents, alone(tiny_pipe, r).latents
        err_own, err = rel_max_error(own, truth), rel_max_error(out.latents, truth)
        assert err_own < 1e-4 and err <= 2 * err_own + 4 * eps, (err, err_own)


def test_max_rows_bounds_every_unet_call(pipe64, invs):
    """Requests past max_rows run in the next call, in order and whole: every UNet call has at most max_rows
    rows, and the outputs are still each edit's own."""
    R = p2p.EditRequest
    requests = [R([SOURCE, TARGET], p2p.Replace(**SELF), seed=1), R([SOURCE], seed=2, store=False),
                R([SOURCE, TARGET, FOX], p2p.Refine(**SELF), inversion=invs["null_text"]),
                R([SOURCE, FOX], p2p.Store(), seed=3)]
    rows = []
    hook = pipe64.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        outs = pipe64.edit_batch(requests, steps=STEPS, progress=False, max_rows=6)
    finally:
        hook.remove()
    assert rows == [6] * STEPS + [6] * STEPS + [4] * STEPS  # (4 + 2), then 6, then 4 rows
    for out, r in zip(outs, requests):
        assert_same(out, alone(pipe64, r))
    with pytest.raises(ValueError, match=r"requests\[2\] runs 6 UNet rows .* over max_rows = 4"):
        pipe64.edit_batch(requests, steps=STEPS, progress=False, max_rows=4)


def test_requests_that_cannot_share_one_loop_are_refused(tiny_pipe, pipe64, invs, cache, tmp_path):
    R = p2p.EditRequest
    gen = R([SOURCE, TARGET], p2p.Replace(), seed=1)
    inv = invs["null_text"]

    def refused(requests, match, **kw):
        with pytest.raises((ValueError, TypeError), match=match):
            pipe64.edit_batch(requests, progress=False, **dict(dict(steps=STEPS), **kw))

    refused([gen, R([SOURCE, TARGET], inversion=inv)], r"requests\[1\]: steps 4 \(its inversion's\) is not the "
            r"batch's 6.*group requests by steps", steps=6)
    refused([gen, R([SOURCE, TARGET], cache=cache)], r"requests\[1\]: sampler 'ddim' \(its cache's\) is not the "
            r"batch's 'pndm'", sampler="pndm")
    refused([gen, R([SOURCE, TARGET], inversion=inv)], r"requests\[1\]: size \(height, width\) \(128, 128\) \(its "
            r"inversion's\) is not the batch's \(80, 128\)", height=80)
    wide = R([SOURCE, TARGET], latents=torch.zeros(1, 4, 16, 18, dtype=torch.float64))
    refused([gen, wide], r"requests\[1\]: size \(height, width\) \(128, 144\) \(its\) is not the batch's "
            r"\(128, 128\)")
    old = dataclasses.replace(inv, timesteps=[t - 1 for t in inv.timesteps])
    refused([gen, R([SOURCE, TARGET], inversion=old)], r"requests\[1\]: timesteps 750 .. 0 \(its inversion's\) are "
            r"not the batch's 751 .. 1")
    refused([gen, R([SOURCE, TARGET], cache=cache, seed=5)], r"requests\[1\]: seed: an edit from a cache runs")
    refused([gen, R([SOURCE, "a big dog riding a bicycle"], p2p.Replace())], r"requests\[1\]: .*same number of words")
    other = tiny_pipe.edit_cache(SOURCE, steps=STEPS, progress=False)
    refused([R([SOURCE, TARGET], cache=other)], r"requests\[0\]: this edit cache was made by another pipeline")
    refused([gen, ([SOURCE, TARGET],)], r"requests\[1\] must be a p2p_engine.EditRequest, got tuple")
    refused([], "non-empty list")
    refused([gen], "max_rows must be an integer >= 2", max_rows=1)
    refused([R([SOURCE, TARGET], store="no")], r"requests\[0\]: store must be True or False")


def test_an_inversion_file_and_the_guidance_rule(pipe64, invs, tmp_path):
    """A request takes an inversion by its file's path; an edit from an inversion runs its own guidance unless
    the request gives one, a generated edit the batch's."""
    inv = invs["null_text"]
    path = tmp_path / "cat.inversion.safetensors"
    inv.save(path)
    requests = [p2p.EditRequest([SOURCE, TARGET], p2p.Replace(**SELF), inversion=str(path)),
                p2p.EditRequest([SOURCE, TARGET], p2p.Replace(**SELF), seed=1)]
    outs = pipe64.edit_batch(requests, steps=STEPS, guidance=3.0, progress=False)
    assert_same(outs[0], pipe64.edit([SOURCE, TARGET], p2p.Replace(**SELF), inversion=inv, progress=False))
    assert_same(outs[1], pipe64.edit([SOURCE, TARGET], p2p.Replace(**SELF), seed=1, steps=STEPS, guidance=3.0,
                                     progress=False))


# -- SDXL ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl64(tmp_path_factory, load_float64):
    folder = p2p.save_random_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", "tiny-sdxl", seed=1)
    return load_float64(folder)


def test_sdxl_batch_equals_each_edit_alone(sdxl64, capture_way):
    """SDXL's pooled embeddings and time ids per block, a re-edit from a cache at a non-square size, and (in a
    second batch at the model's square size, the only size an inversion has) a null-text inversion's per-step
    pooled null; eager and on static state."""
    inv = sdxl64.invert(photo(1, 80, 112), SOURCE, steps=STEPS, inner_steps=1, progress=False)
    cache = sdxl64.edit_cache(SOURCE, seed=4, steps=STEPS, height=80, width=112, progress=False)
    R = p2p.EditRequest
    wide = [R([SOURCE, TARGET], p2p.Replace(), local_blend=p2p.LocalBlend(["cat", "dog"], threshold=0.8), seed=4),
            R([SOURCE, TARGET], p2p.Reweight({"riding": 2.0}), cache=cache),
            R([FOX], p2p.Store(), seed=5)]
    square = [R([SOURCE, "a big cat riding a red bicycle", FOX], p2p.Refine(), inversion=inv),
              R([FOX, TARGET], p2p.Replace(), seed=6)]
    size = dict(height=80, width=112)
    batches = [(wide, size, [alone(sdxl64, r, guidance=5.0, **({} if r.cache else size)) for r in wide]),
               (square, {}, [alone(sdxl64, r, guidance=5.0) for r in square])]
    for capture in (False, True):
        for requests, kw, refs in batches:
            outs = sdxl64.edit_batch(requests, steps=STEPS, guidance=5.0, capture=capture, progress=False, **kw)
            assert len(outs) == len(refs)
            for out, ref in zip(outs, refs):
                assert_same(out, ref)
    capture_way()
