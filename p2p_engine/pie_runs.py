"""Running PIE-Bench: each editor's run of each method as dataset jobs, and where the runs live.

PnPInversion's table crosses its inversions with four editors; the engine runs three (docs/editors.md says
why pix2pix-zero is left out). Per entry, beside Prompt-to-Prompt's job (`pie.protocol_job`):
- "masactrl" (run_editing_masactrl.py): the image inverted and edited with the empty prompt as its source (the
  reference's prompts ["", target]; its inversion also inverts ""), `MasaCtrl()` (start step 4, the decoder's two
  finest resolutions: blocks 10 .. 15 of SD 1.x's 16), no blend, no reweight;
- "pnp" (run_editing_pnp.py): inverted with the source prompt, `PlugAndPlay()` (features for 0.8 of the steps,
  self-attention queries and keys for 0.5, the empty-prompt branch, the reference's negative prompt).
Both at 50 DDIM steps and guidance 7.5, as Prompt-to-Prompt's protocol.

Layout: `pie` without --editors runs Prompt-to-Prompt into OUT/<method>/, as it always has; with --editors each
editor's run of each method goes to OUT/<editor>/<method>/ (the same files inside: jobs.jsonl,
annotation_images/<image_path>, index.jsonl). A Prompt-to-Prompt run of the first layout is moved into the
second (renamed: its index and images keep their paths, which are relative to the run's folder, so nothing is
recomputed) when a run with --editors finds OUT/<method>/ and no OUT/p2p/<method>/ yet.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .files import atomic_write
from .pie import GUIDANCE, IMAGE_FOLDER, MAPPING_FILE, METHODS, SELF_MAX_QUERIES, Entry, protocol_job, read_mapping

EDITORS = ("p2p", "masactrl", "pnp")
JOB_FILE = "jobs.jsonl"


def _job(editor: str, entry: Entry, pie_dir, self_limit: int) -> dict:
    """The job (`jobs.py` format) of one entry for one editor (module docstring)."""
    if editor == "p2p":
        return protocol_job(entry, pie_dir, self_limit)
    job = {"image": str((Path(pie_dir) / IMAGE_FOLDER / entry.image_path).resolve()), "edits": [entry.target],
           "out": entry.out}
    if editor == "masactrl":
        return {**job, "prompt": "", "controller": {"mode": "masactrl"}}
    return {**job, "prompt": entry.source, "controller": {"mode": "pnp"}}


def check_editors(editors) -> list[str] | None:
    """The editors asked for (None: Prompt-to-Prompt in the flat layout); raises naming an unknown one."""
    if editors is None:
        return None
    editors = list(editors)
    unknown = [e for e in editors if e not in EDITORS]
    if unknown or not editors:
        raise ValueError(f"unknown PIE editors {unknown}; choose from {list(EDITORS)}")
    return editors


def run_folder(out, editor: str, method: str, layered: bool) -> Path:
    """Where a run writes: OUT/<editor>/<method>, or OUT/<method> for Prompt-to-Prompt without --editors."""
    return Path(out) / editor / method if layered else Path(out) / method


def migrate(out, methods) -> list[str]:
    """Move Prompt-to-Prompt runs of the flat layout, OUT/<method>/, to OUT/p2p/<method>/ where that does not
    exist yet; returns the methods moved. Safe to call from every rank of a torchrun group at once: a rank that
    finds its move done by another goes on."""
    moved = []
    for method in methods:
        old, new = Path(out) / method, Path(out) / "p2p" / method
        if not (old / JOB_FILE).is_file() or new.exists():
            continue
        new.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(old, new)
        except OSError:  # another rank moved it first (or made the folder): its files are where they belong
            continue
        moved.append(method)
        print(f"moved the Prompt-to-Prompt run {old} to {new} (the --editors layout); nothing is recomputed",
              file=sys.stderr)
    return moved


def run_folders(out) -> dict[tuple[str, str], Path]:
    """{(editor, method): folder} of every run under OUT, in either layout (a folder holding a job file)."""
    out = Path(out)
    found = {}
    if not out.is_dir():
        return found
    for child in sorted(out.iterdir()):
        if (child / JOB_FILE).is_file():
            found.setdefault(("p2p", child.name), child)
        elif child.name in EDITORS and child.is_dir():
            for run in sorted(child.iterdir()):
                if (run / JOB_FILE).is_file():
                    found[(child.name, run.name)] = run  # over a flat run of the same method: the newer layout
    return found


def run_pie(pie_dir, model, out, methods, *, editors=None, types=None, steps: int = 50, inner_steps: int = 10,
            steps_offset: int | None = None, batch_size: int | None = None, device=None, dtype=torch.float32,
            backend: str = "auto", prediction_type: str | None = None, progress: bool = True,
            edit_batch_size: int | None = None) -> dict:
    """Run the protocol (`pie.py`'s docstring) for every entry (of `types`) and method into OUT/<method>/, or
    with `editors` (e.g. ["p2p", "masactrl", "pnp"]) each editor's into OUT/<editor>/<method>/ (module
    docstring). `model` is loaded once for every run (before anything is written); batch_size and
    edit_batch_size as `jobs.run_jobs` takes them. Returns {method, or "editor/method" with editors: jobs.Summary}."""
    from .jobs import Interrupted, process_group, run_jobs
    from .loading import check_reuse, load_or_reuse
    from .pipeline import release_memory

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown PIE methods {unknown}; choose from {list(METHODS)}")
    check_reuse(model, prediction_type)  # before anything moves
    layered = check_editors(editors) is not None
    runs = [(e, m) for e in (editors if layered else ["p2p"]) for m in methods]
    entries = read_mapping(pie_dir, types)
    if not entries:
        raise ValueError(f"no entries of edit types {types} in {Path(pie_dir) / MAPPING_FILE}")
    for folder in (Path(out), *(run_folder(out, e, m, layered) for e, m in runs)):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file; the output of `pie` is a folder (OUT/<method>/ or "
                             f"OUT/<editor>/<method>/)")
    if layered and "p2p" in editors:
        migrate(out, methods)  # before the ranks meet: the group's rendezvous waits for every rank's moves
    summaries = {}
    with process_group(device) as (_, _, device):  # one group for every method's run, not one each
        pipe = load_or_reuse(model, device=device, dtype=dtype, backend=backend, prediction_type=prediction_type)
        try:
            side = pipe.config.latent_size  # SDXL scales the limit with its native latent side
            limit = (side // 2) ** 2 if pipe.family == "sdxl" else SELF_MAX_QUERIES
            for editor, name in runs:
                folder = run_folder(out, editor, name, layered)
                job_file = folder / JOB_FILE
                with atomic_write(job_file, "w", encoding="utf-8") as f:
                    f.write("".join(json.dumps(_job(editor, e, pie_dir, limit), sort_keys=True) + "\n"
                                    for e in entries))
                method, options = METHODS[name]
                summaries[f"{editor}/{name}" if layered else name] = run_jobs(
                    job_file, pipe, folder, steps=steps, inner_steps=inner_steps, method=method, guidance=GUIDANCE,
                    steps_offset=steps_offset, edit_options=options, save_inversions=False, batch_size=batch_size,
                    device=device, progress=progress, edit_batch_size=edit_batch_size)
        except KeyboardInterrupt as e:
            finished = sum(s.ok for s in summaries.values()) + getattr(e, "finished", 0)
            raise Interrupted(finished, out) from None
        finally:
            if pipe is not model:
                del pipe
                release_memory()
    return summaries
