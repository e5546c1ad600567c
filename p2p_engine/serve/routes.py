"""API v1: thin routes. Each checks its input (`validate.py`), queues a job or reads the store, and answers;
no model code runs here (the worker owns the model)."""
from __future__ import annotations

import asyncio
import io
import json
import re

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from .jobs import ENDED, Job
from .schemas import EditBody, InversionBody
from .validate import ApiError, UploadTooLarge, checked_id, edit_spec, inversion_spec, prompt_words
from .worker import inversion_result

router = APIRouter()
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
KEEPALIVE_S = 15.0  # an event stream sends a comment this often while nothing happens
SCENES = ((7, 4), (7, 0), (7, 1), (7, 2), (7, 3), (7, 5))  # toy scenes offered on the page: (seed, index)
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


def _state(request: Request):
    return request.app.state


def _job_body(job) -> dict:
    return job.record() if isinstance(job, Job) else job


def _find(request: Request, job_id: str):
    job = _state(request).jobs.get(checked_id(job_id, "job_id"))
    if job is None:
        raise ApiError(404, f"job_id {job_id}: no such job on this server", "job_id")
    return job


# -- images


@router.post("/v1/images", openapi_extra=UPLOAD_SCHEMA, summary="Upload an image (multipart field 'file')")
async def upload_image(request: Request):
    st = _state(request)
    try:
        form = await request.form(max_files=1, max_fields=1)
    except UploadTooLarge:
        raise ApiError(413, f"file: this server takes images up to {st.config.max_upload_bytes} bytes "
                            f"(--max-upload-bytes)", "file") from None
    except Exception as e:
        raise ApiError(400, f"the body must be multipart/form-data with the image in the field 'file' ({e})",
                       "file") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "file: send the image as a file in the multipart field 'file'", "file")
    data = await upload.read(st.config.max_upload_bytes + 1)
    if len(data) > st.config.max_upload_bytes:
        raise ApiError(413, f"file: this server takes images up to {st.config.max_upload_bytes} bytes "
                            f"(--max-upload-bytes)", "file")
    width, height = await asyncio.to_thread(_check_image, data, st.config.max_pixels)
    image_id = await asyncio.to_thread(st.store.put_image, data)
    return {"image_id": image_id, "width": width, "height": height, "url": f"/v1/images/{image_id}.png"}


def _check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image PIL reads whole; 413 past `max_pixels` (read from the header, before any pixel
    is decoded: a decompression bomb never expands), 422 for what is not an image or ends early."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(422, "file: the upload is empty; send an image file (PNG, JPEG, WebP, ...)", "file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ApiError(413, f"file: the image is {width} x {height} = {width * height} pixels; this server "
                                    f"takes up to {max_pixels} (--max-pixels)", "file")
            im.load()
    except ApiError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own bound, met before ours when ours is set higher
        raise ApiError(413, f"file: the image is too large to decode ({e}); this server takes up to {max_pixels} "
                            f"pixels (--max-pixels)", "file") from None
    except UnidentifiedImageError:
        raise ApiError(422, "file: not an image PIL can read; send a PNG, JPEG, WebP, ...", "file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, f"file: the image cannot be decoded (truncated or corrupt?): {e}", "file") from None
    return width, height


@router.get("/v1/images/{name}", summary="An uploaded image as the model sees it (cropped and resized), PNG")
async def get_image(request: Request, name: str):
    st = _state(request)
    image_id = checked_id(name.removesuffix(".png"), "image_id")
    path = st.store.image_path(image_id)
    if path is None:
        raise ApiError(404, f"image_id {image_id}: no such image", "image_id")

    def prepared() -> bytes:
        from ..images import prepare, to_pil
        from .results import png_bytes
        return png_bytes(to_pil(prepare(str(path), st.pipe.config.image_size))[0])
    return Response(await asyncio.to_thread(prepared), media_type="image/png", headers=IMMUTABLE)


@router.get("/v1/scenes", summary="Toy scenes to edit (their images are stored like uploads)")
async def scenes(request: Request):
    st = _state(request)

    def make() -> list[dict]:
        from ..toy.dataset import make_scene
        from PIL import Image
        from .results import png_bytes
        out = []
        for seed, index in SCENES:
            scene = make_scene(seed, index)
            image_id = st.store.put_image(png_bytes(Image.fromarray(scene.image)))
            out.append({"image_id": image_id, "caption": scene.caption, "url": f"/v1/images/{image_id}.png"})
        return out
    return await asyncio.to_thread(make)


# -- jobs


@router.post("/v1/inversions", status_code=202, summary="Invert an uploaded image (a job)")
async def post_inversion(request: Request, body: InversionBody):
    st = _state(request)
    spec = inversion_spec(body, st.model, st.store, st.config)
    if st.store.has_inversion(spec.inversion_id):
        job = st.jobs.add_ended(Job("inversion", spec.request(), status="done",
                                    result=inversion_result(spec.inversion_id, spec, hit=True)))
    else:
        job = st.jobs.submit(Job("inversion", spec.request(), spec), inversion_id=spec.inversion_id)
    return {"job_id": job.id, "inversion_id": spec.inversion_id}


@router.post("/v1/edits", status_code=202, summary="Edit (or generate) prompts; ?wait=1 answers when the job ends")
async def post_edit(request: Request, body: EditBody, wait: bool = Query(False)):
    st = _state(request)
    pending = st.jobs.inflight_inversions.get(body.inversion_id) if body.inversion_id else None
    spec = edit_spec(body, st.model, st.store, st.config, inversion_job=pending)
    job = st.jobs.submit(Job("edit", body.model_dump(), spec))
    if not wait:
        return {"job_id": job.id}
    while job.status not in ENDED:
        await st.jobs.wait_change(job, job.version, KEEPALIVE_S)
    return JSONResponse(job.record(), status_code=job.error_status or 200)


@router.get("/v1/jobs/{job_id}", summary="A job's status, progress, result or error")
async def get_job(request: Request, job_id: str):
    return _job_body(_find(request, job_id))


@router.delete("/v1/jobs/{job_id}", summary="Cancel a job (a running one stops at its next step)")
async def cancel_job(request: Request, job_id: str):
    _find(request, job_id)
    job = _state(request).jobs.cancel(job_id)
    body = _job_body(job)
    if body["status"] in ENDED and body["status"] != "cancelled":
        raise ApiError(409, f"job {job_id} has already ended ({body['status']}); there is nothing to cancel",
                       "job_id")
    return JSONResponse(body, status_code=202 if body["status"] == "running" else 200)


@router.get("/v1/jobs/{job_id}/events", summary="Server-sent events: queued, running, progress, done, failed, "
                                                "cancelled")
async def job_events(request: Request, job_id: str):
    job = _find(request, job_id)
    jobs = _state(request).jobs

    async def stream():
        status = step = None
        while True:
            body = _job_body(job)
            if body["status"] != status:
                status = body["status"]
                yield _event(status, body)
            elif body["status"] == "running" and body["progress"]["step"] != step:
                yield _event("progress", body["progress"])
            step = body["progress"]["step"]
            if status in ENDED or not isinstance(job, Job):
                return
            version = job.version
            await jobs.wait_change(job, version, KEEPALIVE_S)
            if job.version == version:
                yield ": keep-alive\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


# -- results


@router.get("/v1/results/{job_id}/{name}", summary="An edit's image: k = 0 the source, then each target (PNG)")
async def result_image(request: Request, job_id: str, name: str):
    checked_id(job_id, "job_id")
    if not re.fullmatch(r"[0-9]{1,3}\.png", name):
        raise ApiError(422, f"name a result image as K.png (0 the source, then each target), got {name[:40]!r}",
                       "name")
    _find(request, job_id)
    return _result_file(request, job_id, name)


@router.get("/v1/results/{job_id}/maps/{prompt_index}/{name}",
            summary="A word's cross-attention map: WORD.png (grey, scaled to its maximum) or WORD.json (values)")
async def result_map(request: Request, job_id: str, prompt_index: int, name: str):
    job = _job_body(_find(request, job_id))
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("png", "json"):
        raise ApiError(422, f"name a map as WORD.png or WORD.json, got {name[:60]!r}", "name")
    maps = (job.get("result") or {}).get("maps")
    if maps is None:
        raise ApiError(404, f"job {job_id} has no maps (ask with \"maps\": true, and wait for it to be done)", "job_id")
    if not 0 <= prompt_index < len(maps["prompts"]):
        raise ApiError(404, f"prompt_index must be in [0, {len(maps['prompts'])}), got {prompt_index}", "prompt_index")
    entry = next((w for w in maps["prompts"][prompt_index] if w["word"] == stem), None)
    if entry is None:
        words = [w["word"] for w in maps["prompts"][prompt_index]]
        raise ApiError(404, f"the word {stem!r} has no map in prompt {prompt_index}; its words are {words}", "word")
    return _result_file(request, job_id, "maps", str(prompt_index), f"{entry['index']}.{suffix}")


def _result_file(request: Request, job_id: str, *parts: str):
    path = _state(request).store.result_path(job_id, *parts)
    if path is None:
        raise ApiError(404, f"job {job_id} has no result {'/'.join(parts)} (is it done?)", "job_id")
    media = "image/png" if path.suffix == ".png" else "application/json"
    return FileResponse(str(path), media_type=media, headers=IMMUTABLE)


@router.get("/v1/inversions/{name}", summary="An inversion's file (p2p_engine.Inversion, safetensors)")
async def inversion_file(request: Request, name: str):
    inversion_id = checked_id(name.removesuffix(".safetensors"), "inversion_id")
    path = _state(request).store.inversion_path(inversion_id)
    if not path.is_file():
        raise ApiError(404, f"inversion_id {inversion_id}: no such inversion (is its job done?)", "inversion_id")
    return FileResponse(str(path), media_type="application/octet-stream", headers=IMMUTABLE,
                        filename=f"{inversion_id}.safetensors")


# -- the rest


@router.get("/v1/tokens", summary="A prompt's words and their token positions")
async def tokens(request: Request, prompt: str = Query(..., max_length=4096)):
    tok = _state(request).model.tokenizer
    count = len(tok(prompt).input_ids)
    return {"prompt": prompt, "tokens": count, "max_tokens": 77, "words": prompt_words(prompt, tok)}


@router.get("/healthz", summary="Liveness: 200 while the server runs")
async def healthz(request: Request):
    st = _state(request)
    return {"status": "draining" if st.jobs.draining else "ok", "model": st.config.model,
            "family": st.pipe.family, "image_size": st.pipe.config.image_size}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    st = _state(request)
    return PlainTextResponse(st.metrics.render(st.jobs, st.worker.caches),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
