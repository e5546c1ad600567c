"""The job file and the output index of `p2p_engine.jobs` (formats described there).

Job ids, parsing and checking the JSONL manifest; the append-only per-rank index files, deciding which
jobs are done, and merging the index atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .controllers import blend_from_spec, from_spec
from .files import atomic_write

ID_LEN = 16
INDEX = "index.jsonl"
JOB_KEYS = {"image", "prompt", "edits", "controller", "seed", "blend", "out"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# what an index line records of the run that made it; a job is done only when all of them match (jobs._settings)
SETTINGS = ("model", "dtype", "steps", "inner_steps", "method", "guidance", "steps_offset", "edit", "edit_defaults")


@dataclass
class Job:
    line: int  # 1-based line number in the job file
    id: str
    spec: dict = field(default_factory=dict)  # the parsed line; empty when it did not parse
    image: Path | None = None  # resolved image path
    error: str | None = None  # why the line cannot run, found while parsing


# -- job file ---------------------------------------------------------------------------------------

def job_id(spec) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ID_LEN]


def _check_spec(spec) -> str | None:
    """The first thing wrong with a parsed job line, as a message naming the field; None when fine."""
    if not isinstance(spec, dict):
        return f"a job line must be a JSON object, got {type(spec).__name__}"
    unknown = set(spec) - JOB_KEYS
    if unknown:
        return f"unknown keys {sorted(unknown)}; a job has {sorted(JOB_KEYS)}"
    if not isinstance(spec.get("image"), str) or not spec["image"]:
        return "'image' (a path string) is required"
    if not isinstance(spec.get("prompt"), str):
        return "'prompt' (a string) is required"
    edits = spec.get("edits", [])
    if not isinstance(edits, list) or not all(isinstance(e, str) for e in edits):
        return "'edits' must be a list of prompt strings"
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        return f"'seed' must be an integer, got {seed!r}"
    out = spec.get("out")
    if out is not None:
        rel = Path(out) if isinstance(out, str) else None
        if rel is None or rel.is_absolute() or ".." in rel.parts or rel.suffix.lower() not in IMAGE_SUFFIXES:
            return f"'out' must be a relative path inside the output folder ending in {IMAGE_SUFFIXES}, got {out!r}"
        if not edits:
            return "'out' names where the edited image goes: it needs at least one prompt in 'edits'"
    try:
        blend_from_spec(spec.get("blend"))
    except (ValueError, TypeError) as e:
        return f"blend: {e}"
    ctrl = spec.get("controller")
    if ctrl is None:
        return None
    if not isinstance(ctrl, dict):
        return "'controller' must be an object like {\"mode\": \"replace\", \"cross_steps\": 0.8}"
    try:
        from_spec(ctrl)
    except (ValueError, TypeError) as e:
        return f"controller: {e}"
    mode = ctrl.get("mode", "replace")
    if mode != "reweight" and not edits:
        return f"controller mode {mode!r} needs at least one prompt in 'edits'"
    return None


def read_jobs(path) -> list[Job]:
    """Parse a JSONL job file; bad lines become jobs carrying their error. Duplicate lines run once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # (JSON strings may hold other line breaks)
    except UnicodeDecodeError as e:
        raise ValueError(f"job file {path} is not UTF-8 text ({e})") from None
    jobs, seen = [], set()
    for n, raw in enumerate(lines, 1):
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError as e:
            jid = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:ID_LEN]
            if jid not in seen:
                seen.add(jid)
                jobs.append(Job(n, jid, error=f"line {n} is not valid JSON: {e.msg} at column {e.colno}"))
            continue
        jid = job_id(spec)
        if jid in seen:
            continue
        seen.add(jid)
        error = _check_spec(spec)
        if error is not None:
            jobs.append(Job(n, jid, spec if isinstance(spec, dict) else {}, error=f"line {n}: {error}"))
            continue
        image = Path(spec["image"]).expanduser()
        jobs.append(Job(n, jid, spec, image if image.is_absolute() else path.parent / image))
    _refuse_shared_outputs(jobs)
    return jobs


def _refuse_shared_outputs(jobs: list[Job]) -> None:
    """Jobs whose "out" names one file would overwrite each other: every one of them becomes an error."""
    by_out: dict[str, list[Job]] = {}
    for job in jobs:
        if job.error is None and job.spec.get("out"):
            by_out.setdefault(os.path.normcase(os.path.normpath(job.spec["out"])), []).append(job)
    for same in by_out.values():
        if len(same) > 1:
            for job in same:
                others = ", ".join(str(j.line) for j in same if j is not job)
                job.error = (f"line {job.line}: 'out' {job.spec['out']!r} is also the output of line {others}; "
                             f"give each job its own output file")


# -- index ------------------------------------------------------------------------------------------

def _read_index(path: Path) -> list[dict]:
    """Lines of one index file; a line cut short by a kill is skipped."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and "id" in entry:
                    out.append(entry)
    except FileNotFoundError:
        pass
    return out


def _index_files(out_dir: Path) -> list[Path]:
    return [out_dir / INDEX, *sorted(out_dir.glob("index.rank*.jsonl"))]


def _complete(entry: dict, out_dir: Path, settings: dict) -> bool:
    """Whether an index line is a finished job of a run with `settings` (every key of SETTINGS, defaults
    included: a line lacking one was made by another run); empty settings check the files only."""
    if entry.get("status") != "ok" or (settings and any(entry.get(k) != settings.get(k) for k in SETTINGS)):
        return False
    outputs = entry.get("outputs", {})
    files = [f for f in (outputs.get("inversion"), *outputs.get("edits", [])) if f is not None]
    return bool(files) and all((out_dir / f).is_file() for f in files)


def _done_ids(out_dir: Path, settings: dict) -> set[str]:
    return {e["id"] for p in _index_files(out_dir) for e in _read_index(p) if _complete(e, out_dir, settings)}


def _ok_ids(out_dir: Path) -> set[str]:
    """Ids finished by some run, whatever its settings."""
    return _done_ids(out_dir, {})


def _append(path: Path, entry: dict) -> None:
    """One whole line per call, flushed to disk, so a kill loses at most the line being written."""
    line = json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # the last run died mid-line: start a fresh line
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def merge_index(out_dir) -> Path:
    """Fold DIR/index.jsonl and every DIR/index.rank*.jsonl into DIR/index.jsonl: one line per id, sorted by id.

    For an id seen several times the last complete "ok" line wins, else the last line. Written atomically;
    the merged rank files are removed afterwards.
    """
    out_dir = Path(out_dir)
    files = _index_files(out_dir)
    best: dict[str, dict] = {}
    for p in files:
        for e in _read_index(p):
            prev = best.get(e["id"])
            ok = e.get("status") == "ok" and _complete(e, out_dir, {})
            if prev is None or ok or prev.get("status") != "ok":
                best[e["id"]] = e
    target = out_dir / INDEX
    with atomic_write(target, "w", encoding="utf-8") as f:
        for jid in sorted(best):
            f.write(json.dumps(best[jid], ensure_ascii=False, allow_nan=False) + "\n")
    for p in files[1:]:
        p.unlink(missing_ok=True)
    return target
