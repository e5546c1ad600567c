"""Bad input to the server: each is a 4xx whose JSON {"error", "field"} names what to fix, and the server goes on
serving (toy model, loopback)."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import p2p_engine as p2p
from serving import running

SOURCE = "a big red circle on a white background"
TARGET = "a big blue circle on a white background"


@pytest.fixture(scope="module")
def toy():
    return p2p.load("toy", device="cpu")


@pytest.fixture(scope="module")
def server(toy):
    with running(toy, max_upload_bytes=200_000, max_pixels=1_000_000, max_steps=100, max_prompts=4) as (client, app):
        yield client


def _png(width=40, height=30) -> bytes:
    buf = io.BytesIO()
    rgb = (np.arange(width * height * 3) % 256).astype(np.uint8).reshape(height, width, 3)
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (CRC right) over one row of data: a decompression bomb's header."""
    data = bytearray(_png(1, 1))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _refused(answer, status: int, field, *words):
    got, body = answer
    assert got == status, body
    assert set(body) == {"error", "field"} and body["field"] == field, body
    for w in words:
        assert w in body["error"], body["error"]


def test_uploads_that_are_not_images_are_refused_by_name(server):
    _refused(server.upload(b"this is not an image"), 422, "file", "not an image")
    _refused(server.upload(b""), 422, "file", "empty")
    _refused(server.upload(_png()[:-40]), 422, "file", "cannot be decoded")  # a truncated PNG
    _refused(server.upload(_claiming(2000, 1000)), 413, "file", "2000 x 1000", "--max-pixels")
    _refused(server.upload(_claiming(100_000, 100_000)), 413, "file", "--max-pixels")  # past PIL's own bound
    _refused(server.upload(b"\x89PNG" + bytes(300_000)), 413, "file", "--max-upload-bytes")
    _refused(server.upload(_png(), field="image"), 422, "file", "'file'")
    status, body = server.upload(_png())
    assert status == 200 and len(body["image_id"]) == 32
    assert server.upload(_png()) == (200, body)  # the same image twice is one id


def test_an_upload_sent_in_chunks_is_stopped_at_the_limit(server):
    import http.client

    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    chunks = [head] + [bytes(65536)] * 8 + [f"\r\n--{boundary}--\r\n".encode()]  # 512 kB, no Content-Length
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/images", body=iter(chunks), encode_chunked=True,
                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 413 and b"--max-upload-bytes" in body


def test_wrong_json_types_are_refused_with_the_field(server):
    for body, field in [
            ({"prompts": [SOURCE, 3]}, "prompts[1]"),
            ({"prompts": SOURCE}, "prompts"),
            ({"prompts": [SOURCE, TARGET], "steps": "20"}, "steps"),
            ({"prompts": [SOURCE, TARGET], "steps": 20.0}, "steps"),
            ({"prompts": [SOURCE, TARGET], "maps": "yes"}, "maps"),
            ({"prompts": [SOURCE, TARGET], "seed": True}, "seed"),
            ({"prompts": [SOURCE, TARGET], "controller": {"mode": "swap"}}, "controller.mode"),
            ({"prompts": [SOURCE, TARGET], "controller": {"cross_steps": 1.5}}, "controller.cross_steps"),
            ({"prompts": [SOURCE, TARGET], "controller": {"equalizer": {"blue": "2"}}}, "controller.equalizer.blue"),
            ({"prompts": [SOURCE, TARGET], "color": "red"}, "color"),
            ({"prompts": [SOURCE, TARGET], "blend": ["red", "blue"]}, "blend[0]")]:
        status, answer = server.post("/v1/edits", body)
        assert status == 422 and answer["field"] == field, (body, answer)
        assert answer["error"].startswith(field), answer
    status, answer = server.json("POST", "/v1/edits", b'{"prompts": ["a", "b"], "controller": {"equalizer": '
                                                      b'{"a": NaN}}}')
    assert status == 422 and answer["field"] == "controller.equalizer.a" and "finite" in answer["error"]
    status, answer = server.json("POST", "/v1/edits", b'{"prompts": [')
    assert status == 422 and "JSON" in answer["error"]


def test_words_not_in_the_prompt_and_other_limits_are_named(server):
    cases = [
        ({"prompts": [SOURCE, TARGET], "controller": {"mode": "reweight", "equalizer": {"green": 2.0}}},
         "controller.equalizer", ["'green'", "not in the prompt"]),
        ({"prompts": [SOURCE, TARGET], "blend": [["red"], ["purple"]]}, "blend[1]", ["'purple'"]),
        ({"prompts": [SOURCE, TARGET], "blend": [["red"]]}, "blend", ["one list of words per prompt"]),
        ({"prompts": [SOURCE, TARGET + " today"], "controller": {"mode": "replace"}}, "controller",
         ["same number of words", "Refine"]),
        ({"prompts": [SOURCE, TARGET], "controller": {"mode": "reweight"}}, "controller.equalizer", ["equalizer"]),
        ({"prompts": [SOURCE, TARGET], "controller": {"self_steps": [0.6, 0.2]}}, "controller.self_steps",
         ["after end"]),
        ({"prompts": [SOURCE, TARGET], "steps": 101}, "steps", ["--max-steps"]),
        ({"prompts": [SOURCE, TARGET], "steps": 0}, "steps", ["[1, 100]"]),
        ({"prompts": [SOURCE] * 5}, "prompts", ["at most 4"]),
        ({"prompts": [SOURCE, TARGET], "seed": -1}, "seed", ["seed"]),
        ({"prompts": []}, "prompts", ["empty"]),
        ({"prompts": [SOURCE, TARGET], "inversion_id": "0" * 32}, "prompts", ["either"]),
        ({"targets": [TARGET]}, "prompts", ["either"]),
        ({"prompts": [SOURCE], "controller": {"mode": "replace"}}, "prompts", ["target"]),
        ({"inversion_id": "0" * 32, "targets": [TARGET]}, "inversion_id", ["no such inversion"]),
        ({"inversion_id": "../../" + "0" * 26, "targets": [TARGET]}, "inversion_id", ["32 hex digits"]),
    ]
    for body, field, words in cases:
        status, answer = server.post("/v1/edits", body)
        assert 400 <= status < 500 and answer["field"] == field, (body, status, answer)
        for w in words:
            assert w in answer["error"], (body, answer)
    long = " ".join(f"word{i}" for i in range(80))
    status, answer = server.post("/v1/edits", {"prompts": [SOURCE, long]})
    assert status == 422 and answer["field"] == "prompts[1]" and "shorten it" in answer["error"]
    assert "'word" in answer["error"]  # names the first word past the window


def test_the_first_word_past_the_window_is_the_one_named(server):
    words = ["red", "green", "blue", "circle"] * 25  # one token each: words 0 .. 74 fill positions 1 .. 75
    status, tokens = server.get("/v1/tokens?prompt=" + "%20".join(words))
    assert status == 200 and tokens["tokens"] == 102
    assert tokens["words"][74]["tokens"] == [75] and tokens["words"][75]["tokens"] == []
    status, answer = server.post("/v1/edits", {"prompts": [" ".join(words)]})
    assert status == 422 and answer["field"] == "prompts[0]" and "'circle' (word 75)" in answer["error"], answer


def test_unknown_and_malformed_ids(server):
    unknown = "0123456789abcdef" * 2
    for path, field in [(f"/v1/jobs/{unknown}", "job_id"), ("/v1/jobs/..", "job_id"),
                        (f"/v1/jobs/{unknown}/events", "job_id"), (f"/v1/inversions/{unknown}.safetensors",
                                                                   "inversion_id"),
                        ("/v1/inversions/...safetensors", "inversion_id"), (f"/v1/results/{unknown}/0.png", "job_id"),
                        ("/v1/results/../0.png", "job_id"), (f"/v1/results/{unknown}/..", "name"),
                        (f"/v1/images/{unknown}.png", "image_id"), ("/v1/images/..%2F..%2Fjobs", None),
                        (f"/v1/results/{unknown}/..%2F..%2Fjobs%2F{unknown}.json", None)]:
        status, answer = server.get(path)
        assert 400 <= status < 500 and answer["field"] == field, (path, status, answer)
        assert ("32 hex digits" in answer["error"] or "no such" in answer["error"] or "K.png" in answer["error"]
                or "no route" in answer["error"]), answer  # an escaped "/" is a path no route takes
    status, answer = server.json("DELETE", f"/v1/jobs/{unknown}")
    assert status == 404 and answer["field"] == "job_id"
    status, answer = server.post("/v1/inversions", {"image_id": unknown, "prompt": SOURCE})
    assert status == 404 and answer["field"] == "image_id" and "POST /v1/images" in answer["error"]
    status, answer = server.post("/v1/inversions", {"image_id": "x/../y", "prompt": SOURCE})
    assert status == 422 and answer["field"] == "image_id"


def test_bad_inversion_requests_are_named(server):
    status, upload = server.upload(_png())
    image_id = upload["image_id"]
    for body, field, word in [({"image_id": image_id, "prompt": SOURCE, "method": "exact"}, "method", "null_text"),
                              ({"image_id": image_id, "prompt": SOURCE, "steps": 101}, "steps", "--max-steps"),
                              ({"image_id": image_id, "prompt": SOURCE, "inner_steps": 51}, "inner_steps",
                               "--max-inner-steps"),
                              ({"image_id": image_id, "prompt": SOURCE, "guidance": "high"}, "guidance", "number"),
                              ({"image_id": image_id}, "prompt", "Field required"),
                              ({"image_id": image_id, "prompt": " ".join(["red"] * 90)}, "prompt", "(word 75)")]:
        status, answer = server.post("/v1/inversions", body)
        assert status == 422 and answer["field"] == field and word in answer["error"], (body, answer)


def test_the_server_goes_on_serving_after_bad_input(server):
    test_uploads_that_are_not_images_are_refused_by_name(server)
    status, upload = server.upload(_png())
    status, answer = server.post("/v1/inversions", {"image_id": upload["image_id"], "prompt": SOURCE,
                                                    "method": "direct", "steps": 3})
    assert status == 202
    job = server.wait(answer["job_id"])
    assert job["status"] == "done" and job["result"]["inversion_id"] == answer["inversion_id"]
    assert server.get("/healthz") == (200, {"status": "ok", "model": "toy", "family": "sd1", "image_size": 64})


def test_a_missing_or_wrong_token_is_a_401_on_every_route_but_healthz(toy):
    with running(toy, token="s3cret") as (client, app):
        client.token = None
        for method, path in [("GET", "/v1/scenes"), ("POST", "/v1/edits"), ("GET", "/metrics"),
                             ("GET", "/v1/tokens?prompt=a"), ("GET", "/docs"), ("GET", "/openapi.json")]:
            status, answer = client.json(method, path, {} if method == "POST" else None)
            assert status == 401 and answer["field"] == "Authorization" and "Bearer" in answer["error"], path
        client.token = "wrong"
        status, answer = client.get("/v1/scenes")
        assert status == 401 and "wrong token" in answer["error"]
        assert client.get("/healthz")[0] == 200
        status, _, page = client.request("GET", "/")  # the page's files: no data, and a browser sends no header
        assert status == 200 and b"p2p-engine" in page
        client.token = "s3cret"
        assert client.get("/v1/scenes")[0] == 200
