"""GET /metrics: the Prometheus text format (version 0.0.4), written out here rather than through a client
library: a few gauges, counters and histograms."""
from __future__ import annotations

import threading
from collections import Counter

from .jobs import ENDED

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}',
                f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}",
                f"{name}_count{{{labels}}} {self.count}" if labels else f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.batch_rows = Histogram(ROW_BUCKETS)
        self.step_seconds = Histogram(STEP_BUCKETS)
        self.latency = {kind: Histogram(LATENCY_BUCKETS) for kind in ("edit", "inversion")}
        self.jobs_ended = Counter()
        self.jobs_started = 0
        self.queue_high_water = 0

    def queue_seen(self, depth: int) -> None:
        self.queue_high_water = max(self.queue_high_water, depth)

    def started(self) -> None:
        with self._lock:
            self.jobs_started += 1

    def ended(self, job) -> None:
        with self._lock:
            self.jobs_ended[job.status] += 1
            if job.status == "done":
                self.latency[job.kind].observe(job.ended - job.created)

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)

    def step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds.observe(seconds)

    def render(self, jobs, cache) -> str:
        """The exposition text; `jobs` is the Jobs table, `cache` the edit caches' LRU."""
        with jobs.lock:
            edits, inversions = len(jobs.edits), len(jobs.inversions)
            live = Counter(j.status for j in jobs.live.values())
        with self._lock:
            out = ["# HELP p2p_queue_depth Jobs queued, per lane.", "# TYPE p2p_queue_depth gauge",
                   f'p2p_queue_depth{{lane="edits"}} {edits}', f'p2p_queue_depth{{lane="inversions"}} {inversions}',
                   "# HELP p2p_queue_depth_max The most jobs queued at once since start (bounded by --max-queue).",
                   "# TYPE p2p_queue_depth_max gauge", f"p2p_queue_depth_max {self.queue_high_water}",
                   "# HELP p2p_jobs Jobs queued and running now.", "# TYPE p2p_jobs gauge"]
            out += [f'p2p_jobs{{status="{s}"}} {live.get(s, 0)}' for s in ("queued", "running")]
            out += ["# HELP p2p_jobs_ended_total Jobs ended since start, by status.",
                    "# TYPE p2p_jobs_ended_total counter"]
            out += [f'p2p_jobs_ended_total{{status="{s}"}} {self.jobs_ended.get(s, 0)}' for s in ENDED]
            out += ["# HELP p2p_jobs_started_total Jobs that started running (each job starts once).",
                    "# TYPE p2p_jobs_started_total counter", f"p2p_jobs_started_total {self.jobs_started}",
                    "# HELP p2p_batch_rows UNet rows of each batched edit loop.", "# TYPE p2p_batch_rows histogram",
                    *self.batch_rows.lines("p2p_batch_rows"),
                    "# HELP p2p_step_seconds Wall time of one step of a loop (edit batch or inversion).",
                    "# TYPE p2p_step_seconds histogram", *self.step_seconds.lines("p2p_step_seconds"),
                    "# HELP p2p_request_latency_seconds From submission to the end of a done job.",
                    "# TYPE p2p_request_latency_seconds histogram"]
            for kind, hist in self.latency.items():
                out += hist.lines("p2p_request_latency_seconds", f'kind="{kind}"')
            out += ["# HELP p2p_cache_bytes Bytes held by the edit caches (bounded by --cache-bytes).",
                    "# TYPE p2p_cache_bytes gauge", f"p2p_cache_bytes {cache.nbytes}",
                    "# HELP p2p_cache_entries Edit caches held.", "# TYPE p2p_cache_entries gauge",
                    f"p2p_cache_entries {len(cache)}",
                    "# HELP p2p_cache_lookups_total Re-edits that found their source's cache, or made it.",
                    "# TYPE p2p_cache_lookups_total counter", f'p2p_cache_lookups_total{{result="hit"}} {cache.hits}',
                    f'p2p_cache_lookups_total{{result="miss"}} {cache.misses}',
                    "# HELP p2p_waiting_clients Requests waiting on a job (?wait=1 and event streams).",
                    "# TYPE p2p_waiting_clients gauge", f"p2p_waiting_clients {jobs.waiting()}"]
        return "\n".join(out) + "\n"
