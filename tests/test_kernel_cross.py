"""Fused cross attention (Triton) against its pure-torch reference.

Truth is the reference run in float64 on the very inputs the kernel sees
(already rounded to the test dtype); the kernel must come within twice the
torch's own error in that dtype (the reference for fp32; for half types also
the plan's formulas run in that dtype, p rounded as SDPA rounds it), plus a
hair. The reference is itself checked against a per-target re-statement.
"""
import os

import torch

from p2p_engine.attention import triton_interpreter  # noqa: E402

triton_interpreter()  # on a GPU the kernels are compiled, not interpreted

import pytest  # noqa: E402

from p2p_engine.kernels import cross_attention, cross_attention_reference  # noqa: E402
from p2p_engine.plan import CrossPlan, inject_cross  # noqa: E402
from numerics import table_at  # noqa: E402
from sm90 import compile_in_child  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
MODES = ["none", "store", "replace", "refine", "reweight", "reweight_refine", "gate", "all"]


def make_plan_parts(mode: str, P: int, T: int, gen: torch.Generator) -> dict:
    """Plan tensors (fp32, CPU) for one control mode, as the controllers would build them."""
    J = P - 1
    parts = {}
    if mode in ("store", "all"):
        parts["store"] = True
    if mode in ("replace", "gate"):
        # A word mapper: non-negative rows that may split a word over several tokens.
        m = torch.rand(J, T, T, generator=gen) * (torch.rand(J, T, T, generator=gen) < 0.1)
        parts["mapper"] = m + torch.eye(T)
    if mode in ("refine", "reweight_refine", "all"):
        idx = torch.randint(0, T, (J, T), generator=gen)
        onehot = torch.zeros(J, T, T)
        onehot.scatter_(1, idx[:, None, :], 1.0)  # column t holds a 1 at row idx[t]
        onehot[:, :, T // 2] = 0.0  # an unaligned token
        parts["mapper"] = onehot
        parts["mix"] = (torch.rand(J, T, generator=gen) > 0.3).float()
    if mode == "reweight":
        parts["mapper"] = torch.eye(T).expand(J, T, T).clone()
    if mode in ("reweight", "reweight_refine", "all"):
        parts["equalizer"] = torch.where(torch.rand(J, T, generator=gen) < 0.2, 3.0, 1.0)
    if mode in ("gate", "all"):
        parts["gate"] = (torch.rand(J, T, generator=gen) < 0.6).float()
    return parts


def build_plan(parts: dict | None, P: int, N: int, T: int, device, store_dtype) -> CrossPlan | None:
    if parts is None:
        return None
    kw = {k: v.to(device) for k, v in parts.items() if k != "store"}
    store = torch.zeros(P, N, T, dtype=store_dtype, device=device) if "store" in parts else None
    return CrossPlan(num_prompts=P, store=store, **kw)


def restated(q, k, v, parts: dict | None, scale: float):
    """The plan's formulas written out per target, all in q's dtype (as a diffusers controller
    would run them); returns out (B, H, N, D) and the conditional rows' mean map (P, N, T)."""
    P = q.shape[0] // 2
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, H, N, T)
    cond_mean = p[P:].mean(dim=1)
    if parts is not None and "mapper" in parts:
        T = k.shape[2]
        ones = torch.ones(T, dtype=q.dtype, device=q.device)
        p_src = p[P].clone()
        for j in range(1, P):
            tgt = p[P + j].clone()
            mix, eq, gate = (parts[n][j - 1].to(q) if n in parts else ones for n in ("mix", "equalizer", "gate"))
            injected = (p_src @ parts["mapper"][j - 1].to(q)) * mix + tgt * (1 - mix)
            p[P + j] = injected * eq * gate + tgt * (1 - gate)
    return p @ v, cond_mean


def assert_store_within_torch(mode: str, ker: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor) -> None:
    """The kernel's store errs against float64 truth at most twice torch's own store, plus a few fp32 ulps of
    slack: GPU exp is approximate and heads meet in atomic order."""
    s_ref = (ref.double() - truth).abs().max().item()
    s_ker = (ker.double() - truth).abs().max().item()
    s_tiny = 8 * 2.0**-24 * truth.abs().max().item()
    assert s_ker <= 2 * s_ref + s_tiny, f"{mode}: store error {s_ker:.3g} vs torch {s_ref:.3g}"


def check(mode, P, H, N, T, D, dtype, device, seed=0, store_way="atomic"):
    gen = torch.Generator().manual_seed(seed)
    B = 2 * P
    q = torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
    parts = None if mode == "none" else make_plan_parts(mode, P, T, gen)
    scale = D ** -0.5

    truth_plan = build_plan(parts, P, N, T, device, torch.float64)
    truth = cross_attention_reference(q.double(), k.double(), v.double(), truth_plan, scale)
    ref_plan = build_plan(parts, P, N, T, device, torch.float32)
    ref = cross_attention_reference(q, k, v, ref_plan, scale)
    ker_plan = build_plan(parts, P, N, T, device, torch.float32)
    out = cross_attention(q, k, v, ker_plan, scale, store_way=store_way)

    # The reference itself against the plain re-statement, both in float64.
    restated_out, restated_mean = restated(q.double(), k.double(), v.double(), parts, scale)
    torch.testing.assert_close(truth, restated_out, rtol=1e-9, atol=1e-9)
    if truth_plan is not None and truth_plan.store is not None:
        torch.testing.assert_close(truth_plan.store, restated_mean, rtol=1e-9, atol=1e-9)

    assert out.dtype == dtype and out.shape == q.shape
    tiny = 1e-6 * truth.abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    if dtype != torch.float32:
        # Torch's own half-precision attention rounds p to the input dtype, as the kernel does.
        err_ref = max(err_ref, (restated(q, k, v, parts, scale)[0].double() - truth).abs().max().item())
    err_ker = (out.double() - truth).abs().max().item()
    assert err_ker <= 2 * err_ref + tiny, f"{mode}: kernel error {err_ker:.3g} vs torch {err_ref:.3g}"
    # The unconditional half passes untouched: plain attention, whatever the plan.
    plain = torch.softmax(q[:P].double() @ k[:P].double().transpose(-1, -2) * scale, -1) @ v[:P].double()
    assert (out[:P].double() - plain).abs().max().item() <= 2 * err_ref + tiny
    if truth_plan is not None and truth_plan.store is not None:
        assert_store_within_torch(mode, ker_plan.store, ref_plan.store, truth_plan.store)
        assert truth_plan.store.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_modes_t77(mode, device):
    dtype = torch.float32
    check(mode, P=3, H=2, N=37, T=77, D=40, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["store", "replace", "all"])
@pytest.mark.parametrize("P", [2, 4])
def test_targets_and_short_prompt(mode, P, device):
    # 1 and 3 targets, T = 5 text tokens padded to the kernel's 16.
    check(mode, P=P, H=2, N=21, T=5, D=40, dtype=torch.float32, device=device, seed=P)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["none", "all"])
def test_half(mode, device):
    check(mode, P=2, H=2, N=37, T=77, D=40, dtype=torch.float16, device=device, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["store", "all"])
@pytest.mark.parametrize("P,H", [(2, 3), (3, 2)])
def test_heads_in_program_store(mode, P, H, device):
    """The store met without atomics (one program loops over the heads) holds to the same bounds."""
    check(mode, P=P, H=H, N=21, T=77, D=40, dtype=torch.float32, device=device, seed=P + H, store_way="heads")


def check_cached_source(mode, P, H, N, T, D, dtype, device, *, indexed, store_way="atomic", seed=0):
    """A re-edit's plan (the targets' rows only, p_src given) against the full batch that computes p_src from
    row P: the reference in float64 equals the full batch's target rows; the kernel is held to twice the
    torch's own error, as `check`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2 * P, H, N, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(2 * P, H, T, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(2 * P, H, T, D, generator=gen).to(device=device, dtype=dtype)
    parts = make_plan_parts(mode, P, T, gen)
    scale = D ** -0.5
    full_plan = build_plan(parts, P, N, T, device, torch.float64)
    full = cross_attention_reference(q.double(), k.double(), v.double(), full_plan, scale)
    rows = [*range(1, P), *range(P + 1, 2 * P)]  # the targets' [uncond, cond]
    truth = full[rows]
    qt, kt, vt = q[rows], k[rows], v[rows]
    p_src = torch.softmax(q[P:P + 1].double() @ k[P:P + 1].double().transpose(-1, -2) * scale, -1)

    def cached_plan(store_dtype, src_dtype):
        plan = build_plan(parts, P - 1, N, T, device, store_dtype)
        src = p_src.to(src_dtype)
        if indexed:  # this call's row of a table of calls; the others must not be read
            others = torch.rand(3, 1, H, N, T, generator=gen, dtype=torch.float64).to(device, src_dtype)
            plan.source, plan.source_row = table_at(src, others, 2)
        else:
            plan.source = src
        return plan

    ref64 = cached_plan(torch.float64, torch.float64)
    out64 = cross_attention_reference(qt.double(), kt.double(), vt.double(), ref64, scale)
    torch.testing.assert_close(out64, truth, rtol=1e-12, atol=1e-12)
    if ref64.store is not None:
        torch.testing.assert_close(ref64.store, full_plan.store[1:], rtol=1e-12, atol=1e-12)

    ref_plan, ker_plan = cached_plan(torch.float32, torch.float32), cached_plan(torch.float32, torch.float32)
    ref = cross_attention_reference(qt, kt, vt, ref_plan, scale)
    out = cross_attention(qt, kt, vt, ker_plan, scale, store_way=store_way)
    tiny = 1e-6 * truth.abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    if dtype != torch.float32:  # torch's own half attention: p and its injection rounded to the input dtype
        R = P - 1
        p = torch.softmax(qt @ kt.transpose(-1, -2) * scale, dim=-1)
        if "mapper" in parts:
            kw = {n: parts[n].to(device) for n in ("mix", "equalizer", "gate") if n in parts}
            p[R:] = inject_cross(p_src.to(dtype), p[R:], parts["mapper"].to(device), **kw)
        err_ref = max(err_ref, ((p @ vt).double() - truth).abs().max().item())
    err_ker = (out.double() - truth).abs().max().item()
    assert err_ker <= 2 * err_ref + tiny, f"{mode}: kernel error {err_ker:.3g} vs torch {err_ref:.3g}"
    if ref_plan.store is not None:
        assert_store_within_torch(mode, ker_plan.store, ref_plan.store, full_plan.store[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["store", "replace", "reweight_refine", "all"])
@pytest.mark.parametrize("indexed", [False, True])
def test_cached_source_equals_the_source_row(mode, indexed, device):
    """A re-edit from an edit cache: p_src read from the plan (or a table's row at a device index) instead of
    computed from row P, every conditional row a target."""
    check_cached_source(mode, P=3, H=2, N=21, T=77, D=40, dtype=torch.float32, device=device, indexed=indexed)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_source_heads_in_program_and_one_target(device):
    check_cached_source("all", P=2, H=3, N=21, T=5, D=16, dtype=torch.float32, device=device, indexed=True,
                        store_way="heads", seed=4)


def test_cached_source_errors_name_the_fix():
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen).to(device) for n in (8, 5, 5))
    plan = CrossPlan(1, mapper=torch.eye(5, device=device)[None], source=torch.rand(1, 2, 9, 5, device=device))
    with pytest.raises(ValueError, match=r"plan.source must be \(1, H, N, T\)"):
        cross_attention(q, k, v, plan, 0.25)
    plan.source, plan.source_row = torch.rand(3, 1, 2, 8, 5, device=device), torch.tensor([1.0], device=device)
    with pytest.raises(ValueError, match="source_row must be a \\(1,\\) int64"):
        cross_attention(q, k, v, plan, 0.25)


def test_store_ways_agree_and_unknown_is_refused():
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(9)
    P, H, N, T, D = 2, 2, 19, 77, 16
    q, k, v = (torch.randn(2 * P, H, n, D, generator=gen).to(device) for n in (N, T, T))
    parts = make_plan_parts("all", P, T, gen)
    outs = {}
    for way in ("atomic", "heads"):
        plan = build_plan(parts, P, N, T, device, torch.float32)
        plan.store += 1.0  # accumulated onto what is there, both ways
        outs[way] = cross_attention(q, k, v, plan, D ** -0.5, store_way=way), plan.store
    assert torch.equal(outs["atomic"][0], outs["heads"][0])  # the outputs are one computation
    torch.testing.assert_close(outs["atomic"][1], outs["heads"][1], rtol=4 * 2.0**-24, atol=0)  # sum order
    with pytest.raises(ValueError, match="store_way"):
        cross_attention(q, k, v, None, 1.0, store_way="rows")


def test_strided_views_and_output_layout():
    """Projections give (B, N, H, D); the kernel reads the (B, H, N, D) transpose in place, and its
    output merges back to (B, N, H * D) as a view."""
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(11)
    P, H, N, T, D = 2, 3, 23, 77, 40
    q = torch.randn(2 * P, N, H, D, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(2 * P, T, H, D, generator=gen).to(device).transpose(1, 2)
    v = torch.randn(2 * P, T, H, D, generator=gen).to(device).transpose(1, 2)
    parts = make_plan_parts("all", P, T, gen)
    ref_plan = build_plan(parts, P, N, T, device, torch.float32)
    ker_plan = build_plan(parts, P, N, T, device, torch.float32)
    ref = cross_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), ref_plan, D ** -0.5)
    out = cross_attention(q, k, v, ker_plan, D ** -0.5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ker_plan.store, ref_plan.store)
    assert out.transpose(1, 2).is_contiguous()


def test_store_accumulates_in_place():
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(7)
    P, H, N, T, D = 2, 2, 19, 5, 16
    q = torch.randn(2 * P, H, N, D, generator=gen).to(device)
    k = torch.randn(2 * P, H, T, D, generator=gen).to(device)
    v = torch.randn(2 * P, H, T, D, generator=gen).to(device)
    store = torch.ones(P, N, T, device=device)
    cross_attention(q, k, v, CrossPlan(P, store=store), 0.25)
    # Each query's head-averaged probabilities sum to 1, added on top of the ones.
    torch.testing.assert_close(store.sum(-1), torch.full((P, N), 1.0 + T, device=device))


def test_errors_name_the_fix():
    device = DEVICES[0]
    q = torch.randn(4, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="B, H, N, D"):
        cross_attention(q[0], q, q, None, 1.0)
    with pytest.raises(ValueError, match=r"\[uncond x P, cond x P\]"):
        cross_attention(q, q, q, CrossPlan(num_prompts=3), 1.0)
    with pytest.raises(ValueError, match="plan.store"):
        cross_attention(q, q, q, CrossPlan(num_prompts=2, store=torch.zeros(2, 8, 7, device=device)), 1.0)
    with pytest.raises(ValueError, match="at most 128 text tokens"):
        k = torch.randn(4, 2, 129, 16, device=device)
        cross_attention(q, k, k, None, 1.0)


def test_cpu_without_interpreter_says_how(monkeypatch):
    import p2p_engine.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    q = torch.randn(4, 2, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_attention(q, q, q, None, 1.0)


STANDALONE_EDIT = """
import tempfile, pathlib, p2p_engine as p2p
d = pathlib.Path(tempfile.mkdtemp()) / "m"
p2p.save_random_checkpoint(d, "tiny", seed=0)  # builds transformers models, which import triton.language
pipe = p2p.load(d, device="cpu", backend="triton")
out = pipe.edit(["a cat riding a bicycle", "a dog riding a bicycle"], p2p.Replace(), steps=2, progress=False)
print("edited", tuple(out.latents.shape))
"""
TRITON_FIRST = """
import triton.language, torch
from p2p_engine.attention import attention
from p2p_engine.plan import CrossPlan
q = torch.randn(4, 2, 8, 16)
attention(q, q, q, CrossPlan(2, store=torch.zeros(2, 8, 8)), is_cross=True, backend="triton")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no CUDA")
def test_interpreter_in_a_fresh_process():
    """Outside the tests (which switch the interpreter on first) the Triton backend runs on the CPU once
    p2p_engine is imported first, and says how to fix the import order when Triton came first."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", STANDALONE_EDIT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "edited (2, 4, 16, 16)" in run.stdout, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-c", TRITON_FIRST], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "import p2p_engine before" in run.stderr, run.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N,D", [(4096, 40), (1024, 80), (256, 160), (64, 160)])
def test_cuda_sd_shapes(mode, dtype, N, D):
    check(mode, P=2, H=8, N=N, T=77, D=D, dtype=dtype, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,store_way,N,D", [
    (torch.float16, "atomic", 4096, 40), (torch.float16, "heads", 4096, 40), (torch.float32, "atomic", 256, 160)])
def test_cuda_cached_source_sd_shapes(dtype, store_way, N, D):
    check_cached_source("all", P=2, H=8, N=N, T=77, D=D, dtype=dtype, device="cuda", indexed=True,
                        store_way=store_way)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["store", "all"])
@pytest.mark.parametrize("N,D", [(4096, 40), (1024, 80), (256, 160), (64, 160)])
def test_cuda_heads_in_program_store(mode, N, D):
    check(mode, P=2, H=8, N=N, T=77, D=D, dtype=torch.float16, device="cuda", store_way="heads")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["none", "all"])
@pytest.mark.parametrize("T", [77, 5])
def test_cuda_fp32_odd(mode, T):
    check(mode, P=4, H=3, N=1000, T=T, D=40, dtype=torch.float32, device="cuda")


SM90_COMPILE = r"""
import importlib
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
# The package re-exports the launchers under the module names, so reach the modules directly.
ca = importlib.import_module("p2p_engine.kernels.cross_attention")
sa = importlib.import_module("p2p_engine.kernels.self_attention")

SM90_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (as tests/sm90.py)
names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Each distinct tile set once (D 40 and 64 share theirs; bf16 tiles are fp16's): ~2 s per compile.
for dtype, dims in ((torch.float16, (40, 80, 160)), (torch.bfloat16, (160,)), (torch.float32, (160,))):
    dt, half = names[dtype], dtype != torch.float32
    for D in dims:
        BD = ca.next_pow2(D)
        block_n, warps = ca._config(dtype, BD)
        # the two ways to meet the store; fp16 also with p_src read from an edit cache's table
        for heads, cached in ((False, False), (True, False)) + ((False, True),) * (dtype == torch.float16) \
                if half else ((False, False),):
            c = dict(BLOCK_N=block_n, BLOCK_T=128, BLOCK_D=BD, HAS_STORE=True, HAS_INJECT=True, HAS_MIX=True,
                     HAS_EQ=True, HAS_GATE=True, SRC_CACHED=cached, SRC_INDEXED=cached, PREC="tf32" if half else "ieee",
                     MAP_PREC="tf32" if half else "ieee", HALF_PV=half, HEADS_IN_PROGRAM=heads)
            sig = {n: f"*{dt}" for n in "QKVO"} | {n: "*fp32" for n in ("STORE", "MAPPER", "MIX", "EQ", "GATE", "SRC")}
            sig |= {"SRC_ROW": "*i64"} | {f"s{t}_{d}": "i32" for t in "qkvo" for d in "bhn"}
            sig |= {f"ss_{d}": "i32" for d in "chn"}
            sig |= {n: "i32" for n in ("H", "N", "T", "D", "P")} | {"scale": "fp32"} | {k: "constexpr" for k in c}
            k = triton.compile(ASTSource(ca._cross_fwd, sig, c), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps))
            assert k.metadata.shared <= SM90_SHARED, ("cross", dt, D, heads, cached, k.metadata.shared)
        bm, bn, warps, stages = sa._config(dtype, BD)
        # the source's q and k from row P, (fp16) read from an edit cache's tables, and the other editors' rows
        # table (MasaCtrl's k, v or Plug-and-Play's q, k from another row)
        ways = ((False, False, False), (True, False, False), (False, True, True), (False, True, False))
        for cached, by_rows, take_kv in ways if dtype == torch.float16 else ways[:1] + ways[2:3]:
            c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, INJECT=True, HAS_GATE=True, SRC_CACHED=cached,
                     SRC_INDEXED=cached, BY_ROWS=by_rows, TAKE_KV=take_kv, PREC="tf32" if half else "ieee")
            sig = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "QS", "KS")} | {"GATE": "*fp32", "SRC_ROW": "*i64",
                                                                              "ROWS": "*i64"}
            sig |= {f"s{t}_{d}": "i32" for t in "qkvo" for d in "bhn"}
            sig |= {f"s{t}s_{d}": "i32" for t in "qk" for d in "chn"}
            sig |= {n: "i32" for n in ("H", "N", "D", "P")} | {"scale": "fp32"}
            sig |= {k: "constexpr" for k in c}
            k = triton.compile(ASTSource(sa._self_fwd, sig, c), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            assert k.metadata.shared <= SM90_SHARED, ("self", dt, D, cached, by_rows, take_kv, k.metadata.shared)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA tests compile and run the kernels")
def test_gpu_configs_compile_for_sm90():
    """The GPU launch configs compile for an H100 (sm_90) and fit its shared memory, no GPU needed."""
    compile_in_child(SM90_COMPILE)
