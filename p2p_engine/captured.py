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
  declares (`unet.attn_layers`) at the sizes the latent gives them
  (`static_control.StaticControl` holds these choices and buffers).

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

Several independent edits (`batch.edit_batch`) run as blocks of rows of one
UNet batch (`rows.py`), each block with its own state (`StaticRows`: start
latent, prompts, null texts, pivots, control); the step is one UNet call over
all of them, and one recording serves every later batch of the same blocks.

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

import weakref
from typing import Callable

import torch

from . import graphs
from .cache import CachedControl
from .conditioning import StepTexts, Text, unconditional_rows
from .control import Control
from .rows import Rows, guide, unet_control
from .samplers import DDIMSampler
from .scheduler import ddim_step
from .static_control import StaticCachedControl, StaticControl, _at


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


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()  # a later edit refills it: never a tensor the caller holds


class StaticRows:
    """One edit's block of rows (`rows.Rows`) in a static loop: its own state in fixed buffers."""

    def __init__(self, pipe, block: Rows, counter: torch.Tensor, latent_hw: tuple[int, int]):
        src, P = block.src, block.P
        self.P = P
        self.start = src.latents.expand(P, -1, -1, -1).clone()  # (P, C, h, w)
        self.latents = self.start.clone()
        self.guidance, self.proximal, self.quantile = src.guidance, src.proximal, src.quantile
        self.source_guidance, self.row_guidance = src.source_guidance, src.row_guidance(P, pipe.device,
                                                                                       pipe.master_dtype)
        self.cond = pipe.encode_text(block.prompts)  # (P, 77, D)
        self.uncond = pipe.unconditional() if src.null is None else None  # the pipeline's own
        self.null = None if src.null is None else StepTexts(src.null.context.clone(), _own(src.null.pooled))
        self.negative = None if src.negative is None else Text(src.negative.context.clone(), _own(src.negative.pooled))
        self.pivots = _own(src.pivots) if block.pin else None
        self.control = None
        if block.control is not None:
            kind = StaticCachedControl if isinstance(block.control, CachedControl) else StaticControl
            self.control = kind(block.control, pipe.unet.attn_layers, latent_hw, counter)

    def feeds(self) -> dict[str, torch.Tensor | None]:
        """The tensors an edit fills (the map buffers are zeroed by `reset`)."""
        out = dict(start=self.start, cond=self.cond.context, cond_pooled=self.cond.pooled, pivots=self.pivots)
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
        """What a recording bakes in of this block (`StaticLoop.signature`); a re-edit's cache by identity, as
        the recorded step reads its tables where they are."""
        c = self.control
        feeds = tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in self.feeds().items())
        rows = (self.P, self.guidance, self.source_guidance, self.proximal, self.quantile, self.uncond is None)
        if c is None:
            return feeds, rows
        e, b = c.edit, c.blend
        control = (type(c), c.gates_cross, c.keep, c.self_maps,
                   None if e is None else (e.self_max_queries, e.injected_maps),
                   None if b is None else (b.level, b.thresholds),
                   None if c.editor is None else c.editor.signature(),
                   tuple(sorted((i, n) for i, (_, n) in c.layers.items())),
                   id(c.cache) if isinstance(c, StaticCachedControl) else None)
        return feeds, rows, control

    def texts(self, i: torch.Tensor) -> list[Text]:
        """[uncond x P, cond x P] of the call the counter `i` is at."""
        null = self.null
        u = self.uncond if null is None else Text(_at(null.context, i), None if null.pooled is None else
                                                  _at(null.pooled, i))
        return [unconditional_rows(u, self.negative, self.P), self.cond]


class StaticLoop:
    """The sampling loop's state in fixed buffers and `step()`, which advances it by one UNet call, over the
    rows of one or more edits (`rows.py`: one `StaticRows` block each, in one UNet batch).

    Everything `step` reads that differs between edits of the same shapes is a tensor the loop owns (`feeds`);
    the rest (`signature`) is what a recording bakes in, so a loop of an equal signature can be refilled and
    replayed instead of recorded again."""

    def __init__(self, pipe, blocks: list[Rows], smp: DDIMSampler):
        # the UNet, not the pipeline: loops kept for a pipeline must not keep it alive (`_kept_by_pipe`)
        self.unet, self.dtype = pipe.unet, pipe.dtype
        self.model = (pipe.dtype, pipe.backend, pipe.unet.channels_last, pipe.unet.fused_norms)  # baked in
        device, self.master = pipe.device, pipe.master_dtype
        h, w = blocks[0].src.latents.shape[-2:]
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.timesteps = torch.tensor(smp.timesteps, dtype=torch.long, device=device)
        self.a, self.a_prev, self.v_pred = smp.a.clone(), smp.a_prev.clone(), smp.v_pred
        self.rows = [StaticRows(pipe, b, self.counter, (h, w)) for b in blocks]
        down = pipe.config.vae.downscale
        self.time_ids = pipe.time_ids(h * down, w * down, 2 * sum(r.P for r in self.rows))  # the shapes' own

    def feeds(self) -> dict[str, torch.Tensor | None]:
        """The tensors an edit fills: the shared ones, then each block's (named by its place)."""
        out = dict(timesteps=self.timesteps, a=self.a, a_prev=self.a_prev)
        for j, r in enumerate(self.rows):
            out.update({f"{j}.{k}": t for k, t in r.feeds().items()})
        return out

    def signature(self) -> tuple:
        """What a recording of `step` bakes in: the feeds' shapes and dtypes, the Python values it reads, which
        plan each layer gets, and the model's settings."""
        shared = tuple((k, tuple(t.shape), t.dtype) for k, t in (("timesteps", self.timesteps), ("a", self.a)))
        return shared, self.v_pred, self.model, tuple(r.signature() for r in self.rows)

    def refill(self, other: "StaticLoop") -> None:
        """Take another edit's feeds (a loop of the same signature) and its prompts, back at call 0."""
        for dst, src in zip(self.feeds().values(), other.feeds().values()):  # same names, same order
            if dst is not None:
                dst.copy_(src)
        for mine, theirs in zip(self.rows, other.rows):
            if mine.control is not None:
                mine.control.prompts = theirs.control.prompts
        self.reset()

    def reset(self) -> None:
        """Back to call 0: the start latents, the counter and every map buffer (after a warm-up)."""
        self.counter.zero_()
        for r in self.rows:
            r.latents.copy_(r.start)
            if r.control is not None:
                r.control.reset()

    def step(self) -> None:
        i = self.counter
        text = Text.cat([t for r in self.rows for t in r.texts(i)])  # each block [uncond x P, cond x P]
        x = torch.cat([z for r in self.rows for z in (r.latents, r.latents)]).to(self.dtype)
        for r in self.rows:
            if r.control is not None:
                r.control.begin_step()
        control = unet_control([r.control for r in self.rows], [r.P for r in self.rows])
        out = self.unet(x, _at(self.timesteps, i), text.context, control=control, pooled=text.pooled,
                        time_ids=self.time_ids).to(self.master)
        a, a_prev = _at(self.a, i).reshape(()), _at(self.a_prev, i).reshape(())
        for r, o in zip(self.rows, out.split([2 * r.P for r in self.rows])):
            latents = ddim_step(guide(o, r.row_guidance, r.proximal, r.quantile), r.latents, a, a_prev, self.v_pred)
            if r.pivots is not None:  # before LocalBlend, as in the eager loop
                latents[0] = _at(r.pivots, i)[0]
            if r.control is not None:
                latents = r.control.end_step(latents)
            r.latents.copy_(latents)
        self.counter.add_(1)


def static_sample(pipe, blocks: list[Rows], smp, *, progress: bool, desc: str, graph: bool,
                  callback=None) -> tuple[list[torch.Tensor], list[StaticControl | None]]:
    """The edit loop over the blocks' rows on static state: (each block's final latents (P, C, h, w), each
    block's control, which holds its maps).

    graph=False runs the step call by call (any device; what the tests compare with the eager loop);
    graph=True records it as a CUDA graph and replays it, raising `CaptureFailed` if recording fails.
    """
    for b in blocks:
        why = unsupported(smp, b.control)
        if why is not None:
            raise ValueError(f"capture: {why}")
    loop, recorded = _kept(pipe, StaticLoop(pipe, blocks, smp), graph)
    run_calls(loop, recorded, len(smp.timesteps), progress=progress, desc=desc, callback=callback)
    # copies: the kept loop's buffers are the next edit's
    return ([r.latents.clone() for r in loop.rows],
            [None if r.control is None else r.control.snapshot() for r in loop.rows])


# -- loops kept for later edits of the same shapes ------------------------------------------------------------

MAX_KEPT = 2  # recorded loops kept per pipeline, and per edit cache for its re-edits (least recently used out)
_kept_by_pipe: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kept(pipe, loop: StaticLoop, graph: bool):
    """(the loop to run, its recorded step's replay or None): a kept loop of the same signature refilled with
    this edit's feeds (recorded once, replayed by every later edit), else this loop, recorded when `graph` and
    kept. A loop that reads edit caches is kept with the first of them (and keeps the others alive while it is
    kept), any other with its pipeline."""
    caches = [r.control.cache for r in loop.rows if isinstance(r.control, StaticCachedControl)]
    pool = caches[0].kept_loops if caches else _kept_by_pipe.setdefault(pipe, [])
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
              desc: str, callback=None) -> None:
    """Advance `loop` by `calls` steps: by its recorded step's replay, or (None) running the step call by call.
    `callback(i, calls)` runs on the host after call i (from 1; no device sync) and may raise to stop there (a
    kept loop is reset to call 0 when it is next refilled)."""
    steps = range(calls)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=desc if replay is None else f"{desc} (captured)")
    for i in steps:
        if replay is not None:
            replay()
        else:
            loop.step()
        if callback is not None:
            callback(i + 1, calls)


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
