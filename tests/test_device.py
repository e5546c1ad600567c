"""The engine on a device that is not the host, emulated on the CPU (tests/emulated_device.py).

Every other CPU test runs with the host as the pipeline's device, so a tensor left on the host where the
device needs it (a table built with torch.tensor and no `device=`, then indexed by the loop's device counter;
a mask made on the host) cannot show there, and a copy from the host inside a recorded step (refused while a
CUDA graph records) neither. Here the pipeline lives on an emulated device: each operation that mixes its
tensors with host tensors fails as on CUDA, and each copy from the host inside a recording counts as a sync.
The captured loops run replayed (`emulated_graphs`). Covered: edits, cached re-edits, inversions, SDXL, the
graphed UNet, dataset jobs; every result equals the host's in float64.
"""
import importlib
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import p2p_engine as p2p
from emulated_device import DEVICE, OnDevice, emulated_device, kernel_check
from numerics import rel_max_error
from p2p_engine import graphs, jobs
from p2p_engine.graphs import GraphedUNet
from p2p_engine.inversion import Inversion
from tape import assert_recorded_cleanly

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"
STEPS = 6
SELF = dict(self_max_queries=64)


def _load_off_host(load_float64, path):
    """A checkpoint in float64 on the emulated device."""
    with pytest.MonkeyPatch.context() as mp, emulated_device(mp):
        off = load_float64(path, device=DEVICE)
    assert isinstance(next(off.unet.parameters()), OnDevice)
    return off


@pytest.fixture(scope="module")
def pipes(tiny_ckpt, load_float64):
    """(the tiny model in float64 on the host, the same on the emulated device)."""
    return load_float64(tiny_ckpt), _load_off_host(load_float64, tiny_ckpt)


@pytest.fixture
def device(monkeypatch, emulated_graphs):
    """The emulation on, CUDA graphs emulated (tests/tape.py), a failed recording an error (not the eager loop
    the engine falls back to); yields the check that steps were recorded and none crossed to the host."""
    with emulated_device(monkeypatch), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(CUDA-graph capture|as a CUDA graph failed)")
        yield lambda: assert_recorded_cleanly(emulated_graphs)


def _host(t: torch.Tensor) -> torch.Tensor:
    assert isinstance(t, OnDevice), "a result left the device"
    return t.cpu()


def _assert_same(ref, out, tol):
    assert rel_max_error(_host(out.latents), ref.latents) <= tol
    if ref.attention is not None:
        for ours, theirs in [(out.attention._cross, ref.attention._cross), (out.attention._self, ref.attention._self)]:
            assert ours.keys() == theirs.keys()
            for k, buf in theirs.items():
                assert rel_max_error(_host(ours[k]), buf) <= tol
        res = ref.attention.resolutions[0]  # what users read of them
        word = (out.attention.word_maps(0, "cat", res), ref.attention.word_maps(0, "cat", res))
        assert rel_max_error(_host(word[0]), word[1]) <= tol


def test_the_emulation_refuses_what_cuda_refuses(device, emulated_graphs):
    """Device tensors hold their values and stay on the device; mixing them with a host tensor is refused (a 0-dim
    one is taken, as CUDA takes it); copies both ways and host indices work. Inside a recorded step, a tensor
    made from host data, a copy from the host and a host scalar are each listed as syncs."""
    host = torch.arange(6.0).reshape(2, 3)
    x = host.to(DEVICE)
    assert isinstance(x, OnDevice) and x.device == DEVICE and torch.equal(x.cpu(), host)
    y = torch.zeros(2, 3, device=DEVICE).add_(x).mul_(torch.tensor(2.0))
    assert isinstance(y, OnDevice) and torch.equal(y.cpu(), 2 * host)
    with pytest.raises(RuntimeError, match="same device"):
        x + host
    assert torch.equal(x[:, [0, 2]].cpu(), host[:, [0, 2]]) and torch.equal(x.squeeze_(0).cpu(), host)
    scale, counter = torch.tensor(3.0), torch.zeros(1, dtype=torch.long, device=DEVICE)
    steps = {
        "clean": lambda: x.index_select(0, counter).mul(2),
        "made from host data": lambda: x * torch.tensor([1.0, 2.0, 3.0], device=DEVICE),
        "a copy from the host": lambda: x.add(host.to(DEVICE)),
        "a host scalar": lambda: x * scale,
    }
    for name, step in steps.items():
        graphs.capture(step, warmup=1)
        assert bool(emulated_graphs[-1].syncs) == (name != "clean"), name


CASES = {
    "generation": dict(prompts=[SOURCE, TARGET], controller=None, kw=dict(store=False)),
    "replace, blend, self maps": dict(
        prompts=[SOURCE, TARGET], controller=lambda: p2p.Replace(cross_steps=0.5, self_steps=(0.25, 0.6),
                                                                 self_maps=True, **SELF),
        kw=dict(local_blend=p2p.LocalBlend(["cat", "dog"], start=0.3))),
    "reweight on refine, word windows, blend with subtract, proximal guidance": dict(
        prompts=[SOURCE, "a big cat riding a bicycle", "a big fox riding a bicycle"],
        controller=lambda: p2p.Reweight({"riding": 2.0}, prev=p2p.Refine(), cross_steps={"default_": 0.8,
                                                                                         "bicycle": 0.3}, **SELF),
        kw=dict(local_blend=p2p.LocalBlend(["cat", "cat", "fox"], subtract=["bicycle"] * 3, start=0.25),
                proximal="l0")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edits_off_the_host(pipes, device, case):
    """The eager loop and the captured one (recorded once, replayed) on the device equal the host's eager loop."""
    host, off = pipes
    c = CASES[case]
    make = c["controller"] or (lambda: None)
    kw = dict(seed=3, steps=STEPS, progress=False, **c["kw"])
    ref = host.edit(c["prompts"], make(), capture=False, **kw)
    for capture in (False, True):
        _assert_same(ref, off.edit(c["prompts"], make(), capture=capture, **kw), 1e-12)
    device()


def test_re_edits_from_a_cache_off_the_host(pipes, device):
    """A cache recorded by the captured loop on the device, and a captured re-edit from it, equal the host's
    uncached edit; a cache offloaded to the host re-edits eagerly."""
    host, off = pipes
    source = dict(seed=2, steps=STEPS, progress=False, self_maps=True, cross_steps=(0.2, 1.0), self_steps=(0.1, 0.7),
                  **SELF)
    ctrl = p2p.Replace(self_maps=True, cross_steps=(0.3, 0.8), self_steps=(0.25, 0.6), **SELF)
    ref = host.edit([SOURCE, TARGET], ctrl, capture=False, seed=2, steps=STEPS, progress=False)
    cache = off.edit_cache(SOURCE, capture=True, **source)
    _assert_same(ref, off.edit([SOURCE, TARGET], ctrl, cache=cache, capture=True, progress=False), 1e-12)
    offloaded = off.edit_cache(SOURCE, capture=False, storage="cpu", **source)
    _assert_same(ref, off.edit([SOURCE, TARGET], ctrl, cache=offloaded, capture=False, progress=False), 1e-12)
    device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is off where CUDA is present")
def test_triton_kernels_off_the_host(tiny_ckpt, pipes, device, monkeypatch):
    """The Triton backend's kernels (interpreted) on the device: an edit with cross and self injection, and a
    captured re-edit from a cache, whose kernels read the cached tables at the device counter's row. Every
    tensor the launchers hand a kernel must be on the device; against float64 truth the results err no more than
    the host's."""
    for name in ("cross_attention", "self_attention"):  # the modules (the package's names are the functions)
        module = importlib.import_module(f"p2p_engine.kernels.{name}")
        monkeypatch.setattr(module, "check_inputs", kernel_check(module.check_inputs))
    host = p2p.load(tiny_ckpt, device="cpu", dtype=torch.float32, backend="triton")
    off = p2p.load(tiny_ckpt, device=DEVICE, dtype=torch.float32, backend="triton")
    size = 8 * host.config.vae.downscale  # 8 x 8 latents and 2 steps: the interpreter is slow
    source = dict(seed=2, steps=2, height=size, width=size)
    ctrl = p2p.Reweight({"riding": 2.0}, prev=p2p.Replace(), cross_steps=1.0, self_steps=1.0, **SELF)
    edits = {}
    for pipe in (host, off):
        cache = pipe.edit_cache(SOURCE, cross_steps=1.0, self_steps=1.0, progress=False, **SELF, **source)
        edits[pipe] = [pipe.edit([SOURCE, TARGET], ctrl, capture=True, progress=False, **source),
                       pipe.edit([SOURCE, TARGET], ctrl, cache=cache, capture=True, progress=False)]
    truth = pipes[0].edit([SOURCE, TARGET], ctrl, capture=False, progress=False, **source).latents  # float64
    for ours, theirs in zip(edits[off], edits[host]):  # float32 rounding differs with the memory's alignment
        err_host, err_device = rel_max_error(theirs.latents, truth), rel_max_error(_host(ours.latents), truth)
        assert err_host < 1e-4 and err_device <= 2 * err_host + 1e-6, (err_host, err_device)
    device()


@pytest.mark.parametrize("method", ["null_text", "direct"])
def test_inversions_off_the_host(pipes, device, method):
    """An inversion on the device (null-text's iteration recorded and replayed) and a captured edit from it
    equal the host's."""
    host, off = pipes
    img = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    kw = dict(steps=STEPS, inner_steps=2, method=method, progress=False)
    ref = host.invert(img, SOURCE, use_graph=False, **kw)
    inv = off.invert(img, SOURCE, use_graph=True, **kw)
    assert rel_max_error(inv.null_embeddings, ref.null_embeddings) <= 1e-6  # float32 embeddings and Adam
    ctrl = p2p.Replace(**SELF)
    edit = host.edit([SOURCE, TARGET], ctrl, inversion=ref, capture=False, progress=False)
    _assert_same(edit, off.edit([SOURCE, TARGET], ctrl, inversion=inv, capture=True, progress=False), 1e-6)
    device()


def test_graphed_unet_off_the_host(pipes, device):
    host, off = pipes
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 77, 32, generator=g,
                                                                                  dtype=torch.float64)
    t = torch.tensor([500, 500])
    graphed = GraphedUNet(off.unet, x.to(DEVICE), t.to(DEVICE), ctx.to(DEVICE))
    for seed in (1, 2):
        x = torch.randn(x.shape, generator=g, dtype=torch.float64)
        t = torch.full((2,), 100 * seed)
        with torch.inference_mode():
            assert torch.equal(_host(graphed(x.to(DEVICE), t.to(DEVICE), ctx.to(DEVICE))), host.unet(x, t, ctx))
    device()


def test_sdxl_off_the_host(tmp_path, load_float64, device):
    """SDXL's pooled embeddings, time ids and per-step pooled nulls on the device: a null-text inversion that
    optimises the pooled null (recorded iteration), a captured edit from it, a captured recording of a cache
    and a captured re-edit from that."""
    folder = p2p.save_random_checkpoint(tmp_path / "tiny-sdxl", "tiny-sdxl", seed=1)
    host, off = load_float64(folder), _load_off_host(load_float64, folder)
    img = (torch.rand(80, 112, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    kw = dict(steps=4, inner_steps=1, optimize_pooled=True, progress=False)
    ref, inv = host.invert(img, SOURCE, use_graph=False, **kw), off.invert(img, SOURCE, use_graph=True, **kw)
    assert rel_max_error(inv.null_pooled, ref.null_pooled) <= 1e-6  # float32 embeddings and Adam
    edit = dict(local_blend=p2p.LocalBlend(["cat", "dog"]), progress=False)
    _assert_same(host.edit([SOURCE, TARGET], p2p.Replace(), inversion=ref, capture=False, **edit),
                 off.edit([SOURCE, TARGET], p2p.Replace(), inversion=inv, capture=True, **edit), 1e-6)
    source = dict(seed=4, steps=4, height=128, width=96)
    cache = off.edit_cache(SOURCE, progress=False, capture=True, **source)
    _assert_same(host.edit([SOURCE, TARGET], p2p.Replace(), capture=False, **source, **edit),
                 off.edit([SOURCE, TARGET], p2p.Replace(), cache=cache, capture=True, **edit), 1e-10)
    device()


def test_dataset_jobs_off_the_host(pipes, device, tmp_path):
    """`run_jobs` (what `p2p-engine run` and the PIE protocol call) with the pipeline on the device: a batch of
    inversions, an edit of one of them, every file written as the host's run writes it."""
    host, off = pipes
    lines = []
    for k, prompt in enumerate([SOURCE, "a red car"]):
        pixels = np.random.RandomState(k).randint(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
        job = {"image": f"{k}.png", "prompt": prompt}
        if k == 0:
            job.update(edits=[TARGET], seed=3, controller={"mode": "replace", "cross_steps": 0.6, "self_steps": 0.4})
        lines.append(json.dumps(job))
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    runs = {}
    for name, pipe in (("host", host), ("device", off)):
        summary = jobs.run_jobs(tmp_path / "jobs.jsonl", pipe, tmp_path / name, steps=STEPS, inner_steps=2,
                                batch_size=2, progress=False)
        assert (summary.ok, summary.failed) == (2, 0)
        runs[name] = {e["id"]: e for e in map(json.loads, (tmp_path / name / "index.jsonl").read_text().splitlines())}
    assert runs["host"].keys() == runs["device"].keys()
    edits = 0
    for key, h in runs["host"].items():
        d = runs["device"][key]
        a, b = (Inversion.load(tmp_path / run / e["outputs"]["inversion"]) for run, e in (("host", h), ("device", d)))
        assert rel_max_error(b.null_embeddings, a.null_embeddings) <= 1e-6  # float32 embeddings and Adam
        assert len(h["outputs"].get("edits", [])) == len(d["outputs"].get("edits", []))
        for x, y in zip(h["outputs"].get("edits", []), d["outputs"].get("edits", [])):
            ours, theirs = (np.asarray(Image.open(tmp_path / run / f), dtype=np.int16) for run, f in (("device", y),
                                                                                                   ("host", x)))
            assert np.abs(ours - theirs).max() <= 1
            edits += 1
    assert edits == 2  # the reconstruction and the edit
    device()
