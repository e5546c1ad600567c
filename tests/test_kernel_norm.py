"""GroupNorm (+ SiLU) on channels-last activations (Triton) against torch's.

Truth is torch's GroupNorm in float64 on the inputs the kernel sees; the kernel must come within twice torch's
own error in the input dtype (its GroupNorm, then its SiLU) plus a hair.
"""
import torch

from p2p_engine.attention import triton_interpreter  # noqa: E402

triton_interpreter()  # on a GPU the kernels are compiled, not interpreted

import pytest  # noqa: E402

from p2p_engine.kernels import group_norm, group_norm_reference  # noqa: E402
from sm90 import compile_in_child  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, C, H, W, dtype, device, seed, offset=0.0, channels_last=True):
    gen = torch.Generator().manual_seed(seed)
    # per-channel offsets and scales, as activations have; `offset` shifts every value far from zero
    x = torch.randn(B, C, H, W, generator=gen) * (1 + torch.rand(C, 1, 1, generator=gen)) + \
        torch.randn(C, 1, 1, generator=gen) + offset
    weight, bias = 1 + 0.5 * torch.randn(C, generator=gen), 0.5 * torch.randn(C, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)


def check(B, C, H, W, groups, dtype, silu, *, device=DEVICE, channels_last=True, offset=0.0, seed=0,
          err_torch=None, view=None):
    """`err_torch`, when given, stands in for torch's own error as the bound's base; `view` (x -> a view of
    it) picks what the op is given."""
    x, weight, bias = inputs(B, C, H, W, dtype, device, seed, offset, channels_last)
    if view is not None:
        x = view(x)
    eps = 1e-5
    truth = group_norm_reference(x.double(), weight.double(), bias.double(), groups, eps, silu)
    if err_torch is None:
        err_torch = (group_norm_reference(x, weight, bias, groups, eps, silu).double() - truth).abs().max().item()
    out = group_norm(x, weight, bias, groups, eps, silu)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
        memory_format=torch.channels_last)  # channels-last in, channels-last out
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * truth.abs().max().item(), f"kernel {err:.3g} vs torch {err_torch:.3g}"


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("B,C,H,W,groups", [
    (2, 40, 9, 9, 4),  # 10 channels a group across channel blocks; 81 positions: 3 chunks, the last partial
    (1, 16, 3, 5, 16),  # a channel a group; one partial chunk
    (3, 48, 6, 6, 2),  # 24 channels a group
])
def test_fp32(B, C, H, W, groups, silu):
    check(B, C, H, W, groups, torch.float32, silu)


def test_fp16_and_the_usual_layout():
    check(2, 40, 9, 9, 4, torch.float16, True, seed=1)
    check(2, 40, 9, 9, 4, torch.float32, True, channels_last=False, seed=2)
    check(2, 40, 1, 9, 4, torch.float32, True, channels_last=False, seed=3)  # one row
    # one column sliced out of NCHW: its positions step by the row stride, 9, not the column stride
    check(2, 40, 9, 9, 4, torch.float32, True, channels_last=False, seed=4, view=lambda x: x[..., 2:3])


def test_values_far_from_zero():
    """The variance is merged from deviations (Chan et al.), not E[x^2] - E[x]^2, which in fp32 loses every
    digit of a variance of ~1 about a mean of 3000 (torch's CPU GroupNorm errs by ~15 here, so its error is no
    bound). Exact statistics leave the apply step's rounding, x * a + b at the scale of 3000 * |a| (a ~ 1.5):
    a few ulps of 4500 in fp32, 5e-4 each; 4e-3 allows eight."""
    check(2, 40, 9, 9, 4, torch.float32, False, offset=3000.0, seed=3, err_torch=2e-3)


def test_errors_name_the_fix():
    x, w, b = inputs(1, 8, 4, 4, torch.float32, DEVICE, 0)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        group_norm(x, w, b, 3, 1e-5)
    with pytest.raises(ValueError, match=r"weight and bias must be \(8,\)"):
        group_norm(x, w[:4], b, 2, 1e-5)
    with pytest.raises(TypeError, match="got torch.float64"):
        group_norm(x.double(), w.double(), b.double(), 2, 1e-5)
    with pytest.raises(RuntimeError, match="no backward"):
        group_norm(x.requires_grad_(), w, b, 2, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("C,HW", [(320, 64), (640, 32), (1280, 16), (2560, 8), (1920, 16), (960, 32)])
def test_cuda_sd_shapes(C, HW, dtype):
    check(2, C, HW, HW, 32, dtype, True)
    check(2, C, HW, HW, 32, dtype, False, seed=1)


SM90_COMPILE = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
gn = importlib.import_module("p2p_engine.kernels.group_norm")

SM90_SHARED = 232448  # as tests/sm90.py
CHUNK, BP, BC = gn._config()
for dt in ("fp16", "bf16", "fp32"):
    sig = {"X": f"*{dt}", "MEAN": "*fp32", "M2": "*fp32"}
    sig |= {n: "i32" for n in ("sx_b", "sx_c", "sx_p", "HW", "C", "S")}
    c = dict(CHUNK=CHUNK, BLOCK_P=BP, BLOCK_C=BC)
    k = triton.compile(ASTSource(gn._gn_partials, sig | {n: "constexpr" for n in c}, c),
                       target=GPUTarget("cuda", 90, 32))
    assert k.metadata.shared <= SM90_SHARED, ("partials", dt, k.metadata.shared)
    for silu in (False, True):
        sig = {"X": f"*{dt}", "Y": f"*{dt}", "W": f"*{dt}", "BIAS": f"*{dt}", "STATS": "*fp32"}
        sig |= {n: "i32" for n in ("sx_b", "sx_c", "sx_p", "sy_b", "sy_c", "sy_p", "HW", "C", "G", "CPG")}
        c = dict(BLOCK_P=BP, BLOCK_C=BC, SILU=silu)
        k = triton.compile(ASTSource(gn._gn_apply, sig | {n: "constexpr" for n in c}, c),
                           target=GPUTarget("cuda", 90, 32))
        assert k.metadata.shared <= SM90_SHARED, ("apply", dt, silu, k.metadata.shared)
for BG, BJ in ((32, 16), (32, 128)):  # SD's 32 groups of 10 .. 80 channels
    sig = {"MEAN": "*fp32", "M2": "*fp32", "STATS": "*fp32"} | {n: "i32" for n in ("HW", "C", "S", "G", "CPG")}
    sig |= {"total": "fp32", "eps": "fp32"}
    c = dict(CHUNK=CHUNK, BLOCK_G=BG, BLOCK_J=BJ)
    k = triton.compile(ASTSource(gn._gn_finish, sig | {n: "constexpr" for n in c}, c),
                       target=GPUTarget("cuda", 90, 32))
    assert k.metadata.shared <= SM90_SHARED, ("finish", BG, BJ, k.metadata.shared)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests compile and run the kernels")
def test_gpu_configs_compile_for_sm90():
    """The GPU configs compile for an H100 (sm_90) within its shared memory, no GPU needed."""
    compile_in_child(SM90_COMPILE)
