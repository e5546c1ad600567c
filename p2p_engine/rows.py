"""An edit's rows in a UNet batch, and independent edits side by side in one batch.

One edit runs the rows [uncond x P, cond x P] of its P prompts (`plan.py`'s layout); a re-edit from an edit
cache runs its targets' rows only (`cache.py`). `Rows` is what a sampling loop (`editing._sample`,
`captured.StaticLoop`) needs of one edit: the prompts whose rows run, its `editing.Source` (start latent,
guidance, an inversion's null texts and pivots, proximal guidance) and its control.

Independent edits (`batch.edit_batch`) run as consecutive blocks of one UNet batch,
[uncond x P_1, cond x P_1, uncond x P_2, cond x P_2, ...], each block laid out as its edit alone lays out its
batch. So every layer outside attention treats the rows alike (per-row arithmetic: convolutions, norms and
linears see more rows, nothing else), every attention layer applies each edit's plan to its own block
(`BlockControl`, `plan.BlockPlans`), and the loops apply each edit's guidance, proximal threshold (a quantile
over its own rows), pivots and LocalBlend to its own latents. A batch of one edit is that edit: its control is
the UNet's, with no block plans in between.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import AttnLayer, BlockPlans, ResnetSite
from .scheduler import proximal_delta


@dataclass
class Rows:
    """One edit's block of rows (module docstring)."""

    prompts: list  # the prompts whose rows run: all of them, or a re-edit's targets
    src: object  # editing.Source: start latent, guidance, null texts, pivots, proximal guidance
    control: object  # control.Control (a re-edit's cache.CachedControl, edit_cache's cache.Recorder) or None
    pin: bool  # row 0 is the source, pinned after every step to a direct inversion's pivot
    cache: object = None  # a re-edit's cache.EditCache (its rows are the targets')

    @property
    def P(self) -> int:
        return len(self.prompts)


class BlockControl:
    """What the UNet calls for several edits in one batch: each layer's plans, one per block."""

    def __init__(self, controls: list, prompts: list[int]):
        self.controls = controls  # each block's control or None
        self.rows = tuple(2 * p for p in prompts)  # each block's UNet rows

    def plan(self, layer: AttnLayer, n_queries: int) -> BlockPlans | None:
        # every block's control is asked once per layer and call, as in its own edit (controls count and size
        # their buffers there)
        plans = [None if c is None else c.plan(layer, n_queries) for c in self.controls]
        return None if all(p is None for p in plans) else BlockPlans(self.rows, plans)

    def feature_plan(self, site: ResnetSite) -> BlockPlans | None:
        """A decoder resnet's feature plans (the UNet's feature seam), one per block, as `plan` gives attention's."""
        plans = [None if c is None else c.feature_plan(site) for c in self.controls]
        return None if all(p is None for p in plans) else BlockPlans(self.rows, plans)


def unet_control(controls: list, prompts: list[int]):
    """The control the UNet calls for blocks of `prompts[i]` prompts under `controls[i]` (or None): a single
    block's own, else a `BlockControl` of them all (None where no block has one)."""
    if len(controls) == 1:
        return controls[0]
    if all(c is None for c in controls):
        return None
    return BlockControl(controls, prompts)


def guide(out: torch.Tensor, guidance: float | torch.Tensor, proximal: str | None, quantile: float) -> torch.Tensor:
    """One edit's guided model output (P, C, h, w) from its UNet rows `out` [uncond x P, cond x P]: plain, or
    proximal guidance (`editing`'s module docstring) with its threshold a quantile over these rows only.
    `guidance` a scale, or one per row (P, 1, 1, 1) (`editing.Source.row_guidance`)."""
    out_u, out_c = out.chunk(2)
    delta = out_c - out_u
    if proximal == "l0":
        delta = proximal_delta(delta, quantile)
    return out_u + guidance * delta
