"""Our UNet, VAE and attention seam against diffusers' modules and a float64 softmax.

`test_loading.py` compares whole loaded checkpoints; here the modules themselves: the full SD 1.5 and 2.1
parameter layouts (built on the meta device, so no memory), non-square latents, the attention-layer
numbering the control plans rely on, and the seam's plain path.
"""
import pytest
import torch
import torch.nn.functional as F

from p2p_engine import config
from p2p_engine.attention import attention
from p2p_engine.unet import UNet
from p2p_engine.vae import VAE


def _diffusers_unet(cfg: config.UNetConfig):
    from diffusers import UNet2DConditionModel

    d = cfg.to_diffusers()
    d.pop("_class_name", None)
    return UNet2DConditionModel(**d)


def _diffusers_vae(cfg: config.VAEConfig):
    from diffusers import AutoencoderKL

    d = cfg.to_diffusers()
    d.pop("_class_name", None)
    return AutoencoderKL(**d)


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_layouts_equal_diffusers(preset):
    """Every parameter name and shape of SD 1.5 / 2.1 as diffusers has them (meta device: no memory)."""
    cfg = config.PRESETS[preset]
    with torch.device("meta"):
        ours_u, ref_u = UNet(cfg.unet), _diffusers_unet(cfg.unet)
        ours_v, ref_v = VAE(cfg.vae), _diffusers_vae(cfg.vae)
    assert _shapes(ours_u) == _shapes(ref_u)
    assert _shapes(ours_v) == _shapes(ref_v)
    if preset == "sd15":  # the published SD 1.5 UNet size
        assert sum(p.numel() for p in ours_u.parameters()) == 859_520_964


def test_attention_layers_numbered_in_call_order():
    """Control plans index layers by `AttnLayer.index`: it must follow forward order, self before cross."""
    cfg = config.PRESETS["sd15"].unet
    with torch.device("meta"):
        unet = UNet(cfg)
    layers = unet.attn_layers
    assert [l.index for l in layers] == list(range(32))  # 16 transformer blocks x (self, cross)
    assert [l.is_cross for l in layers] == [False, True] * 16
    places = [l.place for l in layers[::2]]
    assert places == ["down"] * 6 + ["mid"] + ["up"] * 9
    assert [l.level for l in layers[::2]] == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    # and a real forward calls them in exactly that order
    small = UNet(config.PRESETS["tiny"].unet)
    seen = []
    for m in small.modules():
        if getattr(m, "layer", None) is not None:
            m.register_forward_pre_hook(lambda mod, args: seen.append(mod.layer.index))
    with torch.no_grad():
        small(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, small.cfg.cross_attention_dim))
    assert seen == list(range(len(small.attn_layers))) and len(seen) > 0


def _truth_and_drift(ref, run):
    """(float64 output, torch's own float32 error against it) for diffusers module `ref`."""
    with torch.no_grad():
        gold = run(ref.double(), torch.float64)
        base = run(ref.float(), torch.float32)
    return gold, ((base.double() - gold).abs().max() / gold.abs().max()).item()


@pytest.mark.parametrize("preset", ["tiny", "tiny-v"])
def test_unet_non_square_latent_matches_diffusers(preset):
    """13 x 11 latents: odd at every level, so each upsampling must take the skip's size, not 2x."""
    cfg = config.PRESETS[preset].unet
    torch.manual_seed(0)
    ref = _diffusers_unet(cfg).eval()
    for p in ref.parameters():  # no zero-initialised layer may hide a wrong path behind it
        p.data.normal_(0, 0.2)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 13, 11, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 777])
    gold, drift = _truth_and_drift(ref, lambda m, dt: m(x.to(dt), t, ctx.to(dt)).sample)
    with torch.no_grad():
        got = ours(x.float(), t, ctx.float())
    assert got.shape == (2, 4, 13, 11)
    err = ((got.double() - gold).abs().max() / gold.abs().max()).item()
    assert err <= 2 * drift + torch.finfo(torch.float32).eps, (err, drift)


def test_vae_non_square_matches_diffusers():
    cfg = config.PRESETS["tiny"].vae
    torch.manual_seed(0)
    ref = _diffusers_vae(cfg).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.2)
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, 40, 24, generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 4, 5, 3, generator=g, dtype=torch.float64)
    f = 2 ** (len(cfg.block_out_channels) - 1)
    for run, ours_run, shape in [
        (lambda m, dt: m.encode(img.to(dt)).latent_dist.mean, lambda: ours.encode(img.float()),
         (1, 4, 40 // f, 24 // f)),
        (lambda m, dt: m.decode(z.to(dt)).sample, lambda: ours.decode(z.float()), (1, 3, 5 * f, 3 * f)),
    ]:
        gold, drift = _truth_and_drift(ref, run)
        with torch.no_grad():
            got = ours_run()
        assert got.shape == shape
        err = ((got.double() - gold).abs().max() / gold.abs().max()).item()
        assert err <= 2 * drift + torch.finfo(torch.float32).eps, (err, drift)


# -- the seam's plain path

def _softmax_attention64(q, k, v):
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    return p @ v.double()


@pytest.mark.parametrize("n,m,d", [(37, 77, 40), (64, 64, 8), (5, 3, 160)])
def test_seam_plain_matches_float64_softmax(n, m, d):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, s, d, generator=g) for s in (n, m, m))
    gold = _softmax_attention64(q, k, v)
    explicit = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, -1) @ v  # torch's own fp32 drift
    drift = ((explicit.double() - gold).abs().max() / gold.abs().max()).item()
    got = attention(q, k, v, None, is_cross=m == 77, backend="torch")
    err = ((got.double() - gold).abs().max() / gold.abs().max()).item()
    assert err <= 2 * drift + torch.finfo(torch.float32).eps, (err, drift)


def test_seam_upcast_computes_half_inputs_in_float32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=g).half() * 4 for _ in range(3))
    up = attention(q, k, v, None, is_cross=False, backend="torch", upcast=True)
    assert up.dtype == torch.float16
    assert torch.equal(up, F.scaled_dot_product_attention(q.float(), k.float(), v.float()).half())


def test_seam_differentiated_calls_use_sdpa_on_every_backend():
    """Null-text inversion differentiates the uncontrolled UNet: backend "triton" must route it to SDPA
    (the kernels have no backward), with the same values and gradients as the torch backend."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    grads = []
    outs = []
    for backend in ("torch", "triton"):
        out = attention(q, k, v, None, is_cross=False, backend=backend)
        (gq,) = torch.autograd.grad(out.square().sum(), q)
        outs.append(out.detach())
        grads.append(gq)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_interpreter_releases_that_cannot_run_are_named():
    """Triton 3.6 (torch 2.11's) interprets a loop bound as int() of a 1-element array, which NumPy 2.4 refuses:
    that pair is named with what to install, instead of an InterpreterError from inside a kernel."""
    import numpy
    import triton

    from p2p_engine.attention import interpreter_problem, triton_interpreter
    msg = interpreter_problem("3.6.0", "2.4.6")
    assert "numpy<2.4" in msg and "triton>=3.7" in msg and "backend='torch'" in msg
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.0", "2.4.0") is None and interpreter_problem("3.10.1", "2.10.0") is None
    assert interpreter_problem("3.5.1+git0", "2.5.0.dev0") and interpreter_problem("2.3.1", "2.4.0rc1")
    if triton_interpreter():  # these tests' kernels do run interpreted
        assert interpreter_problem(triton.__version__, numpy.__version__) is None


def test_seam_dispatch_on_the_triton_backend(monkeypatch):
    """What backend "triton" runs, as measured fastest on an H200: SDPA without control, the cross kernel
    with control, the self kernel for an injection up to SELF_KERNEL_MAX_N queries and SDPA on the source's
    q, k above it; each route gives the torch backend's values."""
    import p2p_engine.attention as seam
    from p2p_engine.plan import CrossPlan, SelfPlan

    kern = seam.load_kernels()
    calls = []
    for name in ("cross_attention", "self_attention", "self_attention_reference"):
        real = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(seam, "SELF_KERNEL_MAX_N", 16)
    g = torch.Generator().manual_seed(0)

    def both(q, k, v, plan, is_cross):
        calls.clear()
        got = attention(q, k, v, plan, is_cross=is_cross, backend="triton")
        route = list(calls)
        want = attention(q, k, v, plan, is_cross=is_cross, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return route

    q = torch.randn(4, 2, 16, 8, generator=g)
    t = torch.randn(4, 2, 5, 8, generator=g)
    assert both(q, q, q, None, False) == []
    assert both(q, q, q, SelfPlan(num_prompts=2), False) == []  # a plan that does nothing
    assert both(q, q, q, SelfPlan(num_prompts=2, inject=True), False) == ["self_attention"]
    q_big = torch.randn(4, 2, 17, 8, generator=g)
    assert both(q_big, q_big, q_big, SelfPlan(num_prompts=2, inject=True), False) == ["self_attention_reference"]
    assert both(q, t, t, CrossPlan(num_prompts=2, store=torch.zeros(2, 16, 5)), True) == ["cross_attention"]


def test_seam_rejects_unknown_backend():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, q, q, None, is_cross=False, backend="cuda")


def test_attention_probabilities_are_what_forward_applies():
    """Attention.probabilities (the toy analysis's and attention loss's maps): with one head, p @ v through
    the output projection is the layer's own forward (which runs SDPA); with several, the head average of
    per-head softmaxes computed here directly."""
    from p2p_engine.unet import Attention

    torch.manual_seed(0)
    x, ctx = torch.randn(2, 12, 16), torch.randn(2, 7, 8)
    one = Attention(16, 1, 8, None, False)
    p = one.probabilities(x, ctx)
    assert p.shape == (2, 12, 7)
    torch.testing.assert_close(one.to_out[0](p @ one.to_v(ctx)), one(x, ctx), rtol=1e-5, atol=1e-6)
    four = Attention(16, 4, None, None, False)
    q = four.to_q(x).view(2, 12, 4, 4).transpose(1, 2)
    k = four.to_k(x).view(2, 12, 4, 4).transpose(1, 2)
    want = torch.stack([torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2) / 2.0, -1) for h in range(4)]).mean(0)
    torch.testing.assert_close(four.probabilities(x), want)


def test_model_inputs_that_cannot_enter_are_named(tiny_pipe):
    """pipe.unet and pipe.vae are public (API.md): a wrong dtype, channel count, rank, batch or timestep shape
    is refused with the fix named, before any layer sees it; right inputs still run (and under autocast a
    dtype mismatch is autocast's to resolve)."""
    unet, vae = tiny_pipe.unet, tiny_pipe.vae
    c, d = unet.cfg.in_channels, unet.cfg.cross_attention_dim
    x, ctx = torch.randn(2, c, 8, 8), torch.randn(2, 5, d)
    with pytest.raises(ValueError, match=r"sample is torch.float16 but the weights are torch.float32: "
                                         r"pass sample.to\(torch.float32\)"):
        unet(x.half(), 10, ctx)
    with pytest.raises(ValueError, match=r"context must be \(B, T, D\) with %d on dimension 2, got \(2, 5, 7\)" % d):
        unet(x, 10, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"sample must be \(B, C, h, w\) with %d on dimension 1" % c):
        unet(torch.randn(2, c + 1, 8, 8), 10, ctx)
    with pytest.raises(ValueError, match="context has 1 rows but sample has 2"):
        unet(x, 10, ctx[:1])
    with pytest.raises(ValueError, match=r"timestep must be a scalar or \(2,\)"):
        unet(x, torch.tensor([10, 20, 30]), ctx)
    with pytest.raises(TypeError, match="sample must be a tensor"):
        unet(x.numpy(), 10, ctx)
    assert unet(x, torch.tensor([10, 20]), ctx).shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet(x.bfloat16(), 10, ctx).shape == x.shape
    with pytest.raises(ValueError, match=r"sample is on meta but the weights are on cpu: pass sample.to\('cpu'\)"):
        unet(x.to("meta"), 10, ctx)
    with pytest.raises(ValueError, match=r"vae.encode: x must be \(B, 3, H, W\) with 3 on dimension 1, got \(1, 4, 1"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"vae.decode: z is torch.float64 but the weights are torch.float32"):
        vae.decode(torch.randn(1, vae.cfg.latent_channels, 4, 4, dtype=torch.float64))
    assert vae.decode(torch.randn(1, vae.cfg.latent_channels, 4, 4)).shape == (1, 3, 32, 32)
