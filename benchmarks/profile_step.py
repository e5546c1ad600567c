"""Where one UNet step's time goes: its CUDA kernels' time by kind (convolution, GEMM, attention, norm, layout
copies, concatenation, elementwise) against the step's wall time.

GPU (the default when CUDA is available): the SD 1.5 UNet with random weights, fp16, 64 x 64 latents, the torch
backend (an uncontrolled forward runs SDPA on either backend), in two configurations: channels-last memory
(`load`'s CUDA default, the layout of the graphed rows in RESULTS.md) and the usual layout. Per configuration and
batch: the eager forward's wall time (2 warm-up calls, then the median of 10, synchronised), the wall time of
its CUDA-graph replay, then `--steps` eager forwards under torch.profiler. Each kernel is put in a category by
its name (`CATEGORIES`, first match wins). Kernel time per step against the eager wall time is what launching
costs (the CPU dispatching while the GPU idles); against the graph replay's, what stays between kernels once
launches are recorded. PyTorch's CUDA GroupNorm makes its input NCHW-contiguous, so in channels-last each
GroupNorm can pay layout copies: they count as "layout" (direct_copy_kernel_cuda), not "norm". The
"channels-last + fused GroupNorm" configuration runs each GroupNorm and its SiLU as the Triton op
`kernels.group_norm` instead (its `_gn_*` kernels count as "norm").
CPU smoke: the tiny preset in fp32, batch 1, one step. A CPU runs no kernels, so the aten operators' self CPU
times are put in the same categories: it shows that the script works, not where a GPU's time goes.

Prints, per configuration and batch, a table of the categories and one of the 15 most expensive kernels; writes
the same as CSV to --csv, else to $OUT/profile.csv when OUT is set (a GPU session's output folder), rewritten
after each case so that a run cut short keeps what it measured. Its `kind` is "category", "kernel" (an aten
operator on the CPU; the name in full) or "total" (kernel time, wall times and gaps per step).

    python -m benchmarks.profile_step [--smoke] [--device D] [--batch 2 4] [--steps 3] [--csv PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from benchmarks.common import EXPERIMENT_FAILURES, banner, device_name, git_commit, experiment, measure, pick_device, \
    seconds_left
from p2p_engine.config import PRESETS
from p2p_engine.files import atomic_write

# (category, regex searched in the kernel or aten operator name, case-insensitive); the first match wins, so
# the order matters: flash kernels are CUTLASS templates (attention, not gemm); CatArrayBatchedCopy is a
# concatenation, not a layout copy; cuDNN's nchwToNhwc converters say "cudnn" (layout, not convolution);
# cuDNN's convolutions are implicit GEMMs (sm90_xmma_fprop_implicit_gemm_...: convolution, not gemm), though
# a 1x1 convolution that cuDNN hands to a plain cuBLAS kernel counts as gemm. Hopper's cuBLAS names its
# kernels nvjet_*. "conv(?!ert)" keeps type-converting kernels out; aten::expand is not exp.
CATEGORIES = (
    ("attention", r"flash|fmha|sdpa|attention|softmax|_cross_fwd|_self_fwd"),
    ("cat", r"CatArrayBatchedCopy|^aten::_?cat$"),
    ("norm", r"group_?norm|layer_?norm|batch_?norm|rms_?norm|RowwiseMoments|ComputeFusedParams|_gn_"),
    ("layout", r"copy|memcpy|clone|contiguous|transpose|permute|nchwToNhwc|nhwcToNchw|^aten::to$"),
    ("convolution", r"conv(?!ert)|fprop|implicit_gemm|winograd|cudnn"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|cublas|xmma|splitKreduce|^aten::(linear|matmul|addmm|mm|bmm|baddbmm)$"),
    ("elementwise", r"elementwise|vectorized|silu|gelu|^aten::(add|sub|mul|div|exp|sin|cos|neg|pow|where|fill|"
                    r"sigmoid|tanh)_?$"),
)
OTHER = "other"
_RULES = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]
TOP = 15
MIN_SECONDS_LEFT = 10  # before P2P_BENCH_DEADLINE, to start another configuration and batch
CSV_FIELDS = ("date", "device", "commit", "config", "batch", "name", "kind", "ms_per_step", "calls_per_step")


def classify(name: str) -> str:
    for category, rule in _RULES:
        if rule.search(name):
            return category
    return OTHER


@dataclass
class Breakdown:
    categories: list[tuple[str, float, float]]  # (category, ms per step, calls per step), most time first
    kernels: list[tuple[str, float, float]]  # (name, ms per step, calls per step), most time first, all of them
    total_ms: float  # per step
    total_calls: float  # per step


def breakdown(items, steps: int = 1) -> Breakdown:
    """items: (name, time in us, calls) over `steps` steps, a name possibly more than once -> per-step sums by
    category and by name. Every item lands in exactly one category ("other" when no rule matches)."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, us, calls in items:
        by_name[name][0] += us
        by_name[name][1] += calls
    by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (us, calls) in by_name.items():
        cat = by_cat[classify(name)]
        cat[0] += us
        cat[1] += calls

    def per_step(d):
        return sorted(((k, us / 1e3 / steps, calls / steps) for k, (us, calls) in d.items()), key=lambda r: -r[1])

    kernels = per_step(by_name)
    return Breakdown(per_step(by_cat), kernels, sum(r[1] for r in kernels), sum(r[2] for r in kernels))


# -- measuring

def _device_us(event) -> float:
    """A device-side event's duration: self_device_time_total in torch 2.x (self_cuda_time_total, its older name,
    is deprecated); either reads 0 where the profiler was not told its device, hence the time range."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return getattr(event, attr) or event.time_range.elapsed_us()
    return event.time_range.elapsed_us()


def profile_items(fn, device: torch.device, steps: int) -> list[tuple[str, float, int]]:
    """(name, us, 1) for every CUDA kernel (memcpy and memset included) that `steps` calls of fn ran on the
    device; on the CPU, for every aten operator call, its self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if on_gpu:
            torch.cuda.synchronize(device)
    items = []
    for e in prof.events():
        if getattr(e, "is_user_annotation", False):  # record_function ranges span kernels: they would count twice
            continue
        if on_gpu and e.device_type == DeviceType.CUDA:
            items.append((e.name, _device_us(e), 1))
        elif not on_gpu and e.device_type == DeviceType.CPU:
            items.append((e.name, e.self_cpu_time_total, 1))
    return items


@dataclass
class Case:
    config: str
    batch: int
    result: Breakdown
    wall_ms: float  # eager forward, median
    graph_ms: float | None  # the same forward replayed from a CUDA graph, median; None off CUDA or if capture failed


def _graph_ms(unet, sample, t, ctx, device) -> float | None:
    from p2p_engine.graphs import GraphedUNet
    try:
        g = GraphedUNet(unet, sample, t, ctx)
    except RuntimeError as e:  # capture refused an operation: the eager figures still count
        print(f"[profile] CUDA graph capture failed, no graph time: {e}", flush=True)
        return None
    ms = measure(lambda: g(sample, t, ctx), device, warmup=2, repeats=10).median
    del g
    torch.cuda.empty_cache()
    return ms


def random_unet(cfg, device: torch.device, dtype: torch.dtype):
    """The preset's UNet on the device with random weights (N(0, 0.02): finite outputs; timing does not depend
    on the values), on the torch backend; built where it runs, so no checkpoint is written and read back."""
    from p2p_engine.unet import UNet

    with torch.device("meta"):
        unet = UNet(cfg.unet)
    unet = unet.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    unet = unet.to(dtype).eval().requires_grad_(False)  # every timed call is a plain forward, as in sampling
    unet.set_backend("torch")
    return unet


def run(device: torch.device, smoke: bool, batches=(2, 4), steps: int = 3, on_case=None) -> list[Case]:
    """Profile each configuration and batch; `on_case(cases)` is called after each (to save what is done)."""
    from benchmarks.bench_unet import inputs

    on_gpu = device.type == "cuda"
    preset, dtype = ("tiny", torch.float32) if smoke else ("sd15", torch.float16)
    if smoke:
        batches, steps = (1,), 1
    t0 = time.perf_counter()
    cfg = PRESETS[preset]
    unet = random_unet(cfg, device, dtype)
    print(f"[profile] {preset} UNet with random weights built in {time.perf_counter() - t0:.1f} s", flush=True)
    cases = []
    configs = (("channels-last", True, False), ("channels-last + fused GroupNorm", True, True),
               ("usual layout", False, False))
    for config, channels_last, fused in configs if on_gpu else configs[::2]:
        unet.set_channels_last(channels_last)
        unet.set_fused_norms(fused)
        # the fused GroupNorm has not yet run on a GPU: a failure is printed in full and the next configuration runs
        with experiment("profile", config) if fused else contextlib.nullcontext():
            for b in batches:
                if seconds_left() < MIN_SECONDS_LEFT:
                    print(f"[profile] {config} batch {b} and the rest left out: {max(seconds_left(), 0):.0f} s "
                          "left before P2P_BENCH_DEADLINE", flush=True)
                    return cases
                sample, t, ctx = inputs(cfg, b, device, dtype)  # the UNet puts them in its own layout
                with torch.inference_mode():
                    if not torch.isfinite(unet(sample, t, ctx)).all():
                        raise RuntimeError(f"{config}, batch {b}: the forward gave NaN or inf; nothing profiled")
                wall = measure(lambda: unet(sample, t, ctx), device, warmup=2, repeats=3 if smoke else 10).median
                graph = _graph_ms(unet, sample, t, ctx, device) if on_gpu else None
                items = profile_items(lambda: unet(sample, t, ctx), device, steps)
                if not items:
                    print(f"[profile] {config} batch {b}: the profiler recorded no "
                          f"{'CUDA kernels (is CUPTI available?)' if on_gpu else 'operators'}", flush=True)
                result = breakdown(items, steps)
                cases.append(Case(config, b, result, wall, graph))
                print("\n" + report(cases[-1], on_gpu, steps), flush=True)
                if on_case is not None:
                    on_case(cases)
    return cases


# -- reporting

def report(case: Case, on_gpu: bool, steps: int) -> str:
    r, unit = case.result, ("kernel" if on_gpu else "op")
    source = "CUDA kernels" if on_gpu else "aten ops, self CPU time"
    lines = [f"### {case.config}, batch {case.batch}: {source}, {steps} profiled step(s)", "",
             f"| category | ms/step | % of {unit} time | {unit}s/step |", "|---|---|---|---|"]
    for cat, ms, calls in r.categories:
        lines.append(f"| {cat} | {ms:.4g} | {100 * ms / max(r.total_ms, 1e-12):.1f}% | {calls:g} |")
    lines.append(f"| total | {r.total_ms:.4g} | 100% | {r.total_calls:g} |")
    gaps = case.wall_ms - r.total_ms
    lines += ["", f"{unit} time {r.total_ms:.4g} ms/step; eager wall time {case.wall_ms:.4g} ms/step (median, "
                  f"outside the profiler); gaps {gaps:.4g} ms ({100 * gaps / case.wall_ms:.0f}% of the wall time)"]
    if case.graph_ms is not None:
        g_gaps = case.graph_ms - r.total_ms
        lines.append(f"CUDA-graph replay {case.graph_ms:.4g} ms/step; gaps under the graph {g_gaps:.4g} ms "
                     f"({100 * g_gaps / case.graph_ms:.0f}% of its wall time)")
    lines += ["", f"| # | {unit} (first 90 characters) | category | ms/step | calls/step |", "|---|---|---|---|---|"]
    for i, (name, ms, calls) in enumerate(r.kernels[:TOP], 1):
        short = name.removeprefix("void ")[:90].replace("|", "/")
        lines.append(f"| {i} | `{short}` | {classify(name)} | {ms:.4g} | {calls:g} |")
    return "\n".join(lines)


def csv_rows(cases: list[Case], device: torch.device) -> list[dict]:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = {"date": date, "device": device_name(device), "commit": git_commit()}
    rows = []

    def row(c: Case, name: str, kind: str, ms: float, calls: float | None = None):
        rows.append({**head, "config": c.config, "batch": c.batch, "name": name, "kind": kind,
                     "ms_per_step": f"{ms:.4f}", "calls_per_step": "" if calls is None else f"{calls:g}"})

    for c in cases:
        for cat, ms, calls in c.result.categories:
            row(c, cat, "category", ms, calls)
        for name, ms, calls in c.result.kernels[:TOP]:
            row(c, name, "kernel", ms, calls)  # the whole name: the table shows only its start
        row(c, "kernel time" if device.type == "cuda" else "op time", "total", c.result.total_ms, c.result.total_calls)
        row(c, "eager wall time", "total", c.wall_ms)
        row(c, "eager gaps", "total", c.wall_ms - c.result.total_ms)
        if c.graph_ms is not None:
            row(c, "graph wall time", "total", c.graph_ms)
            row(c, "graph gaps", "total", c.graph_ms - c.result.total_ms)
    return rows


def write_csv(path, cases: list[Case], device: torch.device) -> None:
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(cases, device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny preset in fp32, batch 1, one step")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu (which implies --smoke)")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4], help="batch sizes (smoke: 1)")
    ap.add_argument("--steps", type=int, default=3, help="forwards under the profiler per configuration and batch "
                                                          "(smoke: 1)")
    ap.add_argument("--csv", default=None, help="where to write the CSV (default: $OUT/profile.csv when OUT is set)")
    args = ap.parse_args(argv)
    if args.steps < 1 or min(args.batch) < 1:
        ap.error("--steps and --batch must be at least 1")
    device = pick_device(args.device)
    smoke = args.smoke or device.type != "cuda"
    path = args.csv or (os.path.join(os.environ["OUT"], "profile.csv") if os.environ.get("OUT") else None)
    print(banner(device, smoke), flush=True)
    save = (lambda cases: write_csv(path, cases, device)) if path else None
    cases = run(device, smoke, tuple(args.batch), args.steps, on_case=save)
    if path and cases:
        print(f"\n[profile] {len(cases)} case(s) written to {path}")
    return 0 if cases and not EXPERIMENT_FAILURES else 1


if __name__ == "__main__":
    raise SystemExit(main())
