"""Null-text optimisation (reference: null_text_w_ptp.ipynb), batched and capturable.

Per sampling step i, a few Adam iterations on the unconditional ("null") embedding so that one guided DDIM
step from the current latent lands on the pivot z*_{t-1}. Reference order inside step i: loss computed,
Adam step taken, *then* `loss.item() < 1e-5 + i * 2e-5` breaks; so the iteration that meets the threshold
still updates the embedding.

Here the early stop lives on the device: a per-image `done` flag masks the Adam update (parameter and
state), so one iteration can be captured in a CUDA graph and replayed, and images of a batch stop on
their own. The loop reads the flags back once per iteration to leave the step when every image has
stopped (the remaining iterations would change nothing). How the stopped images leave the batch's work
(`COMPACTION`, per path): an eager iteration runs the UNet on the images still optimising only ("rows");
a captured one keeps the batch's shape and masks ("mask"), or ("buckets", `_Buckets`) gathers the
images still optimising into an iteration of half, a quarter, ... of the rows, recorded once per size
and replayed. Adam is written out
with torch.optim.Adam's arithmetic (single-tensor path) and per-image state, so N images in one batch
equal N single runs. `inversion.invert_batch` calls `null_optimize` after the DDIM inversion.
"""
from __future__ import annotations

import torch

from . import graphs
from .checks import warn
from .scheduler import ddim_step


def _coeffs(sched, t: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_prev) as 0-d device tensors, so a captured step reads them from buffers."""
    prev_t = t - sched.num_train_steps // steps
    return sched.alpha(t).to(device).clone(), sched.alpha(prev_t).to(device).clone()


class _Adam:
    """Batched Adam with per-image step counts and a per-image mask, matching torch.optim.Adam
    (single-tensor path, default betas, eps 1e-8) for each image. State is reset per sampling step,
    like the reference's fresh optimizer. All tensors live on the device; nothing reads back."""

    def __init__(self, param: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        n = param.shape[0]
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.count = torch.zeros(n, dtype=torch.float64, device=param.device)  # (N,) steps taken

    def reset(self):
        self.m.zero_(); self.v.zero_(); self.count.zero_()

    def step(self, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, active: torch.Tensor):
        """In place. param/grad (N, ...) (N, 77, D) embeddings or SDXL's (N, P) pooled; lr 0-d fp64; active (N,)."""
        per_image = (-1,) + (1,) * (param.dim() - 1)
        a = active.view(per_image)
        self.count.add_(active.to(self.count.dtype))
        # Bias corrections in float64 then cast, as torch.optim.Adam computes them with Python floats.
        c = self.count.clamp(min=1)
        bc1 = 1 - self.b1 ** c
        bc2_sqrt = (1 - self.b2 ** c).sqrt()
        step_size = (lr / bc1).to(param.dtype).view(per_image)
        bc2_sqrt = bc2_sqrt.to(param.dtype).view(per_image)
        m = torch.lerp(self.m, grad, 1 - self.b1)
        v = self.v * self.b2 + (1 - self.b2) * grad * grad
        denom = v.sqrt() / bc2_sqrt + self.eps
        p = param - step_size * (m / denom)
        self.m.copy_(torch.where(a, m, self.m))
        self.v.copy_(torch.where(a, v, self.v))
        param.copy_(torch.where(a, p, param))


class _Iteration:
    """One inner iteration on static buffers: uncond forward, guided DDIM step, per-image MSE, backward,
    masked Adam step, done-flag update. Called eagerly, or captured once and replayed."""

    def __init__(self, pipe, param: torch.Tensor, latent: torch.Tensor, guidance: float,
                 pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None, optimize_pooled=False):
        dev, dt = param.device, param.dtype
        self.pipe = pipe
        self.v_pred = pipe.config.prediction_type == "v_prediction"
        self.param = param  # (N, 77, D) fp32 null embeddings being optimised
        self.pooled = pooled  # SDXL: (N, P) the unconditional pooled embedding, fixed or optimised
        self.time_ids = time_ids  # SDXL: (N, 6)
        self.pooled_adam = _Adam(pooled) if optimize_pooled else None
        self.latent = latent.clone()  # (N, 4, h, w) z_t
        self.out_c = torch.zeros_like(latent)  # conditional model output at z_t
        self.target = torch.zeros_like(latent)  # pivot z*_{t-1}
        self.t = torch.zeros((), dtype=torch.int64, device=dev)
        self.a = torch.zeros((), dtype=dt, device=dev)
        self.a_prev = torch.zeros((), dtype=dt, device=dev)
        self.lr = torch.zeros((), dtype=torch.float64, device=dev)
        self.thresh = torch.zeros((), dtype=dt, device=dev)
        self.guidance = guidance
        self.done = torch.zeros(param.shape[0], dtype=torch.bool, device=dev)
        self.loss = torch.zeros(param.shape[0], dtype=dt, device=dev)  # (N,) this iteration's loss, NaN if done before
        self.adam = _Adam(param)

    def __call__(self, compact: bool = False):
        """One iteration. `compact` (eager only: it reads the flags back) runs the UNet on the images that
        have not stopped; the stopped ones get a zero gradient, which their masked Adam step ignores."""
        rows = None
        if compact and bool(self.done.any()):
            rows = (~self.done).nonzero().squeeze(1)

        def mine(x):
            return x if rows is None or x is None else x.index_select(0, rows)

        p = mine(self.param).detach().requires_grad_(True)
        pooled = mine(self.pooled)
        if self.pooled_adam is not None:
            pooled = pooled.detach().requires_grad_(True)
        latent = mine(self.latent)
        with torch.enable_grad():
            out_u = self.pipe.predict(latent, self.t, p, pooled=pooled, time_ids=mine(self.time_ids))
            noise = out_u + self.guidance * (mine(self.out_c) - out_u)
            prev = ddim_step(noise, latent, self.a, self.a_prev, self.v_pred)
            loss = ((prev - mine(self.target)) ** 2).mean(dim=(1, 2, 3))  # each image's own MSE
            grads = torch.autograd.grad(loss.sum(), [p] if self.pooled_adam is None else [p, pooled])
        loss = loss.detach()
        if rows is not None:  # back to the batch's rows
            loss = torch.zeros_like(self.loss).index_copy_(0, rows, loss)
            grads = [torch.zeros_like(full).index_copy_(0, rows, g)
                     for full, g in zip((self.param, self.pooled), grads)]
        active = ~self.done
        with torch.no_grad():
            self.adam.step(self.param, grads[0], self.lr, active)
            if self.pooled_adam is not None:
                self.pooled_adam.step(self.pooled, grads[1], self.lr, active)
            self.loss.copy_(torch.where(active, loss, torch.full_like(loss, float("nan"))))
            # Reference: the check follows the step, so the meeting iteration still updates.
            self.done.copy_(self.done | (active & (loss < self.thresh)))


def _graph_iteration(it: _Iteration):
    """`it()` recorded once (`graphs.capture`, three warm-up iterations first). Returns its replay."""
    live = [it.param, it.adam.m, it.adam.v, it.adam.count, it.done]
    if it.pooled_adam is not None:
        live += [it.pooled, it.pooled_adam.m, it.pooled_adam.v, it.pooled_adam.count]
    state = [t.clone() for t in live]
    try:
        replay, _ = graphs.capture(it, warmup=3)
    finally:
        # The warm-up ran on live buffers: restore them (also for the eager fallback).
        for dst, src in zip(live, state):
            dst.copy_(src)
    return replay


# How stopped images leave the batch's work: "rows" (eager only: the UNet runs on the exact rows still
# optimising), "mask" (the batch's shape; stopped rows are masked) or "buckets" (`_Buckets`). A captured
# iteration keeps "mask" until a GPU run times "buckets" against it (benchmarks/bench_inversion.py).
COMPACTION = {"eager": "rows", "graph": "mask"}


def _bucket(active: int, rows: int) -> int:
    """The rows of the smallest iteration, among rows, ceil(rows / 2), ceil(rows / 4), ..., 1, that holds
    the images still optimising."""
    size = rows
    while size > 1 and -(-size // 2) >= active:
        size = -(-size // 2)
    return size


class _Buckets:
    """Stopped images leave a fixed-shape iteration: once the images still optimising fit in half the rows
    (or a quarter, ...), they are gathered, with stopped images filling the rest (masked, as in the full
    batch), into an iteration of that size, run (captured once per size, then replayed) and scattered back.
    Every image's arithmetic is its own, so this equals the full batch up to the rounding of other batch
    sizes. The gathers and scatters are copies of the optimised state, small beside a UNet pass."""

    def __init__(self, pipe, it: "_Iteration", run_full, capture: bool):
        self.pipe, self.it, self.run_full, self.capture = pipe, it, run_full, capture
        self.sized: dict[int, _Iteration] = {}  # rows -> the iteration of that many rows
        self.runs: dict = {}  # rows -> how it runs (its graph's replay, or the iteration itself)
        self.capture_failure = None  # why recording a size failed (the first such size), which then runs eagerly

    def _state(self, it: "_Iteration") -> list:
        """The per-image tensors one iteration reads and writes, in a fixed order (None where absent)."""
        pa = it.pooled_adam
        return [it.param, it.adam.m, it.adam.v, it.adam.count, it.done, it.pooled,
                None if pa is None else pa.m, None if pa is None else pa.v, None if pa is None else pa.count]

    def _sized(self, rows: int) -> "_Iteration":
        if rows not in self.sized:
            it = self.it
            pick = slice(0, rows)
            self.sized[rows] = _Iteration(self.pipe, it.param[pick].clone(), it.latent[pick], it.guidance,
                                          None if it.pooled is None else it.pooled[pick].clone(),
                                          None if it.time_ids is None else it.time_ids[pick].clone(),
                                          it.pooled_adam is not None)
        return self.sized[rows]

    def __call__(self, active: int) -> None:
        it = self.it
        rows = _bucket(active, it.done.shape[0])
        if rows == it.done.shape[0]:
            self.run_full()
            return
        own = (~it.done).nonzero().squeeze(1)  # (active,)
        idx = torch.cat([own, it.done.nonzero().squeeze(1)[:rows - active]])
        sub = self._sized(rows)
        with torch.no_grad():
            for dst, src in zip(self._state(sub) + [sub.latent, sub.out_c, sub.target, sub.time_ids],
                                self._state(it) + [it.latent, it.out_c, it.target, it.time_ids]):
                if dst is not None:
                    dst.copy_(src.index_select(0, idx))
            for dst, src in [(sub.t, it.t), (sub.a, it.a), (sub.a_prev, it.a_prev), (sub.lr, it.lr),
                             (sub.thresh, it.thresh)]:
                dst.copy_(src)
        if rows not in self.runs:  # recorded once its buffers hold real values
            self.runs[rows] = sub
            if self.capture:
                try:
                    self.runs[rows] = _graph_iteration(sub)
                except Exception as e:  # noqa: BLE001 -- this size runs eagerly, said once
                    self.capture_failure = self.capture_failure or f"{rows} rows: {type(e).__name__}: {e}"
                    warn(f"CUDA-graph capture of the {rows}-row null-text iteration failed ({e}); running it "
                         "eagerly")
        self.runs[rows]()
        with torch.no_grad():
            for dst, src in zip(self._state(it), self._state(sub)):
                if dst is not None:
                    dst.index_copy_(0, own, src[:active])
            it.loss.fill_(float("nan")).index_copy_(0, own, sub.loss[:active])


def null_optimize(pipe, traj, cond, uncond, ts, inner_steps, guidance, eps0, eps_slope, use_graph, progress,
                  time_ids=None, optimize_pooled: bool = False, on_step=None):
    """traj: [z*_0..z*_T] each (N, 4, h, w); cond/uncond `Text` of N rows (fp32 master copies); ts the sampling
    timesteps; SDXL's time_ids (N, 6). The unconditional pooled embedding stays at uncond's unless
    `optimize_pooled`. Returns null embeddings (steps, N, 77, D), SDXL's pooled (steps, N, P) or None, losses
    (steps, inner_steps, N), and how the iteration ran: ("eager" or "graph", why recording failed or None; a
    failure beside "graph" is a gathered size's, `_Buckets`). `on_step(i)` is called after step i (from 1)."""
    sched = pipe.scheduler
    dev = pipe.device
    n, steps = cond.context.shape[0], len(ts)
    param = uncond.context.detach().to(pipe.master_dtype).clone()
    pooled = None if uncond.pooled is None else uncond.pooled.detach().to(pipe.master_dtype).clone()
    latent = traj[-1]
    it = _Iteration(pipe, param, latent, guidance, pooled, time_ids, optimize_pooled and pooled is not None)

    mode = None  # COMPACTION's, once it is known whether the iteration is captured

    def eager():  # "rows": the UNet runs on the images still optimising only
        it(compact=mode == "rows")

    run = buckets = failure = None
    nulls = torch.empty((steps, n) + tuple(param.shape[1:]), dtype=param.dtype, device=dev)
    pooled_nulls = None if pooled is None else torch.empty((steps,) + tuple(pooled.shape), dtype=param.dtype,
                                                           device=dev)
    losses = torch.full((steps, inner_steps, n), float("nan"), dtype=param.dtype, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="null-text inversion")
    for i, t in enumerate(ts):
        a, a_prev = _coeffs(sched, t, steps, dev)
        with torch.no_grad():
            it.latent.copy_(latent)
            it.out_c.copy_(pipe.predict(latent, torch.tensor(t, device=dev), cond.context, pooled=cond.pooled,
                                        time_ids=time_ids))
            it.target.copy_(traj[len(traj) - i - 2])
            it.t.fill_(t)
            it.a.copy_(a)
            it.a_prev.copy_(a_prev)
            it.lr.fill_(1e-2 * (1.0 - i / 100.0))
            it.thresh.fill_(eps0 + i * eps_slope)
            it.done.zero_()
            it.adam.reset()
            if it.pooled_adam is not None:
                it.pooled_adam.reset()
        if run is None:  # capture once the buffers hold real values (step 0), so warm-up sees no NaN
            run = eager
            if use_graph:
                try:
                    run = _graph_iteration(it)
                except Exception as e:  # a model part that is not capturable: go on eagerly, but say so
                    failure = f"{type(e).__name__}: {e}"
                    warn(f"CUDA-graph capture of the null-text iteration failed ({e}); using the eager loop")
            mode = COMPACTION["eager" if run is eager else "graph"]
            if mode == "buckets":
                buckets = _Buckets(pipe, it, run, capture=run is not eager)
        active = n
        for j in range(inner_steps):
            if buckets is not None:
                buckets(active)
            else:
                run()
            losses[i, j].copy_(it.loss)
            # Once every image has stopped, the rest of this step's iterations would be masked no-ops: skip
            # them. One host sync per iteration, against an iteration's forward and backward pass.
            if j + 1 < inner_steps:
                active = int((~it.done).sum())
                if active == 0:
                    break
        with torch.no_grad():
            nulls[i].copy_(it.param)
            if pooled_nulls is not None:
                pooled_nulls[i].copy_(it.pooled)
            # Advance with the optimised embedding: guided step from z_t.
            out_u = pipe.predict(latent, torch.tensor(t, device=dev), it.param, pooled=it.pooled, time_ids=time_ids)
            noise = out_u + guidance * (it.out_c - out_u)
            latent = ddim_step(noise, latent, a, a_prev, it.v_pred)
        if bar is not None:
            bar.update()
        if on_step is not None:
            on_step(i + 1)
    if bar is not None:
        bar.close()
    failure = failure or (buckets.capture_failure if buckets is not None else None)
    return nulls, pooled_nulls, losses, ("graph" if run not in (None, eager) else "eager", failure)


# The reference's early stop: step i stops once its loss < EPSILON + i * EPSILON_SLOPE.
EPSILON, EPSILON_SLOPE = 1e-5, 2e-5


def warn_bf16(pipe) -> None:
    """Measured on toy models (4 held-out scenes, reference settings, fp32 master embedding; the table in
    p2p_engine/toy/README.md): an fp16 UNet ends each step within 4% of fp32's loss; a bf16 one (weights or
    autocast) 11-25% higher, with fewer steps stopping early. So bf16 is not offered for the optimisation:
    say so when it is asked."""
    dev = pipe.device.type
    autocast_bf16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
    if pipe.dtype == torch.bfloat16 or autocast_bf16:
        warn("null-text inversion in bfloat16 ends with higher losses than float32 (11-25% on the toy models); "
             "load the model in float16 or float32 for inversion")
