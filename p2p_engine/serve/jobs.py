"""Jobs: their records, the two queues (lanes) the worker takes them from, and the waits of the routes.

A job moves queued -> running -> done | failed | cancelled (or from queued straight to failed or cancelled),
and every move is recorded on disk (`Store.save_job`) before anyone is told. Threads: the routes run on the
event loop, the worker and the result writer on their own threads; `lock` guards every move and the queues,
and the worker sleeps on `wake` (the same lock) until a job arrives or a batch's wait runs out. A route
waiting for a job (`?wait=1`, the event stream) awaits a future that a move resolves on the event loop.

Memory: queued and running jobs are held; ended ones are kept for the most recent `KEEP_ENDED`, older ones
are read back from their records.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

ENDED = ("done", "failed", "cancelled")
KEEP_ENDED = 1000


class Refused(Exception):
    """A submission the server cannot take now: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    kind: str  # "edit" or "inversion"
    request: dict  # the request as validated, JSON (recorded)
    spec: object = None  # what the worker runs (validate.EditSpec or InversionSpec); not recorded
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    step: int = 0
    total: int = 0
    result: dict | None = None
    error: str | None = None
    error_status: int | None = None  # the HTTP status a waiting client gets (504: timed out in the queue)
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    attempts: int = 0  # times it started running: 1 for every job that ran (a job never runs twice)
    cancel_requested: bool = False
    version: int = 0  # bumped at every change; waiters compare it

    @property
    def rows(self) -> int:
        return self.spec.rows if self.spec is not None else 0

    def record(self) -> dict:
        """The JSON the API answers and the store keeps."""
        return {"job_id": self.id, "kind": self.kind, "status": self.status,
                "progress": {"step": self.step, "total": self.total}, "result": self.result, "error": self.error,
                "error_status": self.error_status, "created": self.created, "started": self.started,
                "ended": self.ended, "attempts": self.attempts, "request": self.request}


class Jobs:
    def __init__(self, store, config, metrics):
        self.store, self.config, self.metrics = store, config, metrics
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.edits: deque[Job] = deque()
        self.inversions: deque[Job] = deque()
        self.live: dict[str, Job] = {}  # queued and running
        self.ended: OrderedDict[str, Job] = OrderedDict()
        self.inflight_inversions: dict[str, Job] = {}  # inversion id -> its queued or running job
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Future]] = {}

    # -- the routes' side

    def queued(self) -> int:
        return len(self.edits) + len(self.inversions)

    def submit(self, job: Job, inversion_id: str | None = None) -> Job:
        """Queue `job` (Refused when draining or full); an inversion already queued or running for the same id
        returns that job instead."""
        with self.lock:
            if self.draining:
                raise Refused("the server is shutting down and takes no new jobs; retry on another replica or "
                              "after it restarts", retry_after=5)
            if inversion_id is not None and inversion_id in self.inflight_inversions:
                return self.inflight_inversions[inversion_id]
            if self.queued() >= self.config.max_queue:
                raise Refused(f"the queue is full ({self.config.max_queue} jobs, --max-queue); retry later",
                              retry_after=max(1, round(self.config.batch_timeout_ms / 1000 + 1)))
            (self.edits if job.kind == "edit" else self.inversions).append(job)
            self.live[job.id] = job
            if inversion_id is not None:
                self.inflight_inversions[inversion_id] = job
            self.metrics.queue_seen(self.queued())
            self.store.save_job(job.record())
            self.wake.notify_all()
        return job

    def add_ended(self, job: Job) -> Job:
        """A job that is done as it is made (an inversion that exists already): recorded, never queued."""
        with self.lock:
            job.ended = job.created
            self._keep_ended(job)
            self.store.save_job(job.record())
        return job

    def get(self, job_id: str) -> Job | dict | None:
        """The live or recently ended Job, else the record on disk (a dict), else None."""
        with self.lock:
            job = self.live.get(job_id) or self.ended.get(job_id)
        return job if job is not None else self.store.job_record(job_id)

    def cancel(self, job_id: str) -> Job | dict | None:
        """A queued job ends cancelled at once; a running one is asked to stop at its next step."""
        with self.lock:
            job = self.live.get(job_id)
            if job is None:
                return self.ended.get(job_id) or self.store.job_record(job_id)
            if job.status == "queued":
                (self.edits if job.kind == "edit" else self.inversions).remove(job)
                self._end(job, "cancelled", error="cancelled by the client before it started")
            else:
                job.cancel_requested = True
                self.wake.notify_all()
        return job

    async def wait_change(self, job: Job, version: int, timeout: float) -> None:
        """Return when `job` has changed since `version`, or after `timeout` seconds."""
        if job.version != version:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job.id, set()).add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(job.id)
            if waiting is not None:
                waiting.discard(fut)
                if not waiting:
                    del self._waiters[job.id]

    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    # -- the worker's side (callers hold `lock` where they say so)

    def expire(self, now: float) -> None:
        """Fail the queued jobs that waited past --request-timeout-s (504), without running them. Holds lock."""
        limit = self.config.request_timeout_s
        for lane in (self.edits, self.inversions):
            for job in [j for j in lane if now - j.created > limit]:
                lane.remove(job)
                self._end(job, "failed", error=f"waited {now - job.created:.1f} s in the queue, past the server's "
                                               f"--request-timeout-s {limit:g}; retry later", http_status=504)

    def start(self, job: Job, total: int) -> None:
        """A queued job the worker took (already out of its lane) starts. Holds lock."""
        job.status, job.started, job.total, job.step = "running", time.time(), total, 0
        job.attempts += 1
        self.metrics.started()
        self._changed(job)

    def progress(self, job: Job, step: int, total: int) -> None:
        with self.lock:
            if job.status == "running":
                job.step, job.total = step, total
                self._changed(job, save=False)

    def finish(self, job: Job, status: str, *, result: dict | None = None, error: str | None = None,
               http_status: int | None = None) -> None:
        with self.lock:
            if job.status not in ENDED:
                if status == "done":
                    job.step = job.total
                self._end(job, status, result=result, error=error, http_status=http_status)

    def drain(self, reason: str) -> None:
        """Take no more jobs; end the queued ones as cancelled with `reason` (running ones go on)."""
        with self.lock:
            self.draining = True
            for lane in (self.edits, self.inversions):
                while lane:
                    self._end(lane.popleft(), "cancelled", error=reason, http_status=503)
            self.wake.notify_all()

    # -- moves

    def _end(self, job: Job, status: str, *, result=None, error=None, http_status=None) -> None:
        job.status, job.result, job.error, job.ended = status, result, error, time.time()
        job.error_status = http_status
        self.live.pop(job.id, None)
        for key, j in list(self.inflight_inversions.items()):
            if j is job:
                del self.inflight_inversions[key]
        self._keep_ended(job)
        self.metrics.ended(job)
        self._changed(job)

    def _keep_ended(self, job: Job) -> None:
        self.ended[job.id] = job
        while len(self.ended) > KEEP_ENDED:
            self.ended.popitem(last=False)

    def _changed(self, job: Job, save: bool = True) -> None:
        job.version += 1
        if save:
            self.store.save_job(job.record())
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._resolve, job.id)

    def _resolve(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)
