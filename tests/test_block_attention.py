"""`block_attention`: every block of a `BlockPlans` attended at once equals attending block by block.

The truth is the general path of the attention seam, one block at a time (`attention` with each block's own plan:
`cross_attention_reference` / `self_attention_reference`). float64, odd shapes, every kind of plan side by side:
stores, injections with and without each table, one-prompt blocks, blocks without a plan, re-edits' cached sources
(given and read from a table at a device row), device gates on and off, other editors' row tables ("qk" and "kv")
and self stores.
"""
import pytest
import torch

from p2p_engine.attention import attention
from p2p_engine.block_attention import block_attention
from p2p_engine.plan import BlockPlans, CrossPlan, SelfPlan

H, N, T, D = 3, 10, 7, 6
F64 = torch.float64


def inputs(rows: tuple, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = sum(rows)
    return [torch.randn(B, H, n, D, generator=g, dtype=F64) for n in (N, m, m)]


def cross_blocks(seed: int = 1) -> tuple[tuple, list]:
    """(each block's rows, its plan): a fresh set (stores zero) each call, equal for equal seeds."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    def store(P):
        return torch.zeros(P, N, T, dtype=F64)

    def probs(*shape):
        return r(*shape).softmax(-1)

    return (4, 4, 6, 4, 2, 4, 4, 2, 4), [
        CrossPlan(2, store(2), r(1, T, T), r(1, T), r(1, T) * 2, r(1, T).gt(0.5).to(F64)),  # every table, a store
        None,
        CrossPlan(3, None, r(2, T, T), r(2, T)),  # no equalizer, no gate, no store
        CrossPlan(2, store(2)),  # a store only
        CrossPlan(1, store(1)),  # one prompt
        CrossPlan(2),  # reads nothing: plain attention
        CrossPlan(2, store(2), r(2, T, T), None, r(2, T), r(2, T).gt(0.5).to(F64), probs(1, H, N, T)),  # a re-edit
        CrossPlan(1, None, r(1, T, T), gate=r(1, T), source=probs(3, 1, H, N, T), source_row=torch.tensor([1])),
        CrossPlan(2, None, r(1, T, T), equalizer=r(1, T) * 3),
    ]


def self_blocks(seed: int = 2) -> tuple[tuple, list]:
    g = torch.Generator().manual_seed(seed)

    def store(P):
        return torch.zeros(P, N, N, dtype=F64)

    def qk(c=None):
        shape = (1, H, N, D) if c is None else (c, 1, H, N, D)
        return torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)

    on, off = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    return (4, 4, 6, 4, 4, 4, 4, 4, 4, 4, 4, 6, 2), [
        SelfPlan(2, True),  # Prompt-to-Prompt's injection
        None,
        SelfPlan(3, True, gate=on),
        SelfPlan(2, True, gate=off),
        SelfPlan(2, True, store(2)),  # injection with a store: the maps formed
        SelfPlan(2, False, store(2)),
        SelfPlan(2, True, source=qk()),  # a re-edit
        SelfPlan(2, True, store(2), source=qk()),
        SelfPlan(2, True, gate=on, source=qk(3), source_row=torch.tensor([2])),
        SelfPlan(2, True, gate=on, rows=torch.tensor([0, 0, 2, 2]), take="qk"),  # other editors
        SelfPlan(2, True, store(2), rows=torch.tensor([0, 0, 2, 2]), take="kv"),
        SelfPlan(3, True, gate=off, rows=torch.tensor([0, 1, 0, 3, 3, 3]), take="kv"),
        SelfPlan(1, False),
    ]


def per_block(q, k, v, rows, plans, is_cross):
    """The truth: each block through the seam's general path under its own plan."""
    out, s = [], 0
    for n, plan in zip(rows, plans):
        out.append(attention(q[s:s + n], k[s:s + n], v[s:s + n], plan, is_cross=is_cross, backend="torch"))
        s += n
    return torch.cat(out)


def stores(plans):
    return [p.store for p in plans if p is not None and p.store is not None]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("is_cross", [True, False], ids=["cross", "self"])
def test_every_block_at_once_equals_block_by_block(is_cross):
    make = cross_blocks if is_cross else self_blocks
    rows, plans = make()
    q, k, v = inputs(rows, T if is_cross else N)
    ours = block_attention(q, k, v, BlockPlans(rows, plans), is_cross=is_cross, upcast=False)
    assert ours is not None
    _, truth_plans = make()
    truth = per_block(q, k, v, rows, truth_plans, is_cross)
    assert rel(ours, truth) <= 1e-12
    for mine, theirs in zip(stores(plans), stores(truth_plans)):
        assert theirs.abs().max() > 0 and rel(mine, theirs) <= 1e-12
    # the seam takes this path for a BlockPlans on the torch backend
    _, again = make()
    assert torch.equal(attention(q, k, v, BlockPlans(rows, again), is_cross=is_cross, backend="torch"), ours)


@pytest.mark.parametrize("is_cross", [True, False], ids=["cross", "self"])
def test_a_plan_on_another_blocks_rows_is_caught(is_cross):
    """Blocks 0 and 3 (both two prompts) with their plans swapped: both blocks' rows move far past the tolerance,
    so a path that handed a block another's plan would fail the test above."""
    make = cross_blocks if is_cross else self_blocks
    rows, plans = make()
    q, k, v = inputs(rows, T if is_cross else N)
    truth = per_block(q, k, v, rows, make()[1], is_cross)
    plans[0], plans[3] = plans[3], plans[0]
    ours = block_attention(q, k, v, BlockPlans(rows, plans), is_cross=is_cross, upcast=False)
    for a, b in ((0, 4), (14, 18)):  # block 0's rows, block 3's
        assert rel(ours[a:b], truth[a:b]) > 1e-3


def test_what_it_does_not_take_goes_block_by_block():
    """None (the caller's cue to attend block by block) for a plan with its own `attend`, a block whose rows are
    not its plan's 2P, and half inputs with upcast; the seam's answer is then the general path's."""
    rows, plans = cross_blocks()
    q, k, v = inputs(rows, T)

    class Recording(CrossPlan):
        def attend(self, q, k, v, scale):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    odd = list(plans)
    odd[3] = Recording(2)
    assert block_attention(q, k, v, BlockPlans(rows, odd), is_cross=True, upcast=False) is None
    truth = per_block(q, k, v, rows, cross_blocks()[1][:3] + [Recording(2)] + cross_blocks()[1][4:], True)
    assert rel(attention(q, k, v, BlockPlans(rows, odd), is_cross=True, backend="torch"), truth) <= 1e-12
    wrong = (6,) + rows[1:]  # block 0 claims 6 rows for a 2-prompt plan
    assert block_attention(*inputs(wrong, T), BlockPlans(wrong, plans), is_cross=True, upcast=False) is None
    half = [t.half() for t in (q, k, v)]
    assert block_attention(*half, BlockPlans(rows, plans), is_cross=True, upcast=True) is None
