"""Control plans: what one attention call must do besides attending.

A plan is plain tensors, made once per edit by the controllers
(`p2p_engine.control`) and handed, per step and per layer, to the one
attention function (`p2p_engine.attention.attention`). The kernels in
`p2p_engine.kernels` and the pure-torch path consume the same plan.

Batch layout everywhere: the B = 2P rows are [uncond x P, cond x P] for P
prompts; row P is the source prompt's conditional row, rows P+1 .. 2P-1 the
targets'. Prompt-to-Prompt's plans never touch the unconditional half (other
editors' `rows` do: see the end).

Cross attention, with probabilities p = softmax(q k^T * scale) over T text
tokens, for target j = 1 .. P-1 (row P + j), all per-token vectors over T:

    injected = (p_src @ mapper[j-1]) * mix[j-1] + p_tgt * (1 - mix[j-1])
    injected = injected * equalizer[j-1]
    p_out    = injected * gate[j-1] + p_tgt * (1 - gate[j-1])

- Replace: mapper = the word mapper M_j, mix = 1.
- Refine: mapper = one-hot of the aligner's index map (column t holds a 1 at
  row mapper_j[t]; an unaligned token's column is zero), mix = alphas_j.
- Reweight: equalizer = c on the chosen tokens, 1 elsewhere; alone it uses
  mapper = identity, mix = 1; stacked, the previous controller's mapper/mix.
- gate = alpha_t of this step (per word windows); a step whose gate is all
  zero gets `mapper=None` (no injection at all).
`inject_cross` is these formulas in torch: the kernels' reference and
LocalBlend's rebuild of the injected maps both call it.
`store` (when not None) receives, added in place, the head-averaged
probabilities of the conditional rows *before* injection, as the reference's
AttentionStore sees them: store[i] += mean_h p[P + i].

A plan with a `source` (a re-edit from an edit cache, `p2p_engine.cache`)
reads p_src from it instead of computing it from row P: the batch then holds
the targets only, every conditional row P + j (j = 0 .. P-1) is a target,
with mapper[j], mix[j], ... and store (P, N, T). The source is p_src itself
(1, H, N, T), or with `source_row` a table (C, 1, H, N, T) of recorded calls
and the (1,) device index of this call's row (a captured loop's counter: no
copy of the row, no host sync).

Several independent edits in one batch (`batch.edit_batch`, `rows.BlockControl`): the rows are consecutive
blocks, each laid out as above for its own edit ([uncond x P_i, cond x P_i], or a re-edit's targets), and the
layer's plan is a `BlockPlans`: block i's plan (or None) applies to block i's rows only, so each block attends
exactly as its edit alone would (and the feature seam's plans likewise, `inject_features`).

Self attention, for target rows inside the self-replace window: the output is
softmax(q_src k_src^T * scale) @ v_tgt (the source's map applied to the
target's values). `store` (only for N <= 32*32) receives the head-averaged
(P, N, N) maps of the conditional rows before injection. A `gate` makes the
injection a device-side choice: a captured loop (`p2p_engine.captured`) reads
it from its step counter, so one recorded call serves calls inside and outside
the self window; a gate of 0 gives exactly the plain attention. A `source`
(a re-edit) gives q_src and k_src instead of row P, as for cross attention:
(1, H, N, D) each, or with `source_row` two tables (C, 1, H, N, D); every
conditional row is then a target.

Other editors (`p2p_engine.editors`) read a source row in both guidance halves.
A self plan with `rows`, a (2P,) int64 table, gives every row b a row rows[b]
to read from (b itself: plain attention), and `take` says what it reads:
"qk", the queries and keys (the source's map on the row's own values:
Plug-and-Play), or "kv", the keys and values (the row's own queries:
MasaCtrl's mutual self-attention):

    qk:  out[b] = softmax(q[rows[b]] k[rows[b]]^T * scale) @ v[b]
    kv:  out[b] = softmax(q[b] k[rows[b]]^T * scale) @ v[rows[b]]

with the same `gate` and `store` as above (store: the conditional rows' own
maps, before injection); `rows` and `source` are never given together.

The UNet's second seam is the residual branch of each decoder resnet (its
conv2 output, before the skip is added): `ResnetSite` names one, and a
`FeaturePlan` with a (2P,) `rows` table makes row b's branch row rows[b]'s
(Plug-and-Play's feature injection), where its `gate` (None: always) is
non-zero. `inject_features` is that in torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossPlan:
    num_prompts: int  # P
    store: torch.Tensor | None = None  # (P, N, T) fp32, accumulated in place
    mapper: torch.Tensor | None = None  # (P-1, T, T) fp32 (P, T, T with a source: every row a target)
    mix: torch.Tensor | None = None  # (P-1, T) fp32; None means all ones
    equalizer: torch.Tensor | None = None  # (P-1, T) fp32; None means all ones
    gate: torch.Tensor | None = None  # (P-1, T) fp32; None means all ones
    source: torch.Tensor | None = None  # the cached p_src (1, H, N, T), or a table (C, 1, H, N, T) ...
    source_row: torch.Tensor | None = None  # ... and the (1,) int64 index of this call's row in it

    @property
    def injects(self) -> bool:
        return self.mapper is not None

    @property
    def targets(self) -> int:
        return _targets(self)

    def source_probs(self) -> torch.Tensor:
        """The given p_src (1, H, N, T): the table's row when there is one."""
        return _source_at(self.source, self.source_row)


@dataclass
class SelfPlan:
    num_prompts: int  # P
    inject: bool = False  # targets use the source's map ...
    store: torch.Tensor | None = None  # (P, N, N) fp32, accumulated in place
    gate: torch.Tensor | None = None  # ... (1,) tensor: only where it is non-zero (None: always)
    source: tuple[torch.Tensor, torch.Tensor] | None = None  # the cached (q_src, k_src), each (1, H, N, D), or
    # two tables (C, 1, H, N, D) ...
    source_row: torch.Tensor | None = None  # ... and the (1,) int64 index of this call's row in them
    rows: torch.Tensor | None = None  # (2P,) int64: the row each row reads `take` from (other editors) ...
    take: str = "qk"  # ... "qk" (queries and keys) or "kv" (keys and values)

    @property
    def injects(self) -> bool:
        return self.inject

    @property
    def targets(self) -> int:
        return _targets(self)

    def source_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The given (q_src, k_src), each (1, H, N, D): the tables' rows when there are tables."""
        return tuple(_source_at(t, self.source_row) for t in self.source)


@dataclass
class FeaturePlan:
    """A decoder resnet's residual branch taken from other rows (module docstring)."""

    rows: torch.Tensor  # (2P,) int64: row b's branch becomes row rows[b]'s
    gate: torch.Tensor | None = None  # (1,) tensor: only where it is non-zero (None: always)


def inject_features(h: torch.Tensor, plan: "FeaturePlan | BlockPlans") -> torch.Tensor:
    """h (B, C, h, w), a resnet's residual branch -> the same with row b replaced by row plan.rows[b] (a batch of
    independent edits: each block under its own plan)."""
    if isinstance(plan, BlockPlans):
        return torch.cat([h[a:b] if p is None else inject_features(h[a:b], p) for a, b, p in plan.spans()])
    taken = h.index_select(0, plan.rows)
    return taken if plan.gate is None else torch.where(plan.gate.ne(0), taken, h)


def _targets(plan: CrossPlan | SelfPlan) -> int:
    """Rows that injection writes: P - 1 after the source row, or all P when the source is given."""
    return plan.num_prompts if plan.source is not None else plan.num_prompts - 1


def _source_at(source: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
    return source if row is None else source.index_select(0, row)[0]


@dataclass
class BlockPlans:
    """One layer's plans for a batch of independent edits: `rows[i]` consecutive batch rows, block i, take
    `plans[i]` (a CrossPlan, SelfPlan, or None for plain attention)."""

    rows: tuple[int, ...]  # each block's rows (2 P_i), in batch order
    plans: list  # each block's plan or None

    def spans(self) -> list[tuple[int, int, object]]:
        """(start, end, plan) of each block's rows; neighbouring blocks without a plan are merged into one span,
        which plain attention serves in one call."""
        out, start = [], 0
        for n, plan in zip(self.rows, self.plans):
            if plan is None and out and out[-1][2] is None:
                out[-1] = (out[-1][0], start + n, None)
            else:
                out.append((start, start + n, plan))
            start += n
        return out


@dataclass(frozen=True)
class AttnLayer:
    """Where an attention layer sits; the UNet numbers its layers in call order."""

    index: int  # 0 .. num_layers-1 over the whole UNet, in forward order
    place: str  # "down" | "mid" | "up"
    is_cross: bool
    level: int  # resolution level: 0 is the full latent size, each level halves it
    module: int = 0  # which attention module (Transformer2D) of its down/up block, 0 first; the mid block's is 0


@dataclass(frozen=True)
class ResnetSite:
    """Where a decoder (up block) resnet sits: the UNet's feature seam (module docstring)."""

    level: int  # resolution level of its up block, as AttnLayer's
    position: int  # its index among its block's resnets


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The plans' probabilities: fp32 at least, as the kernels'; float64 inputs (test truth) stay float64."""
    return torch.promote_types(dtype, torch.float32)


def probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) in `compute_dtype`, as every path that materialises a plan's probabilities forms
    them: q (..., N, D), k (..., M, D) -> (..., N, M)."""
    ct = compute_dtype(q.dtype)
    return torch.softmax((q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale, dim=-1)


def inject_cross(p_src: torch.Tensor, p_tgt: torch.Tensor, mapper: torch.Tensor, mix: torch.Tensor | None = None,
                 equalizer: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The targets' injected cross probabilities, by the formulas above.

    Args:
        p_src: (1, *, N, T) the source's probabilities; p_tgt: (P-1, *, N, T) the targets' own, with the
            same middle dimensions (heads, or none).
        mapper: (P-1, T, T); mix, equalizer, gate: (P-1, T) or None (all ones).
    Returns (P-1, *, N, T) in p_tgt's dtype.
    """
    mid = (1,) * (p_tgt.dim() - 3)

    def per_token(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(p_tgt.dtype).view(x.shape[0], *mid, 1, x.shape[-1])

    injected = p_src @ mapper.to(p_tgt.dtype).view(mapper.shape[0], *mid, *mapper.shape[1:])
    mix, equalizer, gate = per_token(mix), per_token(equalizer), per_token(gate)
    if mix is not None:
        injected = injected * mix + p_tgt * (1 - mix)
    if equalizer is not None:
        injected = injected * equalizer
    if gate is not None:
        injected = injected * gate + p_tgt * (1 - gate)
    return injected
