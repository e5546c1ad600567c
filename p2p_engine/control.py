"""Controllers compiled into per-step tables: what the UNet's attention layers see during an edit.

`compile_control` turns a controller description (`p2p_engine.controllers`), once
per edit, into tensors: a cross gate per UNet call (calls, P-1, 77), the mapper
(P-1, 77, 77), mix and equalizer (P-1, 77), a self-replace window, and LocalBlend's
word tables. The resulting `Control` is what the UNet sees: `plan(layer, n)` only
picks the current call's slice; the sampling loop calls `end_step` after each scheduler
step, which applies LocalBlend and advances the counter (MasaCtrl, Plug-and-Play: `editors.py`).

Windows follow the reference exactly: cross windows are rounded with
`int(f * (steps + 1))` over a (steps + 1)-row table, self windows with
`int(f * steps)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import is_int, is_number
from .controllers import Editor, LocalBlend, Store, _Edit
from .editors import EditorTables, editor_tables
from .maps import SELF_MAPS_MAX_QUERIES, AttentionMaps, level_hw
from .plan import AttnLayer, CrossPlan, FeaturePlan, ResnetSite, SelfPlan, inject_cross
from .words import MAX_TOKENS, edit_mapping, require_word, word_inds


# -- windows ---------------------------------------------------------------------------------------

def _bounds(value, what: str) -> tuple[float, float]:
    if is_number(value):
        start, end = 0.0, float(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        start, end = float(value[0]), float(value[1])
    else:
        raise TypeError(f"{what} must be a float or a (start, end) pair of fractions, got {value!r}")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{what} = {value!r}: fractions of the steps must lie in [0, 1]")
    if start > end:
        raise ValueError(f"{what} = {value!r}: the window starts after it ends; give (start, end) with start <= end")
    return start, end


def cross_gate(prompts, steps: int, cross_steps, tokenizer) -> torch.Tensor:
    """(steps + 1, P-1, 77) alpha table of the reference's get_time_words_attention_alpha."""
    rows = steps + 1
    alpha = torch.zeros(rows, len(prompts) - 1, MAX_TOKENS)
    spec = dict(cross_steps) if isinstance(cross_steps, dict) else {"default_": cross_steps}
    spec.setdefault("default_", (0.0, 1.0))

    def put(bounds, j, inds):
        s, e = cross_window(steps, bounds)
        alpha[:, j, inds] = 0
        alpha[s:e, j, inds] = 1

    for j in range(len(prompts) - 1):
        put(spec["default_"], j, slice(None))
    for word, bounds in spec.items():
        if word == "default_":
            continue
        found = False
        for j, p in enumerate(prompts[1:]):
            inds = word_inds(p, word, tokenizer)
            if inds:  # like the reference, a target without the word keeps its default window
                put(bounds, j, inds)
                found = True
        if not found:
            raise ValueError(f"cross_steps: the word {word!r} is in none of the target prompts {prompts[1:]!r}")
    return alpha


def cross_window(steps: int, cross_steps) -> tuple[int, int]:
    """The rows [start, end) of `cross_gate`'s table that a window (a fraction or a pair) opens."""
    start, end = _bounds(cross_steps, "cross_steps")
    return int(start * (steps + 1)), int(end * (steps + 1))


def self_window(steps: int, self_steps) -> tuple[int, int]:
    start, end = _bounds(self_steps, "self_steps")
    return int(steps * start), int(steps * end)


# -- tables ----------------------------------------------------------------------------------------

@dataclass
class EditTables:
    """A word edit (Replace, Refine, Reweight) as tensors; the formulas are `plan.inject_cross`'s."""

    gate: torch.Tensor  # (calls, P-1, T): per UNet call, per target token, 1 inside its cross window
    mapper: torch.Tensor  # (P-1, T, T)
    mix: torch.Tensor | None  # (P-1, T)
    equalizer: torch.Tensor | None  # (P-1, T)
    self_window: tuple[int, int]  # UNet calls [start, end) whose self maps are the source's
    self_max_queries: int  # only layers with at most this many queries have their self maps replaced
    injected_maps: bool = False  # the targets' stored maps are those after injection (the reference's store)

    def to(self, device) -> "EditTables":
        def f32(x):
            return None if x is None else x.to(device=device, dtype=torch.float32).contiguous()
        return EditTables(f32(self.gate), f32(self.mapper), f32(self.mix), f32(self.equalizer),
                          self.self_window, self.self_max_queries, self.injected_maps)


@dataclass
class BlendTables:
    """LocalBlend as tensors: which tokens of each prompt make its mask, and when and where it runs."""

    words: torch.Tensor  # (P, T) 0/1
    subtract: torch.Tensor | None  # (P, T) 0/1
    start: int  # blend after step callbacks number start + 1 on
    level: int  # UNet level whose down/up cross maps are read
    thresholds: tuple[float, float]  # (words, subtract)
    start_fraction: float = 0.0  # `start` as the fraction of the steps it was given (or defaulted) as


def _word_table(words, prompts, tokenizer, what: str) -> torch.Tensor:
    """(P, 77) 0/1 selection of each prompt's words."""
    if isinstance(words, str) or len(words) != len(prompts):
        raise ValueError(f"{what}: give one entry (a word or a list of words) per prompt, "
                         f"{len(prompts)} in all, got {words!r}")
    for ws in words:
        if not (isinstance(ws, str) or isinstance(ws, (list, tuple)) and all(isinstance(w, str) for w in ws)):
            raise TypeError(f"{what}: each prompt's entry is a word or a list of words, got {ws!r}")
    table = torch.zeros(len(prompts), MAX_TOKENS)
    for i, (p, ws) in enumerate(zip(prompts, words)):
        for w in ([ws] if isinstance(ws, str) else ws):
            table[i, require_word(p, w, tokenizer, what)] = 1.0
    return table


def edit_tables(ctrl: _Edit, prompts, tokenizer, steps: int, calls: int, self_max_queries: int) -> EditTables:
    gate = cross_gate(prompts, steps, ctrl.cross_steps, tokenizer)[:calls]
    mapper, mix, eq = edit_mapping(ctrl, prompts, tokenizer)
    limit = self_max_queries if ctrl.self_max_queries is None else ctrl.self_max_queries
    if not is_int(limit) or limit < 0:
        raise ValueError(f"self_max_queries must be a count of queries (an integer >= 0), got {limit!r}")
    if not isinstance(ctrl.injected_maps, bool):
        raise TypeError(f"injected_maps must be True or False, got {ctrl.injected_maps!r}")
    return EditTables(gate, mapper, mix, eq, self_window(steps, ctrl.self_steps), limit, ctrl.injected_maps)


def blend_level(layers: list[AttnLayer], wanted: int | None) -> int:
    """The level LocalBlend reads: `wanted`, else latent/4 (16x16 at 64x64), else the coarsest with maps."""
    levels = sorted({l.level for l in layers or () if l.is_cross and l.place != "mid"})
    if not levels:
        raise ValueError("LocalBlend needs cross-attention layers outside the mid block; this UNet has none")
    if wanted is not None:
        if wanted not in levels:
            raise ValueError(f"LocalBlend(level={wanted}): no down/up cross-attention at that level; "
                             f"levels with maps: {levels}")
        return wanted
    return 2 if 2 in levels else levels[-1]


def blend_tables(blend: LocalBlend, prompts, tokenizer, steps: int, layers, default_start: float = 0.0) -> BlendTables:
    """LocalBlend as tables; `default_start` is the start of a blend that leaves it None."""
    start = default_start if blend.start is None else blend.start
    for name, value, what in (("start", start, "the steps"), ("threshold", blend.threshold, "the mask's maximum"),
                              ("subtract_threshold", blend.subtract_threshold, "the mask's maximum")):
        if not is_number(value):
            raise TypeError(f"LocalBlend {name} must be a number, got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"LocalBlend {name} = {value!r}: a fraction of {what} in [0, 1]")
    subtract = None if blend.subtract is None else _word_table(blend.subtract, prompts, tokenizer,
                                                               "LocalBlend subtract")
    return BlendTables(_word_table(blend.words, prompts, tokenizer, "LocalBlend words"), subtract,
                       int(start * steps), blend_level(layers, blend.level),
                       (blend.threshold, blend.subtract_threshold), float(start))


# -- the runtime object ----------------------------------------------------------------------------

class Control:
    """What the UNet calls: `plan(layer, n_queries)` returns the current call's plan for that layer.

    The sampling loop calls `end_step(latents)` after each scheduler step; it applies LocalBlend
    and advances the counter, which counts UNet calls (one per step, or steps + 1 with PNDM).
    """

    def __init__(self, prompts, calls: int, device, *, edit: EditTables | None = None, blend: BlendTables | None = None,
                 store: bool = True, self_maps: bool = False, editor: EditorTables | None = None):
        self.prompts = prompts
        self.P = len(prompts)
        self.calls = calls
        self.device = torch.device(device)
        self.step = 0
        self.edit = edit.to(self.device) if edit is not None else None
        self.editor = editor.to(self.device) if editor is not None else None
        self.blend = blend
        self.blend_words = self.blend_sub = None  # (P, T) fp32 each, with a blend
        if blend is not None:
            f32 = dict(device=self.device, dtype=torch.float32)
            self.blend_words = blend.words.to(**f32)
            self.blend_sub = blend.subtract.to(**f32) if blend.subtract is not None else None
        # Host-side flags per call, computed once: a call whose gate is all zero injects nothing.
        e = self.edit
        self.cross_on = [bool(g.any()) for g in e.gate] if e is not None else [False] * calls
        self.self_on = [e is not None and e.self_window[0] <= i < e.self_window[1] for i in range(calls)]
        self.keep = store
        self.self_maps = self_maps
        self.cross_sum: dict[int, torch.Tensor] = {}  # layer index -> (P, N, T), summed over calls
        self.self_sum: dict[int, torch.Tensor] = {}   # layer index -> (P, N, N)
        self.layers: dict[int, tuple[AttnLayer, int]] = {}
        # this call's maps (pre-injection), summed at end_step: the cross maps of LocalBlend's layers and, with
        # injected maps, of every layer kept, and the self maps of the layers whose self attention is replaced
        self.step_buf: dict[int, torch.Tensor] = {}
        self.self_step: dict[int, torch.Tensor] = {}
        self.blend_sum = None  # (P, N, T): sum over calls and blend layers of post-injection maps

    # -- called by every attention layer ---------------------------------------------------------
    def plan(self, layer: AttnLayer, n_queries: int):
        if layer.index not in self.layers:
            self.layers[layer.index] = (layer, n_queries)
        if layer.is_cross:
            store = self._cross_buffer(layer, n_queries)
            return self._cross_plan(layer, store) if (self._injects_cross() or store is not None) else None
        store = self._self_buffer(layer, n_queries)
        if self.editor is not None:
            return self.editor.self_plan(layer, self.P, store, *self._editor_window("self"))
        inject = self._injects_self() and n_queries <= self.edit.self_max_queries
        return self._self_plan(layer, inject, store) if (inject or store is not None) else None

    def feature_plan(self, site: ResnetSite) -> FeaturePlan | None:
        """The plan of a decoder resnet's residual branch at this call (the UNet's feature seam), or None."""
        return None if self.editor is None else self.editor.feature_plan(site, *self._editor_window("features"))

    # The per-call choices, as hooks: a captured loop (`static_control.StaticControl`) makes them device tensors.
    def _injects_cross(self) -> bool:
        """Whether this call's cross plans may inject (then `_call_gate` says where)."""
        return self.cross_on[self.step]

    def _injects_self(self) -> bool:
        """Whether this call's self plans may inject (then `_call_self_gate` says whether they do)."""
        return self.self_on[self.step]

    def _call_gate(self) -> torch.Tensor | None:
        """This call's cross gate (P-1, T), or None when the call injects nothing."""
        return self.edit.gate[self.step] if self.cross_on[self.step] else None

    def _call_self_gate(self) -> torch.Tensor | None:
        """A (1,) device switch of this call's self injection, or None: `_injects_self` decided on the host."""
        return None

    def _editor_window(self, kind: str) -> tuple[bool, torch.Tensor | None]:
        """(whether the editor's window of `kind` may be open now, its (1,) device switch or None: host-decided)."""
        return self.editor.open_at(kind, self.step), None

    def _cross_plan(self, layer: AttnLayer, store) -> CrossPlan:
        e, gate = self.edit, self._call_gate()
        if gate is not None:
            return CrossPlan(self.P, store, e.mapper, e.mix, e.equalizer, gate)
        return CrossPlan(self.P, store)

    def _self_plan(self, layer: AttnLayer, inject: bool, store) -> SelfPlan:
        return SelfPlan(self.P, inject, store, self._call_self_gate() if inject else None)

    def _injected_maps(self, layer: AttnLayer, n: int) -> bool:
        """Whether this layer's maps are kept after injection, so go through a per-call buffer."""
        e = self.edit
        return e is not None and e.injected_maps and (layer.is_cross or n <= e.self_max_queries)

    def _self_buffer(self, layer, n):
        if not (self.self_maps and n <= SELF_MAPS_MAX_QUERIES):
            return None
        sums = self.self_step if self._injected_maps(layer, n) else self.self_sum
        store = sums.get(layer.index)
        if store is None:
            store = sums[layer.index] = torch.zeros(self.P, n, n, device=self.device)
        return store

    def _is_blend_layer(self, layer: AttnLayer) -> bool:
        return self.blend is not None and layer.place != "mid" and layer.level == self.blend.level

    def _cross_buffer(self, layer, n):
        if self._is_blend_layer(layer) or self.keep and self._injected_maps(layer, n):
            buf = self.step_buf.get(layer.index)
            if buf is None:
                buf = self.step_buf[layer.index] = torch.zeros(self.P, n, MAX_TOKENS, device=self.device)
            return buf
        if not self.keep:
            return None
        buf = self.cross_sum.get(layer.index)
        if buf is None:
            buf = self.cross_sum[layer.index] = torch.zeros(self.P, n, MAX_TOKENS, device=self.device)
        return buf

    # -- called by the sampling loop after each scheduler step -------------------------------------
    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (P, 4, h, w) after the scheduler step -> the same, blended."""
        gate = self._call_gate()
        if self.keep:
            injected = self.edit is not None and self.edit.injected_maps
            for k, buf in self.step_buf.items():
                add = self._after_injection(buf, gate) if injected else buf
                self.cross_sum.setdefault(k, torch.zeros_like(buf)).add_(add)
        for k, buf in self.self_step.items():  # self maps are kept whenever asked for, as `_self_buffer` keeps them
            self.self_sum.setdefault(k, torch.zeros_like(buf)).add_(self._self_after_injection(buf))
        if self.blend is not None:
            # The reference's store holds the maps *after* injection (its edit writes into the stored
            # tensor), and LocalBlend reads that store: rebuild the injected maps for this step. The
            # injection is linear per column, so applying it to the layer sum is exact.
            step_maps = self._after_injection(self._step_maps(), gate)
            if self.blend_sum is None:
                self.blend_sum = torch.zeros_like(step_maps)
            self.blend_sum.add_(step_maps)  # in place: a captured step keeps adding into the same buffer
            latents = self._blend_from_start(latents)  # reads blend_sum only
        for buf in [*self.step_buf.values(), *self.self_step.values()]:
            buf.zero_()
        self.step += 1
        return latents

    def _after_injection(self, maps: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """This call's cross maps (P, N, T) with the targets' rows as the edit injected them (`inject_cross`)."""
        if gate is None:
            return maps
        e = self.edit
        return torch.cat([maps[:1], inject_cross(maps[:1], maps[1:], e.mapper, e.mix, e.equalizer, gate)])

    def _self_after_injection(self, maps: torch.Tensor) -> torch.Tensor:
        """This call's self maps (P, N, N) of a replaced layer, the targets' rows the source's where replaced."""
        if not self._injects_self():
            return maps
        gate = self._call_self_gate()  # a captured loop's (1,) device switch; None: replaced on the host's word
        src = maps[:1].expand_as(maps[1:])
        return torch.cat([maps[:1], src if gate is None else src * gate + maps[1:] * (1 - gate)])

    def _blend_from_start(self, latents: torch.Tensor) -> torch.Tensor:
        """LocalBlend from the call after `blend.start` on; the latents as they are before."""
        return self._blend(latents) if self.step + 1 > self.blend.start else latents

    def _step_maps(self) -> torch.Tensor:
        """This call's pre-injection maps (P, N, T), summed over the blend layers."""
        return sum(buf for k, buf in self.step_buf.items() if self._is_blend_layer(self.layers[k][0]))

    def _mask(self, maps, words, threshold, pool, hw, size):
        m = (maps * words[:, None]).sum(-1).reshape(self.P, 1, *hw)
        if pool:
            m = torch.nn.functional.max_pool2d(m, 3, 1, padding=1)
        m = torch.nn.functional.interpolate(m, size=size)  # nearest, as the reference
        m = m / m.amax(dim=(2, 3), keepdim=True)
        m = m.gt(threshold)
        return m[:1] | m  # every target's region includes the source's

    def _blend(self, latents):
        h, w = latents.shape[-2:]
        level = self.blend.level
        hw = level_hw(h, w, level)
        maps = self.blend_sum.float()
        mask = self._mask(maps, self.blend_words, self.blend.thresholds[0], True, hw, (h, w))
        if self.blend_sub is not None:
            mask = mask & ~self._mask(maps, self.blend_sub, self.blend.thresholds[1], False, hw, (h, w))
        mask = mask.to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])

    def attention(self, latent_hw, tokenizer=None) -> AttentionMaps:
        return AttentionMaps(self.prompts, dict(self.layers), self.cross_sum, self.self_sum, self.calls,
                             latent_hw, tokenizer)


def compile_control(controller, prompts, tokenizer, steps: int, device, *, layers=None, local_blend=None,
                    store=True, calls: int | None = None, self_max_queries: int = 16 * 16,
                    blend_start: float = 0.0) -> Control | None:
    """Once per edit: controller description -> `Control` (or None when nothing is to be done).

    Args:
        steps: the sampler's steps, which the windows are fractions of.
        layers: the UNet's attention layers (`unet.attn_layers`), for LocalBlend's level.
        calls: UNet calls of the edit, counted by the control (default `steps`).
        self_max_queries: the self-replacement limit of controllers that leave it (`Pipeline.self_max_queries`).
        blend_start: the start of a LocalBlend that leaves it None (0.2 for an edit from an inversion).
    """
    prompts = list(prompts)
    P = len(prompts)
    calls = steps if calls is None else calls
    edit = blend = editor = None
    self_maps = False
    if controller is not None and not isinstance(getattr(controller, "self_maps", False), bool):
        raise TypeError(f"self_maps must be True or False, got {controller.self_maps!r}")
    if isinstance(controller, (Store, Editor)):
        self_maps = controller.self_maps
        editor = editor_tables(controller, P, steps, calls, layers) if isinstance(controller, Editor) else None
    elif controller is not None:
        if not isinstance(controller, _Edit):
            raise TypeError(f"controller must be Store, Replace, Refine, Reweight, MasaCtrl or PlugAndPlay, got "
                            f"{type(controller).__name__}")
        if P < 2:
            raise ValueError(f"{type(controller).__name__} edits need a source and at least one target prompt, "
                             f"got {P} prompt(s)")
        edit = edit_tables(controller, prompts, tokenizer, steps, calls, self_max_queries)
        self_maps = controller.self_maps
    if local_blend is not None:
        if not isinstance(local_blend, LocalBlend):
            raise TypeError(f"local_blend must be a p2p_engine.LocalBlend (e.g. LocalBlend([\"cat\", \"dog\"]): "
                            f"one word or list of words per prompt), got {type(local_blend).__name__}")
        if P < 2:
            raise ValueError("LocalBlend needs a source and at least one target prompt")
        blend = blend_tables(local_blend, prompts, tokenizer, steps, layers, blend_start)
    if controller is None and local_blend is None and not store:
        return None
    return Control(prompts, calls, device, edit=edit, blend=blend, store=store, self_maps=self_maps, editor=editor)
