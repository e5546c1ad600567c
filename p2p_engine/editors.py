"""MasaCtrl and Plug-and-Play compiled: which layers and calls take what from the source row.

Both editors read a source row in *both* guidance halves, which Prompt-to-Prompt
never does; the plan contract (`plan.py`) has a `rows` table for that: row b
reads from row rows[b] (itself: nothing changes). On the batch [uncond x P,
cond x P], prompt 0 the source:

- MasaCtrl (`controllers.MasaCtrl`; PnPInversion's run_editing_masactrl.py,
  after TencentARC/MasaCtrl's MutualSelfAttentionControl): rows = [0] * P +
  [P] * P, take "kv": every row keeps its queries and attends to its half's
  source row's keys and values, in the self layers of the transformer blocks
  from `start_layer` (the reference counts attention calls and halves them:
  block = layer index // 2 here, where each block is one self and one cross
  layer), from UNet call `start_step` to the end. The source rows read
  themselves, so the source is as without the edit.
- Plug-and-Play (`controllers.PlugAndPlay`; PnPInversion's run_editing_pnp.py):
  one source branch r (row 0, the source's unconditional row, for branch
  "empty"; row P for "prompt") read by every target row of both halves:
  rows[b] = r for the targets, b for rows 0 and P. Take "qk" (the branch's
  self-attention map on the target's own values) in the decoder's attention
  modules after the first at latent/4 and all finer ones (SD 1.x:
  up_blocks[1].attentions[1, 2], up_blocks[2, 3].attentions[0 .. 2]) for the
  first `self_steps`; and the residual features of the latent/4 up block's
  second resnet (up_blocks[1].resnets[1]) for the first `feature_steps`,
  through the UNet's feature seam (`plan.FeaturePlan`). The reference's source
  branch is fed latents from the inversion and its own prediction is dropped:
  here the source row is pinned to a direct inversion's pivots, and advanced at
  guidance 1 from a DDIM inversion (its reconstruction, `prepare_source`); its
  targets' unconditional branch reads the negative prompt.

Windows count UNet calls, as the references' `cur_step` (one per DDIM step):
MasaCtrl's [start_step, calls), Plug-and-Play's [int(start * steps),
int(end * steps)) as the reference's `int(n_timesteps * pnp_t)`.
`EditorTables` is what a `control.Control` holds and asks per layer and per
call; the captured loop (`p2p_engine.captured`) reads the same windows from
device tables at its step counter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .checks import is_int, is_number
from .controllers import PNP_BRANCHES, MasaCtrl, PlugAndPlay
from .plan import AttnLayer, FeaturePlan, ResnetSite, SelfPlan

KINDS = ("self", "features")  # what an editor's windows open: self-attention plans, feature plans
PNP_LEVEL = 2  # Plug-and-Play's coarsest decoder level (SD 1.x's up_blocks[1]: latent/4, 16 x 16 at 512 x 512)


@dataclass
class EditorTables:
    """One editor as the attention and feature seams ask for it (module docstring)."""

    name: str  # "masactrl" | "pnp"
    take: str  # the self plans' `take`: "kv" or "qk"
    rows: torch.Tensor  # (2P,) int64: the row each row reads from
    self_layers: frozenset  # indices of the self-attention layers injected
    sites: frozenset  # the decoder resnets (ResnetSite) whose features are injected
    windows: dict  # kind (KINDS) -> UNet calls [start, end) it is open for

    def to(self, device) -> "EditorTables":
        return dataclasses.replace(self, rows=self.rows.to(device))

    def open_at(self, kind: str, call: int) -> bool:
        start, end = self.windows[kind]
        return start <= call < end

    def opens(self, kind: str) -> bool:
        """Whether the window of `kind` opens at any call (on a layer or site that it selects)."""
        start, end = self.windows[kind]
        return start < end and bool(self.self_layers if kind == "self" else self.sites)

    def gate_tables(self, calls: int, device) -> dict:
        """kind -> (calls, 1) fp32, 1 at the calls its window opens, for each kind that opens: what a captured
        loop reads at its step counter (`captured.StaticControl`)."""
        out = {}
        for kind in KINDS:
            if self.opens(kind):
                start, end = self.windows[kind]
                out[kind] = torch.zeros(calls, 1, device=device)
                out[kind][start:end] = 1
        return out

    def self_plan(self, layer: AttnLayer, P: int, store, on: bool, gate) -> SelfPlan | None:
        """The plan of a self layer at this call: `on` the host's word that the window is open (or may be, with
        the device `gate`), `store` the layer's self-map buffer or None."""
        if on and layer.index in self.self_layers:
            return SelfPlan(P, True, store, gate, rows=self.rows, take=self.take)
        return SelfPlan(P, False, store) if store is not None else None

    def feature_plan(self, site: ResnetSite, on: bool, gate) -> FeaturePlan | None:
        return FeaturePlan(self.rows, gate) if on and site in self.sites else None

    def signature(self) -> tuple:
        """What a captured loop bakes in (the windows are its device tables)."""
        return (self.name, self.take, tuple(self.rows.tolist()), tuple(sorted(self.self_layers)),
                tuple(sorted((s.level, s.position) for s in self.sites)))


def _window(value, steps: int, what: str) -> tuple[int, int]:
    """A fraction f (the calls [0, int(f * steps))) or a (start, end) pair of fractions -> calls [start, end)."""
    pair = (0.0, value) if is_number(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_number(v) for v in pair)):
        raise TypeError(f"{what} must be a fraction of the steps or a (start, end) pair of fractions, got {value!r}")
    start, end = (float(v) for v in pair)
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{what} = {value!r}: fractions of the steps with 0 <= start <= end <= 1")
    return int(start * steps), int(end * steps)


def _check_layers(layers, name: str) -> list[AttnLayer]:
    if not layers:
        raise ValueError(f"{name} chooses its layers from the UNet's: pass layers=pipe.unet.attn_layers")
    return list(layers)


def masactrl_layers(ctrl: MasaCtrl, layers) -> frozenset:
    """The self layers MasaCtrl injects: transformer blocks from `start_layer` (None: the decoder at the
    latent's size and half of it), each block one self and one cross layer in forward order."""
    layers = _check_layers(layers, "MasaCtrl")
    selfs = [l for l in layers if not l.is_cross]
    if ctrl.start_layer is None:
        chosen = {l.index for l in selfs if l.place == "up" and l.level <= 1}
    else:
        if not is_int(ctrl.start_layer) or not 0 <= ctrl.start_layer < len(selfs):
            raise ValueError(f"MasaCtrl start_layer = {ctrl.start_layer!r}: a transformer block number in [0, "
                             f"{len(selfs)}) (this UNet has {len(selfs)}, counted in forward order), or None for "
                             f"the decoder's two finest resolutions")
        chosen = {l.index for l in selfs if l.index // 2 >= ctrl.start_layer}
    if not chosen:
        raise ValueError("MasaCtrl: this UNet has no self attention in the decoder's two finest resolutions; give "
                         "start_layer")
    return frozenset(chosen)


def pnp_layers(layers) -> tuple[frozenset, frozenset]:
    """(self layers, resnet sites) of Plug-and-Play: the decoder's attention modules after the first at latent/4
    and every one finer; the latent/4 up block's second resnet."""
    layers = _check_layers(layers, "PlugAndPlay")
    if max(l.level for l in layers) < PNP_LEVEL:
        raise ValueError(f"PlugAndPlay injects features at the decoder's latent/{2 ** PNP_LEVEL} level; this UNet "
                         f"has {max(l.level for l in layers) + 1} levels")
    chosen = {l.index for l in layers if not l.is_cross and l.place == "up"
              and (l.level < PNP_LEVEL or l.level == PNP_LEVEL and l.module >= 1)}
    return frozenset(chosen), frozenset({ResnetSite(PNP_LEVEL, 1)})


def editor_tables(ctrl, num_prompts: int, steps: int, calls: int, layers) -> EditorTables:
    """A MasaCtrl or PlugAndPlay description -> its tables, checked (errors name the argument to fix)."""
    P = num_prompts
    if P < 2:
        raise ValueError(f"{type(ctrl).__name__} edits need a source and at least one target prompt, got {P} "
                         f"prompt(s)")
    if not isinstance(ctrl.self_maps, bool):
        raise TypeError(f"self_maps must be True or False, got {ctrl.self_maps!r}")
    if isinstance(ctrl, MasaCtrl):
        if not is_int(ctrl.start_step) or ctrl.start_step < 0:
            raise ValueError(f"MasaCtrl start_step must be a UNet call number >= 0, got {ctrl.start_step!r}")
        rows = [0] * P + [P] * P
        windows = {"self": (min(ctrl.start_step, calls), calls), "features": (0, 0)}
        return EditorTables("masactrl", "kv", torch.tensor(rows), masactrl_layers(ctrl, layers), frozenset(),
                            windows)
    if isinstance(ctrl, PlugAndPlay):
        if ctrl.branch not in PNP_BRANCHES:
            raise ValueError(f"PlugAndPlay branch must be one of {PNP_BRANCHES} (the source's unconditional row, "
                             f"or its prompt's), got {ctrl.branch!r}")
        _check_negative(ctrl)
        branch = 0 if ctrl.branch == "empty" else P
        rows = [0] + [branch] * (P - 1) + [P] + [branch] * (P - 1)
        self_layers, sites = pnp_layers(layers)
        windows = {"self": _window(ctrl.self_steps, steps, "PlugAndPlay self_steps"),
                   "features": _window(ctrl.feature_steps, steps, "PlugAndPlay feature_steps")}
        windows = {k: (min(a, calls), min(b, calls)) for k, (a, b) in windows.items()}
        return EditorTables("pnp", "qk", torch.tensor(rows), self_layers, sites, windows)
    raise TypeError(f"not an editor: {type(ctrl).__name__}")


def _check_negative(ctrl: PlugAndPlay) -> None:
    if ctrl.negative_prompt is not None and not isinstance(ctrl.negative_prompt, str):
        raise TypeError(f"PlugAndPlay negative_prompt must be a string or None, got {ctrl.negative_prompt!r}")


def prepare_source(pipe, controller, src, inversion):
    """The edit's resolved source settings (`editing.Source`) with what Plug-and-Play changes in them: its
    targets' unconditional prompt, and from a DDIM inversion the source row at guidance 1 (the reference feeds
    its source branch the DDIM reconstruction, which samples the source prompt at guidance 1). Others: `src`."""
    if not isinstance(controller, PlugAndPlay):
        return src
    _check_negative(controller)
    changes = {}
    if controller.negative_prompt is not None:
        changes["negative"] = pipe.encode_text([controller.negative_prompt])
    if inversion is not None and inversion.method == "ddim":
        changes["source_guidance"] = 1.0
    return dataclasses.replace(src, **changes)
