"""Files: the one atomic writer, a safetensors reader whose errors name the file, SHA-256 checksums.

Everything the engine writes (images, inversion files, job indexes, checkpoints, benchmark records) goes
through `atomic_write` or `atomic_folder`: the content is written under a temporary name in the
destination's folder and renamed into place only when complete, so a reader never sees half a file and
a crash leaves nothing behind. The file or folder gets the permissions an ordinary `open()` or `mkdir`
would give it (0666 / 0777 less the umask), not the 0600 / 0700 of a temporary file.

Reading raises `CheckpointError`, the one error type of loading, whose message says what to fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


# -- writing ---------------------------------------------------------------------------------------

def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """`with atomic_write(path) as f: f.write(...)`: `path` appears, whole, when the block ends.

    The parent folder is created if missing. On an exception inside the block, nothing is written and
    an existing `path` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the path of a file to write (inside it, or elsewhere)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path):
    """`with atomic_folder(path) as tmp: ...write files under tmp...`: the folder replaces `path`, whole,
    when the block ends (an existing folder is swapped out only then, and removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


# -- reading ---------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what to fix."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsFile:
    """A safetensors file whose errors name the file.

    `get` returns a tensor backed by the file mapping when no conversion is needed (zero copy), and
    otherwise reads the bytes with a plain read and converts: converting from the mapping would leave
    every touched page of the mapping resident next to the converted copy.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._header = json.loads(fh.read(n))
            self._data_start = 8 + n
            self.shapes = {k: tuple(self._f.get_slice(k).get_shape()) for k in self._f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None

    def get(self, key: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            info = self._header[key]
            src = _ST_DTYPES[info["dtype"]]
            want = dtype if (dtype is not None and src.is_floating_point) else src
            if (device is None or device.type == "cpu") and want == src:
                return self._f.get_tensor(key)
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(self._data_start + begin)
                view, done = memoryview(raw.numpy()), 0
                while done < len(view):  # straight into the tensor (no bytes object); reads may be partial
                    got = fh.readinto(view[done:])
                    if not got:
                        raise EOFError(f"file ends inside tensor {key!r}")
                    done += got
            return raw.view(src).reshape(info["shape"]).to(device=device, dtype=want)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} (corrupt or truncated?): {e}") from None


CHECKSUMS = "SHA256SUMS"


def write_checksums(folder) -> Path:
    """Write `folder/SHA256SUMS` ("<sha256>  <relative path>" per file, sorted) for every file in `folder`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    out = folder / CHECKSUMS
    with atomic_write(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(folder) -> None:
    """Raise CheckpointError naming the first file of `folder` that is missing or differs from SHA256SUMS."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    if not sums.is_file():
        raise CheckpointError(f"{folder}: {CHECKSUMS} is missing, so the files cannot be verified; "
                              f"reinstall p2p-engine")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from the shipped toy model; reinstall p2p-engine")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} is corrupted (its SHA-256 differs from {CHECKSUMS}); reinstall p2p-engine")
