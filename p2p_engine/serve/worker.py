"""The worker: the one thread that runs the model, and the thread that writes results.

Its loop takes, in turn: a batch of edits that is ready (`batching.take`) and runs it through one
`pipe.edit_batch` call; else the oldest queued inversion. Inversions are a lane of their own: between two steps
of an inversion (its progress callback) the worker runs the edit batches that became ready, so a minute-long
null-text inversion holds an edit back by one of its steps, not by the whole minute. Nothing else touches the
device, so no two loops ever run on it at once.

Each loop reports every step (`callback(step, total)`): the jobs' progress, the step time for /metrics, and a
chance to stop. A job cancelled while running ends at once; its loop stops at that step when no job of the
batch still wants it, and otherwise runs on for the others (its rows are then thrown away). On shutdown
(`stop`) the worker takes no more jobs, lets the running loop finish until the grace period ends, and then
stops it at its next step.

Results are written by a second thread (`writer`), so the device goes on with the next batch while PNGs are
encoded; a job is `done` once its results folder is on disk.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ..controllers import Store
from . import batching, results
from .caches import CacheLRU

log = logging.getLogger("p2p_engine.serve")
CACHE_WINDOWS = dict(cross_steps=1.0, self_steps=1.0)  # a recorded source serves any later windows
INVERSIONS_HELD = 8  # loaded Inversion files kept for the next edits of the same image


class Stopped(Exception):
    """Raised in a loop's callback: stop the loop at this step."""


class Worker:
    def __init__(self, pipe, jobs, store, config, metrics):
        self.pipe, self.jobs, self.store, self.config, self.metrics = pipe, jobs, store, config, metrics
        self.policy = batching.Policy(config.max_batch_rows, config.batch_timeout_ms / 1000)
        self.caches = CacheLRU(config.cache_bytes)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="p2p-serve-writer")
        self.thread = threading.Thread(target=self._main, name="p2p-serve-worker", daemon=True)
        self.stopping = False
        self.deadline: float | None = None  # monotonic time past which running loops are stopped
        self._inversions: OrderedDict[str, object] = OrderedDict()

    def start(self) -> None:
        self.thread.start()

    def stop(self, grace_s: float, reason: str) -> None:
        """Blocking: no more jobs (the queued ones end cancelled with `reason`); the running loop may finish within
        `grace_s`, then is stopped; results still being written are finished."""
        self.jobs.drain(reason)
        with self.jobs.lock:
            self.stopping = True
            self.deadline = time.monotonic() + grace_s
            self.jobs.wake.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        self.writer.shutdown(wait=True)

    # -- the loop

    def _main(self) -> None:
        while True:
            with self.jobs.lock:
                self.jobs.expire(time.time())
                if self.stopping:
                    return
                batch, wait = batching.take(self.jobs.edits, self.policy, time.time())
                inversion = self.jobs.inversions.popleft() if not batch and self.jobs.inversions else None
                if not batch and inversion is None:
                    self.jobs.wake.wait(timeout=min(wait, 1.0) if wait is not None else 1.0)
                    continue
            try:
                self._run_edits(batch) if batch else self._run_inversion(inversion)
            except Exception:  # a bug of ours: the jobs have been ended by the run; the worker goes on
                log.error("worker: %s", traceback.format_exc())

    def _serve_ready_edits(self) -> None:
        """Between two steps of an inversion: run the edit batches that are ready now."""
        while not self.stopping:
            with self.jobs.lock:
                self.jobs.expire(time.time())
                batch, _ = batching.take(self.jobs.edits, self.policy, time.time())
            if not batch:
                return
            self._run_edits(batch)

    def _callback(self, jobs: list, on_step=None):
        """A loop's callback(step, total): progress, step time, and Stopped when nothing is left to run for."""
        last = [time.monotonic()]

        def callback(step: int, total: int) -> None:
            now = time.monotonic()
            self.metrics.step(now - last[0])
            last[0] = now
            for job in jobs:
                if job.cancel_requested:
                    self.jobs.finish(job, "cancelled", error=f"cancelled by the client at step {step} of {total}")
                else:
                    self.jobs.progress(job, step, total)
            if self.deadline is not None and now > self.deadline:
                raise Stopped(f"the server shut down; the job was stopped at step {step} of {total} when its "
                              f"grace period (--grace-s) ended")
            if all(job.status != "running" for job in jobs):
                raise Stopped("cancelled")
            if on_step is not None:
                on_step()
                last[0] = time.monotonic()  # the next step's time is its own, not the edits' run in between
        return callback

    # -- edits

    def _run_edits(self, batch: list) -> None:
        spec = batch[0].spec
        calls = spec.steps + (spec.sampler == "pndm")
        with self.jobs.lock:
            for job in batch:
                self.jobs.start(job, calls)
        try:
            requests = [self._request(job) for job in batch]
        except Exception as e:  # a source that could not be loaded or recorded
            for job in batch:
                self.jobs.finish(job, "failed", error=f"{type(e).__name__}: {e}", http_status=500)
            return
        self._loop(batch, requests)

    def _loop(self, batch: list, requests: list) -> None:
        """One `edit_batch` call for the batch (the policy bounded its rows: no split of its own, max_rows=None). A
        request the engine refuses (it names it) would fail the others: they then run each alone."""
        spec = batch[0].spec
        self.metrics.batch(sum(rows for _, _, rows in requests))
        try:
            outs = self.pipe.edit_batch([r for r, _, _ in requests], steps=spec.steps, sampler=spec.sampler,
                                        progress=False, max_rows=None, callback=self._callback(batch))
        except Stopped as e:
            for job in batch:
                self.jobs.finish(job, "cancelled", error=str(e) if str(e) != "cancelled" else None,
                                 http_status=503 if self.deadline is not None else None)
            return
        except (ValueError, TypeError) as e:
            if len(batch) > 1:  # the engine refused one request: the others run without it, each alone
                for job, request in zip(batch, requests):
                    if job.status == "running":
                        self._loop([job], [request])
                return
            self.jobs.finish(batch[0], "failed", error=str(e), http_status=422)
            return
        except Exception as e:
            for job in batch:
                self.jobs.finish(job, "failed", error=f"{type(e).__name__}: {e}", http_status=500)
            log.error("edit batch: %s", traceback.format_exc())
            return
        rows = sum(n for _, _, n in requests)
        for job, out, (_, how, _) in zip(batch, outs, requests):
            if job.status != "running":
                continue  # cancelled while its batch ran on
            maps = None
            if job.spec.maps and out.attention is not None:
                maps = results.word_maps(out.attention, job.spec.prompts, self.pipe.tokenizer,
                                         self.pipe.config.latent_size)
            info = {"cache": how, "loop": out.loop, "batch": {"jobs": len(batch), "rows": rows}}
            self.writer.submit(self._write_edit, job, out.images, maps, info)

    def _request(self, job):
        """(EditRequest, how its source runs: "hit" from an edit cache, "made" (recorded now) or "none", its UNet
        rows per call: a request from a cache runs its targets only)."""
        from .. import EditRequest

        spec = job.spec
        inversion = self._inversion(spec.inversion_id) if spec.inversion_id else None
        store = spec.maps or isinstance(spec.controller, Store)
        common = dict(controller=spec.controller, local_blend=spec.local_blend, store=store)
        cache, how = self._cache(spec, inversion)
        if cache is not None:
            return EditRequest(spec.prompts, cache=cache, **common), how, 2 * (len(spec.prompts) - 1)
        return (EditRequest(spec.prompts, seed=spec.seed or 0, inversion=inversion, guidance=spec.guidance, **common),
                how, spec.rows)

    def _cache(self, spec, inversion):
        if not spec.cacheable or self.caches.max_bytes == 0:
            return None, "none"
        key = spec.source_key
        cache = self.caches.get(key)
        if cache is not None:
            return cache, "hit"
        if not self.caches.seen(key):
            return None, "none"
        source = (dict(inversion=inversion, guidance=spec.guidance) if inversion is not None else
                  dict(seed=spec.seed, steps=spec.steps, guidance=spec.guidance, sampler=spec.sampler))
        try:
            cache = self.pipe.edit_cache(spec.prompts[0], max_bytes=self.caches.max_bytes, progress=False,
                                         **CACHE_WINDOWS, **source)
        except ValueError as e:  # larger than --cache-bytes: this source's edits run whole
            log.info("no edit cache for %r: %s", spec.prompts[0], e)
            return None, "none"
        self.caches.put(key, cache)
        return cache, "made"

    def _inversion(self, inversion_id: str):
        from ..inversion import Inversion

        inv = self._inversions.get(inversion_id)
        if inv is None:
            inv = Inversion.load(self.store.inversion_path(inversion_id))
            self._inversions[inversion_id] = inv
            while len(self._inversions) > INVERSIONS_HELD:
                self._inversions.popitem(last=False)
        self._inversions.move_to_end(inversion_id)
        return inv

    def _write_edit(self, job, images, maps, info) -> None:
        try:
            files, result = results.edit_files(job.id, job.spec.prompts, images, maps)
            self.store.write_results(job.id, files)
        except Exception as e:
            self.jobs.finish(job, "failed", error=f"writing the results failed: {type(e).__name__}: {e}",
                             http_status=500)
            return
        result.update(info, seconds=round(time.time() - job.started, 4))
        self.jobs.finish(job, "done", result=result)

    # -- inversions

    def _run_inversion(self, job) -> None:
        spec = job.spec
        with self.jobs.lock:
            self.jobs.start(job, 0)  # the total comes with the first step
        try:
            inv = self.pipe.invert(str(self.store.image_path(spec.image_id)), spec.prompt, steps=spec.steps,
                                   inner_steps=spec.inner_steps, method=spec.method, guidance=spec.guidance,
                                   progress=False, callback=self._callback([job], on_step=self._serve_ready_edits))
            if job.status != "running":
                return
            self.store.save_inversion(spec.inversion_id, inv, {**spec.request(), "timesteps": inv.timesteps})
        except Stopped as e:
            self.jobs.finish(job, "cancelled", error=str(e) if str(e) != "cancelled" else None,
                             http_status=503 if self.deadline is not None else None)
            return
        except Exception as e:
            self.jobs.finish(job, "failed", error=f"{type(e).__name__}: {e}", http_status=500)
            log.error("inversion: %s", traceback.format_exc())
            return
        self.jobs.finish(job, "done", result=inversion_result(spec.inversion_id, spec, loop=inv.loop))


def inversion_result(inversion_id: str, spec, loop: str | None = None, hit: bool = False) -> dict:
    return {"inversion_id": inversion_id, "url": f"/v1/inversions/{inversion_id}.safetensors",
            "prompt": spec.prompt, "method": spec.method, "steps": spec.steps, "guidance": spec.guidance,
            "loop": loop, "hit": hit}
