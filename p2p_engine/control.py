"""Prompt-to-Prompt controllers and their compilation into per-step plans.

The user-facing controllers (`Store`, `Replace`, `Refine`, `Reweight`,
`LocalBlend`) are plain descriptions. `compile_control` turns one of them,
once per edit, into tensors: a cross gate per step (steps, P-1, 77), the
mapper (P-1, 77, 77), mix and equalizer (P-1, 77) and a self-replace flag per
step. The resulting `Control` is what the UNet sees: `plan(layer, n)` only
picks the current step's slice; the edit loop advances the step.

Windows follow the reference exactly: cross windows are rounded with
`int(f * (steps + 1))` over a (steps + 1)-row table, self windows with
`int(f * steps)`. Prompts longer than 77 tokens are truncated with a warning,
as the reference's tokenizer call does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .plan import AttnLayer, CrossPlan, SelfPlan

MAX_TOKENS = 77


# -- words to token positions -------------------------------------------------------------------

def word_inds(prompt: str, word: str, tokenizer) -> list[int]:
    """Token positions (BOS counted, so starting at 1) of every occurrence of `word` in `prompt`."""
    try:
        from .align import word_inds as native
    except ImportError:
        native = None
    if native is not None:
        return [int(i) for i in native(prompt, word, tokenizer)]
    # The reference's walk over decoded tokens, used until the aligner module is present.
    split = prompt.split(" ")
    places = [i for i, w in enumerate(split) if w == word]
    out: list[int] = []
    if places:
        pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(prompt)][1:-1]
        cur, ptr = 0, 0
        for i, piece in enumerate(pieces):
            cur += len(piece)
            if ptr in places:
                out.append(i + 1)
            if cur >= len(split[ptr]):
                ptr, cur = ptr + 1, 0
    return out


def _require_word(prompt: str, word: str, tokenizer, what: str) -> list[int]:
    inds = [i for i in word_inds(prompt, word, tokenizer) if i < MAX_TOKENS]
    if not inds:
        raise ValueError(f"{what}: the word {word!r} is not in the prompt {prompt!r} "
                         "(words are matched whole, split on spaces)")
    return inds


def check_prompts(prompts, tokenizer) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (the source first)")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"every prompt must be a str, got {type(p).__name__}")
        n = len(tokenizer(p).input_ids)
        if n > MAX_TOKENS:
            warnings.warn(f"prompt {p!r} has {n} tokens; it is truncated to {MAX_TOKENS} like the reference does",
                          stacklevel=3)
    return prompts


# -- windows ---------------------------------------------------------------------------------------

def _bounds(value, what: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        start, end = 0.0, float(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        start, end = float(value[0]), float(value[1])
    else:
        raise TypeError(f"{what} must be a float or a (start, end) pair of fractions, got {value!r}")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{what} = {value!r}: fractions of the steps must lie in [0, 1]")
    return start, end


def cross_gate(prompts, steps: int, cross_steps, tokenizer) -> torch.Tensor:
    """(steps + 1, P-1, 77) alpha table of the reference's get_time_words_attention_alpha."""
    rows = steps + 1
    alpha = torch.zeros(rows, len(prompts) - 1, MAX_TOKENS)
    spec = dict(cross_steps) if isinstance(cross_steps, dict) else {"default_": cross_steps}
    spec.setdefault("default_", (0.0, 1.0))

    def put(bounds, j, inds):
        start, end = _bounds(bounds, "cross_steps")
        s, e = int(start * rows), int(end * rows)
        alpha[:, j, inds] = 0
        alpha[s:e, j, inds] = 1

    for j in range(len(prompts) - 1):
        put(spec["default_"], j, slice(None))
    for word, bounds in spec.items():
        if word == "default_":
            continue
        found = False
        for j, p in enumerate(prompts[1:]):
            inds = [i for i in word_inds(p, word, tokenizer) if i < MAX_TOKENS]
            if inds:  # like the reference, a target without the word keeps its default window
                put(bounds, j, inds)
                found = True
        if not found:
            raise ValueError(f"cross_steps: the word {word!r} is in none of the target prompts {prompts[1:]!r}")
    return alpha


def self_window(steps: int, self_steps) -> tuple[int, int]:
    start, end = _bounds(self_steps, "self_steps")
    return int(steps * start), int(steps * end)


# -- controllers (descriptions) --------------------------------------------------------------------

@dataclass
class Store:
    """Keep attention maps only; no edit. `self_maps` also keeps self maps of layers with N <= 32*32."""

    self_maps: bool = False


@dataclass
class _Edit:
    cross_steps: object = 0.8
    self_steps: object = 0.4
    # Self replacement applies to layers with at most this many queries: 16*16 in the stable
    # notebook (default), 32*32 in the null-text notebook.
    self_max_queries: int = 16 * 16
    self_maps: bool = False


@dataclass
class Replace(_Edit):
    """Word swap: target cross maps become P_src @ M_j (same number of words in every prompt)."""


@dataclass
class Refine(_Edit):
    """Added words: aligned tokens take the source's maps, inserted tokens keep their own."""


@dataclass
class Reweight(_Edit):
    """Scale the chosen words' columns of the (mapped) source maps; `prev` is a Replace or Refine."""

    equalizer: dict = field(default_factory=dict)
    prev: object = None

    def __init__(self, equalizer=None, prev=None, cross_steps=0.8, self_steps=0.4,
                 self_max_queries=16 * 16, self_maps=False):
        super().__init__(cross_steps, self_steps, self_max_queries, self_maps)
        self.equalizer = dict(equalizer or {})
        self.prev = prev
        if prev is not None and not isinstance(prev, (Replace, Refine)):
            raise TypeError(f"Reweight(prev=...) must be a Replace or Refine, got {type(prev).__name__}")


@dataclass
class LocalBlend:
    """Keep the source latent outside the chosen words' region.

    words: one entry per prompt (a word or a list of words), e.g. ["cat", "dog"].
    subtract: the same shape, or None (null-text notebook's subtraction).
    start: fraction of the steps before blending starts (0.2 in the null-text notebook).
    level: the UNet level whose down/up cross maps build the mask; None = latent / 4 (the
        reference's 16x16 maps at 64x64 latents), falling back to the coarsest level with
        down/up cross attention.
    """

    words: object
    subtract: object = None
    start: float = 0.0
    threshold: float = 0.3
    subtract_threshold: float = 0.3
    level: int | None = None


# -- compiled form ---------------------------------------------------------------------------------

def _one_hot_mapper(mapper: torch.Tensor) -> torch.Tensor:
    """(P-1, T) index map (-1 = unaligned) -> (P-1, T, T) with column t holding a 1 at row mapper[t]."""
    n, t = mapper.shape
    out = torch.zeros(n, t, t)
    cols = torch.arange(t).expand(n, t)
    ok = mapper >= 0
    b = torch.arange(n)[:, None].expand(n, t)
    out[b[ok], mapper[ok].long(), cols[ok]] = 1.0
    return out


def _word_table(words, prompts, tokenizer, what: str) -> torch.Tensor:
    """(P, 77) 0/1 selection of each prompt's words."""
    if isinstance(words, str) or len(words) != len(prompts):
        raise ValueError(f"{what}: give one entry (a word or a list of words) per prompt, "
                         f"{len(prompts)} in all, got {words!r}")
    table = torch.zeros(len(prompts), MAX_TOKENS)
    for i, (p, ws) in enumerate(zip(prompts, words)):
        for w in ([ws] if isinstance(ws, str) else ws):
            table[i, _require_word(p, w, tokenizer, what)] = 1.0
    return table


def _edit_tensors(ctrl, prompts, tokenizer):
    """(mapper (P-1,T,T), mix (P-1,T) or None, equalizer (P-1,T) or None)."""
    n = len(prompts) - 1
    if isinstance(ctrl, Reweight):
        if ctrl.prev is not None:
            mapper, mix, _ = _edit_tensors(ctrl.prev, prompts, tokenizer)
        else:
            mapper, mix = torch.eye(MAX_TOKENS).expand(n, -1, -1).clone(), None
        eq = torch.ones(n, MAX_TOKENS)
        for word, scale in ctrl.equalizer.items():
            for j, p in enumerate(prompts[1:]):
                eq[j, _require_word(p, word, tokenizer, "Reweight equalizer")] = float(scale)
        return mapper, mix, eq
    from . import align
    if isinstance(ctrl, Replace):
        return torch.as_tensor(align.replace_mappers(prompts, tokenizer), dtype=torch.float32), None, None
    mapper, alphas = align.refine_mappers(prompts, tokenizer)
    return _one_hot_mapper(torch.as_tensor(mapper)), torch.as_tensor(alphas, dtype=torch.float32), None


class Control:
    """What the UNet calls: `plan(layer, n_queries)` returns the step's plan for that layer.

    The edit loop calls `end_step(latents)` after each scheduler step; it applies LocalBlend
    and advances the step counter.
    """

    def __init__(self, prompts, steps: int, device, *, gate=None, mapper=None, mix=None, equalizer=None,
                 self_window_=(0, 0), self_max_queries=16 * 16, store=True, self_maps=False,
                 blend=None, blend_sub=None, blend_start=0, blend_level=None, thresholds=(0.3, 0.3)):
        self.prompts = prompts
        self.P = len(prompts)
        self.steps = steps
        self.device = torch.device(device)
        self.step = 0
        f32 = dict(device=self.device, dtype=torch.float32)
        self.gate = gate.to(**f32).contiguous() if gate is not None else None  # (steps, P-1, T)
        self.mapper = mapper.to(**f32).contiguous() if mapper is not None else None
        self.mix = mix.to(**f32).contiguous() if mix is not None else None
        self.equalizer = equalizer.to(**f32).contiguous() if equalizer is not None else None
        # Host-side per-step flags, computed once: a step whose gate is all zero injects nothing.
        self.cross_on = ([bool(g.any()) for g in gate] if (gate is not None and mapper is not None)
                         else [False] * steps)
        s0, s1 = self_window_
        self.self_on = [mapper is not None and s0 <= i < s1 for i in range(steps)]
        self.self_max_queries = self_max_queries
        self.keep = store
        self.self_maps = self_maps
        self.cross_sum: dict[int, torch.Tensor] = {}  # layer index -> (P, N, T), summed over steps
        self.self_sum: dict[int, torch.Tensor] = {}   # layer index -> (P, N, N)
        self.layers: dict[int, tuple[AttnLayer, int]] = {}
        # LocalBlend
        self.blend = blend.to(**f32) if blend is not None else None  # (P, T)
        self.blend_sub = blend_sub.to(**f32) if blend_sub is not None else None
        self.blend_start = blend_start
        self.blend_level = blend_level
        self.thresholds = thresholds
        self.step_buf: dict[int, torch.Tensor] = {}  # blend layers: this step's maps (pre-injection)
        self.blend_sum = None  # (P, N, T): sum over steps and blend layers of post-injection maps
        self.blend_count = 0

    # -- called by every attention layer ---------------------------------------------------------
    def plan(self, layer: AttnLayer, n_queries: int):
        i = self.step
        if layer.index not in self.layers:
            self.layers[layer.index] = (layer, n_queries)
        if layer.is_cross:
            store = self._cross_buffer(layer, n_queries)
            if self.cross_on[i]:
                return CrossPlan(self.P, store, self.mapper, self.mix, self.equalizer, self.gate[i])
            return CrossPlan(self.P, store) if store is not None else None
        inject = self.self_on[i] and n_queries <= self.self_max_queries
        store = None
        if self.self_maps and n_queries <= 32 * 32:
            store = self.self_sum.get(layer.index)
            if store is None:
                store = self.self_sum[layer.index] = torch.zeros(self.P, n_queries, n_queries,
                                                                 device=self.device)
        if inject or store is not None:
            return SelfPlan(self.P, inject, store)
        return None

    def _is_blend_layer(self, layer: AttnLayer) -> bool:
        return self.blend is not None and layer.place != "mid" and layer.level == self.blend_level

    def _cross_buffer(self, layer, n):
        if self._is_blend_layer(layer):
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

    # -- called by the edit loop after each scheduler step ----------------------------------------
    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (P, 4, h, w) after the scheduler step -> the same, blended."""
        i = self.step
        if self.step_buf:
            step_maps = sum(self.step_buf.values())  # (P, N, T) over blend layers
            if self.keep:
                for k, buf in self.step_buf.items():
                    self.cross_sum.setdefault(k, torch.zeros_like(buf)).add_(buf)
            # The reference's store holds the maps *after* injection (its edit writes into the stored
            # tensor), and LocalBlend reads that store: rebuild the injected maps for this step. The
            # injection is linear per column, so applying it to the layer sum is exact.
            if self.cross_on[i]:
                src, tgt = step_maps[:1], step_maps[1:]
                inj = src @ self.mapper  # (P-1, N, T)
                if self.mix is not None:
                    inj = inj * self.mix[:, None] + tgt * (1 - self.mix[:, None])
                if self.equalizer is not None:
                    inj = inj * self.equalizer[:, None]
                g = self.gate[i][:, None]
                step_maps = torch.cat([src, inj * g + tgt * (1 - g)])
            self.blend_sum = step_maps if self.blend_sum is None else self.blend_sum + step_maps
            for buf in self.step_buf.values():
                buf.zero_()
            if i + 1 > self.blend_start:
                latents = self._blend(latents)
        self.step += 1
        return latents

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
        hw = (-(-h // 2 ** self.blend_level), -(-w // 2 ** self.blend_level))
        maps = self.blend_sum.float()
        mask = self._mask(maps, self.blend, self.thresholds[0], True, hw, (h, w))
        if self.blend_sub is not None:
            mask = mask & ~self._mask(maps, self.blend_sub, self.thresholds[1], False, hw, (h, w))
        mask = mask.to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])

    def attention(self, latent_hw, tokenizer=None):
        from .maps import AttentionMaps
        return AttentionMaps(self.prompts, dict(self.layers), self.cross_sum, self.self_sum, self.steps,
                             latent_hw, tokenizer)


def blend_level(layers: list[AttnLayer], latent_size: int, wanted: int | None) -> int:
    """The level LocalBlend reads: `wanted`, else latent/4 (16x16 at 64x64), else the coarsest with maps."""
    levels = sorted({l.level for l in layers if l.is_cross and l.place != "mid"})
    if not levels:
        raise ValueError("LocalBlend needs cross-attention layers outside the mid block; this UNet has none")
    if wanted is not None:
        if wanted not in levels:
            raise ValueError(f"LocalBlend(level={wanted}): no down/up cross-attention at that level; "
                             f"levels with maps: {levels}")
        return wanted
    return 2 if 2 in levels else levels[-1]


def compile_control(controller, prompts, tokenizer, steps: int, device, *, layers=None, local_blend=None,
                    store=True) -> Control | None:
    """Once per edit: controller description -> `Control` (or None when nothing is to be done)."""
    prompts = list(prompts)
    P = len(prompts)
    kw = dict(store=store)
    if isinstance(controller, Store):
        kw["self_maps"] = controller.self_maps
    elif controller is not None:
        if not isinstance(controller, _Edit):
            raise TypeError(f"controller must be Store, Replace, Refine or Reweight, got {type(controller).__name__}")
        if P < 2:
            raise ValueError(f"{type(controller).__name__} edits need a source and at least one target prompt, "
                             f"got {P} prompt(s)")
        gate = cross_gate(prompts, steps, controller.cross_steps, tokenizer)[:steps]
        window = self_window(steps, controller.self_steps)
        mapper, mix, eq = _edit_tensors(controller, prompts, tokenizer)
        kw.update(gate=gate, mapper=mapper, mix=mix, equalizer=eq, self_window_=window,
                  self_max_queries=controller.self_max_queries, self_maps=controller.self_maps)
    if local_blend is not None:
        if P < 2:
            raise ValueError("LocalBlend needs a source and at least one target prompt")
        if not 0.0 <= float(local_blend.start) <= 1.0:
            raise ValueError(f"LocalBlend start = {local_blend.start!r}: a fraction of the steps in [0, 1]")
        kw.update(blend=_word_table(local_blend.words, prompts, tokenizer, "LocalBlend words"),
                  blend_sub=(None if local_blend.subtract is None else
                             _word_table(local_blend.subtract, prompts, tokenizer, "LocalBlend subtract")),
                  blend_start=int(local_blend.start * steps),
                  thresholds=(local_blend.threshold, local_blend.subtract_threshold),
                  blend_level=blend_level(layers, 0, local_blend.level) if layers is not None
                  else (local_blend.level if local_blend.level is not None else 2))
    if controller is None and local_blend is None and not store:
        return None
    return Control(prompts, steps, device, **kw)
