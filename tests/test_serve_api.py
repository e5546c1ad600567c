"""The server's API on the toy model (CPU, loopback, few steps): its edits are the engine's pixels, its inversions
the command line's, re-edits come from the source's cache, and jobs report, stream, cancel and time out."""
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import p2p_engine as p2p
from p2p_engine.cli import main
from p2p_engine.toy.dataset import make_scene
from serving import running

SOURCE = "a big red circle on a white background"
TARGET = "a big blue circle on a white background"
STEPS = 8


@pytest.fixture(scope="module")
def toy():
    return p2p.load("toy", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(toy):
    with running(toy, batch_timeout_ms=20) as (client, app):
        yield client, app


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB")) for im in images]


def _scene_png(tmp_path) -> tuple[bytes, str, str]:
    scene = make_scene(7, 4)
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path.read_bytes(), str(path), scene.caption


def test_an_edit_through_the_api_is_pipe_edit_pixel_for_pixel(server, toy):
    client, _ = server
    body = {"prompts": [SOURCE, TARGET], "seed": 3, "steps": STEPS, "maps": True,
            "controller": {"mode": "replace", "cross_steps": 0.7, "self_steps": 0.3}, "blend": [["red"], ["blue"]]}
    status, job = client.post("/v1/edits?wait=1", body)
    assert status == 200 and job["status"] == "done", job
    ref = toy.edit([SOURCE, TARGET], controller=p2p.Replace(cross_steps=0.7, self_steps=0.3), seed=3, steps=STEPS,
                   local_blend=p2p.LocalBlend([["red"], ["blue"]]), progress=False)
    got = [client.png(url) for url in job["result"]["images"]]
    assert len(got) == 2
    for a, b in zip(got, _pixels(ref.images)):
        assert np.array_equal(a, b)
    # the maps: the word's cross map at 16 x 16 as the engine stores it
    maps = job["result"]["maps"]
    assert maps["res"] == 16 and [w["word"] for w in maps["prompts"][1]][:4] == ["a", "big", "blue", "circle"]
    entry = next(w for w in maps["prompts"][1] if w["word"] == "blue")
    status, values = client.get(entry["json"])
    want = ref.attention.word_maps(1, "blue", 16).numpy()
    assert status == 200 and np.allclose(np.array(values["map"]), want, rtol=1e-6, atol=1e-9)
    status, headers, png = client.request("GET", entry["png"])
    assert status == 200 and "immutable" in headers["Cache-Control"]
    grey = np.asarray(Image.open(io.BytesIO(png)))
    assert grey.shape == (16, 16) and grey.max() == 255
    assert client.get(f"/v1/results/{job['job_id']}/maps/1/green.png")[1]["field"] == "word"


def test_an_edit_from_an_api_inversion_is_the_command_lines(server, toy, tmp_path):
    client, _ = server
    data, path, caption = _scene_png(tmp_path)
    target = caption.replace("green", "purple")
    status, up = client.upload(data)
    assert status == 200
    status, answer = client.post("/v1/inversions", {"image_id": up["image_id"], "prompt": caption,
                                                    "method": "null_text", "steps": 5, "inner_steps": 3})
    assert status == 202
    inv_job = client.wait(answer["job_id"])
    assert inv_job["status"] == "done" and inv_job["progress"] == {"step": 10, "total": 10}
    status, job = client.post("/v1/edits?wait=1", {"inversion_id": answer["inversion_id"], "targets": [target],
                                                   "controller": {"mode": "replace"}})
    assert status == 200 and job["status"] == "done", job

    inv_file = tmp_path / "cli.inversion.safetensors"
    assert main(["invert", "--model", "toy", "--device", "cpu", "--image", path, "--prompt", caption, "--method",
                 "null_text", "--steps", "5", "--inner-steps", "3", "--out", str(inv_file)]) == 0
    assert main(["edit", "--model", "toy", "--device", "cpu", "--inversion", str(inv_file), "--target", target,
                 "--out", str(tmp_path / "cli.png")]) == 0
    cli = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    api = np.concatenate([client.png(u) for u in job["result"]["images"]], axis=1)
    assert np.array_equal(api, cli)
    # and the inversion file itself
    status, _, raw = client.request("GET", f"/v1/inversions/{answer['inversion_id']}.safetensors")
    served = tmp_path / "served.safetensors"
    served.write_bytes(raw)
    a, b = p2p.Inversion.load(served), p2p.Inversion.load(inv_file)
    assert torch.equal(a.latent_T, b.latent_T) and torch.equal(a.null_embeddings, b.null_embeddings)
    # asked again: the same inversion, not a second one
    status, again = client.post("/v1/inversions", {"image_id": up["image_id"], "prompt": caption,
                                                   "method": "null_text", "steps": 5, "inner_steps": 3})
    assert status == 202 and again["inversion_id"] == answer["inversion_id"]
    hit = client.get(f"/v1/jobs/{again['job_id']}")[1]
    assert hit["status"] == "done" and hit["result"]["hit"] is True


def test_re_edits_of_a_source_run_from_its_edit_cache(server, toy):
    client, app = server
    base = {"prompts": [SOURCE, TARGET], "seed": 11, "steps": STEPS}
    hows, jobs = [], []
    for cross in (0.8, 0.6, 0.4):
        status, job = client.post("/v1/edits?wait=1", {**base, "controller": {"mode": "replace", "cross_steps": cross}})
        assert status == 200 and job["status"] == "done", job
        hows.append(job["result"]["cache"])
        jobs.append(job)
    assert hows == ["none", "made", "hit"]
    cache = toy.edit_cache(SOURCE, seed=11, steps=STEPS, cross_steps=1.0, self_steps=1.0, progress=False)
    for job, cross in zip(jobs[1:], (0.6, 0.4)):
        ref = toy.edit([SOURCE, TARGET], controller=p2p.Replace(cross_steps=cross), cache=cache, store=False,
                       progress=False)  # no maps asked: none stored
        for url, want in zip(job["result"]["images"], _pixels(ref.images)):
            assert np.array_equal(client.png(url), want)
    status, text = client.get("/metrics")
    assert 'p2p_cache_lookups_total{result="hit"} 1' in text and "p2p_cache_entries 1" in text


def test_job_events_stream_queued_running_progress_done(server):
    client, _ = server
    status, answer = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": STEPS, "seed": 5})
    conn = socket.create_connection((client.host, client.port), timeout=60)
    conn.sendall(f"GET /v1/jobs/{answer['job_id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = b""
    deadline = time.monotonic() + 120
    while b"event: done" not in raw and time.monotonic() < deadline:
        raw += conn.recv(65536)
    conn.close()
    names = [line.split(": ", 1)[1] for line in raw.decode().splitlines() if line.startswith("event: ")]
    assert names[-1] == "done" and names.count("done") == 1
    assert "running" in names and names.index("running") < names.index("done")
    steps = [json.loads(line[6:])["step"] for line in raw.decode().splitlines()
             if line.startswith("data: ") and '"step"' in line and '"status"' not in line]
    assert steps == sorted(steps) and steps and steps[-1] <= STEPS


def test_a_running_edit_is_cancelled_at_its_next_step(server):
    client, app = server
    status, answer = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 400, "seed": 1})
    job_id = answer["job_id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}")[1]["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, cancelled = client.json("DELETE", f"/v1/jobs/{job_id}")
    assert status in (200, 202), cancelled
    job = client.wait(job_id)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 400 and "cancelled" in job["error"]
    assert app.state.store.result_path(job_id, "0.png") is None
    assert client.json("DELETE", f"/v1/jobs/{job_id}")[0] == 200  # cancelling again changes nothing
    status, done = client.post("/v1/edits?wait=1", {"prompts": [SOURCE], "steps": 2})
    assert done["status"] == "done"
    assert client.json("DELETE", f"/v1/jobs/{done['job_id']}")[0] == 409
    # within --max-steps but past what the model's schedule allows: refused up front, not failed later
    status, answer = client.post("/v1/edits", {"prompts": [SOURCE], "steps": 1000})
    assert status == 422 and answer["field"] == "steps" and "steps_offset" in answer["error"]


def test_edits_run_between_the_steps_of_an_inversion(server, tmp_path):
    client, _ = server
    data, _, caption = _scene_png(tmp_path)
    status, up = client.upload(data)
    status, inv = client.post("/v1/inversions", {"image_id": up["image_id"], "prompt": caption, "method": "null_text",
                                                 "steps": 30, "inner_steps": 10})
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{inv['job_id']}")[1]["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, edit = client.post("/v1/edits?wait=1", {"prompts": [SOURCE, TARGET], "steps": 3})
    assert edit["status"] == "done"
    inversion = client.get(f"/v1/jobs/{inv['job_id']}")[1]
    assert inversion["status"] == "running", "the edit waited for the whole inversion"
    client.json("DELETE", f"/v1/jobs/{inv['job_id']}")
    assert client.wait(inv["job_id"])["status"] == "cancelled"


def test_a_full_queue_answers_503_and_a_stale_job_504(toy):
    with running(toy, max_queue=2, request_timeout_s=1.0, batch_timeout_ms=0) as (client, app):
        status, long = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 300})
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{long['job_id']}")[1]["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        queued = [client.post("/v1/edits", {"prompts": [SOURCE], "steps": 2, "seed": s})[1] for s in range(2)]
        status, headers, raw = client.request("POST", "/v1/edits", json.dumps({"prompts": [SOURCE]}).encode(),
                                              {"Content-Type": "application/json"})
        assert status == 503 and int(headers["Retry-After"]) >= 1 and b"--max-queue" in raw
        stale = client.wait(queued[0]["job_id"])
        assert stale["status"] == "failed" and stale["error_status"] == 504 and stale["attempts"] == 0
        assert "--request-timeout-s" in stale["error"]
        client.json("DELETE", f"/v1/jobs/{long['job_id']}")
        status, text = client.get("/metrics")
        assert "p2p_queue_depth_max 2" in text


def test_a_client_that_disconnects_mid_stream_leaves_nothing_behind(server):
    client, app = server
    status, answer = client.post("/v1/edits", {"prompts": [SOURCE, TARGET], "steps": 60, "seed": 9})
    for _ in range(3):
        conn = socket.create_connection((client.host, client.port), timeout=60)
        conn.sendall(f"GET /v1/jobs/{answer['job_id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = b""
        while b"event: " not in raw:  # the headers, then the first event
            chunk = conn.recv(4096)
            assert chunk, raw
            raw += chunk
        conn.close()  # mid-stream
    deadline = time.monotonic() + 120
    while app.state.jobs.waiting():
        assert time.monotonic() < deadline, "a stream of a gone client is still waiting"
        time.sleep(0.05)
    job = client.wait(answer["job_id"])
    assert job["status"] == "done" and job["attempts"] == 1
    assert client.get("/healthz")[0] == 200


def test_the_api_is_listed_and_its_page_and_scenes_are_served(server):
    client, _ = server
    status, spec = client.get("/openapi.json")
    assert status == 200 and {"/v1/images", "/v1/inversions", "/v1/edits", "/v1/jobs/{job_id}",
                              "/v1/jobs/{job_id}/events", "/v1/tokens", "/metrics", "/healthz"} <= set(spec["paths"])
    status, _, page = client.request("GET", "/")
    assert status == 200 and b"/static/app.js" in page
    status, scenes = client.get("/v1/scenes")
    assert status == 200 and len(scenes) >= 4
    picture = client.png(scenes[0]["url"])
    assert picture.shape == (64, 64, 3)
