"""Independent edits' attention in one call per layer: the torch backend's way with `plan.BlockPlans`.

A batch of independent edits (`rows.py`) hands each attention layer a `BlockPlans`: block i's rows under block
i's plan. Attending block by block (the general path in `attention.attention`) is exact but pays each small
call once per block; on a 2-core CPU the toy model's eight 2-prompt edits spent most of their control time there
(benchmarks/RESULTS.md, edit_batch). Here every block's `CrossPlan` or `SelfPlan` is applied at once, each
formula of `plan.py` once per layer over the rows it concerns, gathered by index or by a table of rows:

cross attention
    the rows no plan reads (unconditional rows, blocks without a plan) in one SDPA; the probabilities of every
    controlled block's conditional rows in one softmax; each block's store gets its own rows' head mean (before
    injection); every target row's injection in one `plan.inject_cross`, each row with its own block's source
    probabilities (its row P, or a re-edit's cached ones) and tables (a block's absent mix, equalizer or gate
    is ones, which the formulas leave exact: x * 1 + y * 0 == x); one p @ v.
self attention
    one SDPA whose queries, keys and values each row reads from the row a table names: a target the source's
    queries and keys (Prompt-to-Prompt), every row its editor's row (MasaCtrl, Plug-and-Play), a device gate
    choosing per call between that row and the row's own; a re-edit's targets take the cache's queries and keys.
    A block that stores its self maps forms its conditional rows' maps (all such rows in one softmax), stores
    them, injects the source's and multiplies by v, as `self_attention_reference` does.

Each row is computed by its own edit's formulas, so only the rounding of batched products differs
(tests/test_block_attention.py: float64 within 1e-12; tests/test_edit_batch.py: whole edits within 1e-10). A plan
with its own `attend` (an edit cache's recorder), a block whose rows are not its plan's 2P, or half inputs with
`upcast` give None, and the caller attends block by block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import BlockPlans, CrossPlan, SelfPlan, inject_cross, probabilities


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: BlockPlans, *, is_cross: bool,
                    upcast: bool) -> torch.Tensor | None:
    """q (B, H, N, D), k, v (B, H, M, D) -> (B, H, N, D), every block under its plan; None where this path does
    not apply (module docstring)."""
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return None  # the general path keeps each block's own upcast choice
    blocks, start = [], 0
    for n, plan in zip(plans.rows, plans.plans):
        if plan is not None and not _ours(plan, is_cross, n):
            return None
        blocks.append((start, plan))
        start += n
    if start != q.shape[0]:
        return None
    scale = q.shape[-1] ** -0.5
    return (_cross if is_cross else _self)(q, k, v, blocks, scale)


def _ours(plan, is_cross: bool, rows: int) -> bool:
    """Whether this path applies a block's plan: a CrossPlan or SelfPlan (not one with its own `attend`) laid out
    as `plan.py` says, [uncond x P, cond x P]."""
    if hasattr(plan, "attend") or not isinstance(plan, CrossPlan if is_cross else SelfPlan):
        return False
    return rows == 2 * plan.num_prompts


def _cross(q, k, v, blocks, scale: float) -> torch.Tensor:
    ctrl, stores, injects = [], [], []  # conditional rows whose p is formed; (row in ctrl, P, store); (.., plan)
    for s, plan in blocks:
        P = 0 if plan is None or not (plan.injects or plan.store is not None) else plan.num_prompts
        if not P:  # no plan, or one that reads nothing: plain attention (`attention.attention`'s first branch)
            continue
        r = len(ctrl)
        ctrl += range(s + P, s + 2 * P)
        if plan.store is not None:
            stores.append((r, P, plan.store))
        if plan.injects and plan.targets:
            injects.append((r, plan))
    formed = set(ctrl)
    plain = _Rows([r for r in range(q.shape[0]) if r not in formed], q.device)  # SDPA: every other row
    out = torch.empty_like(q)
    if plain.runs:
        plain.put(out, F.scaled_dot_product_attention(*(plain.take(t) for t in (q, k, v)), scale=scale))
    if not ctrl:
        return out
    ctrl = _Rows(ctrl, q.device)
    p = probabilities(ctrl.take(q), ctrl.take(k), scale)  # (R, H, N, T)
    if stores:
        mean = p.mean(dim=1)  # (R, N, T), before injection
        for r, P, store in stores:
            store.add_(mean[r:r + P].to(store.dtype))
    if injects:
        # each target row's source probabilities: its block's row P (p's row r), or a re-edit's cached ones
        sources, targets = [], []
        for r, plan in injects:
            first = r + plan.num_prompts - plan.targets
            src = p[r:r + 1] if plan.source is None else plan.source_probs().to(p.dtype)
            sources.append(src.expand(plan.targets, *p.shape[1:]))
            targets += range(first, r + plan.num_prompts)
        plans = [plan for _, plan in injects]
        tables = [_stacked([getattr(pl, name) for pl in plans], plans) for name in ("mix", "equalizer", "gate")]
        mapper = torch.cat([pl.mapper for pl in plans])  # (targets, T, T)
        targets = _Rows(targets, q.device)
        injected = inject_cross(torch.cat(sources), targets.take(p), mapper, *tables)
        targets.put(p, injected)
    ctrl.put(out, (p @ ctrl.take(v).to(p.dtype)).to(q.dtype))
    return out


def _self(q, k, v, blocks, scale: float) -> torch.Tensor:
    B, dev = q.shape[0], q.device
    tables = {}  # "q" / "k" / "v" -> (B,) int64: the row each row reads it from (absent: its own)

    def table(name: str) -> torch.Tensor:
        if name not in tables:
            tables[name] = torch.arange(B, device=dev)
        return tables[name]

    def point(names, a: int, b: int, rows, on) -> None:
        """Rows a .. b-1 read `names` from `rows` (a row number or a (b-a,) table), where the switch `on` is."""
        for name in names:
            t = table(name)
            t[a:b] = rows if on is None else torch.where(on, rows, t[a:b])

    cached, explicit, own_maps = [], [], []  # see below
    for s, plan in blocks:
        if plan is None or not (plan.inject or plan.store is not None):
            continue
        P = plan.num_prompts
        on = plan.gate.ne(0) if plan.gate is not None and plan.inject else None  # (1,) device switch
        if plan.inject and plan.rows is not None:  # other editors: every row reads from its table's row
            point(("k", "v") if plan.take == "kv" else ("q", "k"), s, s + 2 * P, plan.rows + s, on)
            if plan.store is not None:
                own_maps.append((s, P, plan.store))
        elif plan.store is not None:  # the conditional rows' maps are formed, stored, injected: p @ v
            explicit.append((s, plan, on))
        elif plan.source is not None:  # a re-edit: the targets' q, k are the cache's
            cached.append((s + 2 * P - plan.targets, s + 2 * P, plan.source_qk(), on))
        else:  # the targets' q, k are the source row's
            point(("q", "k"), s + P + 1, s + 2 * P, s + P, on)
    formed = [r for s, plan, _ in explicit for r in range(s + plan.num_prompts, s + 2 * plan.num_prompts)]
    skip = set(formed)
    sdpa = _Rows([r for r in range(B) if r not in skip], dev)  # rows whose output SDPA gives

    def taken(x: torch.Tensor, name: str) -> torch.Tensor:
        if name in tables:
            return x.index_select(0, sdpa.take(tables[name]))
        return sdpa.take(x).clone() if cached else sdpa.take(x)  # a copy where the cache's rows are written

    qs, ks, vs = taken(q, "q"), taken(k, "k"), taken(v, "v")
    for a, b, source, on in cached:
        at = sdpa.position(a)
        for x, src in zip((qs, ks), source):
            src = src.to(x.dtype).expand(b - a, *x.shape[1:])
            x[at:at + b - a] = src if on is None else torch.where(on, src, x[at:at + b - a])
    out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    for s, P, store in own_maps:  # other editors' stores: each row's own map, before injection
        store.add_(probabilities(q[s + P:s + 2 * P], k[s + P:s + 2 * P], scale).mean(dim=1).to(store.dtype))
    if not explicit:
        return out
    full = torch.empty_like(q)
    sdpa.put(full, out)
    formed = _Rows(formed, dev)
    p = probabilities(formed.take(q), formed.take(k), scale)  # (R, H, N, N)
    mean, r = p.mean(dim=1), 0
    for s, plan, on in explicit:
        P = plan.num_prompts
        plan.store.add_(mean[r:r + P].to(plan.store.dtype))
        if plan.inject:  # every target takes the source's map: row P's, or the cache's
            first = r + P - plan.targets
            src = p[r:r + 1] if plan.source is None else probabilities(*plan.source_qk(), scale)
            src = src.expand(r + P - first, *p.shape[1:])
            p[first:r + P] = src if on is None else torch.where(on, src, p[first:r + P])
        r += P
    formed.put(full, (p @ formed.take(v).to(p.dtype)).to(q.dtype))
    return full


def _stacked(tables: list, plans: list) -> torch.Tensor | None:
    """Each injecting block's (targets, T) table, stacked over their target rows; a block without one gets ones."""
    if all(t is None for t in tables):
        return None
    like = next(t for t in tables if t is not None)
    return torch.cat([t if t is not None else like.new_ones(pl.targets, like.shape[-1])
                      for t, pl in zip(tables, plans)])


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """`rows` as consecutive [start, end) runs."""
    runs = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


class _Rows:
    """Some rows of a batch, taken and written as a slice where they are consecutive, else through one index
    made once by device ops only (no copy from the host, which a recorded CUDA graph would replay from freed
    host memory)."""

    def __init__(self, rows: list[int], device):
        self.runs, self.device, self._index = _runs(rows), device, None

    def index(self) -> torch.Tensor:
        if self._index is None:
            self._index = torch.cat([torch.arange(a, b, device=self.device) for a, b in self.runs])
        return self._index

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """t's rows (B, ...) -> (rows, ...)."""
        if len(self.runs) == 1:
            return t[self.runs[0][0]:self.runs[0][1]]
        return t.index_select(0, self.index())

    def position(self, row: int) -> int:
        """Where batch row `row` sits among these rows."""
        at = 0
        for a, b in self.runs:
            if a <= row < b:
                return at + row - a
            at += b - a
        raise ValueError(f"row {row} is not among {self.runs}")

    def put(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """t[rows] = value, in place."""
        if len(self.runs) == 1:
            t[self.runs[0][0]:self.runs[0][1]] = value
        else:
            t.index_copy_(0, self.index(), value.to(t.dtype))
