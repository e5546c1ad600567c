"""Re-edits that skip the source: an `EditCache` holds what an edit's source row computes.

The source row of a Prompt-to-Prompt edit does not depend on its targets: its
cross attention is never injected, its self attention is its own, LocalBlend
keeps row 0 as it is and a direct inversion's pivots pin it. So everything the
targets read from it can be recorded by one run of the source prompt alone
(`Pipeline.edit_cache`, the `Recorder` below):

- its latents after every UNet call (LocalBlend's row 0; the last is the
  source's final latent, and its decoded image is kept too);
- its per-head cross-attention probabilities p (1, H, N, T) of every cross
  layer, for the calls inside the cache's cross window (injection reads p_src);
- its self-attention queries and keys (1, H, N, D) of the layers with at most
  `self_max_queries` queries, for the calls inside the self window (self
  replacement attends with them);
- per call and per level, the sum over the down/up layers of its head-averaged
  cross maps (LocalBlend's mask reads the source's row), and per layer the sums
  over calls that `out.attention` shows (the self maps' too with `self_maps`).

Each layer's per-call tensors are kept as one table over its window's calls
(call c at row c - window start), put together when the run ends (one layer's
table at a time, so the cache is held twice for at most one layer): a captured
re-edit (`p2p_engine.captured`) indexes the tables with its device step counter.
A captured recording run (`p2p_engine.recording`) writes the same tables in place.

An edit with the cache (`pipe.edit(prompts, controller, cache=cache)`,
`CachedControl`) runs the batch [uncond x (P-1), cond x (P-1)] of its targets;
its plans compute what the edit's plans compute for rows P+1 .. 2P-1, with the
cached source standing in for row P. Its cross plans are `CrossPlan`s with the
cached p_src as their `source`, its self plans `SelfPlan`s with the cached q_src
and k_src (a captured re-edit gives the whole tables and the counter's row,
which the Triton kernels read in place), run by the kernels or the references
like any plan.
Proximal guidance cannot be cached: its threshold is taken over the whole batch,
so there the source depends on its targets.

Memory (`EditCache.nbytes`, bounded by `max_bytes`, which is checked after the
first UNet call, before the rest is recorded): the cross probabilities dominate.
SD 1.5 at 512 x 512 in fp32 has 26,944 cross-attention queries per call (5 x
4096 + 5 x 1024 + 5 x 256 + 64) x 8 heads x 77 tokens x 4 bytes = 66 MB per call,
2.7 GB for the 41 calls of the default window 0.8 of 50 steps; the self queries
and keys of its 16 x 16 layers add 2 x (5 x 256 + 64) x 1280 x 4 bytes = 14 MB
per call (0.28 GB for 20 calls) and the per-call level maps 83 MB. `storage="cpu"`
keeps a CUDA run's cache in pinned host memory, copied back call by call (such a
re-edit runs eagerly: a graph cannot index host memory by a device counter).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .control import Control, cross_window, self_window
from .maps import SELF_MAPS_MAX_QUERIES
from .plan import AttnLayer, CrossPlan, SelfPlan, probabilities


@dataclass
class EditCache:
    """The recorded source of later edits (module docstring); made by `Pipeline.edit_cache`."""

    prompt: str
    source: object  # editing.Source: the start latent and sampling settings every edit from the cache runs
    calls: int  # UNet calls of an edit
    cross_window: tuple[int, int]  # calls [start, end) whose cross probabilities are kept
    self_window: tuple[int, int]  # calls [start, end) whose self queries and keys are kept ...
    self_max_queries: int  # ... for the self layers with at most this many queries
    self_maps: bool
    layers: dict  # layer index -> (AttnLayer, queries)
    latents: torch.Tensor  # (calls, 1, C, h, w) master dtype, after each call's step
    image: object  # the source's decoded PIL image
    cross: dict = field(default_factory=dict)  # layer -> p (window calls, 1, H, N, T), from call cross_window[0]
    self_qk: dict = field(default_factory=dict)  # layer -> (q, k), each (window calls, 1, H, N, D), from self_window[0]
    level_maps: dict = field(default_factory=dict)  # level -> (calls, N, T) fp32
    cross_sum: dict = field(default_factory=dict)  # layer -> (N, T) fp32, summed over calls
    self_sum: dict = field(default_factory=dict)  # layer -> (N, N) fp32
    owner: object = None  # weakref to the Pipeline that made it
    kept_loops: list = field(default_factory=list, repr=False)  # captured re-edits' loops (captured._kept)
    loop: str = "eager"  # how the source's run was made: one of editing.LOOPS
    capture_failure: str | None = None  # why recording its step failed, where it was captured and ran eagerly

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (their whole storage: a captured recording's tables keep a spare
        row past the window)."""
        tensors = [self.latents, *self.cross.values(), *(t for qk in self.self_qk.values() for t in qk),
                   *self.level_maps.values(), *self.cross_sum.values(), *self.self_sum.values()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def check_for(self, pipe, prompts) -> None:
        if self.owner is None or self.owner() is not pipe:
            raise ValueError("this edit cache was made by another pipeline; make one with this pipeline's "
                             "edit_cache")
        if prompts[0] != self.prompt:
            raise ValueError(f"the cache holds the source prompt {self.prompt!r}, but prompt 0 is {prompts[0]!r}; "
                             f"give the cache's prompt first")
        if len(prompts) < 2:
            raise ValueError("an edit from a cache needs at least one target prompt after the source")

    @property
    def on_device(self) -> torch.device:
        """Where the cache's tensors are (the pipeline's device, or "cpu" for a cache offloaded to host memory)."""
        return self.latents.device

    def cross_probs(self, call: int, layer: int, device) -> torch.Tensor:
        """The source's p (1, H, N, T) of one call inside the cross window."""
        return self.cross[layer][call - self.cross_window[0]].to(device, non_blocking=True)

    def source_qk(self, call: int, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's (q, k), each (1, H, N, D), of one call inside the self window."""
        i = call - self.self_window[0]
        q, k = self.self_qk[layer]
        return q[i].to(device, non_blocking=True), k[i].to(device, non_blocking=True)


# -- recording: the source prompt alone --------------------------------------------------------------------

@dataclass
class _RecordCross:
    rec: "Recorder"
    layer: AttnLayer

    def attend(self, q, k, v, scale):
        # as cross_attention_reference for the rows [uncond, cond] of one prompt
        out = torch.empty_like(q)
        out[:1] = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], scale=scale)
        p = probabilities(q[1:], k[1:], scale)  # (1, H, N, T)
        self.rec.record_cross(self.layer, p)
        out[1:] = (p @ v[1:].to(p.dtype)).to(q.dtype)
        return out


@dataclass
class _RecordSelf:
    rec: "Recorder"
    layer: AttnLayer
    keep_qk: bool
    store: torch.Tensor | None  # (1, N, N) fp32

    def attend(self, q, k, v, scale):
        if self.keep_qk:
            self.rec.record_self(self.layer, q[1:], k[1:])
        if self.store is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        # as self_attention_reference with a store
        out = torch.empty_like(q)
        out[:1] = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], scale=scale)
        p = probabilities(q[1:], k[1:], scale)
        self.store.add_(p.mean(dim=1).to(self.store.dtype))
        out[1:] = (p @ v[1:].to(p.dtype)).to(q.dtype)
        return out


class Recorder:
    """The control of `edit_cache`'s one-prompt run: the source's attention as an edit computes it, recorded."""

    SETTINGS = ("device", "storage", "calls", "cross_window", "self_window", "self_max_queries", "self_maps",
                "max_bytes")  # what __init__ sets, as opposed to what a run records (`_start`)

    def __init__(self, device, storage, calls: int, steps: int, cross_steps, self_steps, self_max_queries: int,
                 self_maps: bool, max_bytes: int | None):
        self.device = torch.device(device)
        refused = ValueError(f"storage must be 'cpu' or the pipeline's device {self.device}, got {storage!r}")
        try:
            self.storage = self.device if storage is None else torch.device(storage)
        except (RuntimeError, TypeError):
            raise refused from None
        if self.storage.type not in ("cpu", self.device.type):
            raise refused
        self.calls = calls
        self.cross_window = cross_window(steps, cross_steps)
        self.self_window = self_window(steps, self_steps)
        self.self_max_queries = self_max_queries
        self.self_maps = self_maps
        self.max_bytes = max_bytes
        self._start()

    def _start(self) -> None:
        """Nothing recorded yet."""
        self.step = 0
        self.layers: dict[int, tuple[AttnLayer, int]] = {}
        self.call_bytes = {"cross": 0, "self": 0}  # bytes one call inside each window keeps
        self.cross: dict = {}
        self.self_qk: dict = {}
        self.cross_sum: dict[int, torch.Tensor] = {}
        self.self_sum: dict[int, torch.Tensor] = {}
        self.level_step: dict[int, torch.Tensor] = {}  # this call's level sums
        self.level_maps: dict[int, torch.Tensor] = {}
        self.latents: list[torch.Tensor] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if self.storage == t.device:
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return out.copy_(t, non_blocking=True)

    def _inside(self, window) -> bool:
        return window[0] <= self.step < window[1]

    def plan(self, layer: AttnLayer, n_queries: int):
        if layer.index not in self.layers:
            self.layers[layer.index] = (layer, n_queries)
        if layer.is_cross:
            return _RecordCross(self, layer)
        keep_qk = n_queries <= self.self_max_queries
        store = None
        if self.self_maps and n_queries <= SELF_MAPS_MAX_QUERIES:
            store = self.self_sum.get(layer.index)
            if store is None:
                store = self.self_sum[layer.index] = torch.zeros(1, n_queries, n_queries, device=self.device)
        return _RecordSelf(self, layer, keep_qk, store) if keep_qk or store is not None else None

    def feature_plan(self, site) -> None:
        return None  # the source's features are its own (the UNet's feature seam)

    def record_cross(self, layer: AttnLayer, p: torch.Tensor) -> None:
        mean = p.mean(dim=1)[0].float()  # (N, T), as the edit's fp32 store receives it
        if self.step == 0:
            self.call_bytes["cross"] += p.numel() * p.element_size()
        total = self.cross_sum.get(layer.index)
        self.cross_sum[layer.index] = mean.clone() if total is None else total.add_(mean)
        if layer.place != "mid":  # the sum over a level's layers, in call order, as LocalBlend's
            level = self.level_step.get(layer.level)
            self.level_step[layer.level] = mean if level is None else level + mean
        if self._inside(self.cross_window):
            self.cross.setdefault(layer.index, []).append(self._keep(p))

    def record_self(self, layer: AttnLayer, q: torch.Tensor, k: torch.Tensor) -> None:
        if self.step == 0:
            self.call_bytes["self"] += 2 * q.numel() * q.element_size()
        if self._inside(self.self_window):
            qs, ks = self.self_qk.setdefault(layer.index, ([], []))
            qs.append(self._keep(q))
            ks.append(self._keep(k))

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        i = self.step
        self.latents.append(self._keep(latents))
        for level, m in self.level_step.items():
            if level not in self.level_maps:
                self.level_maps[level] = torch.empty((self.calls, *m.shape), device=self.storage)
            self.level_maps[level][i].copy_(m, non_blocking=True)
        self.level_step = {}
        if i == 0:
            self._check_size()
        self.step += 1
        return latents

    def window_calls(self) -> dict[str, int]:
        """The calls inside each window: the rows of its tables."""
        return {name: max(0, min(win[1], self.calls) - win[0])
                for name, win in (("cross", self.cross_window), ("self", self.self_window))}

    def total_bytes(self, rows: dict[str, int], fp32_values: int, latent_bytes: int) -> int:
        """The bytes of a cache whose tables have `rows` calls, with its fp32 sums and maps and one call's latent."""
        return (self.call_bytes["cross"] * rows["cross"] + self.call_bytes["self"] * rows["self"] +
                4 * fp32_values + self.calls * latent_bytes)

    def estimate(self) -> int:
        """The bytes the finished cache will hold, known once every layer has been called."""
        sums = sum(t.numel() for t in self.cross_sum.values()) + sum(t.numel() for t in self.self_sum.values())
        levels = sum(t.numel() for t in self.level_maps.values())
        latent = self.latents[0]
        return self.total_bytes(self.window_calls(), sums + levels, latent.numel() * latent.element_size())

    def _check_size(self) -> None:
        self.refuse_over(self.estimate())

    def refuse_over(self, need: int) -> None:
        """Raise if a cache of `need` bytes is over `max_bytes`."""
        if self.max_bytes is not None and need > self.max_bytes:
            raise ValueError(f"the edit cache would hold {need / 2**20:,.1f} MiB, over max_bytes = "
                             f"{self.max_bytes / 2**20:,.1f} MiB: narrow its cross_steps / self_steps windows or "
                             f"self_max_queries, raise max_bytes, or keep it in host memory (storage='cpu')")

    def _table(self, calls: list) -> torch.Tensor:
        """One layer's recorded calls stacked into a table (calls, ...) where the cache lives, the list emptied:
        at most one layer's table is held twice while the cache is put together."""
        out = torch.empty((len(calls), *calls[0].shape), dtype=calls[0].dtype, device=self.storage,
                          pin_memory=self.storage.type == "cpu" and self.device.type == "cuda")
        torch.stack(calls, out=out)
        calls.clear()
        return out

    def finish(self, pipe, prompt: str, src, latents: torch.Tensor, image) -> EditCache:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # pinned copies are asynchronous
        cross = {k: self._table(calls) for k, calls in self.cross.items()}
        self_qk = {k: (self._table(qs), self._table(ks)) for k, (qs, ks) in self.self_qk.items()}
        return EditCache(prompt, src, self.calls, self.cross_window, self.self_window, self.self_max_queries,
                         self.self_maps, dict(self.layers), self._table(self.latents), image, cross, self_qk,
                         self.level_maps, self.cross_sum, {k: v[0] for k, v in self.self_sum.items()},
                         weakref.ref(pipe))


# -- replaying: the targets' rows only ----------------------------------------------------------------------

class CachedControl(Control):
    """A compiled edit's control, driven over its targets' rows with the source read from an `EditCache`."""

    def __init__(self, control: Control, cache: EditCache):
        self.__dict__.update(control.__dict__)  # the compiled tables and buffers, as the uncached edit has them
        self.cache = cache
        self._check_covered()

    def _check_covered(self) -> None:
        cache, e = self.cache, self.edit
        if self.calls != cache.calls:
            raise ValueError(f"the edit makes {self.calls} UNet calls, the cache {cache.calls}")
        if self.self_maps and not cache.self_maps:
            raise ValueError("the controller keeps self maps (self_maps=True); make the cache with self_maps=True")
        if self.editor is not None:
            raise ValueError(f"{self.editor.name}: an edit cache records the source's conditional row for "
                             "Prompt-to-Prompt, and this editor reads the source in both guidance halves (its keys "
                             "and values, or its features); run the edit without cache=")
        if e is None:
            return
        if e.injected_maps:
            raise ValueError("a re-edit from a cache keeps each prompt's own maps; for the maps after injection "
                             "(injected_maps=True) run the edit without cache=")
        a, b = cache.cross_window
        outside = [i for i in range(self.calls) if self.cross_on[i] and not a <= i < b]
        if outside:
            raise ValueError(f"the edit's cross window injects at UNet calls {outside[0]} .. {outside[-1]}, but the "
                             f"cache keeps the source's cross attention for calls {a} .. {b - 1} only; make the "
                             f"cache with cross_steps covering the controller's")
        sizes = [n for layer, n in cache.layers.values() if not layer.is_cross and n <= e.self_max_queries]
        calls = [i for i in range(self.calls) if self.self_on[i]]
        if calls and sizes:
            a, b = cache.self_window
            if calls[0] < a or calls[-1] >= b or max(sizes) > cache.self_max_queries:
                raise ValueError(f"the edit replaces self attention at UNet calls {calls[0]} .. {calls[-1]} in "
                                 f"layers of up to {max(sizes)} queries; the cache keeps calls {a} .. {b - 1} "
                                 f"and layers of up to {cache.self_max_queries}: make it with self_steps and "
                                 f"self_max_queries covering the controller's")

    def _cross_plan(self, layer: AttnLayer, store) -> CrossPlan:
        # the targets' rows of the store; a plan with a source reads p_src from the cache
        store = None if store is None else store[1:]
        e, gate = self.edit, self._call_gate()
        if gate is None:
            return CrossPlan(self.P - 1, store)
        return CrossPlan(self.P - 1, store, e.mapper, e.mix, e.equalizer, gate, *self._source_probs(layer.index))

    def _self_plan(self, layer: AttnLayer, inject: bool, store) -> SelfPlan:
        store = None if store is None else store[1:]
        if not inject:
            return SelfPlan(self.P - 1, False, store)
        return SelfPlan(self.P - 1, True, store, self._call_self_gate(), *self._source_qk(layer.index))

    def _step_maps(self) -> torch.Tensor:
        maps = super()._step_maps()
        maps[0] = self._source_level_maps()
        return maps

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (P-1, C, h, w) of the targets -> the same, blended against the cached source row."""
        return super().end_step(torch.cat([self._source_latents(latents), latents]))[1:]

    def attention(self, latent_hw, tokenizer=None):
        for k, buf in self.cross_sum.items():  # row 0, which only the targets' calls did not fill
            buf[0] = self.cache.cross_sum[k]
        for k, buf in self.self_sum.items():
            buf[0] = self.cache.self_sum[k]
        return super().attention(latent_hw, tokenizer)

    # What this call reads of the source, as hooks (a captured re-edit, `static_control.StaticCachedControl`, reads
    # the cache's tables at its device counter instead): p (1, H, N, T), or a table of calls, and the (1,) device
    # index of this call's row, as `CrossPlan.source` / `source_row`; (q, k), each (1, H, N, D), or two tables,
    # and the row, as `SelfPlan.source` / `source_row`; LocalBlend's level maps (N, T); the latents (1, C, h, w)
    # after this call, in `like`'s device and dtype.
    def _source_probs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.cache.cross_probs(self.step, layer, self.device), None

    def _source_qk(self, layer: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        return self.cache.source_qk(self.step, layer, self.device), None

    def _source_level_maps(self) -> torch.Tensor:
        return self.cache.level_maps[self.blend.level][self.step].to(self.device)

    def _source_latents(self, like: torch.Tensor) -> torch.Tensor:
        return self.cache.latents[self.step].to(like.device, like.dtype)
