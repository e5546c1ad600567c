"""Helpers of the server's tests: a server in this process (uvicorn on a thread, loopback, a free port) or in a
child process (`p2p-engine serve`, for signals), and a small HTTP client on the standard library. Every wait is
bounded."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ENDED = ("done", "failed", "cancelled")


class Client:
    def __init__(self, base: str, token: str | None = None, timeout: float = 120.0):
        m = re.fullmatch(r"http://([^:/]+):(\d+)/?", base)
        self.host, self.port, self.base = m.group(1), int(m.group(2)), base.rstrip("/")
        self.token, self.timeout = token, timeout

    def _headers(self, extra=None) -> dict:
        h = dict(extra or {})
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=self._headers(headers))
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, decoded JSON or the text)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        status, hdrs, raw = self.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str):
        return self.json("GET", path)

    def post(self, path: str, body):
        return self.json("POST", path, body)

    def upload(self, data: bytes, filename: str = "image.png", field: str = "file"):
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, _, raw = self.request("POST", "/v1/images", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(raw)

    def wait(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.get(f"/v1/jobs/{job_id}")
            assert status == 200, job
            if job["status"] in ENDED:
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s")

    def png(self, url: str):
        import io

        import numpy as np
        from PIL import Image
        status, headers, raw = self.request("GET", url)
        assert status == 200, raw[:200]
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


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


class Process:
    """`python -m p2p_engine serve --port 0 ...` in a child process; `url` once it printed that it is ready."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 120.0):
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "p2p_engine", "serve", "--port", "0", *args],
                                     cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors, False), daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise TimeoutError(f"the server did not say it was ready: {''.join(self.errors)[-3000:]}")
        url = re.search(r"ready at (http://\S+?)/? ", self.lines[-1]).group(1)
        self.client = Client(url)

    def _read(self, stream, into: list, ready: bool) -> None:
        for line in stream:
            into.append(line)
            if ready and "ready at http" in line:
                self._ready.set()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def no_temporaries(folder: Path) -> list[Path]:
    """Leftovers of unfinished atomic writes under `folder` (none expected)."""
    return [p for p in Path(folder).rglob(".*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
