"""A small client of API v1 on the standard library, and a server in a child process: what the tests, the benchmark
and a script driving the server use (`from p2p_engine.serve.client import Client, Process`).

    client = Client("http://127.0.0.1:8000")
    status, job = client.post("/v1/edits?wait=1", {"prompts": ["a big red circle on a white background",
                                                               "a big blue circle on a white background"]})
    pixels = client.png(job["result"]["images"][1])
"""
from __future__ import annotations

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
        """(status, headers, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=self._headers(headers))
            r = conn.getresponse()
            return r.status, r.headers, r.read()  # headers: case-insensitive
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


class Process:
    """`python -m p2p_engine serve --port 0 ARGS` in a child process, started when it printed that it is ready;
    `client` talks to it."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "p2p_engine", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors, False), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start (exit status {self.proc.poll()}): "
                                   f"{''.join(self.errors)[-3000:]}")
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

    def rss_bytes(self) -> int:
        """The server's resident memory (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def cpu_seconds(self) -> float:
        """User and system CPU time the server has used (Linux): what it cost, whatever else shares the machine."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
