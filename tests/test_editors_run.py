"""MasaCtrl and Plug-and-Play through every way the engine runs an edit: which layers they choose on each
family's UNet, the captured loop (equal to the eager one bit for bit, and a kept loop refilled by later edits),
the Triton backend under the interpreter, the refusals (edit caches, bad arguments) and the dict form jobs use.
Their numbers against the references are tests/test_editors.py's.
"""
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import captured, config, controllers, editors, graphs
from p2p_engine.plan import ResnetSite
from p2p_engine.unet import UNet
from numerics import rel_max_error

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"
STEPS = 6


def _unet(preset) -> UNet:
    with torch.device("meta"):
        return UNet(config.PRESETS[preset].unet)


def _selfs(unet, blocks: dict) -> set:
    """The self layers of {"up_blocks[i]": [modules]}, every transformer block of each module."""
    out = set()
    for block, modules in blocks.items():
        b = unet.up_blocks[int(block[len("up_blocks["):-1])]
        for m in modules:
            out |= {t.attn1.layer.index for t in b.attentions[m].transformer_blocks}
    return out


@pytest.mark.parametrize("preset", ["sd15", "tiny-sd"])
def test_sd1_layers_are_the_references(preset):
    """On SD 1.x's layout: MasaCtrl's default is start_layer 10 of 16 (up_blocks[2] and [3]); Plug-and-Play's
    self layers are up_blocks[1].attentions[1, 2] and up_blocks[2, 3].attentions[0 .. 2], its feature site
    up_blocks[1].resnets[1]."""
    unet = _unet(preset)
    layers = unet.attn_layers
    assert len([layer for layer in layers if not layer.is_cross]) == 16
    default = editors.masactrl_layers(p2p.MasaCtrl(), layers)
    assert default == editors.masactrl_layers(p2p.MasaCtrl(start_layer=10), layers)
    assert default == _selfs(unet, {"up_blocks[2]": [0, 1, 2], "up_blocks[3]": [0, 1, 2]})
    assert editors.masactrl_layers(p2p.MasaCtrl(start_layer=9), layers) == default | _selfs(unet, {"up_blocks[1]": [2]})
    self_layers, sites = editors.pnp_layers(layers)
    assert self_layers == _selfs(unet, {"up_blocks[1]": [1, 2], "up_blocks[2]": [0, 1, 2], "up_blocks[3]": [0, 1, 2]})
    assert sites == {ResnetSite(2, 1)} and unet.resnet_sites[1][1] == ResnetSite(2, 1)
    assert [s for block in unet.resnet_sites for s in block].count(ResnetSite(2, 1)) == 1


@pytest.mark.parametrize("preset", ["sdxl", "tiny-sdxl"])
def test_sdxl_layers_follow_the_same_rule(preset):
    """SDXL has no attention at the latent's own size: MasaCtrl's default is the decoder at half of it
    (up_blocks[1], blocks 64 .. 69 of 70 on SDXL base, which MasaCtrl's SDXL script tries as start_layer 64);
    Plug-and-Play's latent/4 level is up_blocks[0]: its attentions[1, 2] (every transformer block of each) and all
    of up_blocks[1], the feature site up_blocks[0].resnets[1]."""
    unet = _unet(preset)
    layers = unet.attn_layers
    default = editors.masactrl_layers(p2p.MasaCtrl(), layers)
    assert default == _selfs(unet, {"up_blocks[1]": list(range(len(unet.up_blocks[1].attentions)))})
    if preset == "sdxl":
        assert len([layer for layer in layers if not layer.is_cross]) == 70
        assert default == editors.masactrl_layers(p2p.MasaCtrl(start_layer=64), layers)
    self_layers, sites = editors.pnp_layers(layers)
    n0 = len(unet.up_blocks[0].attentions)
    assert self_layers == _selfs(unet, {"up_blocks[0]": list(range(1, n0)),
                                        "up_blocks[1]": list(range(len(unet.up_blocks[1].attentions)))})
    assert sites == {ResnetSite(2, 1)} and unet.resnet_sites[0][1] == ResnetSite(2, 1)


def test_sdxl_edits_keep_the_source_and_move_the_target(tmp_path_factory, load_float64):
    """On the SDXL architecture (two text encoders, pooled embeddings: Plug-and-Play's negative prompt carries
    its pooled vector), each editor leaves the source row as the uncontrolled edit makes it (to float64 rounding:
    its injected layers attend over gathered rows) and moves the target."""
    pipe = load_float64(p2p.save_random_checkpoint(tmp_path_factory.mktemp("xl") / "ckpt", "tiny-sdxl", seed=0))
    kw = dict(steps=3, seed=0, progress=False, decode_images=False)
    plain = pipe.edit([SOURCE, TARGET], None, **kw).latents
    for ctrl in (p2p.MasaCtrl(start_step=1), p2p.PlugAndPlay()):
        got = pipe.edit([SOURCE, TARGET], ctrl, **kw).latents
        assert rel_max_error(got[0], plain[0]) < 1e-12
        assert rel_max_error(got[1], plain[1]) > 1e-3


# -- the captured loop ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe64(tiny_ckpt, load_float64):
    return load_float64(tiny_ckpt)


@pytest.fixture(scope="module")
def image():
    return (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "direct"])
def test_every_inversion_method(pipe64, image, method):
    """Both editors edit from every inversion method: the source row is the uncontrolled edit's (pinned for a
    direct inversion; for Plug-and-Play from a DDIM inversion, the guidance-1 reconstruction its reference feeds
    its branch) and the target moves."""
    inv = pipe64.invert(image, SOURCE, steps=STEPS, inner_steps=2, method=method, progress=False)
    kw = dict(inversion=inv, progress=False, decode_images=False)
    plain = pipe64.edit([SOURCE, TARGET], None, **kw).latents
    for ctrl in (p2p.MasaCtrl(start_step=1), p2p.PlugAndPlay()):
        got = pipe64.edit([SOURCE, TARGET], ctrl, **kw).latents
        source = plain[0]
        if isinstance(ctrl, p2p.PlugAndPlay) and method == "ddim":
            source = pipe64.edit([SOURCE], None, guidance=1.0, **kw).latents[0]
            assert rel_max_error(source, plain[0]) > 1e-3  # not the guided source
        assert rel_max_error(got[0], source) < 1e-12, (type(ctrl).__name__, method)
        assert rel_max_error(got[1], plain[1]) > 1e-3


CASES = {
    "masactrl from a seed, self maps": (p2p.MasaCtrl(start_step=2, self_maps=True), None),
    "masactrl from a direct inversion": (p2p.MasaCtrl(start_step=1, start_layer=3), "direct"),
    "pnp from a ddim inversion (source at guidance 1, negative prompt)": (p2p.PlugAndPlay(self_steps=(0.2, 0.7)),
                                                                          "ddim"),
    "pnp from a null-text inversion, the prompt's branch": (
        p2p.PlugAndPlay(feature_steps=0.5, branch="prompt", negative_prompt=None), "null_text"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_captured_loop_equals_eager(pipe64, image, case, capture_way):
    """Every window is a device flag per call; a closed one leaves each row its own q, k, v and features exactly
    (where(0, taken, own) is own). The static step equals the eager one to float64 rounding: a closed self window
    is SDPA with an explicit scale (or, storing self maps, the plan's store path) where the eager call is plain
    SDPA, as for Prompt-to-Prompt's captured loop (tests/test_captured.py)."""
    controller, method = CASES[case]
    kw = dict(seed=3, steps=STEPS) if method is None else dict(
        inversion=pipe64.invert(image, SOURCE, steps=STEPS, inner_steps=2, method=method, progress=False))
    eager = pipe64.edit([SOURCE, TARGET], controller, capture=False, progress=False, **kw)
    static = pipe64.edit([SOURCE, TARGET], controller, capture=True, progress=False, **kw)
    assert static.loop == ("graph" if graphs.can_capture(pipe64.device) else "static")
    assert rel_max_error(static.latents, eager.latents) <= 1e-12
    for maps in ("_cross", "_self"):
        ours, theirs = getattr(static.attention, maps), getattr(eager.attention, maps)
        assert ours.keys() == theirs.keys() and all(rel_max_error(ours[k], v) <= 1e-12 for k, v in theirs.items())
    plain = pipe64.edit([SOURCE, TARGET], None, capture=False, progress=False, **kw)
    assert rel_max_error(eager.latents[1], plain.latents[1]) > 1e-3  # the editor did something
    capture_way()
    captured.forget(pipe64)


def test_a_kept_loop_serves_later_editor_edits(pipe64, image, capture_way):
    """A second edit with other windows, another negative prompt and other prompts refills the first's loop (its
    windows and texts are feeds) and equals its own eager run; another branch (a rows table the recording bakes
    in) gets its own loop."""
    inv = pipe64.invert(image, SOURCE, steps=STEPS, method="ddim", progress=False)

    def run(ctrl, target, capture=True):
        return pipe64.edit([SOURCE, target], ctrl, inversion=inv, capture=capture, progress=False)

    captured.forget(pipe64)
    run(p2p.PlugAndPlay(), TARGET)
    [loop] = [k for _, k, _ in captured._kept_by_pipe[pipe64]]
    second = (p2p.PlugAndPlay(feature_steps=0.3, self_steps=0.9, negative_prompt="blurry"), "a fox riding a bicycle")
    got = run(*second)
    assert [k for _, k, _ in captured._kept_by_pipe[pipe64]] == [loop]
    assert rel_max_error(got.latents, run(*second, capture=False).latents) <= 1e-12
    run(p2p.PlugAndPlay(branch="prompt"), TARGET)
    assert len(captured._kept_by_pipe[pipe64]) == 2
    captured.forget(pipe64)
    masa = [run(p2p.MasaCtrl(start_step=s), TARGET) for s in (1, 4)]
    assert len(captured._kept_by_pipe[pipe64]) == 1
    assert rel_max_error(masa[1].latents, run(p2p.MasaCtrl(start_step=4), TARGET, capture=False).latents) <= 1e-12
    assert rel_max_error(masa[0].latents, masa[1].latents) > 1e-3  # the refill took the second start step
    captured.forget(pipe64)
    capture_way()


def test_edit_batch_equals_each_edit_alone(pipe64, image, capture_way):
    """MasaCtrl and Plug-and-Play requests in one `edit_batch` beside a Prompt-to-Prompt one (generated and
    inverted sources, Plug-and-Play from a DDIM inversion with its source at guidance 1 and its negative prompt,
    three prompts, self maps): each output equals its own `pipe.edit` within float64 rounding, in the eager loop
    and on static state. The feature seam takes each block's own plan (`BlockPlans`)."""
    R = p2p.EditRequest
    ddim = pipe64.invert(image, SOURCE, steps=STEPS, method="ddim", progress=False)
    direct = pipe64.invert(image, "", steps=STEPS, method="direct", progress=False)
    fox = "a fox riding a bicycle"
    requests = [R([SOURCE, TARGET], p2p.PlugAndPlay(self_steps=(0.2, 0.7)), inversion=ddim),
                R([SOURCE, TARGET, fox], p2p.MasaCtrl(start_step=2, self_maps=True), seed=1),
                R([SOURCE, TARGET], p2p.Replace(), seed=2),
                R(["", TARGET], p2p.MasaCtrl(start_step=1), inversion=direct),
                R([SOURCE, fox], p2p.PlugAndPlay(feature_steps=0.5, branch="prompt", negative_prompt="blurry"), seed=3)]
    for capture in (False, True):
        outs = pipe64.edit_batch(requests, steps=STEPS, capture=capture, progress=False)
        for r, out in zip(requests, outs):
            kw = dict(inversion=r.inversion) if r.inversion is not None else dict(seed=r.seed, steps=STEPS)
            alone = pipe64.edit(r.prompts, r.controller, capture=False, progress=False, **kw)
            assert rel_max_error(out.latents, alone.latents) <= 1e-10, (type(r.controller).__name__, capture)
            for maps in ("_cross", "_self"):
                ours, theirs = getattr(out.attention, maps), getattr(alone.attention, maps)
                assert ours.keys() == theirs.keys()
                assert all(rel_max_error(ours[k], v) <= 1e-10 for k, v in theirs.items())
    captured.forget(pipe64)
    capture_way()


# -- the Triton backend: the fused self-attention kernel with the source's K, V (MasaCtrl) or Q, K (PnP) ----

@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is off where CUDA is present")
@pytest.mark.parametrize("controller", [p2p.MasaCtrl(start_step=0, start_layer=3),
                                        p2p.PlugAndPlay(feature_steps=1.0, self_steps=1.0)], ids=["masactrl", "pnp"])
def test_triton_backend_matches_torch(tiny_ckpt, tiny_pipe, controller):
    tpipe = p2p.load(tiny_ckpt, device="cpu", dtype=torch.float32, backend="triton")
    size = 8 * tiny_pipe.config.vae.downscale  # 8 x 8 latents: few programs for the interpreter
    kw = dict(steps=2, seed=0, height=size, width=size, progress=False, decode_images=False)
    got = tpipe.edit([SOURCE, TARGET], controller, **kw).latents
    want = tiny_pipe.edit([SOURCE, TARGET], controller, **kw).latents
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = tiny_pipe.edit([SOURCE, TARGET], None, **kw).latents
    assert rel_max_error(got[1], plain[1]) > 1e-3


# -- refusals and the dict form --------------------------------------------------------------------------------

def test_re_edits_from_a_cache_are_refused_naming_why(tiny_pipe):
    cache = tiny_pipe.edit_cache(SOURCE, steps=3, progress=False)
    for ctrl in (p2p.MasaCtrl(), p2p.PlugAndPlay()):
        with pytest.raises(ValueError, match="both guidance halves.*without cache="):
            tiny_pipe.edit([SOURCE, TARGET], ctrl, cache=cache, progress=False)


@pytest.mark.parametrize("ctrl,error,match", [
    (p2p.MasaCtrl(start_step=-1), ValueError, "start_step must be a UNet call number"),
    (p2p.MasaCtrl(start_layer=7), ValueError, r"start_layer = 7: a transformer block number in \[0, 7\)"),
    (p2p.MasaCtrl(start_layer=2.0), ValueError, "start_layer"),
    (p2p.PlugAndPlay(branch="uncond"), ValueError, "branch must be one of"),
    (p2p.PlugAndPlay(self_steps=1.5), ValueError, "self_steps = 1.5"),
    (p2p.PlugAndPlay(feature_steps="most"), TypeError, "feature_steps must be a fraction"),
    (p2p.PlugAndPlay(negative_prompt=3), TypeError, "negative_prompt must be a string"),
    (p2p.MasaCtrl(self_maps="yes"), TypeError, "self_maps must be True or False"),
])
def test_bad_arguments_name_what_to_fix(tiny_pipe, ctrl, error, match):
    with pytest.raises(error, match=match):
        tiny_pipe.edit([SOURCE, TARGET], ctrl, steps=2, progress=False)


def test_one_prompt_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="a source and at least one target"):
        tiny_pipe.edit([SOURCE], p2p.MasaCtrl(), steps=2, progress=False)


def test_from_spec_builds_the_editors():
    assert controllers.from_spec({"mode": "masactrl", "start_step": 3}) == p2p.MasaCtrl(start_step=3)
    assert controllers.from_spec({"mode": "pnp", "self_steps": 0.4, "branch": "prompt"}) == p2p.PlugAndPlay(
        self_steps=0.4, branch="prompt")
    with pytest.raises(ValueError, match=r"unknown masactrl controller keys \['cross_steps'\]"):
        controllers.from_spec({"mode": "masactrl", "cross_steps": 0.5})
    with pytest.raises(ValueError, match="unknown pnp controller keys"):
        controllers.from_spec({"mode": "pnp", "start_step": 1})
