"""The application: `create_app(pipe, config)` wires the store, the jobs, the worker and the routes together.

Also here: the one error shape (every error is JSON {"error": what to fix, "field": where or null} with its
status), and `Guard`, the outermost layer, which answers before any route runs: a missing or wrong token (401),
a submission while the server shuts down (503), an upload larger than the limit (413, by its Content-Length, or
counted as it arrives).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import tempfile
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .config import ServeConfig
from .jobs import Jobs, Refused
from .metrics import Metrics
from .store import BadId, Store
from .validate import ApiError, Model, UploadTooLarge
from .worker import Worker

# Answered without the token: liveness, and the page's own files (they hold no data, and a browser opening a page
# cannot send a header; the page sends the token on every API call it makes).
PUBLIC = ("/healthz", "/")
PUBLIC_PREFIX = "/static/"
UPLOAD_PATH = "/v1/images"
MULTIPART_SLACK = 64 << 10  # boundaries and part headers around the file in an upload's body
EXPIRE_EVERY_S = 0.5  # how often queued jobs are checked against --request-timeout-s while the worker is busy


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware around the whole app (module docstring)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, config = scope["path"], self.state.config
        headers = dict(scope["headers"])
        if config.token and path not in PUBLIC and not path.startswith(PUBLIC_PREFIX):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not given:
                return await error(401, "this server needs a token: send the header 'Authorization: Bearer TOKEN'",
                                   "Authorization", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            if not hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
                return await error(401, "wrong token: send 'Authorization: Bearer TOKEN' with the server's --token",
                                   "Authorization", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if self.state.jobs.draining and scope["method"] == "POST":
            return await error(503, "the server is shutting down and takes no new work", None,
                               {"Retry-After": "5"})(scope, receive, send)
        if path == UPLOAD_PATH and scope["method"] == "POST":
            limit = config.max_upload_bytes + MULTIPART_SLACK
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await error(413, f"file: the upload is {int(length)} bytes; this server takes images up to "
                                        f"{config.max_upload_bytes} bytes (--max-upload-bytes)",
                                   "file")(scope, receive, send)
            seen = 0

            async def counted():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise UploadTooLarge()
                return message
            return await self.app(scope, counted, send)
        return await self.app(scope, receive, send)


def create_app(pipe, config: ServeConfig | None = None) -> FastAPI:
    """The app serving `pipe` (a loaded `Pipeline`). Its data folder is `config.data_dir`, or a temporary folder
    removed when the app shuts down. The worker starts with the app and stops (draining) when it shuts down."""
    from .routes import router

    config = config or ServeConfig()
    temporary = config.data_dir is None
    root = Path(tempfile.mkdtemp(prefix="p2p-serve-")) if temporary else Path(config.data_dir)
    store = Store(root)
    metrics = Metrics()
    jobs = Jobs(store, config, metrics)
    recovered = store.recover("the server stopped (killed or crashed)")
    worker = Worker(pipe, jobs, store, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        jobs.loop = asyncio.get_running_loop()
        worker.start()
        expiry = asyncio.create_task(_expire(jobs))
        try:
            yield
        finally:
            expiry.cancel()
            await shutdown(app)
            if temporary:
                from .store import remove_tree
                remove_tree(root)

    app = FastAPI(title="p2p-engine", version="1", lifespan=lifespan,
                  description="Prompt-to-Prompt editing and null-text inversion as a service. Every error is JSON "
                              "{\"error\", \"field\"}.")
    app.state.config, app.state.store, app.state.jobs, app.state.worker = config, store, jobs, worker
    app.state.metrics, app.state.pipe, app.state.model = metrics, pipe, Model.of(pipe)
    app.state.recovered = recovered
    app.state.started = time.time()
    app.include_router(router)
    static = resources.files("p2p_engine.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error(e.status, str(e), e.field, e.headers)

    @app.exception_handler(BadId)
    async def bad_id(request, e: BadId):
        return error(422, str(e), e.field)

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return error(503, str(e), None, {"Retry-After": str(e.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        field = _field(first.get("loc", ()), e.body)
        got = first.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {repr(got)[:60]})"
        return error(422, f"{field or 'body'}: {first.get('msg', 'invalid')}{shown}", field)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = e.detail if e.status_code != 404 or e.detail != "Not Found" else \
            f"no route {request.method} {request.url.path}; the API is listed at /docs"
        return error(e.status_code, str(message), None, getattr(e, "headers", None))

    app.add_middleware(Guard, state=app.state)
    return app


def _field(loc, body) -> str | None:
    """A validation error's place as `controller.equalizer.blue` or `prompts[1]`: the parts of its location that
    are keys and indices of the body (pydantic adds the tried type of a union, e.g. "constrained-float")."""
    where, parts = loc[0] if loc else None, []
    node = body
    for part in loc[1:]:
        if where != "body":
            parts.append(f".{part}")
        elif isinstance(node, dict) and part in node:
            parts.append(f".{part}")
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parts.append(f"[{part}]")
            node = node[part]
        elif not isinstance(node, (dict, list)) or isinstance(part, int):
            continue  # a tag of the type tried, not a place
        else:
            parts.append(f".{part}")  # a key that is missing: the place to add it
            node = None
    return "".join(parts).lstrip(".") or None


async def shutdown(app, reason: str = "the server shut down before the job started; submit it again") -> None:
    """Drain: refuse new work, end queued jobs, let the running loop finish within --grace-s, write what is being
    written. Idempotent."""
    if getattr(app.state, "stopped", False):
        return
    app.state.stopped = True
    await asyncio.to_thread(app.state.worker.stop, app.state.config.grace_s, reason)


async def _expire(jobs: Jobs) -> None:
    while True:
        await asyncio.sleep(EXPIRE_EVERY_S)
        with jobs.lock:
            jobs.expire(time.time())
