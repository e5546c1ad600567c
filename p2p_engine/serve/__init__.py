"""`p2p-engine serve`: the engine as an HTTP service (API v1, OpenAPI at /docs) with an editing page at /.

One model per process, one worker thread that owns the device. The layers, each its own module:
- `routes.py`: thin routes; they validate (`schemas.py` for types, `validate.py` against the model and the
  limits), queue a job or read the store, and answer; `app.py` wires them with the one error shape and the
  guard (token, draining, upload size);
- `jobs.py`: job records, the two queues (edits, inversions) and the waits of `?wait=1` and event streams;
- `worker.py`: the thread that runs the model: edit batches through `pipe.edit_batch` (`batching.py` decides
  which edits share a loop), inversions in their own lane, re-edits from edit caches (`caches.py`), results
  written by a second thread (`results.py`);
- `store.py`: images, inversions, job records and results under --data-dir, written atomically;
- `metrics.py`: /metrics in the Prometheus text format; `server.py`: uvicorn, signals and the drain;
- `static/`: the page (HTML, CSS, JavaScript; no build step, nothing fetched from another host).

Needs the `serve` extra (`pip install "p2p-engine[serve]"`: FastAPI, uvicorn, python-multipart). Nothing in
the engine imports this package; the command line imports it when `serve` runs.
"""
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(pipe, config=None):
    from .app import create_app as make
    return make(pipe, config)


def serve(config, pipe=None) -> int:
    from .server import serve as run
    return run(config, pipe)
