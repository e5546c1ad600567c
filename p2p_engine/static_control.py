"""The controls of the captured loop (`p2p_engine.captured`): every per-call choice a device tensor.

The eager loop's `control.Control` decides on the host, call by call, whether a cross gate or the self window
is open and whether LocalBlend has started, and allocates its map buffers when a layer first asks. A recorded
graph runs no Python, so `StaticControl` reads those choices from tables at the loop's device step counter and
allocates every buffer before the first call (the module docstring of `captured` says what that changes);
`StaticCachedControl` does the same for a re-edit from an edit cache, reading the cache's tables at the
counter.
"""
from __future__ import annotations

import copy

import torch

from .cache import CachedControl
from .control import Control
from .maps import SELF_MAPS_MAX_QUERIES, level_hw
from .words import MAX_TOKENS


def layer_queries(h: int, w: int, level: int) -> int:
    """The queries of an attention layer at `level` for latents of h x w."""
    h, w = level_hw(h, w, level)
    return h * w


def _at(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """table[i] for a (1,) device counter, without a host sync: (1, *table.shape[1:])."""
    return table.index_select(0, i)


class StaticControl(Control):
    """A `Control` whose per-call choices are read from the device counter and whose buffers exist up front."""

    def __init__(self, control: Control, layers, latent_hw: tuple[int, int], counter: torch.Tensor):
        # Control's own, not the next in line: a StaticCachedControl's eager control has made and checked it
        Control.__init__(self, control.prompts, control.calls, control.device, edit=control.edit,
                         blend=control.blend, store=control.keep, self_maps=control.self_maps, editor=control.editor)
        self.counter = counter
        e, dev = self.edit, self.device
        self.gates_cross = e is not None and bool(e.gate.any())  # once, before the loop
        self.self_gate = None
        if e is not None and e.self_window[0] < e.self_window[1]:
            self.self_gate = torch.zeros(self.calls, 1, device=dev)
            self.self_gate[e.self_window[0]:e.self_window[1]] = 1
        self.editor_gates = {} if self.editor is None else self.editor.gate_tables(self.calls, dev)
        self.editor_now = {}
        self.blend_on = None
        if self.blend is not None:
            self.blend_on = (torch.arange(self.calls) + 1 > self.blend.start).view(-1, 1, 1, 1, 1).to(dev)
        h, w = latent_hw
        for layer in layers:
            n = layer_queries(h, w, layer.level)
            self.layers[layer.index] = (layer, n)
            maps = torch.zeros(self.P, n, MAX_TOKENS if layer.is_cross else n, device=dev)
            injected = self._injected_maps(layer, n)  # summed at end_step from this call's buffer, as Control's
            if layer.is_cross and (self._is_blend_layer(layer) or self.keep and injected):
                self.step_buf[layer.index] = maps
                if self.keep:
                    self.cross_sum[layer.index] = torch.zeros_like(maps)
                if self._is_blend_layer(layer):
                    self.blend_sum = torch.zeros_like(maps)
            elif layer.is_cross and self.keep:
                self.cross_sum[layer.index] = maps
            elif not layer.is_cross and self.self_maps and n <= SELF_MAPS_MAX_QUERIES:
                self.self_sum[layer.index] = maps
                if injected:
                    self.self_step[layer.index] = torch.zeros_like(maps)
        self.cross_gate_now = self.self_gate_now = None

    def snapshot(self) -> "StaticControl":
        """This control with copies of its summed maps: what an edit returns while the loop is kept."""
        out = copy.copy(self)
        out.cross_sum = {k: v.clone() for k, v in self.cross_sum.items()}
        out.self_sum = {k: v.clone() for k, v in self.self_sum.items()}
        return out

    def reset(self) -> None:
        """Every map buffer zeroed, back at call 0 (`StaticLoop.reset`)."""
        for buf in [*self.cross_sum.values(), *self.self_sum.values(), *self.step_buf.values(),
                    *self.self_step.values()]:
            buf.zero_()
        if self.blend_sum is not None:
            self.blend_sum.zero_()
        self.step = 0

    def begin_step(self) -> None:
        """This call's gates, read from the counter (recorded into the graph with the rest of the step)."""
        if self.gates_cross:
            self.cross_gate_now = _at(self.edit.gate, self.counter)[0]  # (P-1, T)
        if self.self_gate is not None:
            self.self_gate_now = _at(self.self_gate, self.counter)[0]  # (1,)
        self.editor_now = {kind: _at(gate, self.counter)[0] for kind, gate in self.editor_gates.items()}

    def _injects_cross(self) -> bool:
        return self.gates_cross  # every call, with the counter's gate row

    def _injects_self(self) -> bool:
        return self.self_gate is not None  # every call, switched by the counter's window flag

    def _call_gate(self) -> torch.Tensor | None:
        return self.cross_gate_now  # read from the counter; closed rows give exactly the own maps

    def _call_self_gate(self) -> torch.Tensor | None:
        return self.self_gate_now

    def _editor_window(self, kind: str) -> tuple[bool, torch.Tensor | None]:
        return kind in self.editor_gates, self.editor_now.get(kind)  # every call, switched by the counter's flag

    def _blend_from_start(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.where(_at(self.blend_on, self.counter)[0], self._blend(latents), latents)


def _row(counter: torch.Tensor, window: tuple[int, int], table: torch.Tensor | None) -> torch.Tensor | None:
    """The (1,) row of a table over the calls [window) for the call the counter is at, clamped inside it (the
    calls outside a window read an entry their gate then zeroes)."""
    if table is None:
        return None
    return (counter - window[0]).clamp(0, table.shape[0] - 1)


class StaticCachedControl(StaticControl, CachedControl):
    """A re-edit's control (`cache.CachedControl`) on static state: its targets' plans, with the source's
    attention, LocalBlend maps and latents read from the cache's tables at the counter."""

    def __init__(self, control: CachedControl, layers, latent_hw: tuple[int, int], counter: torch.Tensor):
        super().__init__(control, layers, latent_hw, counter)
        self.cache = control.cache
        self.cross_row = self.self_row = None

    def begin_step(self) -> None:
        super().begin_step()
        c = self.cache
        self.cross_row = _row(self.counter, c.cross_window, next(iter(c.cross.values()), None))
        self.self_row = _row(self.counter, c.self_window, next(iter(c.self_qk.values()), (None,))[0])

    def _source_probs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.cross[layer], self.cross_row  # the kernel reads the row in place

    def _source_qk(self, layer: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.cache.self_qk[layer], self.self_row  # the kernel reads the rows in place

    def _source_level_maps(self) -> torch.Tensor:
        return _at(self.cache.level_maps[self.blend.level], self.counter)[0]

    def _source_latents(self, like: torch.Tensor) -> torch.Tensor:
        return _at(self.cache.latents, self.counter)[0].to(like.dtype)
