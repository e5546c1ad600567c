"""Many independent edits in one UNet batch: `pipe.edit_batch(requests, ...)`.

Each `EditRequest` is what `pipe.edit` takes for one edit: its prompts, controller, LocalBlend, seed or start
latent, inversion or edit cache, proximal guidance and guidance. `edit_batch` resolves each into its block of
rows (`rows.py`: [uncond x P, cond x P], a re-edit's targets only) and runs them all in one loop: every UNet
call takes every request's rows, each attention layer applies each request's plans to its own rows only, and
each request's guidance, proximal threshold, pivots and LocalBlend apply to its own latents. So each output is
that request's `pipe.edit` alone, up to the rounding of a batched convolution or matrix product (float64: within
1e-10 relative; tests/test_edit_batch.py).

One loop means one sampler, one list of timesteps and one latent size: the batch's `steps`, `sampler`, `height`
and `width` (an inversion or an edit cache fixes its own, which must be the batch's). A request that cannot share
the loop is refused, naming the field and the request; nothing is split silently, so a caller with mixed
requests groups them and calls `edit_batch` once per group.

Guidance, per request: its own `guidance`; else, for an edit from an inversion, the guidance it was inverted
with (as `edit` defaults it); else the batch's `guidance`. A re-edit runs its cache's.

Memory: at most `max_rows` UNet rows (2 per prompt, 2 per target of a re-edit) run in one call (default
DEFAULT_MAX_ROWS, eight two-prompt edits); requests past it run in the next call of at most as many rows, in
order, whole. The UNet's activations grow with the rows of one call; what each request keeps beside them is
what its own edit keeps (its stored maps, its latents, its inversion's null texts), freed as its output is
made. benchmarks/gpu_session.sh states the peak per request at SD 1.5's size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from .checks import check_flags, is_int
from .editing import EditOutput, _run, _sampler, edit_output, edit_rows
from .rows import Rows
from .words import check_prompts

# The rows of one UNet call by default: 8 two-prompt edits, the benchmarked batch (benchmarks/cpu_edit_batch.py).
DEFAULT_MAX_ROWS = 32
DEFAULT_SEED, DEFAULT_QUANTILE = 0, 0.75


@dataclass
class EditRequest:
    """One edit of `edit_batch`: the arguments of `pipe.edit` for it (`editing.edit` says what each does). The
    loop's settings (steps, sampler, size, capture) are the batch's; `guidance` None: see the module docstring."""

    prompts: list
    controller: object = None
    local_blend: object = None
    seed: int = DEFAULT_SEED
    latents: torch.Tensor | None = None
    inversion: object = None  # an Inversion or the path of its file
    cache: object = None  # an EditCache: a re-edit, whose source settings are the cache's
    proximal: str | None = None
    quantile: float = DEFAULT_QUANTILE
    guidance: float | None = None
    store: bool = True


@torch.no_grad()
def edit_batch(pipe, requests, steps: int = 50, guidance: float = 7.5, sampler: str = "ddim",
               height: int | None = None, width: int | None = None, capture: bool | None = None,
               progress: bool = True, *, max_rows: int | None = DEFAULT_MAX_ROWS,
               decode_images: bool = True, callback=None) -> list[EditOutput]:
    """One `EditOutput` per request, in order, each equal to the request's `pipe.edit` alone (module docstring).

    Args:
        requests: a list of `EditRequest`.
        steps, sampler, height, width: the loop's, shared by every request (an inversion or a cache fixes its
            own: they must agree).
        guidance: the guidance of requests that give none (module docstring).
        capture: as `edit`'s: the loop on static state, one recording per batch shape, replayed by later batches
            of the same requests' shapes and settings.
        max_rows: the most UNet rows one call runs (None: no bound; module docstring).
        callback: called as callback(step, total) after each UNet call (total: the calls of every loop the
            batch runs, one per group of `max_rows`); an exception it raises stops the batch there and propagates
            (how a server reports progress and cancels).
    """
    check_flags(progress=progress, decode_images=decode_images, **({} if capture is None else {"capture": capture}))
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError(f"requests must be a non-empty list of p2p_engine.EditRequest, got {requests!r}")
    if max_rows is not None and (not is_int(max_rows) or max_rows < 2):
        raise ValueError(f"max_rows must be an integer >= 2 (one prompt's two rows) or None, got {max_rows!r}")
    blocks = [_resolve(pipe, i, r, steps, guidance, sampler, height, width) for i, r in enumerate(requests)]
    _check_shared(pipe, blocks, steps, sampler, height, width)
    outs = []
    groups = list(_groups(blocks, max_rows))
    for g, group in enumerate(groups):
        smp = _sampler(pipe, blocks[group[0]].src)
        report = None if callback is None else (
            lambda i, calls, done=g: callback(done * calls + i, len(groups) * calls))
        latents, controls, loop, failure = _run(pipe, [blocks[j] for j in group], smp, capture, progress=progress,
                                                desc="edit batch", callback=report)
        for j, z, control in zip(group, latents, controls):
            outs.append(edit_output(pipe, blocks[j], z, control, loop, failure, store=requests[j].store,
                                    decode_images=decode_images))
    return outs


def _resolve(pipe, i: int, r, steps, guidance, sampler, height, width) -> Rows:
    """Request i resolved into its block of rows, as `edit` resolves its arguments; errors name the request."""
    if not isinstance(r, EditRequest):
        raise TypeError(f"requests[{i}] must be a p2p_engine.EditRequest, got {type(r).__name__}")
    try:
        check_flags(store=r.store)
        prompts = check_prompts(r.prompts, pipe.tokenizer)
        if r.cache is not None:  # the cache's settings; seed and quantile left at their defaults count as not given
            source_args = dict(seed=None if r.seed == DEFAULT_SEED else r.seed, latents=r.latents,
                               inversion=r.inversion, proximal=r.proximal, guidance=r.guidance,
                               quantile=None if r.quantile == DEFAULT_QUANTILE else r.quantile)
        else:
            inversion = r.inversion
            if isinstance(inversion, (str, os.PathLike)):
                from .inversion import Inversion
                inversion = Inversion.load(inversion)
            fixed = inversion is not None or r.latents is not None  # the start latent fixes the size
            # an inversion fixes steps, sampler and timesteps, checked against the batch's in _check_shared
            source_args = dict(seed=r.seed, latents=r.latents, inversion=inversion, proximal=r.proximal,
                               quantile=r.quantile, steps=None if inversion is not None else steps,
                               sampler=None if inversion is not None else sampler,
                               guidance=r.guidance if r.guidance is not None or inversion is not None else guidance,
                               height=None if fixed else height, width=None if fixed else width)
        return edit_rows(pipe, prompts, r.controller, local_blend=r.local_blend, store=r.store, cache=r.cache,
                         source_args=source_args)
    except (ValueError, TypeError) as e:
        raise _named(e, i) from e


def _named(e: Exception, i: int) -> Exception:
    """The error `e` of request i with the request named first (the same type; `e` itself where its type takes
    other arguments)."""
    try:
        return type(e)(f"requests[{i}]: {e}")
    except Exception:  # noqa: BLE001 -- an exception type of other arguments keeps its own message
        return e


def _check_shared(pipe, blocks: list[Rows], steps, sampler, height, width) -> None:
    """Refuse a request whose loop differs from the batch's: steps, sampler, latent size, timesteps."""
    down = pipe.config.vae.downscale
    first = blocks[0].src.latents.shape[-2:]
    size = (height or first[0] * down, width or first[1] * down)
    timesteps = None
    for i, b in enumerate(blocks):
        src = b.src
        what = "its cache's" if b.cache is not None else "its inversion's" if src.null is not None else "its"
        mine = (src.latents.shape[-2] * down, src.latents.shape[-1] * down)
        for field, theirs, ours in (("steps", src.steps, steps), ("sampler", src.sampler, sampler),
                                    ("size (height, width)", mine, size)):
            if theirs != ours:
                raise ValueError(f"requests[{i}]: {field} {theirs!r} ({what}) is not the batch's {ours!r}: one "
                                 f"edit_batch runs one loop; group requests by {field.split(' ')[0]} and call "
                                 f"edit_batch once per group")
        calls = _sampler(pipe, src).timesteps
        timesteps = calls if timesteps is None else timesteps
        if calls != timesteps:
            raise ValueError(f"requests[{i}]: timesteps {calls[0]} .. {calls[-1]} ({what}) are not the batch's "
                             f"{timesteps[0]} .. {timesteps[-1]} (requests[0]'s): one edit_batch runs one loop; "
                             f"group requests by timesteps (an inversion's are those it was made with)")


def _groups(blocks: list[Rows], max_rows: int | None) -> list[list[int]]:
    """The requests in order, in consecutive groups of at most max_rows UNet rows each."""
    groups, rows = [[]], 0
    for i, b in enumerate(blocks):
        need = 2 * b.P
        if max_rows is not None and need > max_rows:
            raise ValueError(f"requests[{i}] runs {need} UNet rows (2 per prompt), over max_rows = {max_rows}: "
                             f"raise max_rows")
        if groups[-1] and max_rows is not None and rows + need > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += need
    return groups
