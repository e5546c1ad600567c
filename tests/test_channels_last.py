"""Channels-last memory (`load(..., channels_last=True)`, the default on CUDA) changes where the UNet's
activations sit in memory, not what it computes: in float64 every path agrees with the usual layout to
rounding (a convolution in NHWC sums in another order), and the interpreted Triton kernels read the same q, k, v.
"""
import pytest
import torch

import p2p_engine as p2p
from numerics import rel_max_error

SOURCE, TARGET = "a cat riding a bicycle", "a dog riding a bicycle"
SELF = dict(self_max_queries=64)


@pytest.fixture(scope="module")
def pipes64(tiny_ckpt, load_float64):
    usual, nhwc = load_float64(tiny_ckpt), load_float64(tiny_ckpt)
    nhwc.unet.set_channels_last(True)
    return usual, nhwc


def test_load_sets_the_layout(tiny_ckpt):
    assert not p2p.load(tiny_ckpt, device="cpu").unet.channels_last  # the CPU default
    pipe = p2p.load(tiny_ckpt, device="cpu", channels_last=True)
    assert pipe.unet.channels_last and pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe.unet.set_channels_last(False)
    assert pipe.unet.conv_in.weight.is_contiguous() and not pipe.unet.channels_last


def test_forward_equals_the_usual_layout(pipes64):
    usual, nhwc = pipes64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 10, 14, generator=g, dtype=torch.float64)  # odd levels round up
    ctx = torch.randn(2, 77, usual.config.unet.cross_attention_dim, generator=g, dtype=torch.float64)
    a, b = usual.unet(x, 500, ctx), nhwc.unet(x, 500, ctx)
    assert b.is_contiguous() and b.shape == a.shape  # the caller gets the usual layout back
    assert rel_max_error(b, a) < 1e-12


@pytest.mark.parametrize("capture", [False, True])
def test_edits_equal_the_usual_layout(pipes64, capture):
    usual, nhwc = pipes64
    kw = dict(seed=1, steps=4, local_blend=p2p.LocalBlend(["cat", "dog"]), capture=capture, progress=False)
    ctrl = p2p.Replace(self_maps=True, **SELF)
    a, b = usual.edit([SOURCE, TARGET], ctrl, **kw), nhwc.edit([SOURCE, TARGET], ctrl, **kw)
    assert rel_max_error(b.latents, a.latents) < 1e-12
    for k, buf in a.attention._cross.items():
        assert rel_max_error(b.attention._cross[k], buf) < 1e-12


def test_null_text_inversion_equals_the_usual_layout(pipes64):
    """The inner loop differentiates through the convolutions in the other layout."""
    usual, nhwc = pipes64
    img = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    a, b = (p.invert(img, SOURCE, steps=3, inner_steps=2, progress=False) for p in (usual, nhwc))
    assert rel_max_error(b.latent_T, a.latent_T) < 1e-12
    assert rel_max_error(b.null_embeddings, a.null_embeddings) < 1e-9  # Adam's first steps amplify rounding


def test_triton_kernels_read_the_same_inputs(tiny_ckpt, pipes64, monkeypatch):
    """An edit on the Triton backend in float32 (interpreted on the CPU; on a GPU compiled, and the captured
    loop replayed as a CUDA graph) errs against the float64 truth no more than the usual layout does, with
    torch's GroupNorms and (on a GPU; on the CPU the interpreter is too slow for more than one forward,
    `test_fused_norms_forward`) with the fused ones. TF32 convolutions are off here: the two layouts take
    different cuDNN algorithms, whose TF32 errors differ."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    kw = dict(seed=2, steps=2 if device == "cpu" else 8, progress=False)
    ctrl = p2p.Reweight({"riding": 2.0}, prev=p2p.Replace(), self_steps=1.0, **SELF)
    truth = pipes64[0].edit([SOURCE, TARGET], ctrl, **kw).latents
    errs = []
    for cl, fused in ((False, False), (True, False), (True, True))[:3 if device == "cuda" else 2]:
        pipe = p2p.load(tiny_ckpt, device=device, backend="triton", channels_last=cl)
        pipe.unet.set_fused_norms(fused)
        out = pipe.edit([SOURCE, TARGET], ctrl, capture=device == "cuda", **kw)
        errs.append(rel_max_error(out.latents.cpu(), truth))
    print(f"float32 against float64: usual layout, channels-last, with fused GroupNorms: {errs}")
    assert errs[0] < 1e-4 and max(errs[1:]) <= 2 * errs[0] + 1e-6, errs


def test_fused_norms_forward(tiny_ckpt, pipes64, monkeypatch):
    """Every GroupNorm (+ SiLU) of a channels-last UNet as the Triton op (interpreted on the CPU): the forward
    errs against float64 no more than torch's GroupNorm in float32 does, and the op did the work."""
    import p2p_engine.kernels as kernels
    calls = []
    op = kernels.group_norm

    def counting(x, *args, **kw):
        calls.append(x.is_contiguous(memory_format=torch.channels_last))
        return op(x, *args, **kw)

    monkeypatch.setattr(kernels, "group_norm", counting)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 77, pipes64[0].config.unet.cross_attention_dim, generator=g, dtype=torch.float64)
    truth = pipes64[0].unet(x, 500, ctx)
    pipe = p2p.load(tiny_ckpt, device="cpu", channels_last=True)
    assert not pipe.unet.fused_norms  # off unless asked (FUSED_NORMS, on CUDA only)
    with torch.no_grad():
        plain = pipe.unet(x.float(), 500, ctx.float())
        pipe.unet.set_fused_norms(True)
        fused = pipe.unet(x.float(), 500, ctx.float())
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in pipe.unet.modules())
    assert len(calls) == norms and all(calls), (len(calls), norms)
    err_plain, err_fused = rel_max_error(plain, truth), rel_max_error(fused, truth)
    assert err_plain < 1e-5 and err_fused <= 2 * err_plain + 1e-7, (err_plain, err_fused)


def test_fused_norms_leave_gradients_to_torch(tiny_ckpt):
    """Where autograd needs the GroupNorm (null-text inversion's steps) the fused module takes torch's path."""
    norm = p2p.load(tiny_ckpt, device="cpu").unet.conv_norm_out
    norm.fused = True
    x = torch.randn(2, norm.num_channels, 4, 4, requires_grad=True)
    y = norm(x, silu=True)
    y.sum().backward()
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias,
                                                                   norm.eps))
    assert torch.equal(y, want) and x.grad is not None
