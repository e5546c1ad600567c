"""The runs in a PIE-Bench output folder, and their per-image scores.

`find_runs(OUT)` reads three layouts, each run a folder holding `annotation_images/<image_path>`:

    OUT/<method>/                 `p2p-engine pie` runs of Prompt-to-Prompt (with jobs.jsonl, index.jsonl)
    OUT/<editor>/<method>/        `p2p-engine pie --editors ...` runs (the same files, one folder per editor)
    OUT/<method>+<editor>/        PnPInversion's own scripts (output/ddim+p2p/annotation_images/...): no job
                                  file or index, so every entry is expected and seconds are unknown

`evaluate` scores every entry of every run (one source image loaded, and its side of each metric computed,
once for all runs). Edited images that are not square are cropped to their right-most source-sized block,
as the reference's evaluate.py crops PnPInversion's side-by-side outputs
([prompts | source | reconstruction | edit]).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pie import IMAGE_FOLDER, mask_decode, read_mapping
from .scorer import Scorer

DEFAULT_EDITOR = "p2p"  # OUT/<method>/ runs predate per-editor folders and are Prompt-to-Prompt's


@dataclass(frozen=True)
class Run:
    editor: str
    method: str
    folder: Path
    native: bool  # written by `p2p-engine pie` (jobs.jsonl and index.jsonl), else by PnPInversion's scripts


def _is_run(folder: Path) -> bool:
    return (folder / "jobs.jsonl").is_file() or (folder / IMAGE_FOLDER).is_dir()


def find_runs(out) -> list[Run]:
    """Every run below `out` (module docstring), sorted by editor and method."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not the output folder of a `p2p-engine pie` run")
    runs = []
    for child in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / "jobs.jsonl").is_file():
            runs.append(Run(DEFAULT_EDITOR, child.name, child, True))
        elif (child / IMAGE_FOLDER).is_dir():
            method, _, editor = child.name.rpartition("+")
            runs.append(Run(editor, method, child, False) if method else Run("", child.name, child, False))
        else:
            runs += [Run(child.name, g.name, g, (g / "jobs.jsonl").is_file())
                     for g in sorted(p for p in child.iterdir() if p.is_dir() and _is_run(p))]
    seen: dict[tuple[str, str], Run] = {}
    for r in runs:
        other = seen.setdefault((r.editor, r.method), r)
        if other.folder.resolve() != r.folder.resolve():  # a link from OUT/<method> to OUT/p2p/<method> is one run
            raise ValueError(f"{other.folder} and {r.folder} both hold {r.editor} runs of {r.method}: move one out "
                             f"of {out}")
    return sorted(seen.values(), key=lambda r: (r.editor, r.method))


def _index_by_output(folder: Path) -> dict[str, dict]:
    from ..manifest import INDEX, _read_index

    by_out = {}
    for line in _read_index(folder / INDEX):
        for name in (line.get("outputs") or {}).get("edits", []):
            by_out[name] = line
        if line.get("status") != "ok" and line.get("out"):
            by_out.setdefault(line["out"], line)
    return by_out


def _asked(run: Run, index: dict) -> set[str] | None:
    """The outputs a native run was asked for (its last job file's and every one its index records); None
    for a PnPInversion run (every entry)."""
    from ..manifest import read_jobs

    if not run.native:
        return None
    return {j.spec.get("out") for j in read_jobs(run.folder / "jobs.jsonl")} | set(index)


def crop_like_reference(edited: np.ndarray, shape) -> np.ndarray:
    """The right-most, bottom-most `shape` block of a non-square image (evaluate.py's crop); else as is."""
    h, w = edited.shape[:2]
    if h == w:
        return edited
    return edited[max(h - shape[0], 0):, max(w - shape[1], 0):]


def _cost(line: dict) -> dict:
    cost = line.get("unet_evaluations") or {}
    if not cost:
        return {}
    inversion = cost["inversion"] + 2 * cost["inversion_backward"]  # a backward pass costs about two forwards
    return {"unet_evaluations": inversion + cost["edit"], "inversion_evaluations": inversion}


def evaluate(pie_dir, out, methods=None, *, types=None, scorer: Scorer | None = None, extra: dict | None = None,
             progress: bool = False) -> list[dict]:
    """Per run (editor, method) and entry: the scorer's metrics (PSNR, MSE and SSIM alone without one), seconds
    and UNet evaluations from a native run's index, and `extra` {name: fn(entry, source, edited) -> float}.
    Rows of entries a run was asked for but did not finish carry status "missing" or "error"; entries a native
    run's jobs left out (`pie --types`) have no rows. `methods` picks runs by method name."""
    from ..images import load_image

    pie_dir = Path(pie_dir)
    scorer = scorer if scorer is not None else Scorer()
    runs = find_runs(out)
    if methods:
        never = [m for m in methods if m not in {r.method for r in runs}]
        if never:
            raise ValueError(f"{never} never ran into {out} (no OUT/<method>/ or OUT/<editor>/<method>/ folder): "
                             f"run `p2p-engine pie --methods {','.join(never)}` first, or leave them out of "
                             f"--methods")
        runs = [r for r in runs if r.method in methods]
    if not runs:
        raise FileNotFoundError(f"{out} holds no runs (OUT/<method>/, OUT/<editor>/<method>/ or PnPInversion's "
                                f"OUT/<method>+<editor>/annotation_images); run `p2p-engine pie` first")
    entries = read_mapping(pie_dir, types)
    indexes = {r: _index_by_output(r.folder) if r.native else {} for r in runs}
    asked = {r: _asked(r, indexes[r]) for r in runs}
    rows: dict[tuple[Run, int], dict] = {}
    if progress:
        from tqdm import tqdm

        entries_iter = tqdm(entries, desc="pie-metrics", unit="image")
    else:
        entries_iter = entries
    for n, e in enumerate(entries_iter):
        todo = []
        for r in runs:
            if asked[r] is not None and e.out not in asked[r]:
                continue
            row = {"editor": r.editor, "method": r.method, "key": e.key, "type": e.type_id}
            rows[r, n] = row
            line = indexes[r].get(e.out) if r.native else {"status": "ok"}
            path = r.folder / e.out
            if line is None or line.get("status") != "ok" or not path.is_file():
                row["status"] = "missing" if line is None or line.get("status") in ("ok", None) else line["status"]
            else:
                todo.append((r, row, line, path))
        if not todo:
            continue
        source = load_image(pie_dir / IMAGE_FOLDER / e.image_path)
        mask = mask_decode(e.mask, source.shape[:2])
        prepared = scorer.prepare(source, mask)
        for r, row, line, path in todo:
            edited = crop_like_reference(load_image(path), source.shape)
            if edited.shape != source.shape:
                raise ValueError(f"{path} is {edited.shape[1]} x {edited.shape[0]} but its source is "
                                 f"{source.shape[1]} x {source.shape[0]}: edit at the benchmark's resolution")
            row.update(status="ok", **scorer(source, edited, mask, e.target, prepared))
            if r.native:
                row["seconds"] = line.get("seconds")
                row.update(_cost(line))
            for name, fn in (extra or {}).items():
                row[name] = fn(e, source, edited)
    order = {r: i for i, r in enumerate(runs)}
    return [rows[k] for k in sorted(rows, key=lambda k: (order[k[0]], k[1]))]

