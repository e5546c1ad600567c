"""`p2p-engine serve`: load the model, build the app, serve it with uvicorn until SIGTERM or Ctrl-C.

On the first SIGTERM or SIGINT the server drains (`app.shutdown`): submissions get 503, queued jobs end
cancelled, the running batch may finish within --grace-s and is then stopped at its next step, every job's end
is recorded; then uvicorn closes its connections and the process exits 0. A second Ctrl-C ends the grace period
at once. uvicorn
would re-raise the signal it caught after its shutdown (ending the process by the signal, not with 0), so its
handler is replaced (`Server.handle_exit`).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import uvicorn

from .app import create_app, shutdown
from .config import ServeConfig, check


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app
        self._draining: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"p2p-engine serve: ready at http://{host}:{port}/ (model {self.app.state.config.model}, data in "
                  f"{self.app.state.store.root})", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining is not None:
            if sig == signal.SIGINT:  # a second Ctrl-C: the grace period ends now (the loop stops at its next step)
                self.app.state.worker.deadline = time.monotonic()
            return
        print(f"p2p-engine serve: {signal.Signals(sig).name}: finishing running jobs (up to "
              f"{self.app.state.config.grace_s:g} s), then exiting", file=sys.stderr, flush=True)
        loop = self.app.state.jobs.loop
        if loop is None:  # before the app started: nothing to drain
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await shutdown(self.app, "the server shut down (SIGTERM) before the job started; submit it again")
        self.should_exit = True


def serve(config: ServeConfig, pipe=None) -> int:
    """Run the server in this process (blocking); returns the exit status. `pipe`: an already loaded model."""
    check(config)
    if pipe is None:
        import torch

        import p2p_engine as p2p
        pipe = p2p.load(config.model, device=config.device, dtype=getattr(torch, config.dtype),
                        backend=config.backend)
    app = create_app(pipe, config)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5,
                        lifespan="on")
    logging.getLogger("p2p_engine.serve").setLevel(logging.INFO)
    server = Server(uv, app)
    server.run()
    return 0
