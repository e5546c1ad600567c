"""The server's state on disk, under `--data-dir`; every file goes through the project's one atomic writer.

    images/<image_id>                 an upload's bytes as received (id: its SHA-256, so one image is one id)
    inversions/<inversion_id>.safetensors   an `Inversion` file (id: a hash of the request and the model)
    inversions/<inversion_id>.json    the request that made it
    jobs/<job_id>.json                a job's record, rewritten when it is queued, starts and ends
    results/<job_id>/                 an edit's files, written as one folder when the job ends:
        0.png, 1.png, ...             the source (k = 0) and each target
        maps/<prompt_index>/<word_index>.png | .json   per-word cross-attention maps, when asked for

A file is whole or absent: `atomic_write` renames a finished temporary file into place and `atomic_folder` a
finished folder. A killed process can leave a temporary (".name.XXXX.tmp") behind; `open` removes those, and
marks the jobs that were queued or running when the process died as failed, with the reason.

Ids are 32 hex digits (random for jobs, content hashes for images and inversions) and are checked against that
pattern before any path is made from them: a path never comes from a request.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from ..files import atomic_folder, atomic_write, write_json

ID = re.compile(r"[0-9a-f]{32}")
RUNNING = ("queued", "running")


class BadId(ValueError):
    """An id that is not 32 hex digits (the message names the field)."""

    def __init__(self, field: str, value):
        super().__init__(f"{field} must be 32 hex digits (as the server returned it), got {str(value)[:80]!r}")
        self.field = field


def check_id(value, field: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise BadId(field, value)
    return value


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def derived_id(fields: dict) -> str:
    """The id of what `fields` (JSON-able) make: the same fields give the same id."""
    return content_id(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


class Store:
    def __init__(self, root):
        self.root = Path(root)
        for sub in ("images", "inversions", "jobs", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- start-up

    def recover(self, reason: str) -> list[dict]:
        """Remove temporaries a killed process left, and end the records of jobs it left queued or running as
        failed with `reason`. Returns those records."""
        for folder in ("images", "inversions", "jobs", "results"):
            for p in (self.root / folder).iterdir():
                if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        ended = []
        for record in self.job_records():
            if record.get("status") in RUNNING:
                record.update(status="failed", ended=time.time(), error_status=500,
                              error=f"{reason} while the job was {record['status']}; submit it again")
                self.save_job(record)
                ended.append(record)
        return ended

    # -- images

    def put_image(self, data: bytes) -> str:
        image_id = content_id(data)
        path = self.root / "images" / image_id
        if not path.exists():
            with atomic_write(path) as f:
                f.write(data)
        return image_id

    def image_path(self, image_id: str) -> Path | None:
        path = self.root / "images" / check_id(image_id, "image_id")
        return path if path.is_file() else None

    # -- inversions

    def inversion_path(self, inversion_id: str) -> Path:
        return self.root / "inversions" / f"{check_id(inversion_id, 'inversion_id')}.safetensors"

    def has_inversion(self, inversion_id: str) -> bool:
        return self.inversion_path(inversion_id).is_file()

    def save_inversion(self, inversion_id: str, inversion, request: dict) -> None:
        write_json(self.root / "inversions" / f"{inversion_id}.json", request)
        inversion.save(self.inversion_path(inversion_id))  # atomic; written last: its presence means done

    def inversion_request(self, inversion_id: str) -> dict | None:
        path = self.root / "inversions" / f"{check_id(inversion_id, 'inversion_id')}.json"
        return json.loads(path.read_text()) if path.is_file() and self.has_inversion(inversion_id) else None

    # -- jobs

    def save_job(self, record: dict) -> None:
        write_json(self.root / "jobs" / f"{check_id(record['job_id'], 'job_id')}.json", record)

    def job_record(self, job_id: str) -> dict | None:
        path = self.root / "jobs" / f"{check_id(job_id, 'job_id')}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def job_records(self):
        for p in sorted((self.root / "jobs").glob("*.json")):
            if ID.fullmatch(p.stem):
                yield json.loads(p.read_text())

    # -- results

    def write_results(self, job_id: str, files: dict[str, bytes]) -> None:
        """`files` (relative path -> bytes) as the folder results/<job_id>, which appears whole."""
        with atomic_folder(self.root / "results" / check_id(job_id, "job_id")) as tmp:
            for rel, data in files.items():
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)  # inside the temporary folder: the folder's rename publishes it

    def result_path(self, job_id: str, *parts: str) -> Path | None:
        """An existing result file; `parts` are names the routes built from numbers, never from a request."""
        path = self.root / "results" / check_id(job_id, "job_id")
        for part in parts:
            if not re.fullmatch(r"[0-9]+(\.png|\.json)?|maps", part):
                raise ValueError(f"not a result file name: {part!r}")
            path = path / part
        return path if path.is_file() else None


def remove_tree(path) -> None:
    """The temporary data folder, at exit."""
    shutil.rmtree(os.fspath(path), ignore_errors=True)
