"""Helpers of the server's tests: a server in this process (uvicorn on a thread, loopback, a free port); the client
and the server in a child process (`p2p-engine serve`, for signals) are the package's (`p2p_engine.serve.client`).
Every wait is bounded."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from p2p_engine.serve.client import ENDED, Client, Process  # noqa: F401 (the tests' names)


@contextlib.contextmanager
def running(pipe, **settings):
    """The app of `pipe` served on a thread of this process; yields (Client, app). Leaves after draining."""
    import asyncio

    import uvicorn

    from p2p_engine.serve import ServeConfig, create_app
    from p2p_engine.serve.app import shutdown

    config = ServeConfig(port=0, **settings)
    app = create_app(pipe, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Client(f"http://127.0.0.1:{port}", token=settings.get("token")), app
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(app), app.state.jobs.loop).result(timeout=120)
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not stop"


def no_temporaries(folder: Path) -> list[Path]:
    """Leftovers of unfinished atomic writes under `folder` (none expected)."""
    return [p for p in Path(folder).rglob(".*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
