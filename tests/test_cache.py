"""Re-edits from an edit cache (p2p_engine.cache) equal the uncached edits they stand in for.

The loop's logic is compared in float64, where a cached and an uncached edit agree to rounding (1e-10);
float32 is then held to the accuracy the uncached edit itself has against float64 truth.
"""
import pytest
import torch

import p2p_engine as p2p
from numerics import rel_max_error

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"
STEPS = 8
SELF = dict(self_max_queries=64)  # the tiny model's 8 x 8 self layers: replaced, as 16 x 16 are at full size


@pytest.fixture(scope="module")
def pipe64(tiny_ckpt, load_float64):
    return load_float64(tiny_ckpt)


def _run_pair(pipe, prompts, controller, source: dict, cache_kw: dict | None = None, **edit_kw):
    ref = pipe.edit(prompts, controller, progress=False, **source, **edit_kw)
    cache = pipe.edit_cache(prompts[0], progress=False, **source, **(cache_kw or {}))
    out = pipe.edit(prompts, controller, cache=cache, progress=False, **edit_kw)
    return ref, out, cache


def _assert_equal(ref, out, tol):
    assert out.latents.shape == ref.latents.shape
    assert rel_max_error(out.latents, ref.latents) < tol
    if ref.attention is not None:  # every layer's summed maps, source row included
        for ours, theirs in [(out.attention._cross, ref.attention._cross), (out.attention._self, ref.attention._self)]:
            assert ours.keys() == theirs.keys()
            for k, buf in theirs.items():
                assert rel_max_error(ours[k], buf) < tol


CASES = {
    "replace, blend, self maps": dict(
        prompts=[SOURCE, TARGET], controller=p2p.Replace(self_maps=True, **SELF),
        edit_kw=dict(local_blend=p2p.LocalBlend(["cat", "dog"])), cache_kw=dict(self_maps=True, **SELF)),
    "refine": dict(prompts=[SOURCE, "a big cat riding a red bicycle"], controller=p2p.Refine(**SELF)),
    "reweight on replace, word windows, two targets": dict(
        prompts=[SOURCE, TARGET, "a fox riding a bicycle"],
        controller=p2p.Reweight({"riding": 2.0}, prev=p2p.Replace(), cross_steps={"default_": 0.8, "bicycle": 0.3},
                                self_steps=(0.1, 0.4), **SELF),
        edit_kw=dict(local_blend=p2p.LocalBlend(["cat", "dog", "fox"], subtract=["bicycle"] * 3, start=0.25))),
    "store only": dict(prompts=[SOURCE, TARGET], controller=p2p.Store()),
    "pndm": dict(prompts=[SOURCE, TARGET], controller=p2p.Replace(**SELF), source=dict(sampler="pndm")),
    "dpmsolver++": dict(prompts=[SOURCE, TARGET], controller=p2p.Replace(**SELF),
                        source=dict(sampler="dpmsolver++")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_edit_equals_uncached_float64(pipe64, case):
    c = CASES[case]
    source = dict(seed=3, steps=STEPS, **c.get("source", {}))
    cache_kw = dict(SELF, **c.get("cache_kw", {}))
    ref, out, _ = _run_pair(pipe64, c["prompts"], c["controller"], source, cache_kw, **c.get("edit_kw", {}))
    _assert_equal(ref, out, 1e-10)
    assert len(out.images) == len(c["prompts"])


@pytest.mark.parametrize("method", ["direct", "null_text"])
def test_cached_edit_from_an_inversion_equals_uncached(pipe64, method):
    img = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    inv = pipe64.invert(img, SOURCE, steps=STEPS, inner_steps=2, method=method, progress=False)
    ref, out, _ = _run_pair(pipe64, [SOURCE, TARGET], p2p.Replace(**SELF), dict(inversion=inv), dict(SELF),
                            local_blend=p2p.LocalBlend(["cat", "dog"]))
    _assert_equal(ref, out, 1e-10)


def test_float32_cached_edit_is_as_accurate_as_uncached(tiny_pipe, pipe64):
    """Against the float64 truth, the cached float32 edit errs no more than a few times the uncached one."""
    prompts, ctrl = [SOURCE, TARGET], p2p.Replace(**SELF)
    blend = p2p.LocalBlend(["cat", "dog"])
    source = dict(seed=5, steps=STEPS)
    truth = pipe64.edit(prompts, ctrl, local_blend=blend, progress=False, **source)
    ref, out, cache = _run_pair(tiny_pipe, prompts, ctrl, source, dict(SELF), local_blend=blend)
    err_ref, err_out = rel_max_error(ref.latents, truth.latents), rel_max_error(out.latents, truth.latents)
    print(f"fp32 vs fp64: uncached {err_ref:.2e}, cached {err_out:.2e}; cached vs uncached "
          f"{rel_max_error(out.latents, ref.latents):.2e}; cache {cache.nbytes} bytes")
    assert err_ref < 1e-4  # float32 drift, not a different computation
    assert err_out < 4 * err_ref


def test_cache_is_reusable_and_its_size_is_stated(tiny_pipe):
    cache = tiny_pipe.edit_cache(SOURCE, seed=1, steps=STEPS, progress=False, **SELF)
    held = {k: v.clone() for k, v in cache.cross.items()}  # layer -> (window calls, 1, H, N, T)
    ctrl = p2p.Replace(**SELF)
    a = tiny_pipe.edit([SOURCE, TARGET], ctrl, cache=cache, progress=False)
    b = tiny_pipe.edit([SOURCE, "a fox riding a bicycle"], ctrl, cache=cache, progress=False)
    c = tiny_pipe.edit([SOURCE, TARGET], ctrl, cache=cache, progress=False)
    assert torch.equal(a.latents, c.latents) and not torch.equal(a.latents, b.latents)
    assert all(torch.equal(held[k], cache.cross[k]) for k in held)
    assert torch.equal(a.latents[0], cache.latents[-1][0])
    # the stated size counts every tensor, and the estimate made after the first call is exact
    counted = sum(t.numel() * t.element_size() for t in [cache.latents, *cache.cross.values(),
                  *(x for qk in cache.self_qk.values() for x in qk), *cache.level_maps.values(),
                  *cache.cross_sum.values()])
    assert cache.nbytes == counted
    # the default windows: cross calls [0, int(0.8 * (steps + 1))), self calls [0, int(0.4 * steps)), kept for
    # every cross layer and the self layers of up to self_max_queries queries
    cross_layers = [i for i, (layer, _) in cache.layers.items() if layer.is_cross]
    self_layers = [i for i, (layer, n) in cache.layers.items() if not layer.is_cross and n <= SELF["self_max_queries"]]
    assert sorted(cache.cross) == cross_layers and sorted(cache.self_qk) == self_layers and self_layers
    assert {t.shape[0] for t in cache.cross.values()} == {int(0.8 * (STEPS + 1))}
    assert {t.shape[0] for qk in cache.self_qk.values() for t in qk} == {int(0.4 * STEPS)}
    with pytest.raises(ValueError, match="max_bytes"):
        tiny_pipe.edit_cache(SOURCE, seed=1, steps=STEPS, progress=False, max_bytes=cache.nbytes - 1, **SELF)
    exact = tiny_pipe.edit_cache(SOURCE, seed=1, steps=STEPS, progress=False, max_bytes=cache.nbytes, **SELF)
    assert exact.nbytes == cache.nbytes


def test_cache_refuses_what_it_cannot_stand_in_for(tiny_pipe, tiny_ckpt):
    pipe = tiny_pipe
    cache = pipe.edit_cache(SOURCE, seed=1, steps=STEPS, progress=False, **SELF)
    ctrl = p2p.Replace(**SELF)
    with pytest.raises(ValueError, match="source prompt"):
        pipe.edit([TARGET, SOURCE], ctrl, cache=cache, progress=False)
    with pytest.raises(ValueError, match="seed, steps: an edit from a cache"):
        pipe.edit([SOURCE, TARGET], ctrl, cache=cache, seed=1, steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="cross_steps"):
        pipe.edit([SOURCE, TARGET], p2p.Replace(cross_steps=1.0, **SELF), cache=cache, progress=False)
    with pytest.raises(ValueError, match="self_steps"):
        pipe.edit([SOURCE, TARGET], p2p.Replace(self_steps=0.8, **SELF), cache=cache, progress=False)
    with pytest.raises(ValueError, match="self_max_queries"):
        pipe.edit([SOURCE, TARGET], p2p.Replace(self_max_queries=256), cache=cache, progress=False)
    with pytest.raises(ValueError, match="self_maps=True"):
        pipe.edit([SOURCE, TARGET], p2p.Replace(self_maps=True, **SELF), cache=cache, progress=False)
    with pytest.raises(ValueError, match=r"own maps; for the maps after injection \(injected_maps=True\) run"):
        pipe.edit([SOURCE, TARGET], p2p.Replace(injected_maps=True, **SELF), cache=cache, progress=False)
    with pytest.raises(ValueError, match="target prompt"):
        pipe.edit([SOURCE], None, cache=cache, progress=False)
    with pytest.raises(TypeError, match="cache must be an EditCache .* got str"):
        pipe.edit([SOURCE, TARGET], ctrl, cache="source.cache", progress=False)
    with pytest.raises(TypeError, match="edit_cache takes the source prompt, one string"):
        pipe.edit_cache([SOURCE, TARGET], steps=STEPS, progress=False)
    for bad in (dict(max_bytes="1e9"), dict(max_bytes=-1), dict(self_max_queries="64")):
        with pytest.raises(ValueError, match="must be an integer >= 0 or None"):
            pipe.edit_cache(SOURCE, steps=STEPS, progress=False, **bad)
    with pytest.raises(TypeError, match="self_maps must be True or False"):
        pipe.edit_cache(SOURCE, steps=STEPS, progress=False, self_maps="no")
    with pytest.raises(ValueError, match="proximal"):
        pipe.edit_cache(SOURCE, steps=STEPS, proximal="l0", progress=False)
    with pytest.raises(ValueError, match="storage"):
        pipe.edit_cache(SOURCE, steps=STEPS, storage="meta", progress=False)
    with pytest.raises(ValueError, match="storage must be 'cpu'"):
        pipe.edit_cache(SOURCE, steps=STEPS, storage="disk", progress=False)
    other = p2p.load(tiny_ckpt, device="cpu", backend="torch")
    with pytest.raises(ValueError, match="another pipeline"):
        other.edit([SOURCE, TARGET], ctrl, cache=cache, progress=False)
    # a narrower edit than the cache's windows is fine
    pipe.edit([SOURCE, TARGET], p2p.Replace(cross_steps=0.5, self_steps=0.2, **SELF), cache=cache, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is off where CUDA is present; "
                    "test_cuda_cached_edit_equals_uncached runs the compiled kernel")
def test_triton_re_edit_reads_the_cached_source(tiny_ckpt, pipe64, monkeypatch, capture_way):
    """On the Triton backend a re-edit's injecting cross and self calls go to the kernels with the cached p_src,
    q_src and k_src (their cached-source modes, interpreted here), eagerly and in the static loop a graph
    records (which hands over whole tables and the counter's row), and err against float64 truth no more than
    the uncached edit."""
    import p2p_engine.kernels as kernels
    tpipe = p2p.load(tiny_ckpt, device="cpu", dtype=torch.float32, backend="triton")
    size = 8 * tpipe.config.vae.downscale  # 8 x 8 latents and 2 steps: the interpreter is slow
    source = dict(seed=2, steps=2, height=size, width=size)
    prompts = [SOURCE, TARGET]
    ctrl = p2p.Reweight({"riding": 2.0}, prev=p2p.Replace(), cross_steps=1.0, self_steps=1.0, **SELF)
    truth = pipe64.edit(prompts, ctrl, progress=False, **source).latents
    cached_calls = {"cross_attention": [], "self_attention": []}

    def counting(name):
        kernel = getattr(kernels, name)

        def run(q, k, v, plan, scale, **kw):
            if plan is not None and plan.source is not None and plan.injects:
                cached_calls[name].append("table" if plan.source_row is not None else "row")
            return kernel(q, k, v, plan, scale, **kw)
        return run

    for name in cached_calls:
        monkeypatch.setattr(kernels, name, counting(name))
    ref, out, cache = _run_pair(tpipe, prompts, ctrl, source, dict(cross_steps=1.0, self_steps=1.0, **SELF),
                                capture=False)
    static = tpipe.edit(prompts, ctrl, cache=cache, capture=True, progress=False)
    for name, calls in cached_calls.items():  # the re-edits' calls, with the source from the cache
        assert {"row", "table"} <= set(calls), (name, calls)
    err_ref = rel_max_error(ref.latents, truth)
    for out in (out, static):
        err_out = rel_max_error(out.latents, truth)
        assert err_ref < 1e-4 and err_out <= 2 * err_ref + 1e-6, (err_ref, err_out)
    capture_way()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("storage", [None, "cpu"])
def test_cuda_cached_edit_equals_uncached(tiny_ckpt, load_float64, storage):
    """On the GPU with the Triton kernels for the uncached edit; a cache offloaded to pinned host memory too."""
    pipe = p2p.load(tiny_ckpt, device="cuda", dtype=torch.float32, backend="triton")
    truth = load_float64(tiny_ckpt)
    prompts, ctrl, blend = [SOURCE, TARGET], p2p.Replace(**SELF), p2p.LocalBlend(["cat", "dog"])
    source = dict(seed=2, steps=STEPS)
    gold = truth.edit(prompts, ctrl, local_blend=blend, progress=False, **source).latents
    ref, out, cache = _run_pair(pipe, prompts, ctrl, source, dict(SELF, storage=storage), local_blend=blend)
    if storage == "cpu":
        assert all(t.device.type == "cpu" and t.is_pinned() for t in cache.cross.values())
    err_ref, err_out = rel_max_error(ref.latents.cpu(), gold), rel_max_error(out.latents.cpu(), gold)
    assert err_ref < 1e-3 and err_out < 4 * err_ref + 1e-6


# -- the recording run on static state (p2p_engine.recording) ------------------------------------------------

def _cache_tensors(cache) -> dict:
    out = {"latents": cache.latents}
    for name in ("cross", "level_maps", "cross_sum", "self_sum"):
        out |= {(name, k): t for k, t in getattr(cache, name).items()}
    out |= {("self_qk", k, i): t for k, qk in cache.self_qk.items() for i, t in enumerate(qk)}
    return out


def _assert_same_cache(eager, static) -> None:
    a, b = _cache_tensors(eager), _cache_tensors(static)
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert b[k].shape == t.shape and torch.equal(b[k], t), k
    assert (static.layers, static.cross_window, static.self_window) == (eager.layers, eager.cross_window,
                                                                       eager.self_window)


@pytest.mark.parametrize("kw", [{}, dict(self_maps=True, cross_steps=(0.2, 1.0), self_steps=(0.1, 0.7))],
                         ids=["defaults", "self maps, windows"])
def test_captured_recording_equals_the_eager_one(pipe64, kw, capture_way):
    """edit_cache(capture=True) runs the static step a CUDA graph records (call by call on the CPU): every table,
    sum, level map and latent equals the eager recorder's bit for bit in float64, and so does a re-edit from it.
    Its size is refused over max_bytes before anything is allocated, counting the tables' spare rows."""
    source = dict(seed=3, steps=STEPS, progress=False, **SELF, **kw)
    eager = pipe64.edit_cache(SOURCE, capture=False, **source)
    static = pipe64.edit_cache(SOURCE, capture=True, **source)
    _assert_same_cache(eager, static)
    windows = dict(cross_steps=(0.3, 0.8), self_steps=(0.25, 0.6)) if kw else {}  # inside the cache's
    ctrl = p2p.Replace(self_maps=kw.get("self_maps", False), **SELF, **windows)
    a, b = (pipe64.edit([SOURCE, TARGET], ctrl, cache=c, capture=False, progress=False) for c in (eager, static))
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="max_bytes"):
        pipe64.edit_cache(SOURCE, capture=True, max_bytes=static.nbytes - 1, **source)
    assert pipe64.edit_cache(SOURCE, capture=True, max_bytes=static.nbytes, **source).nbytes == static.nbytes
    capture_way()


@pytest.mark.parametrize("method", ["null_text", "negative_prompt", "direct"])
def test_captured_recording_of_an_inversion(pipe64, method, capture_way):
    """The unconditional text per call (null-text's optimised, negative-prompt's source prompt) and a direct
    inversion's pivots (row 0 pinned) come from the loop's tables."""
    img = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    inv = pipe64.invert(img, SOURCE, steps=STEPS, inner_steps=2, method=method, progress=False)
    eager, static = (pipe64.edit_cache(SOURCE, inversion=inv, capture=c, progress=False, **SELF)
                     for c in (False, True))
    _assert_same_cache(eager, static)
    capture_way()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_recording_equals_eager(tiny_ckpt):
    """The recording run replayed as a CUDA graph against the eager recorder, and a captured re-edit from it."""
    pipe = p2p.load(tiny_ckpt, device="cuda", dtype=torch.float32, backend="triton")
    source = dict(seed=2, steps=STEPS, progress=False, self_maps=True, **SELF)
    eager = pipe.edit_cache(SOURCE, capture=False, **source)
    static = pipe.edit_cache(SOURCE, capture=True, **source)
    a, b = _cache_tensors(eager), _cache_tensors(static)
    assert a.keys() == b.keys()
    for k, t in a.items():  # the same kernels, so to rounding: the sums add in one order, tables are copies
        assert rel_max_error(b[k], t) < 1e-5, k
    ctrl = p2p.Replace(self_maps=True, **SELF)
    ref = pipe.edit([SOURCE, TARGET], ctrl, cache=eager, capture=False, progress=False)
    out = pipe.edit([SOURCE, TARGET], ctrl, cache=static, capture=True, progress=False)
    assert rel_max_error(out.latents, ref.latents) < 1e-4
