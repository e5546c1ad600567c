"""The sampling loop: generation, Prompt-to-Prompt edits, and sampling from an inversion, all one loop.

Reference loop (ptp_utils.text2image_ldm_stable): one start latent shared by
all prompts; the batch is [uncond("") x P, cond x P]; per UNet call one forward
on the doubled latents, guidance, one scheduler step, then LocalBlend on the
latents. The sampler (`samplers.py`: DDIM by default, PNDM as the stable
notebook, DPM-Solver++) gives the calls' timesteps and steps. With an
`Inversion`, the loop is DDIM on the inversion's timesteps, the start latent is
its latent_T and step i uses null_embeddings[i] as every prompt's
unconditional context; a direct inversion's pivot replaces the source row after
every scheduler step, before LocalBlend. The reconstruction of an inverted
image is this loop with its one prompt.

Proximal guidance (`proximal="l0"`, ProxEdit; the reference's name): the
guided noise is e_u + g * d with d = e_c - e_u soft-thresholded at the
`quantile` of |d| over the whole (P, 4, h, w) batch: d := d - clamp(d, -thr, thr).

Re-edits (`cache=`, p2p_engine.cache): the source row of an edit does not depend
on its targets, so `edit_cache` runs it alone once and records what the targets
read from it; an edit with that cache runs the targets' rows only.

Precision: the UNet runs in the pipeline's dtype; the latents between steps,
the guidance and the scheduler's arithmetic stay in the master dtype
(`Pipeline.master_dtype`, float32), as null-text inversion optimised them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import captured, editors, graphs, recording
from .checks import check_flags, check_guidance, is_int, is_number, warn
from .cache import CachedControl, EditCache, Recorder
from .control import compile_control
from .images import to_pil
from .conditioning import StepTexts, Text, unconditional_rows
from .rows import Rows, guide, unet_control
from .samplers import make_sampler
from .words import check_prompts

DEFAULT_STEPS = 50
DEFAULT_MAX_BYTES = 16 << 30  # an edit cache's default bound
PROXIMAL = (None, "l0")
# capture=None runs the captured loop on CUDA only once this is True: it turns on when the CUDA tests of the
# captured loop (tests/test_captured.py, run by benchmarks/gpu_session.sh) have passed on a GPU.
CAPTURE_BY_DEFAULT = False
# How an edit's, a cache's or a null-text inversion's loop ran (their `loop`): step by step; on static state run
# call by call (capture=True where CUDA graphs are not available); one step recorded as a CUDA graph and replayed.
# Where recording failed, the loop ran "eager" and `capture_failure` says why.
LOOPS = ("eager", "static", "graph")
_capture_failures: set[str] = set()  # each warned of once per process; every output still states its own


# An edit from an inversion follows the null-text notebook, the reference for real images, where its controller
# and LocalBlend leave the choice open: self replacement up to 32 x 32 queries (`Pipeline.self_max_queries`) and
# LocalBlend from 20% of the steps; a generated image keeps the stable notebook's 16 x 16 and 0.
INVERTED_BLEND_START = 0.2


@dataclass
class EditOutput:
    images: list  # PIL images, source first
    latents: torch.Tensor  # (P, 4, h, w) final latents, master dtype
    attention: object  # maps.AttentionMaps or None
    loop: str = "eager"  # how the loop ran: LOOPS
    capture_failure: str | None = None  # why recording failed, where a captured loop was asked for and ran eagerly
    # The values the edit used where the defaults depend on its source (INVERTED_BLEND_START): its self
    # replacement's largest layer in queries (None without a word edit) and LocalBlend's start as a fraction of the
    # steps (None without LocalBlend).
    self_max_queries: int | None = None
    blend_start: float | None = None


@dataclass
class Source:
    """What fixes an edit's source row: the start latent and the sampling settings (`resolve_source`)."""

    latents: torch.Tensor  # (1, C, h, w) start latent, master dtype
    steps: int
    guidance: float
    sampler: str
    steps_offset: int | None
    timesteps: list | None  # an inversion's
    null: StepTexts | None  # an inversion's unconditional conditioning per step
    pivots: torch.Tensor | None  # a direct inversion's (steps, C, h, w)
    proximal: str | None
    quantile: float
    seed: int | None
    negative: Text | None = None  # the targets' unconditional conditioning (one row), where not the source's
    source_guidance: float | None = None  # the source row's guidance, where not `guidance` (editors.prepare_source)

    def row_guidance(self, rows: int, device, dtype) -> float | torch.Tensor:
        """The guidance scale of each of `rows` rows: `guidance`, or (rows, 1, 1, 1) with row 0's own."""
        if self.source_guidance is None:
            return self.guidance
        scales = torch.full((rows, 1, 1, 1), float(self.guidance), device=device, dtype=dtype)
        scales[0] = self.source_guidance
        return scales


def resolve_source(pipe, *, seed=None, steps=None, guidance=None, sampler=None, steps_offset=None, height=None,
                   width=None, latents=None, inversion=None, proximal=None, quantile=None) -> Source:
    """The edit's arguments (see `edit`) checked and resolved into a `Source`; None takes the default."""
    device, master = pipe.device, pipe.master_dtype
    channels = pipe.config.unet.in_channels
    sampler = "ddim" if sampler is None else sampler
    quantile = 0.75 if quantile is None else quantile
    if proximal not in PROXIMAL:
        raise ValueError(f"proximal must be one of {PROXIMAL}, got {proximal!r}")
    if not is_number(quantile) or not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be a number in (0, 1], got {quantile!r}")
    for name, size in (("height", height), ("width", width)):
        if size is not None and (not is_int(size) or size <= 0):
            raise ValueError(f"{name} must be a positive number of pixels, got {size!r}")
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor (1, 4, h, w), got {type(latents).__name__}")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    check_guidance(guidance)
    null = timesteps = pivots = None
    if inversion is not None:
        if not hasattr(inversion, "check_compatible"):  # (the Pipeline's methods load one given by its path)
            raise TypeError(f"inversion must be a p2p_engine.Inversion or the path of its file, got "
                            f"{type(inversion).__name__}")
        inversion.check_compatible(pipe)
        n = inversion.null_embeddings.shape[0]
        if steps is not None and steps != n:
            raise ValueError(f"steps={steps}, but the inversion was made with {n} steps; an edit from it runs "
                             f"its {n} (leave steps out)")
        if sampler != "ddim":
            raise ValueError(f"sampler={sampler!r}: inversions are defined on DDIM, and an edit from one follows "
                             f"its DDIM trajectory; leave sampler out (or give 'ddim')")
        if steps_offset is not None:
            raise ValueError("steps_offset: the inversion fixes the timesteps it was made with; leave it out")
        if latents is not None:
            raise ValueError("give the start latent by `latents` or by `inversion`, not both")
        steps, latents, timesteps = n, inversion.latent_T, inversion.timesteps
        guidance = inversion.guidance if guidance is None else guidance
        null = inversion.null_text().to(device, pipe.dtype)  # (steps, 77, D) and SDXL's (steps, pooled)
        if inversion.pivots is not None:
            pivots = inversion.pivots.to(device, master)  # (steps, 4, h, w): z*_{T-1} .. z*_0
    steps = DEFAULT_STEPS if steps is None else steps
    guidance = pipe.default_guidance if guidance is None else guidance
    if latents is None:
        down = pipe.config.vae.downscale
        height, width = height or pipe.config.image_size, width or pipe.config.image_size
        if height % down or width % down:
            raise ValueError(f"height and width must be multiples of {down}, got {height} x {width}")
        g = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
        latents = torch.randn((1, channels, height // down, width // down), generator=g, device=device,
                              dtype=torch.float32)
    latents = latents.to(device, master)
    if latents.dim() != 4 or latents.shape[0] != 1 or latents.shape[1] != channels:
        raise ValueError(f"latents must be (1, {channels}, h, w), shared by all prompts; got {tuple(latents.shape)}")
    size = [n * pipe.config.vae.downscale for n in latents.shape[-2:]]
    if [height or size[0], width or size[1]] != size:
        raise ValueError(f"height x width = {height} x {width}, but the start latent (`latents` or the inversion's) "
                         f"makes {size[0]} x {size[1]} images; leave height and width out")
    return Source(latents, steps, guidance, sampler, steps_offset, timesteps, null, pivots, proximal, quantile, seed)


def _sampler(pipe, src: Source):
    """A fresh sampler of the source's settings (samplers keep state within one loop)."""
    return make_sampler(src.sampler, pipe.scheduler, src.steps, pipe.device, steps_offset=src.steps_offset,
                        timesteps=src.timesteps)


def _sample(pipe, blocks: list[Rows], smp, *, progress: bool, desc: str, callback=None) -> list[torch.Tensor]:
    """The loop (module docstring) over the blocks' rows in one UNet batch (`rows.py`: one block per edit) with
    the sampler `smp`, which every block shares (one timestep per call). Returns each block's final latents
    (P, C, h, w). `callback(i, calls)` is called after call i (from 1) and may raise to stop the loop there."""
    device, master = pipe.device, pipe.master_dtype
    sizes = [b.P for b in blocks]
    latents = [b.src.latents.expand(b.P, -1, -1, -1).clone() for b in blocks]  # (P, 4, h, w) each
    h, w = latents[0].shape[-2:]
    cond = [pipe.encode_text(b.prompts) for b in blocks]  # (P, 77, D), SDXL's pooled (P, pooled)
    uncond = pipe.unconditional() if any(b.src.null is None for b in blocks) else None
    guidance = [b.src.row_guidance(b.P, device, master) for b in blocks]
    down = pipe.config.vae.downscale
    time_ids = pipe.time_ids(h * down, w * down, 2 * sum(sizes))  # SDXL: (2 sum P, 6); None for SD 1.x/2.x
    control = unet_control([b.control for b in blocks], sizes)
    calls = smp.timesteps
    if progress:
        from tqdm.auto import tqdm
        calls = tqdm(calls, desc=desc)
    for i, t in enumerate(calls):
        texts = []
        for b, c in zip(blocks, cond):
            texts += [unconditional_rows(uncond if b.src.null is None else b.src.null.step(i), b.src.negative, b.P), c]
        text = Text.cat(texts)  # (2 sum P, 77, D): each block [uncond x P, cond x P]
        x = torch.cat([row for z in latents for row in (z, z)]).to(pipe.dtype)
        out = pipe.unet(x, torch.tensor(t, device=device), text.context, control=control, pooled=text.pooled,
                        time_ids=time_ids).to(master)
        guided = [guide(o, g, b.src.proximal, b.src.quantile)
                  for b, g, o in zip(blocks, guidance, out.split([2 * n for n in sizes]))]
        stepped = smp.step(i, torch.cat(guided), torch.cat(latents)).split(sizes)
        latents = []
        for b, z in zip(blocks, stepped):
            if b.pin and b.src.pivots is not None:  # before LocalBlend, as the reference's offsets are added
                z[0] = b.src.pivots[i]
            latents.append(z if b.control is None else b.control.end_step(z))
        if callback is not None:
            callback(i + 1, len(smp.timesteps))
    return latents


def _run(pipe, blocks: list[Rows], smp, capture: bool | None, *, progress: bool, desc: str, callback=None):
    """The loop eager (`_sample`) or on static state (`captured`, see `edit`'s capture): (each block's latents,
    each block's control, loop, capture_failure) with loop one of LOOPS. `callback`: as `_sample`'s."""
    graph = graphs.can_capture(pipe.device)
    if capture is None:
        capture = CAPTURE_BY_DEFAULT and graph and all(captured.unsupported(smp, b.control) is None for b in blocks)
    (latents, controls), loop, failure = _captured_or_eager(
        capture, graph, "the edit step",
        lambda: captured.static_sample(pipe, blocks, smp, progress=progress, desc=desc, graph=graph,
                                       callback=callback),
        lambda: (_sample(pipe, blocks, smp, progress=progress, desc=desc, callback=callback),
                 [b.control for b in blocks]))
    return latents, controls, loop, failure


def _captured_or_eager(capture: bool, graph: bool, what: str, static, eager):
    """(result, loop, capture_failure): static() where capture (LOOPS' "graph" or "static"), else eager(); eager()
    too where recording `what` as a CUDA graph fails, which is warned of once per process and returned."""
    failure = None
    if capture:
        try:
            return static(), "graph" if graph else "static", None
        except captured.CaptureFailed as e:
            failure = str(e)
            message = f"recording {what} as a CUDA graph failed ({e}); running the eager loop"
            if message not in _capture_failures:
                _capture_failures.add(message)
                warn(message, RuntimeWarning)
    return eager(), "eager", failure


@torch.no_grad()
def edit(pipe, prompts, controller=None, *, seed: int | None = None, steps: int | None = None,
         guidance: float | None = None, sampler: str | None = None, steps_offset: int | None = None,
         height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None, local_blend=None,
         inversion=None, proximal: str | None = None, quantile: float | None = None, store: bool = True,
         cache: EditCache | None = None, capture: bool | None = None, progress: bool = True,
         decode_images: bool = True) -> EditOutput:
    """Generate (controller=None) or edit P prompts, prompt 0 the source.

    Args:
        seed: the start noise's seed (default 0).
        steps: sampling steps (default 50; with an inversion, its own, and another number is an error).
        guidance: classifier-free guidance scale (default the family's, 7.5 or SDXL's 5.0; with an inversion, the
            one it was made with).
        sampler: "ddim" (default), "pndm" (PLMS, steps + 1 UNet calls) or "dpmsolver++"; windows are fractions
            of steps.
        steps_offset: overrides the checkpoint's for "leading" timesteps (0 gives 980 .. 0 at 50 steps).
        latents: optional start noise (1, 4, h, w) shared by every prompt.
        inversion: an Inversion; its latent_T starts the loop and its null embeddings replace ""; a "direct"
            one also pins the source row to its pivot after every step. An edit of a real image takes the
            null-text notebook's defaults where the controller and LocalBlend leave them unset: self replacement
            up to 32 x 32 queries ((L/2)^2 on SDXL) and LocalBlend from 0.2 of the steps; a generated image the
            stable notebook's 16 x 16 ((L/4)^2) and 0. `out.self_max_queries` and `out.blend_start` say which ran.
        proximal: "l0" for proximal guidance at `quantile` (default 0.75; module docstring), None for plain
            guidance.
        store: keep the cross maps of every layer (summed over steps) in `out.attention`.
        cache: an `EditCache` of prompt 0 (`Pipeline.edit_cache`): only the targets' rows run, and the source's
            settings (seed .. quantile above) are the cache's: giving any of them is an error.
        capture: run the loop on static state (`p2p_engine.captured`): on CUDA one step recorded as a CUDA graph
            and replayed (if recording fails, the eager loop runs, warned of once; `out.loop` and
            `out.capture_failure` say how each edit ran), elsewhere the same step run call by call. DDIM only;
            with a cache, one on the pipeline's device. A later edit of the same shapes and settings replays the
            recorded loop with its own inputs (`captured.forget` drops it). None: on CUDA when CAPTURE_BY_DEFAULT
            and the edit allows it, else eager.
    """
    check_flags(store=store, progress=progress, decode_images=decode_images,
                **({} if capture is None else {"capture": capture}))
    prompts = check_prompts(prompts, pipe.tokenizer)
    source_args = dict(seed=seed, steps=steps, guidance=guidance, sampler=sampler, steps_offset=steps_offset,
                       height=height, width=width, latents=latents, inversion=inversion, proximal=proximal,
                       quantile=quantile)
    block = edit_rows(pipe, prompts, controller, local_blend=local_blend, store=store, cache=cache,
                      source_args=source_args)
    desc = "re-edit" if cache is not None else "edit" if controller is not None else "sample"
    [latents], [control], loop, failure = _run(pipe, [block], _sampler(pipe, block.src), capture, progress=progress,
                                               desc=desc)
    return edit_output(pipe, block, latents, control, loop, failure, store=store, decode_images=decode_images)


def edit_rows(pipe, prompts: list[str], controller, *, local_blend, store: bool, cache: EditCache | None,
              source_args: dict) -> Rows:
    """One edit's arguments (checked prompts; see `edit`) resolved into its block of rows: its source and its
    compiled control; with a cache, the targets' rows under a `CachedControl`."""
    if cache is not None:
        if not isinstance(cache, EditCache):
            raise TypeError(f"cache must be an EditCache (made by pipe.edit_cache(source prompt, ...)), "
                            f"got {type(cache).__name__}")
        given = [k for k, v in source_args.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: an edit from a cache runs the source settings the cache was made "
                             f"with; leave them out")
        src = cache.source
        cache.check_for(pipe, prompts)
        calls = cache.calls
    else:
        inversion = source_args.get("inversion")
        src = editors.prepare_source(pipe, controller, resolve_source(pipe, **source_args), inversion)
        if inversion is not None and prompts[0] != inversion.prompt:
            warn(f"the source prompt {prompts[0]!r} is not the one the image was inverted with "
                 f"({inversion.prompt!r}): the source row will not reproduce the image")
        calls = len(_sampler(pipe, src).timesteps)
    h, w = src.latents.shape[-2:]
    inverted = src.null is not None  # a real image: the null-text notebook's defaults (INVERTED_BLEND_START)
    control = compile_control(controller, prompts, pipe.tokenizer, src.steps, pipe.device,
                              layers=pipe.unet.attn_layers, local_blend=local_blend, store=store, calls=calls,
                              self_max_queries=pipe.self_max_queries(h, w, inverted),
                              blend_start=INVERTED_BLEND_START if inverted else 0.0)
    if cache is None:
        return Rows(prompts, src, control, pin=True)
    if control is None:
        raise ValueError("an edit from a cache needs a controller, a LocalBlend or store=True")
    return Rows(prompts[1:], src, CachedControl(control, cache), pin=False, cache=cache)


def edit_output(pipe, block: Rows, latents: torch.Tensor, control, loop: str, failure: str | None, *, store: bool,
                decode_images: bool) -> EditOutput:
    """The `EditOutput` of one edit's block after its loop: `latents` its rows' final latents, `control` the
    control that holds its maps (a re-edit's source row, maps and image come from its cache)."""
    h, w = block.src.latents.shape[-2:]
    attention = control.attention((h, w), pipe.tokenizer) if (control is not None and store) else None
    images = to_pil(pipe.decode_latents(latents)) if decode_images else []
    if block.cache is not None:
        latents = torch.cat([block.cache.latents[-1].to(pipe.device, pipe.master_dtype), latents])
        images = [block.cache.image] + images if decode_images else []
    compiled = block.control  # the tables as compiled, whichever loop ran them
    edit, blend = (None, None) if compiled is None else (compiled.edit, compiled.blend)
    return EditOutput(images=images, latents=latents, attention=attention, loop=loop, capture_failure=failure,
                      self_max_queries=None if edit is None else edit.self_max_queries,
                      blend_start=None if blend is None else blend.start_fraction)


@torch.no_grad()
def edit_cache(pipe, prompt: str, *, cross_steps=0.8, self_steps=0.4, self_max_queries: int | None = None,
               self_maps: bool = False, max_bytes: int | None = DEFAULT_MAX_BYTES, storage=None,
               capture: bool | None = None, progress: bool = True, **source_args) -> EditCache:
    """Run the source `prompt` alone and record what later edits of it read (p2p_engine.cache).

    Args:
        cross_steps, self_steps: the windows (fractions of the steps, or (start, end)) whose source attention is
            kept; a later edit's windows must lie inside them (the controllers' defaults, 0.8 and 0.4, by default).
        self_max_queries: self layers with at most this many queries are kept (default the limit an edit of this
            source defaults to: `Pipeline.self_max_queries`, the null-text notebook's from an inversion).
        self_maps: also keep the source's self maps (for edits whose controller stores them).
        max_bytes: refuse, after the first UNet call, a cache that would hold more (None: no limit).
        storage: where the cache lives (default the pipeline's device; "cpu" offloads a CUDA run to pinned
            host memory).
        capture: run the source on static state (`p2p_engine.recording`), as `edit` takes it: True records one
            step as a CUDA graph on CUDA (call by call elsewhere), False runs the eager loop, None (default)
            captures on CUDA when CAPTURE_BY_DEFAULT, DDIM sampling and storage on the device allow it.
        **source_args: the source's settings, as `edit` takes them (seed, steps, inversion, ...).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"edit_cache takes the source prompt, one string (the targets come with each edit), got "
                        f"{type(prompt).__name__}")
    check_flags(self_maps=self_maps, progress=progress, **({} if capture is None else {"capture": capture}))
    for name, count in (("max_bytes", max_bytes), ("self_max_queries", self_max_queries)):
        if count is not None and (not is_int(count) or count < 0):
            raise ValueError(f"{name} must be an integer >= 0 or None, got {count!r}")
    [prompt] = check_prompts([prompt], pipe.tokenizer)
    src = resolve_source(pipe, **source_args)
    if src.proximal is not None:
        raise ValueError("proximal guidance takes its threshold over the whole batch, so the source row depends on "
                         "the targets and cannot be cached; edit without a cache")
    h, w = src.latents.shape[-2:]
    limit = pipe.self_max_queries(h, w, src.null is not None) if self_max_queries is None else self_max_queries
    smp = _sampler(pipe, src)
    recorder = Recorder(pipe.device, storage, len(smp.timesteps), src.steps, cross_steps, self_steps, limit,
                        self_maps, max_bytes)
    latents, recorder, loop, failure = _record_source(pipe, prompt, src, smp, recorder, capture, progress)
    image = to_pil(pipe.decode_latents(latents))[0]
    cache = recorder.finish(pipe, prompt, src, latents, image)
    cache.loop, cache.capture_failure = loop, failure
    return cache


def _record_source(pipe, prompt, src, smp, recorder: Recorder, capture: bool | None, progress: bool):
    """edit_cache's run of the source alone, eager or on static state (as `_run` runs edits): (latents, recorder,
    loop, capture_failure)."""
    graph = graphs.can_capture(pipe.device)
    if capture is None:
        capture = (CAPTURE_BY_DEFAULT and graph and recorder.storage == recorder.device
                   and captured.unsupported(smp, None) is None)
    block = Rows([prompt], src, recorder, pin=True)
    (latents, recorder), loop, failure = _captured_or_eager(
        capture, graph, "the source's step",
        lambda: recording.static_record(pipe, prompt, src, smp, recorder, progress=progress, graph=graph),
        lambda: (_sample(pipe, [block], smp, progress=progress, desc="source")[0], recorder))
    return latents, recorder, loop, failure
