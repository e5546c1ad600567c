"""Flash-style self attention with source injection (Triton) against its reference.

Truth is the reference in float64 on the inputs the kernel sees; the kernel
must come within twice torch's own error in that dtype (the reference for
fp32, SDPA for half types, whose p is also rounded before p @ v) plus a hair.
"""

import torch

from p2p_engine.attention import triton_interpreter  # noqa: E402

triton_interpreter()  # on a GPU the kernels are compiled, not interpreted

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from p2p_engine.kernels import self_attention, self_attention_reference  # noqa: E402
from p2p_engine.plan import SelfPlan  # noqa: E402
from numerics import table_at  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def inputs(P, H, N, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    # Scaled up so the maps are peaked, as trained attention is, not near-uniform.
    return [(2 * torch.randn(2 * P, H, N, D, generator=gen)).to(device=device, dtype=dtype) for _ in range(3)]


def straight_injection(q, k, v, P, scale):
    """Re-statement independent of the reference: per row, which q/k score it. float64."""
    q, k, v = q.double(), k.double(), v.double()
    rows = []
    for b in range(q.shape[0]):
        src = P if b > P else b
        p = torch.softmax(q[src] @ k[src].transpose(-1, -2) * scale, dim=-1)
        rows.append(p @ v[b])
    return torch.stack(rows)


def check(P, H, N, D, dtype, device, inject, store=False, seed=0):
    q, k, v = inputs(P, H, N, D, dtype, device, seed)
    scale = D ** -0.5

    def plan(store_dtype):
        if not inject and not store:
            return None
        st = torch.zeros(P, N, N, dtype=store_dtype, device=device) if store else None
        return SelfPlan(num_prompts=P, inject=inject, store=st)

    truth_plan = plan(torch.float64)
    truth = self_attention_reference(q.double(), k.double(), v.double(), truth_plan, scale)
    if inject:
        torch.testing.assert_close(truth, straight_injection(q, k, v, P, scale), rtol=1e-10, atol=1e-10)
    ref = self_attention_reference(q, k, v, plan(torch.float32), scale)
    err_torch = (ref.double() - truth).abs().max().item()
    if dtype != torch.float32:
        qs, ks, vs = q.clone(), k.clone(), v.clone()
        if inject:
            qs[P + 1:], ks[P + 1:] = q[P:P + 1], k[P:P + 1]
        sdpa = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        err_torch = max(err_torch, (sdpa.double() - truth).abs().max().item())
    ker_plan = plan(torch.float32)
    out = self_attention(q, k, v, ker_plan, scale)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * truth.abs().max().item(), f"kernel {err:.3g} vs torch {err_torch:.3g}"
    if store:
        s_err = (ker_plan.store.double() - truth_plan.store).abs().max().item()
        assert s_err <= 1e-6


def check_cached_source(P, H, N, D, dtype, device, *, indexed, store=False, gate=None, seed=0):
    """A re-edit's plan (the targets' rows only, the source's q and k given, or read from tables at a device
    row) against the full batch that takes them from row P: the reference in float64 equals the full batch's
    target rows (and store rows); the kernel is held to twice torch's own error, as `check`."""
    q, k, v = inputs(P, H, N, D, dtype, device, seed)
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(seed + 100)

    def full_plan(store_dtype):
        g = None if gate is None else torch.tensor([gate], device=device)
        st = torch.zeros(P, N, N, dtype=store_dtype, device=device) if store else None
        return SelfPlan(num_prompts=P, inject=True, store=st, gate=g)

    full = full_plan(torch.float64)
    truth_all = self_attention_reference(q.double(), k.double(), v.double(), full, scale)
    rows = [*range(1, P), *range(P + 1, 2 * P)]  # the targets' [uncond, cond]
    truth = truth_all[rows]
    qt, kt, vt = q[rows], k[rows], v[rows]

    def cached_plan(store_dtype, src_dtype):
        plan = full_plan(store_dtype)
        plan.num_prompts = P - 1
        if plan.store is not None:
            plan.store = plan.store[1:].clone()
        src = (q[P:P + 1].to(src_dtype), k[P:P + 1].to(src_dtype))
        if indexed:  # this call's row of tables of calls; the others must not be read
            (qs, row), (ks, _) = (table_at(s, torch.randn(3, 1, H, N, D, generator=gen).to(device, src_dtype), 1)
                                  for s in src)
            plan.source, plan.source_row = (qs, ks), row
        else:
            plan.source = src
        return plan

    ref64 = cached_plan(torch.float64, torch.float64)
    out64 = self_attention_reference(qt.double(), kt.double(), vt.double(), ref64, scale)
    torch.testing.assert_close(out64, truth, rtol=1e-12, atol=1e-12)
    if store:
        torch.testing.assert_close(ref64.store, full.store[1:], rtol=1e-12, atol=1e-12)
    ref = self_attention_reference(qt, kt, vt, cached_plan(torch.float32, dtype), scale)
    err_torch = (ref.double() - truth).abs().max().item()
    if dtype != torch.float32:
        qs, ks = qt.clone(), kt.clone()
        if gate != 0:
            qs[P - 1:], ks[P - 1:] = q[P:P + 1], k[P:P + 1]
        sdpa = F.scaled_dot_product_attention(qs, ks, vt, scale=scale)
        err_torch = max(err_torch, (sdpa.double() - truth).abs().max().item())
    ker_plan = cached_plan(torch.float32, dtype)
    out = self_attention(qt, kt, vt, ker_plan, scale)
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * truth.abs().max().item(), f"kernel {err:.3g} vs torch {err_torch:.3g}"
    if store:
        assert (ker_plan.store.double() - full.store[1:]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("P,gate", [(2, None), (3, 1.0), (3, 0.0)])
def test_cached_source_equals_the_source_row(P, gate, indexed, device):
    """A re-edit from an edit cache: q_src and k_src read from the plan (or tables' rows at a device index)
    instead of row P, every conditional row a target; a gate of 0 leaves every row its own."""
    check_cached_source(P, H=2, N=37, D=40, dtype=torch.float32, device=device, indexed=indexed, gate=gate,
                        seed=P)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_source_fp16_and_store(device):
    check_cached_source(3, H=2, N=21, D=16, dtype=torch.float16, device=device, indexed=True, seed=3)
    check_cached_source(3, H=2, N=25, D=16, dtype=torch.float32, device=device, indexed=True, store=True, seed=4)


def test_cached_source_errors_name_the_fix():
    device = DEVICES[0]
    q = torch.randn(2, 2, 8, 16, device=device)
    plan = SelfPlan(1, inject=True, source=(q[1:, :, :5], q[1:]))
    with pytest.raises(ValueError, match=r"plan.source's q must be \(1, H, N, D\)"):
        self_attention(q, q, q, plan, 0.25)
    plan.source = (q[1:], q[1:].half())
    with pytest.raises(ValueError, match="plan.source's k must be .* float32"):
        self_attention(q, q, q, plan, 0.25)
    plan.source, plan.source_row = (q[None, 1:], q[None, 1:]), torch.tensor([0], device=device, dtype=torch.int32)
    with pytest.raises(ValueError, match="source_row must be a \\(1,\\) int64"):
        self_attention(q, q, q, plan, 0.25)


def straight_rows(q, k, v, rows, take, scale):
    """Re-statement of a `rows` plan independent of the reference: per row b, the row r = rows[b] it reads its
    keys and values (take "kv": MasaCtrl) or its queries and keys ("qk": Plug-and-Play) from. float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = []
    for b, r in enumerate(rows.tolist()):
        qb, kb, vb = (q[b], k[r], v[r]) if take == "kv" else (q[r], k[r], v[b])
        out.append(torch.softmax(qb @ kb.transpose(-1, -2) * scale, dim=-1) @ vb)
    return torch.stack(out)


def editor_rows(P, kind, device):
    """The rows tables the editors make: MasaCtrl's (each half reads its own source row), Plug-and-Play's from
    the source's unconditional row into every target row of both halves."""
    if kind == "masactrl":
        rows = [0] * P + [P] * P
    else:
        rows = [0] * P + [P] + [0] * (P - 1)
    return torch.tensor(rows, dtype=torch.int64, device=device)


def check_rows(P, H, N, D, dtype, device, take, gate=None, store=False, seed=0):
    """A `rows` plan: the reference in float64 equals the straight re-statement, the kernel comes within twice
    torch's own error (the reference in `dtype`), and a store receives the conditional rows' own maps."""
    q, k, v = inputs(P, H, N, D, dtype, device, seed)
    scale = D ** -0.5
    rows = editor_rows(P, "masactrl" if take == "kv" else "pnp", device)

    def plan(store_dtype):
        g = None if gate is None else torch.tensor([gate], device=device)
        st = torch.zeros(P, N, N, dtype=store_dtype, device=device) if store else None
        return SelfPlan(num_prompts=P, inject=True, store=st, gate=g, rows=rows, take=take)

    truth_plan = plan(torch.float64)
    truth = self_attention_reference(q.double(), k.double(), v.double(), truth_plan, scale)
    straight = straight_rows(q, k, v, rows if gate != 0 else torch.arange(2 * P), take, scale)
    torch.testing.assert_close(truth, straight, rtol=1e-10, atol=1e-10)
    ref = self_attention_reference(q, k, v, plan(torch.float32), scale)
    err_torch = (ref.double() - truth).abs().max().item()
    ker_plan = plan(torch.float32)
    out = self_attention(q, k, v, ker_plan, scale)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * truth.abs().max().item(), f"kernel {err:.3g} vs torch {err_torch:.3g}"
    if store:
        own = torch.softmax(q[P:].double() @ k[P:].double().transpose(-1, -2) * scale, dim=-1).mean(dim=1)
        torch.testing.assert_close(truth_plan.store, own, rtol=1e-10, atol=1e-10)
        assert (ker_plan.store.double() - own).abs().max().item() <= 1e-6
    return truth


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("take", ["kv", "qk"])
@pytest.mark.parametrize("P,N,D,gate", [(2, 37, 40, None), (3, 21, 24, 1.0), (3, 19, 16, 0.0)])
def test_rows_plans(P, N, D, gate, take, device):
    """MasaCtrl's (take "kv") and Plug-and-Play's (take "qk") plans on odd shapes, both guidance halves; a gate of
    0 gives plain attention."""
    truth = check_rows(P, H=2, N=N, D=D, dtype=torch.float32, device=device, take=take, gate=gate, seed=P + N)
    q, k, v = inputs(P, 2, N, D, torch.float32, device, P + N)
    plain = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=D ** -0.5)
    changed = (truth - plain).abs().amax(dim=(1, 2, 3)) > 1e-3  # which rows the plan moved
    if gate == 0:
        assert not changed.any()
    else:
        moved = editor_rows(P, "masactrl" if take == "kv" else "pnp", device) != torch.arange(2 * P, device=device)
        assert torch.equal(changed, moved), (changed, moved)  # the sources stay, every target moves


@pytest.mark.parametrize("device", DEVICES)
def test_rows_plans_fp16_and_store(device):
    check_rows(3, H=2, N=21, D=16, dtype=torch.float16, device=device, take="kv", seed=8)
    check_rows(2, H=3, N=25, D=16, dtype=torch.float32, device=device, take="qk", store=True, seed=9)
    check_rows(2, H=2, N=23, D=16, dtype=torch.float32, device=device, take="kv", store=True, gate=1.0, seed=10)


def test_rows_plan_errors_name_the_fix():
    device = DEVICES[0]
    q = torch.randn(4, 2, 8, 16, device=device)
    rows = torch.tensor([0, 0, 2, 2], device=device)
    for fn in (self_attention, self_attention_reference):
        with pytest.raises(ValueError, match=r"plan.rows must be a \(4,\) int64"):
            fn(q, q, q, SelfPlan(2, inject=True, rows=rows[:3]), 0.25)
        with pytest.raises(ValueError, match="plan.take must be one of"):
            fn(q, q, q, SelfPlan(2, inject=True, rows=rows, take="v"), 0.25)
        with pytest.raises(ValueError, match="not both"):
            fn(q, q, q, SelfPlan(2, inject=True, rows=rows, source=(q[2:3], q[2:3])), 0.25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inject", [False, True])
@pytest.mark.parametrize("P,N", [(2, 37), (3, 70), (4, 21)])
def test_fp32(P, N, inject, device):
    check(P, H=2, N=N, D=40, dtype=torch.float32, device=device, inject=inject, seed=P)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inject", [False, True])
def test_fp16(inject, device):
    check(2, H=2, N=37, D=40, dtype=torch.float16, device=device, inject=inject, seed=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inject", [False, True])
def test_store_falls_back_to_reference(inject, device):
    check(2, H=2, N=25, D=16, dtype=torch.float32, device=device, inject=inject, store=True)


@pytest.mark.parametrize("fn", [self_attention_reference, self_attention], ids=["reference", "triton"])
@pytest.mark.parametrize("inject", [False, True])
def test_store_is_the_head_mean_of_the_conditional_maps(fn, inject):
    """The store receives, added to what it holds, softmax(q k^T * scale) averaged over the heads, of the
    conditional rows and before injection (each target's own map), restated here in float64: not one head's
    map, not the unconditional rows', not the source's map injected into the targets."""
    device = DEVICES[0]
    P, H, N, D = 3, 3, 21, 16
    q, k, v = inputs(P, H, N, D, torch.float32, device, 13)
    scale = D ** -0.5
    before = torch.rand(P, N, N, generator=torch.Generator().manual_seed(14)).to(device)
    store = before.clone()
    fn(q, k, v, SelfPlan(num_prompts=P, inject=inject, store=store), scale)
    qd, kd = q[P:].double(), k[P:].double()
    heads = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1)  # (P, H, N, N) the conditional rows' maps
    want = before.double() + heads.mean(dim=1)
    torch.testing.assert_close(store.double(), want, rtol=0, atol=1e-6)
    # What the mutants would store lies far from it: one head, the other half's rows, the source's map.
    uncond = torch.softmax(q[:P].double() @ k[:P].double().transpose(-1, -2) * scale, dim=-1).mean(dim=1)
    for wrong in (heads[:, 0], heads[:, -1], uncond, heads[:1].mean(dim=1).expand(P, N, N)):
        assert (before.double() + wrong - want).abs().max() > 0.05


@pytest.mark.parametrize("inject", [False, True])
def test_strided_views(inject):
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(12)
    P, H, N, D = 3, 2, 29, 40
    q, k, v = (torch.randn(2 * P, N, H, D, generator=gen).to(device).transpose(1, 2) for _ in range(3))
    plan = SelfPlan(num_prompts=P, inject=inject)
    ref = self_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), plan, D ** -0.5)
    out = self_attention(q, k, v, plan, D ** -0.5)
    torch.testing.assert_close(out, ref)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("store", [False, True])
def test_gate_switches_injection_on_the_device(store):
    """A gated plan equals the injecting plan where the gate is 1 and the plain one where it is 0, bit for bit,
    in the kernel and in the reference (a captured loop's self window)."""
    device = DEVICES[0]
    P, H, N, D = 3, 2, 21, 16
    q, k, v = inputs(P, H, N, D, torch.float32, device, 7)

    def run(fn, inject, gate=None):
        st = torch.zeros(P, N, N, device=device) if store else None
        g = None if gate is None else torch.tensor([gate], device=device)
        out = fn(q, k, v, SelfPlan(num_prompts=P, inject=inject, store=st, gate=g), D ** -0.5)
        return out, st

    for fn in (self_attention, self_attention_reference):
        for gate, inject in ((1.0, True), (0.0, False)):
            got, st_got = run(fn, True, gate)
            want, st_want = run(fn, inject)
            assert torch.equal(got, want), (fn.__name__, gate)
            if store:
                assert torch.equal(st_got, st_want)
    with pytest.raises(ValueError, match="gate must be one value"):
        self_attention(q, k, v, SelfPlan(num_prompts=P, inject=True, gate=torch.ones(2, device=device)), 1.0)


def test_errors_name_the_fix():
    q = torch.randn(4, 2, 8, 16, device=DEVICES[0])
    with pytest.raises(ValueError, match="same length"):
        self_attention(q, q[:, :, :5], q[:, :, :5], None, 1.0)
    with pytest.raises(ValueError, match=r"\[uncond x P, cond x P\]"):
        self_attention(q, q, q, SelfPlan(num_prompts=1, inject=True), 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        self_attention(q, q.double(), q, None, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inject", [False, True])
@pytest.mark.parametrize("D", [40, 64, 80, 160])
def test_cuda_n4096(D, inject, dtype):
    check(2, H=2, N=4096, D=D, dtype=dtype, device="cuda", inject=inject)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,N,D", [(torch.float16, 1024, 80), (torch.float16, 256, 160),
                                       (torch.float32, 1000, 40)])
def test_cuda_cached_source(dtype, N, D):
    check_cached_source(2, H=8, N=N, D=D, dtype=dtype, device="cuda", indexed=True, gate=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [40, 80, 160])
def test_cuda_odd_n_fp32(D):
    check(3, H=2, N=1000, D=D, dtype=torch.float32, device="cuda", inject=True)
