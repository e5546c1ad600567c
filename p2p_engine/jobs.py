"""Dataset-scale jobs: a JSONL manifest in, one folder of files per image out; resumable and sharded.

Each line of the job file is one job:

    {"image": "cats/001.jpg", "prompt": "a cat on a sofa",
     "edits": ["a dog on a sofa"],                                  # optional
     "controller": {"mode": "replace", "cross_steps": 0.8, "self_steps": 0.4,
                    "equalizer": {"sofa": 2.0}},                    # optional, for the edits
     "blend": {"words": ["cat", "dog"], "start": 0.2},              # optional LocalBlend
     "out": "dogs/001.png",                                         # optional, see below
     "seed": 0}                                                     # optional

Jobs run in batches of `batch_size`: their images inverted together (`invert_batch`), then their edits
in one `edit_batch` (each edit equal to its own `edit`; a batch whose edit fails runs again job by job, so
that only the bad job fails). Relative image paths are read from the job file's folder. A job's id is the first
16 hex digits of sha256 over the line's canonical JSON (sorted keys, no spaces), so
the same job keeps its folder however the file is reordered or re-spaced.

Per finished job, written atomically (temporary file + rename):
    DIR/<id>/inversion.safetensors       p2p.Inversion.save (unless save_inversions=False)
    DIR/<id>/edit_<k>.png                when "edits" are given: k=0 the source
                                         reconstruction, k>=1 the edited prompts;
    DIR/<out>                            instead, when "out" is given: the last
                                         edited image only (format from the name)
then one line appended to the index (DIR/index.jsonl, or DIR/index.rank<r>.jsonl
per rank under torchrun; rank 0 merges them into DIR/index.jsonl at the end). An ok
line also says how the job's loops ran ("loops": the inversion's and the edit's,
editing.LOOPS) and, where recording a CUDA graph failed, why ("capture_failures"); an edit's
line the values it used where its defaults depend on the source ("self_max_queries",
"blend_start": an edit of an inverted image takes the null-text notebook's 32 x 32 and 0.2).

A job counts as done when an index line says "ok" for its id with the same model and settings (`manifest.SETTINGS`,
defaults resolved: the model's fingerprint and dtype, steps, inner steps, method, guidance, steps offset, edit
options) and every output it names exists; a second run skips done jobs and redoes the rest (interrupted ones,
failed ones, and ones made with another model or other settings, whose files are replaced). Under torchrun each rank
takes jobs[rank::world] of the deduplicated job list; torchrun itself starts, names and restarts the ranks, and the
output folder is the only shared state.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from .batch import EditRequest
from .checks import is_int
from .control import compile_control
from .controllers import blend_from_spec, from_spec
from .editing import INVERTED_BLEND_START
from .images import prepare, save_image_atomic
from .loading import load_or_reuse
from .manifest import INDEX, Job, _append, _done_ids, _ok_ids, merge_index, read_jobs
from .pipeline import Pipeline, probe_weights, release_memory
from .words import MAX_TOKENS


DEFAULT_BATCH_SIZE = 4  # jobs inverted and edited together: the measurement is in benchmarks/RESULTS.md


@dataclass
class Summary:
    total: int = 0  # distinct jobs in the file
    ok: int = 0  # finished in this run
    failed: int = 0  # recorded with an error in this run
    skipped: int = 0  # already done by an earlier run
    seconds: float = 0.0
    index: Path | None = None

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says how many jobs finished (their files and index lines are kept)."""

    def __init__(self, finished: int, out_dir):
        self.finished = finished
        kept = (f"{finished} jobs finished and were kept in {out_dir}" if finished > 1 else
                f"1 job finished and was kept in {out_dir}" if finished else "no job finished")
        super().__init__(f"{kept}; run again to resume")


# -- what makes a result ----------------------------------------------------------------------------

def model_fingerprint(pipe: Pipeline) -> str:
    """16 hex digits identifying the weights and configuration as loaded: sha256 over the model and scheduler
    configs and the exact values of `weights_probe` (UNet, text encoders) and of the VAE's probe. Exact, not
    rounded: one checkpoint loaded in one dtype always gives the same values (casting is deterministic), while
    rounding a half-precision copy to a few digits flips some of hundreds of values whatever the digits; the
    dtype is therefore a setting of its own, and the path is not part of it (a moved checkpoint is the same)."""
    h = hashlib.sha256()
    config = {"model": asdict(pipe.config), "scheduler": asdict(pipe.scheduler.config)}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for probe in (pipe.weights_probe(), probe_weights(pipe.vae)):
        h.update(probe.numpy().tobytes())
    return h.hexdigest()[:16]


def _settings(pipe: Pipeline, *, steps, inner_steps, method, guidance, steps_offset, edit_options) -> dict:
    """Every setting that changes a job's files, defaults resolved, so that leaving an option out and giving
    its default count as the same run (the keys of `manifest.SETTINGS`)."""
    spacing = pipe.scheduler.config.timestep_spacing or "leading"
    if steps_offset is None and spacing == "leading":
        steps_offset = pipe.scheduler.config.steps_offset
    side = pipe.config.latent_size  # every job's image is prepared at the model's native size
    return {"model": model_fingerprint(pipe), "dtype": str(pipe.dtype).removeprefix("torch."), "steps": steps,
            "inner_steps": inner_steps, "method": method,
            "guidance": float(pipe.default_guidance if guidance is None else guidance),
            "steps_offset": steps_offset, "edit": dict(edit_options or {}),
            # what an edit from an inversion takes where a job leaves them out (editing.INVERTED_BLEND_START)
            "edit_defaults": {"self_max_queries": pipe.self_max_queries(side, side, inverted=True),
                              "blend_start": INVERTED_BLEND_START}}


# -- running ----------------------------------------------------------------------------------------

def _final_losses(losses: torch.Tensor) -> list:
    """(steps, inner) with NaN for iterations not run -> the last loss of each step (None if none ran)."""
    out = []
    for row in losses.tolist():
        ran = [v for v in row if not math.isnan(v)]
        out.append(ran[-1] if ran else None)
    return out


def _prepare(pipe, job: Job, steps: int) -> torch.Tensor:
    """Read and check one job's image, prompts and edit -> (1, 3, S, S) in [-1, 1]; raises with the reason.
    The edit's words and windows are checked here, before the inversion they would otherwise waste."""
    spec = job.spec
    for p in [spec["prompt"], *spec.get("edits", [])]:
        n = len(pipe.tokenizer(p).input_ids)
        if n > MAX_TOKENS:
            raise ValueError(f"prompt {p!r} has {n} tokens; the text encoder reads at most {MAX_TOKENS}: shorten it")
    if spec.get("edits") or spec.get("controller"):
        compile_control(from_spec(spec.get("controller")), _edit_prompts(spec), pipe.tokenizer, steps,
                        torch.device("cpu"), layers=pipe.unet.attn_layers,
                        local_blend=blend_from_spec(spec.get("blend")), store=False)
    return prepare(str(job.image), pipe.config.image_size)


def _edit_prompts(spec: dict) -> list[str]:
    edits = spec.get("edits", [])
    return [spec["prompt"], *(edits or [spec["prompt"]])]  # a reweight may edit the prompt itself


def _batches(pipe, jobs: list[Job], batch_size: int, steps: int, record_error):
    """Yield lists of (job, image tensor) of up to batch_size, loading lazily so memory stays O(batch)."""
    batch = []
    for job in jobs:
        try:
            batch.append((job, _prepare(pipe, job, steps)))
        except Exception as e:  # one bad input must not stop the others: recorded, and the run goes on
            record_error(job, e)
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def process_group(device=None):
    """Yields (rank, world, device) for the block. Under torchrun (RANK/WORLD_SIZE set) the process joins
    the group once, here, and leaves it when the outermost block ends; a block inside another, or inside a
    group the caller made, reuses that group. A group is never made twice in one process: the second
    rendezvous races ranks still tearing down the first and can hang every rank."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        yield 0, 1, device
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        # Ranks meet only at the end; shards can finish hours apart, so the barrier must wait that long.
        dist.init_process_group("nccl" if torch.device(device or "cpu").type == "cuda" else "gloo",
                                timeout=timedelta(days=1))
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if owns:
            dist.destroy_process_group()


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # tqdm's own rate is per second; dataset users think in images per minute
    return tqdm(total=total, disable=not enabled, unit="img", desc=desc, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images "
                           "[{elapsed}<{remaining}{postfix}]")


def run_jobs(job_file, model, out_dir, *, steps: int = 50, inner_steps: int = 10, batch_size: int | None = None,
             device=None, dtype=torch.float32, backend: str = "auto", prediction_type: str | None = None,
             method: str = "null_text", guidance: float | None = None, steps_offset: int | None = None,
             edit_options: dict | None = None, save_inversions: bool = True, progress: bool = True,
             max_batches: int | None = None, edit_batch_size: int | None = None) -> Summary:
    """Invert (and edit) every job of a JSONL file into out_dir; see the module docstring for the layout.

    Args:
        model: a checkpoint path, loaded with device, dtype, backend and prediction_type (`loading.load_or_reuse`),
            or a loaded Pipeline to reuse (no reload, no global state).
        method: the inversion method of every job (`Pipeline.invert`); steps_offset as there.
        batch_size: jobs inverted together (`invert_batch`) and edited together (`edit_batch`); None:
            DEFAULT_BATCH_SIZE.
        edit_options: more fields of every job's `EditRequest` (e.g. {"proximal": "l0"}).
        save_inversions: keep each job's inversion file (PIE runs only keep the edited images).
        max_batches: stop after this many inversion batches (the rest is left for a later run).
        edit_batch_size: jobs per `edit_batch` (default batch_size); each job's files are the same at any size.
    Returns a Summary; under torchrun its counts are summed over all ranks.
    """
    start = time.perf_counter()
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    for name, size in (("batch_size", batch_size), ("edit_batch_size", edit_batch_size)):
        if size is not None and (not is_int(size) or size < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output folder {out_dir} is a file: give a folder (it is created if missing)")
    jobs = read_jobs(job_file)
    with process_group(device) as (rank, world, device):
        mine = jobs[rank::world]
        own_pipe = not isinstance(model, Pipeline)
        pipe = None
        if any(j.error is None for j in mine):  # loaded first: a model that fails to load writes nothing
            pipe = load_or_reuse(model, device=device, dtype=dtype, backend=backend, prediction_type=prediction_type)
        out_dir.mkdir(parents=True, exist_ok=True)
        index = out_dir / (INDEX if world == 1 else f"index.rank{rank}.jsonl")
        settings = {} if pipe is None else _settings(pipe, steps=steps, inner_steps=inner_steps, method=method,
                                                     guidance=guidance, steps_offset=steps_offset,
                                                     edit_options=edit_options)
        done = _done_ids(out_dir, settings) if settings else set()
        todo = [j for j in mine if j.error is not None or j.id not in done]
        summary = Summary(total=len(jobs), skipped=len(mine) - len(todo))
        stale = len({j.id for j in todo} & _ok_ids(out_dir))
        if stale and rank == 0:
            print(f"{stale} job{'s were' if stale > 1 else ' was'} finished with another model or other settings: "
                  f"redoing {'them' if stale > 1 else 'it'} (files replaced)", file=sys.stderr)

        bar = _progress_bar(len(todo), progress and rank == 0,
                            "jobs" if world == 1 else f"rank 0 of {world}")

        def record(job: Job, entry: dict) -> None:
            base = {"id": job.id, "line": job.line, "image": job.spec.get("image"), "prompt": job.spec.get("prompt"),
                    "edits": job.spec.get("edits", []), "rank": rank, **settings}
            if isinstance(model, (str, os.PathLike)):
                base["model_path"] = model if str(model) == "toy" else str(Path(model).resolve())
            if job.spec.get("out"):
                base["out"] = job.spec["out"]
            _append(index, {**base, **entry})
            bar.update()
            minutes = bar.format_dict["elapsed"] / 60
            if minutes > 0:
                bar.set_postfix_str(f"{bar.n / minutes:.1f} images/min", refresh=False)

        def record_error(job: Job, err) -> None:
            msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
            summary.failed += 1
            record(job, {"status": "error", "error": msg})
            bar.write(f"job {job.id} (line {job.line}) failed: {msg}", file=sys.stderr)

        try:
            for job in todo:
                if job.error is not None:
                    record_error(job, job.error)
            runnable = [j for j in todo if j.error is None]
            if runnable:
                _run_batches(pipe, runnable, out_dir, batch_size, record, record_error, summary, max_batches,
                             {"steps": steps, "inner_steps": inner_steps, "method": method, "guidance": guidance,
                              "steps_offset": steps_offset}, save_inversions, edit_options or {},
                             edit_batch_size or batch_size)
        except KeyboardInterrupt:
            bar.close()
            raise Interrupted(summary.ok, out_dir) from None
        finally:
            if own_pipe and pipe is not None:  # a caller's pipeline keeps its cache for the next call; ours goes
                del pipe
                release_memory()
        bar.close()
        if world > 1:
            import torch.distributed as dist

            counts = torch.tensor([summary.ok, summary.failed, summary.skipped], dtype=torch.int64,
                                  device=device if torch.device(device or "cpu").type == "cuda" else "cpu")
            dist.all_reduce(counts)  # also the barrier: every rank has written its index file
            summary.ok, summary.failed, summary.skipped = counts.tolist()
            if rank == 0:
                summary.index = merge_index(out_dir)
            dist.barrier()  # others return only once the merged index exists
            summary.index = out_dir / INDEX
        else:
            summary.index = merge_index(out_dir)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_batches(pipe, runnable: list[Job], out_dir: Path, batch_size: int, record, record_error, summary: Summary,
                 max_batches: int | None, invert_options: dict, save_inversions: bool, edit_options: dict,
                 edit_batch_size: int) -> None:
    for n_batch, batch in enumerate(_batches(pipe, runnable, batch_size, invert_options["steps"], record_error), 1):
        t0 = time.perf_counter()
        try:
            invs = pipe.invert_batch([x for _, x in batch], [j.spec["prompt"] for j, _ in batch], progress=False,
                                     **invert_options)
        except Exception as e:  # e.g. out of memory: the batch's jobs fail, the next batch may not
            for job, _ in batch:
                record_error(job, e)
        else:
            per_image = (time.perf_counter() - t0) / len(batch)
            done = [(job, inv) for (job, _), inv in zip(batch, invs)]
            edits = _edit(pipe, done, invert_options["steps"], edit_options, edit_batch_size)
            for job, inv in done:
                _finish(pipe, job, inv, edits.get(job.id), out_dir, per_image, record, record_error, summary,
                        save_inversions)
        if max_batches is not None and n_batch >= max_batches:
            break


def _edit(pipe, done: list, steps: int, edit_options: dict, size: int) -> dict:
    """The edits of the inverted jobs that ask for one, `size` jobs per `edit_batch`: {job id: (EditOutput or its
    error, seconds per job)}. A batch that fails runs again job by job, so that a bad job fails alone."""
    def request(job: Job, inv) -> EditRequest:  # edit_options: more fields of every EditRequest
        return EditRequest(_edit_prompts(job.spec), controller=from_spec(job.spec.get("controller")), inversion=inv,
                           local_blend=blend_from_spec(job.spec.get("blend")), seed=job.spec.get("seed", 0),
                           **edit_options)

    wanted = [(job, inv) for job, inv in done if job.spec.get("edits") or job.spec.get("controller")]
    out = {}
    for k in range(0, len(wanted), size):
        group = wanted[k:k + size]
        t0 = time.perf_counter()
        try:
            outs = pipe.edit_batch([request(job, inv) for job, inv in group], steps=steps, progress=False)
        except Exception as e:  # noqa: BLE001 -- recorded as the job's error, or found by running each alone
            if len(group) > 1:
                out.update(_edit(pipe, group, steps, edit_options, 1))
                continue
            outs = [e]
        seconds = (time.perf_counter() - t0) / len(group)
        out.update({job.id: (o, seconds) for (job, _), o in zip(group, outs)})
    return out


def _finish(pipe, job: Job, inv, edit, out_dir: Path, seconds: float, record, record_error, summary: Summary,
            save_inversion: bool) -> None:
    """Write one job's inversion and edits (`edit`: (its EditOutput or error, seconds), None without an edit),
    then its index line. Index last: a kill in between means redo."""
    t0 = time.perf_counter()
    outputs, used = {"inversion": None, "edits": []}, {}
    loops = {"inversion": inv.loop, "edit": None}  # how each loop ran (editing.LOOPS), and why a capture failed
    failures = [inv.capture_failure] if inv.capture_failure else []
    try:
        if save_inversion:
            outputs["inversion"] = f"{job.id}/inversion.safetensors"
            inv.save(out_dir / outputs["inversion"])
        cost = inv.unet_evaluations(len(_edit_prompts(job.spec)))
        if edit is not None:
            out, edit_seconds = edit
            if isinstance(out, Exception):
                raise out
            seconds += edit_seconds
            loops["edit"] = out.loop
            used = {"self_max_queries": out.self_max_queries, "blend_start": out.blend_start}
            failures += [out.capture_failure] if out.capture_failure else []
            named = [(f"{job.id}/edit_{k}.png", im) for k, im in enumerate(out.images)]
            if job.spec.get("out"):
                named = [(job.spec["out"], out.images[-1])]
            for name, im in named:
                save_image_atomic(im, out_dir / name)
                outputs["edits"].append(name)
        else:
            cost["edit"] = 0
    except Exception as e:
        for name in (outputs["inversion"], *outputs["edits"]):  # a failed job leaves no files behind
            if name is not None:
                (out_dir / name).unlink(missing_ok=True)
        record_error(job, e)
        return
    losses = _final_losses(inv.losses)
    summary.ok += 1
    record(job, {"status": "ok", "outputs": outputs, "final_losses": losses,
                 "final_loss": next((v for v in reversed(losses) if v is not None), None),
                 "seconds": round(seconds + time.perf_counter() - t0, 4), "unet_evaluations": cost, "loops": loops,
                 **used, **({"capture_failures": failures} if failures else {})})
