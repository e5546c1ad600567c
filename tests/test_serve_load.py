"""Load: 16 concurrent clients x 4 edits each against a server in a child process (toy model, loopback, few
steps), twice. Every request ends done or gets 503; none is lost or run twice; the queue never passes its bound;
the server's memory does not grow from the first round to the second."""
import re
import signal
from concurrent.futures import ThreadPoolExecutor

from serving import Process

CLIENTS, EDITS, MAX_QUEUE = 16, 4, 12
SOURCE = "a big red circle on a white background"
TARGETS = ["a big blue circle on a white background", "a big green circle on a white background"]
GROWTH_BOUND = 64 << 20  # a round's 64 jobs keep ~60 kB of results each on disk; a leak of outputs would show


def _round(client, first_seed: int) -> list[tuple[int, dict]]:
    def one_client(c: int):
        out = []
        for e in range(EDITS):
            seed = first_seed + c * EDITS + e
            status, answer = client.post("/v1/edits?wait=1", {"prompts": [SOURCE, TARGETS[seed % 2]], "seed": seed,
                                                              "steps": 4})
            out.append((status, answer))
        return out
    with ThreadPoolExecutor(CLIENTS) as pool:
        return [r for rs in pool.map(one_client, range(CLIENTS)) for r in rs]


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_sixteen_clients_four_edits_each(tmp_path):
    server = Process("--data-dir", str(tmp_path), "--max-queue", str(MAX_QUEUE), "--batch-timeout-ms", "20")
    client = server.client
    try:
        results = _round(client, 0)
        rss_first = server.rss_bytes()
        results += _round(client, 1000)
        rss_second = server.rss_bytes()
        done = [a for s, a in results if s == 200]
        refused = [a for s, a in results if s == 503]
        assert len(done) + len(refused) == 2 * CLIENTS * EDITS, [a for s, a in results if s not in (200, 503)]
        assert all(a["status"] == "done" and a["attempts"] == 1 for a in done)
        assert all("--max-queue" in a["error"] for a in refused)
        assert len(done) >= CLIENTS  # the bound refuses some, not all
        ids = [a["job_id"] for a in done]
        assert len(set(ids)) == len(ids)
        # each done job's result is its own request's: its seed's prompts, and its files on disk once
        assert all(a["result"]["prompts"][1] == TARGETS[a["request"]["seed"] % 2] for a in done)
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(ids)
        status, text = client.get("/metrics")
        assert _metric(text, "p2p_queue_depth_max") <= MAX_QUEUE
        assert _metric(text, "p2p_jobs_started_total") == len(done)  # none ran twice, none refused ran
        assert _metric(text, 'p2p_jobs_ended_total{status="done"}') == len(done)
        assert _metric(text, 'p2p_jobs{status="queued"}') == 0 and _metric(text, 'p2p_jobs{status="running"}') == 0
        assert _metric(text, "p2p_batch_rows_count") < len(done)  # edits shared loops
        assert rss_second - rss_first < GROWTH_BOUND, (rss_first, rss_second)
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
