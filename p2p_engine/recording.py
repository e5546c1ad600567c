"""The edit cache's recording run on static state: `edit_cache(..., capture=True)`.

`editing.edit_cache` runs the source prompt alone with a `cache.Recorder`,
which appends what later edits read (probabilities, queries and keys, level
maps, latents) to per-layer lists, call by call, deciding on the host which
calls fall inside its windows. Here the same run takes the static step of
`p2p_engine.captured` (one CUDA graph, recorded once and replayed every
call): `StaticRecorder` sizes every table from the UNet's layers before the
first call (so `max_bytes` is checked before anything is allocated), and each
call writes its entries at a row its device counter gives: the call's row in
the window, or a spare row past the window's end for calls outside it, which
the cache never shows. The sums are added into zeroed buffers (0 + x is x, so
they agree with the eager recorder's first-call copies bit for bit).

DDIM only, and the cache on the pipeline's device (a graph cannot write host
memory at a device index); otherwise the eager recorder runs. A recorded
recording loop is not kept: its tables are the cache itself.
"""
from __future__ import annotations

import weakref

import torch

from .cache import EditCache, Recorder
from .captured import StaticLoop, record_graph, run_calls, unsupported
from .maps import SELF_MAPS_MAX_QUERIES
from .plan import compute_dtype
from .rows import Rows
from .static_control import layer_queries
from .unet import Attention
from .words import MAX_TOKENS


def _heads(unet) -> dict[int, tuple[int, int]]:
    """layer index -> (heads, head dim) of every attention layer of `unet`."""
    return {m.layer.index: (m.heads, m.to_q.out_features // m.heads) for m in unet.modules()
            if isinstance(m, Attention) and m.layer is not None}


def _window_row(counter: torch.Tensor, window: tuple[int, int], spare: int) -> torch.Tensor:
    """The (1,) table row of the call the counter is at: its place in the window [start, end), or `spare`."""
    a, b = window
    inside = (counter >= a) & (counter < b)
    return torch.where(inside, counter - a, torch.full_like(counter, spare))


class StaticRecorder(Recorder):
    """A `Recorder` whose tables exist before the first call and are written at the device counter's row."""

    def __init__(self, rec: Recorder, unet, latent_shape: tuple, counter: torch.Tensor, dtype: torch.dtype,
                 master: torch.dtype):
        """latent_shape: (1, C, h, w), the source row's; dtype: the UNet's; master: the latents'."""
        for name in Recorder.SETTINGS:  # the settings, not what `rec` holds: it stays the eager fallback
            setattr(self, name, getattr(rec, name))
        self._start()
        if self.storage != self.device:
            raise ValueError("a captured recording keeps the cache on the pipeline's device; use storage=None")
        self.counter = counter
        self.cross_row = self.self_row = None
        tables, sums, levels = self._layout(unet, latent_shape[-2:], dtype)
        self.calls_in = self.window_calls()
        rows = {kind: n + 1 if n else 0 for kind, n in self.calls_in.items()}  # a spare row past each window
        self.refuse_over(self.total_bytes(rows, sums + self.calls * sum(n * MAX_TOKENS for n in levels.values()),
                                          torch.Size(latent_shape).numel() * master.itemsize))
        dev = self.device
        for index, (kind, shape, dt) in tables.items():
            size = (rows[kind], *shape)
            if size[0] and kind == "cross":
                self.cross[index] = torch.empty(size, dtype=dt, device=dev)
            elif size[0]:
                self.self_qk[index] = (torch.empty(size, dtype=dt, device=dev), torch.empty(size, dtype=dt, device=dev))
        for layer, n in self.layers.values():
            if layer.is_cross:
                self.cross_sum[layer.index] = torch.zeros(n, MAX_TOKENS, device=dev)
            elif self.self_maps and n <= SELF_MAPS_MAX_QUERIES:
                self.self_sum[layer.index] = torch.zeros(1, n, n, device=dev)
        self.level_step = {lv: torch.zeros(n, MAX_TOKENS, device=dev) for lv, n in levels.items()}
        self.level_maps = {lv: torch.empty(self.calls, n, MAX_TOKENS, device=dev) for lv, n in levels.items()}
        self.latent_table = torch.empty(self.calls, *latent_shape, dtype=master, device=dev)

    def _layout(self, unet, latent_hw: tuple[int, int], dtype: torch.dtype) -> tuple[dict, int, dict]:
        """What the eager recorder learns in its first call, from the UNet's layers: the layers and their queries
        (`layers`), the bytes one call keeps (`call_bytes`); returns the per-call tables {layer: (kind, shape,
        dtype)}, the values of the fp32 sums, and the levels of LocalBlend's maps {level: queries}."""
        h, w = latent_hw
        heads, ct = _heads(unet), compute_dtype(dtype)
        tables, sums, levels = {}, 0, {}
        for layer in unet.attn_layers:
            n = layer_queries(h, w, layer.level)
            H, D = heads[layer.index]
            self.layers[layer.index] = (layer, n)
            if layer.is_cross:
                tables[layer.index] = ("cross", (1, H, n, MAX_TOKENS), ct)  # p in the plans' compute dtype
                sums += n * MAX_TOKENS
                if layer.place != "mid":
                    levels[layer.level] = n
            else:
                if n <= self.self_max_queries:
                    tables[layer.index] = ("self", (1, H, n, D), dtype)  # q and k as the UNet makes them
                if self.self_maps and n <= SELF_MAPS_MAX_QUERIES:
                    sums += n * n
        for kind, shape, dt in tables.values():
            self.call_bytes[kind] += (2 if kind == "self" else 1) * torch.Size(shape).numel() * dt.itemsize
        return tables, sums, levels

    def reset(self) -> None:
        """Back to zeroed sums (`StaticLoop.reset`; the tables are written whole by the next run)."""
        for t in [*self.cross_sum.values(), *self.self_sum.values()]:
            t.zero_()

    def begin_step(self) -> None:
        for t in self.level_step.values():
            t.zero_()
        self.cross_row = _window_row(self.counter, self.cross_window, self.calls_in["cross"])
        self.self_row = _window_row(self.counter, self.self_window, self.calls_in["self"])

    def record_cross(self, layer, p: torch.Tensor) -> None:
        mean = p.mean(dim=1)[0].float()  # (N, T)
        self.cross_sum[layer.index].add_(mean)
        if layer.place != "mid":
            self.level_step[layer.level].add_(mean)
        if layer.index in self.cross:
            self.cross[layer.index].index_copy_(0, self.cross_row, p[None])

    def record_self(self, layer, q: torch.Tensor, k: torch.Tensor) -> None:
        if layer.index in self.self_qk:
            for table, t in zip(self.self_qk[layer.index], (q, k)):
                table.index_copy_(0, self.self_row, t[None])

    def end_step(self, latents: torch.Tensor) -> torch.Tensor:
        self.latent_table.index_copy_(0, self.counter, latents[None])
        for level, m in self.level_step.items():
            self.level_maps[level].index_copy_(0, self.counter, m[None])
        return latents

    def finish(self, pipe, prompt: str, src, latents: torch.Tensor, image) -> EditCache:
        cross = {k: t[:-1] for k, t in self.cross.items()}  # the spare rows dropped
        self_qk = {k: (q[:-1], kk[:-1]) for k, (q, kk) in self.self_qk.items()}
        return EditCache(prompt, src, self.calls, self.cross_window, self.self_window, self.self_max_queries,
                         self.self_maps, dict(self.layers), self.latent_table, image, cross, self_qk,
                         dict(self.level_maps), self.cross_sum, {k: v[0] for k, v in self.self_sum.items()},
                         weakref.ref(pipe))


class RecordLoop(StaticLoop):
    """The static loop over the source prompt alone, with a `StaticRecorder` as its control."""

    def __init__(self, pipe, prompt: str, src, smp, recorder: Recorder):
        super().__init__(pipe, [Rows([prompt], src, None, pin=True)], smp)
        [self.source] = self.rows
        self.source.control = StaticRecorder(recorder, pipe.unet, tuple(self.source.start.shape), self.counter,
                                             pipe.dtype, pipe.master_dtype)


def static_record(pipe, prompt: str, src, smp, recorder: Recorder, *, progress: bool,
                  graph: bool) -> tuple[torch.Tensor, StaticRecorder]:
    """The recording run on static state: (the final latent (1, C, h, w), the recorder holding the tables).

    graph=False runs the step call by call (what the tests compare with the eager recorder); graph=True records
    one step as a CUDA graph and replays it, raising `captured.CaptureFailed` if recording fails."""
    why = unsupported(smp, None)
    if why is not None:
        raise ValueError(f"capture: {why}")
    loop = RecordLoop(pipe, prompt, src, smp, recorder)
    run_calls(loop, record_graph(loop) if graph else None, len(smp.timesteps), progress=progress, desc="source")
    return loop.source.latents.clone(), loop.source.control
