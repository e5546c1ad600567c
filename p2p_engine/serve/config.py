"""The server's settings: every knob and limit named once, with its default (the `serve` flags set them)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass
class ServeConfig:
    model: str = "toy"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str | None = None  # None: a temporary folder, removed at exit
    token: str | None = None  # every route but /healthz and the page's static files then needs "Bearer TOKEN"
    device: str | None = None
    dtype: str = "float32"
    backend: str = "auto"
    # -- scheduling (worker.py, batching.py)
    max_batch_rows: int = 32  # UNet rows one batched loop runs: an edit of P prompts is 2P (P - 1 from a cache)
    batch_timeout_ms: float = 50.0  # how long the first queued edit waits for company before its batch runs
    max_queue: int = 64  # queued jobs (both lanes); past it a submission gets 503 with Retry-After
    request_timeout_s: float = 300.0  # a job still queued after this fails with 504 without starting
    cache_bytes: int = 2 << 30  # the edit caches' LRU bound (re-edits of a source skip its row)
    grace_s: float = 30.0  # on SIGTERM / Ctrl-C: how long running batches may go on before they are cancelled
    # -- limits on requests (validate.py)
    max_upload_bytes: int = 20 << 20  # 413 past it
    max_pixels: int = 40_000_000  # decoded width x height; more is refused (413) before the pixels are decoded
    max_steps: int = 1000
    max_prompts: int = 8  # prompts of one edit, source included
    max_inner_steps: int = 50  # null-text iterations per step


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(config: ServeConfig) -> None:
    """Refuse settings the server cannot run with, naming the flag (ValueError)."""
    if not is_loopback(config.host) and not config.token:
        raise ValueError(f"--host {config.host} accepts connections from other machines: give --token TOKEN so that "
                         f"only clients with it are served (or serve on 127.0.0.1)")
    positive = {"--max-batch-rows": config.max_batch_rows, "--max-queue": config.max_queue,
                "--max-upload-bytes": config.max_upload_bytes, "--max-pixels": config.max_pixels,
                "--max-steps": config.max_steps, "--max-prompts": config.max_prompts}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    nonnegative = {"--batch-timeout-ms": config.batch_timeout_ms, "--request-timeout-s": config.request_timeout_s,
                   "--cache-bytes": config.cache_bytes, "--grace-s": config.grace_s,
                   "--max-inner-steps": config.max_inner_steps}
    for flag, value in nonnegative.items():
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if config.max_prompts < 2:
        raise ValueError("--max-prompts must allow a source and a target (2 or more)")
    if config.token is not None and (not config.token.strip() or any(c.isspace() for c in config.token)):
        raise ValueError("--token must be a non-empty string without spaces")


def add_arguments(p) -> None:
    """The `serve` flags (argparse), one per knob of ServeConfig, with its default."""
    d = ServeConfig()
    p.add_argument("--model", default=d.model, help="diffusers folder, single-file .safetensors, or 'toy' (default)")
    p.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=d.port, help="port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="images, inversions, jobs and results (default: a temporary folder removed at exit); a "
                        "restarted server on the same folder serves what was finished")
    p.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows, metavar="N",
                   help=f"UNet rows one batched loop runs; an edit of P prompts is 2P (default {d.max_batch_rows})")
    p.add_argument("--batch-timeout-ms", type=float, default=d.batch_timeout_ms, metavar="T",
                   help=f"how long a queued edit waits for others to share its loop (default {d.batch_timeout_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"queued jobs before submissions get 503 (default {d.max_queue})")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s, metavar="S",
                   help=f"a job queued this long fails with 504 without running (default {d.request_timeout_s:g})")
    p.add_argument("--cache-bytes", type=int, default=d.cache_bytes, metavar="B",
                   help=f"bound of the re-edit caches, least recently used out (default {d.cache_bytes}; 0: none)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every route but /healthz")
    p.add_argument("--grace-s", type=float, default=d.grace_s, metavar="S",
                   help=f"on SIGTERM / Ctrl-C, how long running jobs may finish (default {d.grace_s:g})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--backend", default=d.backend, choices=("auto", "triton", "torch"))
    for name, what in (("max_upload_bytes", "upload size in bytes (413 past it)"),
                       ("max_pixels", "decoded image pixels, width x height (413 past it)"),
                       ("max_steps", "sampling steps of a request"), ("max_prompts", "prompts of an edit"),
                       ("max_inner_steps", "null-text iterations per step")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name), metavar="N",
                       help=f"limit: {what} (default {getattr(d, name)})")


def from_args(args) -> ServeConfig:
    return ServeConfig(**{k: getattr(args, k) for k in ServeConfig.__dataclass_fields__})
