"""Faults of a server in a child process (`p2p-engine serve`, toy model, loopback): SIGTERM with jobs running,
restarts on the same --data-dir, and kill -9 in the middle of a job."""
import json
import signal
import time
from pathlib import Path

from serving import ENDED, Process, no_temporaries

SOURCE = "a big red circle on a white background"
TARGET = "a big blue circle on a white background"


def _running(client, job_id: str, step: int = 1, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}")[1]
        if job["status"] == "running" and job["progress"]["step"] >= step:
            return
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.02)


def _records(data: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (data / "jobs").glob("*.json")}


def test_sigterm_finishes_the_running_batch_records_every_end_and_exits_0(tmp_path):
    data = tmp_path / "data"
    server = Process("--data-dir", str(data), "--grace-s", "120", "--batch-timeout-ms", "0", "--max-batch-rows", "4")
    client = server.client
    try:
        status, first = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 40, "seed": 1})
        status, second = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 40, "seed": 2})
        assert status == 202
        _running(client, first["job_id"])
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # draining: the server answers, and refuses new work
            status, answer = client.post("/v1/edits", {"prompts": [SOURCE]})
            if status == 503:
                break
            assert time.monotonic() < deadline, answer
            time.sleep(0.05)
        assert "shutting down" in answer["error"]
        assert server.wait(timeout=180) == 0
    finally:
        server.kill()
    records = _records(data)
    assert records[first["job_id"]]["status"] == "done"  # it ran on within the grace period
    assert (data / "results" / first["job_id"] / "1.png").is_file()
    queued = records[second["job_id"]]
    assert queued["status"] == "cancelled" and "shut down" in queued["error"] and queued["attempts"] == 0
    assert all(r["status"] in ENDED for r in records.values())
    assert not no_temporaries(data)


def test_past_the_grace_period_a_running_job_is_stopped_and_recorded(tmp_path):
    data = tmp_path / "data"
    server = Process("--data-dir", str(data), "--grace-s", "0.2")
    try:
        status, job = server.client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 900})
        _running(server.client, job["job_id"])
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=180) == 0
    finally:
        server.kill()
    record = _records(data)[job["job_id"]]
    assert record["status"] == "cancelled" and "--grace-s" in record["error"]
    assert not (data / "results" / job["job_id"]).exists() and not no_temporaries(data)


def test_a_restart_on_the_same_folder_serves_old_results_and_kill_9_fails_the_running(tmp_path):
    data = tmp_path / "data"
    server = Process("--data-dir", str(data))
    try:
        client = server.client
        status, done = client.post("/v1/edits?wait=1", {"prompts": [SOURCE, TARGET], "steps": 4, "maps": True})
        assert done["status"] == "done"
        before = {url: client.request("GET", url)[2] for url in done["result"]["images"]}
        status, running = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 900})
        _running(client, running["job_id"])
        server.signal(signal.SIGKILL)
        server.wait(timeout=60)
    finally:
        server.kill()
    again = Process("--data-dir", str(data))
    try:
        client = again.client
        old = client.get(f"/v1/jobs/{done['job_id']}")[1]
        assert old["status"] == "done" and old["result"] == done["result"]
        for url, raw in before.items():
            status, headers, now = client.request("GET", url)
            assert status == 200 and now == raw
        word = done["result"]["maps"]["prompts"][1][2]
        assert client.get(word["json"])[0] == 200
        lost = client.get(f"/v1/jobs/{running['job_id']}")[1]
        assert lost["status"] == "failed" and "killed or crashed" in lost["error"] and "running" in lost["error"]
        assert not (data / "results" / running["job_id"]).exists() and not no_temporaries(data)
        status, fresh = client.post("/v1/edits?wait=1", {"prompts": [SOURCE], "steps": 2})
        assert fresh["status"] == "done"
        again.signal(signal.SIGTERM)
        assert again.wait(timeout=120) == 0
    finally:
        again.kill()


def test_inversions_cancel_at_their_next_step_and_stop_when_the_grace_period_ends(tmp_path):
    import asyncio

    import torch

    import p2p_engine as p2p
    from p2p_engine.serve.app import shutdown
    from p2p_engine.toy.dataset import make_scene
    from PIL import Image
    from serving import running

    toy = p2p.load("toy", device="cpu", dtype=torch.float32)
    scene = make_scene(7, 4)
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    with running(toy, data_dir=str(tmp_path / "data"), grace_s=0.0) as (client, app):
        status, up = client.upload((tmp_path / "scene.png").read_bytes())
        body = {"image_id": up["image_id"], "prompt": scene.caption, "method": "null_text", "steps": 200,
                "inner_steps": 5}
        status, first = client.post("/v1/inversions", body)
        _running(client, first["job_id"], step=2)
        assert client.json("DELETE", f"/v1/jobs/{first['job_id']}")[0] == 202
        job = client.wait(first["job_id"])
        assert job["status"] == "cancelled" and job["progress"]["step"] < 400
        assert not (tmp_path / "data" / "inversions" / f"{first['inversion_id']}.safetensors").exists()
        status, second = client.post("/v1/inversions", {**body, "steps": 199})
        _running(client, second["job_id"], step=2)
        asyncio.run_coroutine_threadsafe(shutdown(app), app.state.jobs.loop).result(timeout=120)
        job = client.get(f"/v1/jobs/{second['job_id']}")[1]
        assert job["status"] == "cancelled" and "--grace-s" in job["error"] and job["error_status"] == 503
    records = _records(tmp_path / "data")
    assert {r["status"] for r in records.values()} == {"cancelled"}
    assert not no_temporaries(tmp_path / "data")
