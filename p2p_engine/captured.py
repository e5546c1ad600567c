"""The sampling loop with static state: one step that a CUDA graph can record once and replay every call.

The eager loop (`editing._sample`) decides on the host, call by call, what the
attention layers do: whether a cross gate is open, whether the self window is,
whether LocalBlend has started; the control allocates its map buffers when a
layer first asks. A recorded graph replays the kernels of one call and runs no
Python, so here every such choice is a device tensor read through a step
counter that lives on the device and that the step itself advances:

- the timestep, the DDIM alphas, an inversion's null text and a direct
  inversion's pivot are tables indexed by the counter;
- cross injection runs on every call with that call's gate row (a closed gate
  gives exactly the target's own probabilities: injected * 0 + p * 1);
- self injection takes the source's queries and keys where the call's window
  flag is set (`SelfPlan.gate`; 0 gives exactly plain attention), as `editors`' plans do;
- LocalBlend's mask is built every call and `torch.where` keeps the unblended
  latents before its start;
- every map buffer is allocated before the first call, for the layers the UNet
  declares (`unet.attn_layers`) at the sizes the latent gives them.

Only the cross gate changes any arithmetic: a call whose gate is closed and
whose maps are not stored takes the plan's explicit softmax instead of SDPA, so
such calls agree with the eager loop to float rounding, every other call bit
for bit. The loop's static step equals the eager loop for every controller
(tests/test_captured.py, on the CPU, where it runs step by step unrecorded). On
CUDA `static_sample` records it once (after a warm-up that compiles the
kernels) and replays it; DDIM only (PNDM and DPM-Solver++ keep host-side
history).

A re-edit from an edit cache (`p2p_engine.cache`) takes the same step over its
targets' rows (`StaticCachedControl`): the cache keeps the source's
probabilities, queries and keys as per-layer tables over the calls of its
windows, so the counter picks the call's entry there as it picks the gate's;
the cache must live on the pipeline's device (a graph cannot index host
memory by a device counter).

A recorded loop is kept for later edits (`_kept`: the last MAX_KEPT per
pipeline, and per edit cache for its re-edits). An edit whose loop has the same
`StaticLoop.signature` (shapes, dtypes, the guidance and other values the
recording bakes in, which plan each layer gets) copies its own tensors (start
noise, timesteps and alphas, prompts, null texts, pivots, gates, mapper,
LocalBlend's words) into the kept loop and replays its graph: no warm-up, no
recording. Edits return copies of the kept loop's outputs. `forget(pipe)` drops
a pipeline's kept loops and the memory their graphs hold.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable

import torch

from . import graphs
from .cache import CachedControl
from .conditioning import StepTexts, Text, unconditional_rows
from .control import Control
from .maps import SELF_MAPS_MAX_QUERIES, level_hw
from .samplers import DDIMSampler
from .scheduler import ddim_step, proximal_delta
from .words import MAX_TOKENS


class CaptureFailed(RuntimeError):
    """Recording the step as a CUDA graph failed; the caller runs the eager loop instead."""


def unsupported(smp, control) -> str | None:
    """Why the static loop cannot run this edit, or None."""
    if not isinstance(smp, DDIMSampler):
        return "only DDIM sampling is captured (PNDM and DPM-Solver++ keep host-side history); use sampler='ddim'"
    if isinstance(control, CachedControl):
        where = control.cache.on_device
        if where != control.device:
            return (f"a captured re-edit reads its cache on the pipeline's device, and this cache is on {where}; "
                    f"make it with storage=None, or run the re-edit with capture=False")
    elif control is not None and type(control) is not Control:
        return f"a {type(control).__name__} runs eagerly"
    return None


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


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()  # a later edit refills it: never a tensor the caller holds


class StaticLoop:
    """The sampling loop's state in fixed buffers and `step()`, which advances it by one UNet call.

    Everything `step` reads that differs between edits of the same shapes is a tensor the loop owns (`feeds`);
    the rest (`signature`) is what a recording bakes in, so a loop of an equal signature can be refilled and
    replayed instead of recorded again."""

    def __init__(self, pipe, prompts, src, smp: DDIMSampler, control: Control | None, *, pin: bool):
        # the UNet, not the pipeline: loops kept for a pipeline must not keep it alive (`_kept_by_pipe`)
        self.unet, self.dtype = pipe.unet, pipe.dtype
        self.model = (pipe.dtype, pipe.backend, pipe.unet.channels_last, pipe.unet.fused_norms)  # baked in
        device, master = pipe.device, pipe.master_dtype
        P = self.P = len(prompts)
        self.start = src.latents.expand(P, -1, -1, -1).clone()  # (P, C, h, w)
        self.latents = self.start.clone()
        h, w = self.start.shape[-2:]
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.timesteps = torch.tensor(smp.timesteps, dtype=torch.long, device=device)
        self.a, self.a_prev, self.v_pred = smp.a.clone(), smp.a_prev.clone(), smp.v_pred
        self.guidance, self.proximal, self.quantile = src.guidance, src.proximal, src.quantile
        self.source_guidance, self.row_guidance = src.source_guidance, src.row_guidance(P, device, master)
        self.cond = pipe.encode_text(prompts)  # (P, 77, D)
        self.uncond = pipe.unconditional() if src.null is None else None  # the pipeline's own
        self.null = None if src.null is None else StepTexts(src.null.context.clone(), _own(src.null.pooled))
        self.negative = None if src.negative is None else Text(src.negative.context.clone(), _own(src.negative.pooled))
        down = pipe.config.vae.downscale
        self.time_ids = pipe.time_ids(h * down, w * down, 2 * P)  # the shapes' own
        self.pivots = _own(src.pivots) if pin else None
        self.control = None
        if control is not None:
            kind = StaticCachedControl if isinstance(control, CachedControl) else StaticControl
            self.control = kind(control, pipe.unet.attn_layers, (h, w), self.counter)
        self.master = master

    def feeds(self) -> dict[str, torch.Tensor | None]:
        """The tensors an edit fills (the map buffers are zeroed by `reset`)."""
        out = dict(start=self.start, timesteps=self.timesteps, a=self.a, a_prev=self.a_prev, cond=self.cond.context,
                   cond_pooled=self.cond.pooled, pivots=self.pivots)
        if self.null is not None:
            out.update(null=self.null.context, null_pooled=self.null.pooled)
        if self.negative is not None:
            out.update(negative=self.negative.context, negative_pooled=self.negative.pooled)
        c = self.control
        if c is not None:
            e = c.edit
            for name in ("gate", "mapper", "mix", "equalizer"):
                out[name] = None if e is None else getattr(e, name)
            out.update(self_gate=c.self_gate, blend_on=c.blend_on, blend_words=c.blend_words, blend_sub=c.blend_sub)
            out.update({f"editor_{kind}": gate for kind, gate in c.editor_gates.items()})
        return out

    def signature(self) -> tuple:
        """What a recording of `step` bakes in: the feeds' shapes and dtypes, the Python values it reads, which
        plan each layer gets, and the model's settings."""
        c = self.control
        feeds = tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in self.feeds().items())
        loop = (self.P, self.v_pred, self.guidance, self.source_guidance, self.proximal, self.quantile,
                self.uncond is None, self.model)
        if c is None:
            return feeds, loop
        e, b = c.edit, c.blend
        control = (type(c), c.gates_cross, c.keep, c.self_maps,
                   None if e is None else (e.self_max_queries, e.injected_maps),
                   None if b is None else (b.level, b.thresholds),
                   None if c.editor is None else c.editor.signature(),
                   tuple(sorted((i, n) for i, (_, n) in c.layers.items())))
        return feeds, loop, control

    def refill(self, other: "StaticLoop") -> None:
        """Take another edit's feeds (a loop of the same signature) and its prompts, back at call 0."""
        for dst, src in zip(self.feeds().values(), other.feeds().values()):  # same names, same order
            if dst is not None:
                dst.copy_(src)
        if self.control is not None:
            self.control.prompts = other.control.prompts
        self.reset()

    def reset(self) -> None:
        """Back to call 0: the start latent, the counter and every map buffer (after a warm-up)."""
        self.latents.copy_(self.start)
        self.counter.zero_()
        if self.control is not None:
            self.control.reset()

    def step(self) -> None:
        i, P = self.counter, self.P
        if self.uncond is not None:
            u = self.uncond
        else:
            null = self.null
            u = Text(_at(null.context, i), None if null.pooled is None else _at(null.pooled, i))
        text = Text.cat([unconditional_rows(u, self.negative, P), self.cond])
        x = torch.cat([self.latents, self.latents]).to(self.dtype)
        if self.control is not None:
            self.control.begin_step()
        out = self.unet(x, _at(self.timesteps, i), text.context, control=self.control, pooled=text.pooled,
                        time_ids=self.time_ids).to(self.master)
        out_u, out_c = out.chunk(2)
        delta = out_c - out_u
        if self.proximal == "l0":
            delta = proximal_delta(delta, self.quantile)
        a, a_prev = _at(self.a, i).reshape(()), _at(self.a_prev, i).reshape(())
        latents = ddim_step(out_u + self.row_guidance * delta, self.latents, a, a_prev, self.v_pred)
        if self.pivots is not None:  # before LocalBlend, as in the eager loop
            latents[0] = _at(self.pivots, i)[0]
        if self.control is not None:
            latents = self.control.end_step(latents)
        self.latents.copy_(latents)
        self.counter.add_(1)


def static_sample(pipe, prompts, src, smp, control, *, pin: bool, progress: bool, desc: str,
                  graph: bool) -> tuple[torch.Tensor, StaticControl | None]:
    """The edit loop on static state: (final latents (P, C, h, w), the control that holds its maps).

    graph=False runs the step call by call (any device; what the tests compare with the eager loop);
    graph=True records it as a CUDA graph and replays it, raising `CaptureFailed` if recording fails.
    """
    why = unsupported(smp, control)
    if why is not None:
        raise ValueError(f"capture: {why}")
    loop, recorded = _kept(pipe, StaticLoop(pipe, prompts, src, smp, control, pin=pin), graph)
    run_calls(loop, recorded, len(smp.timesteps), progress=progress, desc=desc)
    # copies: the kept loop's buffers are the next edit's
    return loop.latents.clone(), None if loop.control is None else loop.control.snapshot()


# -- loops kept for later edits of the same shapes ------------------------------------------------------------

MAX_KEPT = 2  # recorded loops kept per pipeline, and per edit cache for its re-edits (least recently used out)
_kept_by_pipe: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kept(pipe, loop: StaticLoop, graph: bool):
    """(the loop to run, its recorded step's replay or None): a kept loop of the same signature refilled with
    this edit's feeds (recorded once, replayed by every later edit), else this loop, recorded when `graph` and
    kept."""
    c = loop.control
    pool = c.cache.kept_loops if isinstance(c, StaticCachedControl) else _kept_by_pipe.setdefault(pipe, [])
    key = (graph, loop.signature())
    for i, (k, kept, recorded) in enumerate(pool):
        if k == key:
            kept.refill(loop)
            pool.append(pool.pop(i))
            return kept, recorded
    recorded = record_graph(loop) if graph else None
    pool.append((key, loop, recorded))
    del pool[:-MAX_KEPT]
    return loop, recorded


def forget(pipe) -> None:
    """Drop the loops (and CUDA graphs, with their memory) kept for `pipe`'s edits (an edit cache's own re-edit
    loops go when the cache does)."""
    _kept_by_pipe.pop(pipe, None)


def run_calls(loop: StaticLoop, replay: Callable[[], None] | None, calls: int, *, progress: bool,
              desc: str) -> None:
    """Advance `loop` by `calls` steps: by its recorded step's replay, or (None) running the step call by call."""
    steps = range(calls)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=desc if replay is None else f"{desc} (captured)")
    for _ in steps:
        if replay is not None:
            replay()
        else:
            loop.step()


def record_graph(loop: StaticLoop) -> Callable[[], None]:
    """The loop's step recorded once (`graphs.capture`: two warm-up steps, the state reset to call 0, the step
    recorded): returns its replay, one step per call. Raises `CaptureFailed` if recording fails, ValueError
    where the loop's device cannot record."""
    device = loop.counter.device
    if not graphs.can_capture(device):
        raise ValueError(f"capture: CUDA graphs need a CUDA pipeline; this one is on {device}")
    try:  # at most as many warm-up steps as calls: the counter must stay inside the tables
        replay, _ = graphs.capture(loop.step, warmup=min(2, loop.timesteps.shape[0]), reset=loop.reset)
    except Exception as e:  # noqa: BLE001 -- reported by the caller, which falls back to the eager loop
        raise CaptureFailed(f"{type(e).__name__}: {e}") from e
    return replay
