"""The server's parts without a server: the batching policy, the edit caches' LRU, the store's recovery, the
settings' checks, and the inversion callback the worker's lane relies on."""
import json
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from p2p_engine.serve import batching
from p2p_engine.serve.caches import CacheLRU
from p2p_engine.serve.config import ServeConfig, check, is_loopback
from p2p_engine.serve.store import BadId, Store, check_id, derived_id


@dataclass(eq=False)
class FakeJob:
    spec: object
    created: float

    @property
    def rows(self):
        return self.spec.rows


def _job(prompts=2, steps=10, sampler="ddim", hw=(16, 16), timesteps=None, created=0.0):
    spec = SimpleNamespace(rows=2 * prompts, steps=steps, sampler=sampler, latent_hw=hw, timesteps=timesteps)
    return FakeJob(spec, created)


def test_a_batch_takes_the_edits_of_the_oldest_ones_loop_up_to_the_rows():
    policy = batching.Policy(max_rows=12, timeout_s=0.05)
    a, b, c, d, e = _job(created=0), _job(steps=20, created=0.01), _job(created=0.02), _job(prompts=3, created=0.03), \
        _job(created=0.04)
    queue = [a, b, c, d, e]
    batch, wait = batching.take(queue, policy, now=1.0)
    # rows 4 + 4 fit, d's 6 would make 14 > 12: the batch is full there (e, later, waits for the next one)
    assert batch == [a, c] and wait is None
    assert queue == [b, d, e]
    batch, _ = batching.take(queue, policy, now=1.0)
    assert batch == [b]  # the oldest leads, whatever its loop


def test_a_batch_waits_for_company_until_the_timeout_unless_full():
    policy = batching.Policy(max_rows=8, timeout_s=0.05)
    queue = [_job(created=1.0)]
    batch, wait = batching.take(queue, policy, now=1.01)
    assert batch == [] and wait == pytest.approx(0.04) and len(queue) == 1
    batch, wait = batching.take(queue, policy, now=1.06)
    assert len(batch) == 1 and wait is None and not queue
    full = [_job(created=1.0), _job(created=1.0)]  # 8 rows: full at once
    assert len(batching.take(full, policy, now=1.0)[0]) == 2
    big = [_job(prompts=8, created=1.0)]  # 16 rows > 8: runs alone rather than never
    assert len(batching.take(big, policy, now=1.0)[0]) == 1
    assert batching.take([], policy, now=1.0) == ([], None)


def test_edits_of_different_inversions_timesteps_do_not_share_a_loop():
    policy = batching.Policy(max_rows=64, timeout_s=0.0)
    queue = [_job(timesteps=(981, 1)), _job(timesteps=(980, 0)), _job(hw=(8, 8)), _job(sampler="pndm")]
    assert len(batching.take(queue, policy, now=1.0)[0]) == 1
    assert len(queue) == 3


class FakeCache:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def test_the_cache_lru_is_bounded_in_bytes_and_drops_the_least_recent():
    lru = CacheLRU(max_bytes=100)
    assert not lru.seen("a") and lru.seen("a")
    lru.put("a", FakeCache(40))
    lru.put("b", FakeCache(40))
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("c", FakeCache(40))  # 120 > 100: b goes
    assert lru.get("b") is None and lru.get("a") is not None and lru.get("c") is not None
    assert lru.nbytes == 80 and len(lru) == 2
    lru.put("huge", FakeCache(101))  # larger than the bound: not kept, nothing dropped for it
    assert lru.get("huge") is None and len(lru) == 2


def test_the_store_ends_the_jobs_a_killed_server_left_and_removes_its_temporaries(tmp_path):
    store = Store(tmp_path)
    running = {"job_id": "a" * 32, "status": "running", "kind": "edit"}
    queued = {"job_id": "b" * 32, "status": "queued", "kind": "edit"}
    done = {"job_id": "c" * 32, "status": "done", "kind": "edit", "result": {"images": []}}
    for record in (running, queued, done):
        store.save_job(record)
    (tmp_path / "results" / ".x.tmp").mkdir()
    (tmp_path / "jobs" / ".y.json.abc.tmp").write_text("half")
    ended = store.recover("the server stopped")
    assert sorted(r["job_id"] for r in ended) == ["a" * 32, "b" * 32]
    again = {r["job_id"]: r for r in store.job_records()}
    assert again["a" * 32]["status"] == "failed" and "while the job was running" in again["a" * 32]["error"]
    assert again["b" * 32]["status"] == "failed" and "while the job was queued" in again["b" * 32]["error"]
    assert again["c" * 32] == done
    assert not list(tmp_path.rglob(".*tmp"))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "..", "A" * 32, "a" * 31, "a" * 33, "a" * 31 + "/", 5, None])
def test_ids_are_32_hex_digits_or_refused(bad, tmp_path):
    with pytest.raises(BadId, match="32 hex digits"):
        check_id(bad, "job_id")
    with pytest.raises(BadId):
        Store(tmp_path).job_record(bad)
    assert derived_id({"a": 1, "b": 2}) == derived_id({"b": 2, "a": 1}) != derived_id({"a": 1, "b": 3})


def test_settings_refuse_a_public_host_without_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.5.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="--token"):
        check(ServeConfig(host="0.0.0.0"))
    check(ServeConfig(host="0.0.0.0", token="s3cret"))
    with pytest.raises(ValueError, match="--max-batch-rows"):
        check(ServeConfig(max_batch_rows=0))
    with pytest.raises(ValueError, match="--token"):
        check(ServeConfig(token="two words"))


def test_the_cli_refuses_a_public_host_without_a_token(capsys):
    from p2p_engine.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err


def test_inversion_reports_every_step_and_stops_where_its_callback_raises(tiny_pipe):
    import numpy as np

    image = (np.arange(128 * 128 * 3) % 251).astype(np.uint8).reshape(128, 128, 3)
    seen = []
    tiny_pipe.invert(image, "a photo", steps=3, inner_steps=1, method="null_text", progress=False,
                     callback=lambda step, total: seen.append((step, total)))
    assert seen == [(i, 6) for i in range(1, 7)]
    seen.clear()
    tiny_pipe.invert(image, "a photo", steps=3, method="direct", progress=False,
                     callback=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def stop(step, total):
        if step == 4:
            raise KeyboardInterrupt("stop here")
        seen.append(step)
    seen.clear()
    with pytest.raises(KeyboardInterrupt, match="stop here"):
        tiny_pipe.invert(image, "a photo", steps=3, inner_steps=1, progress=False, callback=stop)
    assert seen == [1, 2, 3]


def test_job_records_are_json_and_recorded_at_every_move(tmp_path):
    from p2p_engine.serve.jobs import Job, Jobs, Refused
    from p2p_engine.serve.metrics import Metrics

    store = Store(tmp_path)
    jobs = Jobs(store, ServeConfig(max_queue=1, request_timeout_s=10), Metrics())
    job = jobs.submit(Job("edit", {"prompts": ["x"]}, SimpleNamespace(rows=2)))
    assert json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())["status"] == "queued"
    with pytest.raises(Refused, match="--max-queue"):
        jobs.submit(Job("edit", {}, SimpleNamespace(rows=2)))
    with jobs.lock:
        jobs.expire(time.time() + 11)
    record = json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())
    assert record["status"] == "failed" and record["error_status"] == 504 and "--request-timeout-s" in record["error"]
    jobs.drain("bye")
    with pytest.raises(Refused, match="shutting down"):
        jobs.submit(Job("edit", {}, SimpleNamespace(rows=2)))


@pytest.mark.parametrize("capture", [False, True])
def test_edit_batch_reports_every_call_and_stops_where_its_callback_raises(tiny_pipe, capture):
    import torch

    from p2p_engine import EditRequest, Replace

    requests = [EditRequest(["a cat riding a bicycle", "a dog riding a bicycle"], controller=Replace(), seed=s,
                            store=False) for s in (0, 1)]
    plain = tiny_pipe.edit_batch(requests, steps=3, progress=False, capture=capture, max_rows=4)
    seen = []
    outs = tiny_pipe.edit_batch(requests, steps=3, progress=False, capture=capture, max_rows=4,
                                callback=lambda step, total: seen.append((step, total)))
    assert seen == [(i, 6) for i in range(1, 7)]  # two groups of 4 rows, 3 calls each
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(outs, plain))

    def stop(step, total):
        seen.append(step)
        if step == 2:
            raise KeyboardInterrupt("stop")
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.edit_batch(requests, steps=3, progress=False, capture=capture, max_rows=4, callback=stop)
    assert seen == [1, 2]
    again = tiny_pipe.edit_batch(requests, steps=3, progress=False, capture=capture, max_rows=4)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(again, plain))  # a stopped loop leaves no trace
