"""What every benchmark shares: timing, correctness gates, tables, and the results record.

A benchmark module `benchmarks/bench_NAME.py` exposes

    run(device: torch.device, smoke: bool) -> list[Row]

which first checks its outputs against the baseline (raising `CorrectnessError`
on a mismatch: nothing is timed then), then times both sides with `measure`.
Code that has not yet run on a GPU runs inside `experiment(...)`: if it fails
its gate or crashes, it is reported and its rows are left out, the others are
still recorded, and the run's exit status says so.
`run_suite` (behind `p2p-engine bench`) prints a device banner and one markdown
table per benchmark; GPU runs (not smoke runs) append rows to
`benchmarks/results.csv` and rewrite the benchmark's marked section of
`benchmarks/RESULTS.md`. CPU numbers are never recorded: they show that the
benchmarks work, not how fast anything is on a GPU.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib
import inspect
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from p2p_engine.files import atomic_write

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_CSV = BENCH_DIR / "results.csv"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
# Run order of `p2p-engine bench`; a module missing from the checkout is skipped with a note.
SUITE = ("unet", "pipeline", "inversion", "methods", "editors", "sdxl", "attention", "load")
CSV_FIELDS = ("date", "device", "commit", "benchmark", "case", "ours", "ours_ms", "ours_iqr_ms", "baseline",
              "baseline_ms", "ratio", "floor_ms", "peak_mem_mb", "check")


class CorrectnessError(AssertionError):
    """Our output differs from the baseline's by more than float drift: the timing would mean nothing."""


# -- timing

@dataclass
class Timing:
    samples_ms: list[float]
    peak_mem_bytes: int | None = None
    mem_kind: str = ""  # "cuda" (max allocated during the runs) or "rss" (process peak, CPU)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr(self) -> float:
        s = sorted(self.samples_ms)
        if len(s) < 4:
            return s[-1] - s[0]
        q = statistics.quantiles(s, n=4)
        return q[2] - q[0]

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    @property
    def max(self) -> float:
        return max(self.samples_ms)

    def spread(self) -> str:
        return f"IQR {self.iqr:.3g}, {self.min:.4g}-{self.max:.4g}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_bytes() -> int:
    # ru_maxrss is in KiB on Linux; it is the process's peak and never goes down.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 10) -> Timing:
    """Wall time of `fn()` in ms, after `warmup` untimed calls, synchronising the device around each call.

    Peak memory: on CUDA the most allocated during the timed calls; on CPU the process's peak RSS (an upper
    bound that includes everything loaded before).
    """
    with torch.inference_mode():
        return measure_grad(fn, device, warmup=warmup, repeats=repeats)


def measure_grad(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 3) -> Timing:
    """`measure` for work that needs autograd (inversion): no inference mode around it."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        return Timing(samples, torch.cuda.max_memory_allocated(device), "cuda")
    return Timing(samples, _rss_peak_bytes(), "rss")


def seconds_left() -> float:
    """Seconds until P2P_BENCH_DEADLINE (a Unix time that a GPU session's script sets per benchmark, so that a
    benchmark drops its last variants rather than being killed with nothing recorded); inf when unset."""
    deadline = os.environ.get("P2P_BENCH_DEADLINE")
    return float("inf") if not deadline else float(deadline) - time.time()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype) -> float:
    """The device's measured dense matmul rate (FLOP/s): the denominator of every floor."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=2, repeats=5 if device.type == "cuda" else 3)
    return 2 * n ** 3 / (t.min / 1e3)


# -- correctness

def capture_failures(*outputs) -> list[str]:
    """The CUDA-graph capture failures that engine outputs state (edits', edit caches', inversions' or lists of
    them: their `capture_failure`). A captured loop whose recording failed ran eagerly, so a row timed that way
    must say so rather than carry the graph's name."""
    found = []
    for out in outputs:
        for o in out if isinstance(out, list) else [out]:
            failure = getattr(o, "capture_failure", None)  # None too from a checkout older than the field
            if failure and failure not in found:
                found.append(failure)
    return found


# experiments that failed during the current benchmark's run (see `experiment`); run_suite reads and clears it
EXPERIMENT_FAILURES: list[str] = []


@contextlib.contextmanager
def experiment(bench: str, what: str):
    """Runs a block that adds an experiment's rows beside a benchmark's established ones (code that has not yet
    run on a GPU). If it fails its gate or crashes, the failure is printed in full and the block is left; the
    benchmark's other rows are still recorded, and `run_suite` reports the benchmark as failed."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- reported in full, and the run's exit status says so
        kind = "FAILED its correctness check" if isinstance(e, CorrectnessError) else "CRASHED"
        detail = str(e) if isinstance(e, CorrectnessError) else traceback.format_exc()
        print(f"\n[{bench}] {what} {kind}, its rows left out: {detail}", file=sys.stderr, flush=True)
        EXPERIMENT_FAILURES.append(f"{what}: {type(e).__name__}: {e}")


def fallback_note(failures: list[str]) -> str:
    """The check column's note for a row whose captured side ran eagerly ('' when capture worked)."""
    return f"CAPTURE FAILED, timed the eager fallback: {failures[0]}; " if failures else ""


def fallback_name(name: str, failures: list[str]) -> str:
    """A row side's name, tagged where `capture_failures` saw its captured loop run eagerly."""
    return name + (" [eager: capture failed]" if failures else "")


def accepts(fn, name: str) -> bool:
    """Whether `fn` takes the keyword `name` (a benchmark also runs against checkouts older than the option)."""
    return name in inspect.signature(fn).parameters


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        raise CorrectnessError(f"shape {tuple(ours.shape)} differs from the baseline's {tuple(ref.shape)}")
    if not torch.isfinite(ours).all():
        raise CorrectnessError("our output has NaN or inf")
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_close(what: str, ours: torch.Tensor, ref_hi: torch.Tensor, base_lo, dtype: torch.dtype) -> str:
    """Gate: err(ours, ref_hi) <= 2 * drift + eps(dtype).

    `ref_hi` is the baseline in higher precision; `base_lo` is the baseline in the benchmark's dtype, or a
    list of such runs that differ only in how torch orders its arithmetic (attention processor, thread
    count). The drift is the largest error among them, so the tolerance is what torch itself drifts in
    that precision. One run can understate it: an Adam-optimised tensor amplifies rounding differences,
    and a single fp32 baseline's error varies about 2x with the CPU thread count alone.
    Returns the line for the table.
    """
    err = rel_err(ours, ref_hi)
    runs = base_lo if isinstance(base_lo, (list, tuple)) else [base_lo]
    drift = max(rel_err(b, ref_hi) for b in runs)
    tol = 2 * drift + torch.finfo(dtype).eps
    line = f"{what}: err {err:.2e} <= {tol:.2e}"
    if not err <= tol:
        raise CorrectnessError(f"{what}: relative error {err:.3e} vs the higher-precision baseline exceeds "
                               f"{tol:.3e} (2 x the baseline's own drift {drift:.3e} over {len(runs)} run(s) + eps)")
    return line


# -- reporting

@dataclass
class Row:
    case: str  # e.g. "batch 2"
    ours_name: str
    ours: Timing
    baseline_name: str = ""
    baseline: Timing | None = None
    floor_ms: float | None = None
    check: str = ""
    unit: str = "ms"
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """Baseline time over ours: above 1 means we are faster."""
        return None if self.baseline is None else self.baseline.median / self.ours.median


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def markdown_table(title: str, rows: list[Row]) -> str:
    lines = [f"### {title}", "",
             "| case | ours | ms (median) | spread | baseline | ms (median) | speed-up | floor ms | peak MB | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = None if r.ours.peak_mem_bytes is None else r.ours.peak_mem_bytes / 2 ** 20
        lines.append(
            f"| {r.case} | {r.ours_name} | {_fmt(r.ours.median)} | {r.ours.spread()} | {r.baseline_name or '-'} | "
            f"{_fmt(r.baseline.median if r.baseline else None)} | "
            f"{'-' if r.ratio is None else f'{r.ratio:.2f}x'} | {_fmt(r.floor_ms, 3)} | {_fmt(mem, 5)} | "
            f"{r.check or '-'} |")
    mem_kinds = {r.ours.mem_kind for r in rows}
    if "rss" in mem_kinds:
        lines += ["", "peak MB on CPU is the process's peak RSS so far (an upper bound, not per benchmark)."]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def banner(device: torch.device, smoke: bool) -> str:
    if device.type != "cuda":
        return ("=" * 78 + "\nNO GPU PRESENT: this is a CPU smoke run on the tiny preset. It shows that the "
                "benchmarks\nand their correctness checks work; its numbers mean NOTHING for GPU use and are not "
                "recorded.\n" + "=" * 78)
    kind = "smoke run (tiny preset; not recorded)" if smoke else "full run (SD 1.5 architecture, random weights)"
    return f"GPU: {device_name(device)}, torch {torch.__version__}: {kind}"


def git_commit() -> str:
    """The checkout's commit; P2P_COMMIT where the tree travelled without .git (the GPU machine)."""
    if os.environ.get("P2P_COMMIT"):
        return os.environ["P2P_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record_results(name: str, rows: list[Row], device: torch.device, *, command: str,
           csv_path: Path = RESULTS_CSV, md_path: Path = RESULTS_MD) -> bool:
    """Append GPU rows to results.csv and put the latest table in RESULTS.md; CPU runs record nothing."""
    if device.type != "cuda":
        return False
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev, commit = device_name(device), git_commit()
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"date": date, "device": dev, "commit": commit, "benchmark": name, "case": r.case,
                        "ours": r.ours_name, "ours_ms": f"{r.ours.median:.4f}", "ours_iqr_ms": f"{r.ours.iqr:.4f}",
                        "baseline": r.baseline_name,
                        "baseline_ms": "" if r.baseline is None else f"{r.baseline.median:.4f}",
                        "ratio": "" if r.ratio is None else f"{r.ratio:.3f}",
                        "floor_ms": "" if r.floor_ms is None else f"{r.floor_ms:.4f}",
                        "peak_mem_mb": "" if r.ours.peak_mem_bytes is None else f"{r.ours.peak_mem_bytes / 2**20:.0f}",
                        "check": r.check})
    section = (f"<!-- bench:{name} begin -->\n{markdown_table(name, rows)}\n\n"
               f"{dev}, commit {commit}, {date}, by `{command}`.\n<!-- bench:{name} end -->")
    text = update_marked_section(md_path.read_text() if md_path.exists() else "", name, section)
    with atomic_write(md_path, "w") as f:
        f.write(text)
    return True


def update_marked_section(text: str, name: str, section: str) -> str:
    """Replace the `<!-- bench:NAME begin/end -->` section, or add it under "## GPU" (dropping the placeholder)."""
    begin, end = f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    text = text.replace("No GPU run has been recorded yet (no GPU was lent to the sessions so far).\n", "")
    if "## GPU" not in text:
        text = text.rstrip("\n") + "\n\n## GPU\n"
    head, rest = text.split("## GPU", 1)
    first, nl, tail = rest.partition("\n")
    return head + "## GPU" + first + nl + "\n" + section + "\n" + tail


# -- the suite

def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is present")
    return device


def run_suite(only: list[str] | None = None, smoke: bool = False, device=None, record: bool = True) -> int:
    """Run the benchmarks; 0 when every one ran and passed its check, 1 otherwise."""
    dev = pick_device(device)
    smoke = smoke or dev.type != "cuda"
    names = list(only) if only else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    quiet_baselines()
    print(banner(dev, smoke), flush=True)
    failed = 0
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"benchmarks.bench_{name}":
                print(f"\n[{name}] skipped: benchmarks/bench_{name}.py is not in this checkout")
                continue
            raise
        if not hasattr(module, "run"):
            # A standalone script (its own argparse and recording): run it as its author meant, on GPU only.
            script = BENCH_DIR / f"bench_{name}.py"
            if smoke:
                rel = script.relative_to(BENCH_DIR.parent)
                print(f"\n[{name}] skipped in a smoke run: run it directly with `python {rel}`")
                continue
            print(f"\n[{name}] running {script.name} as a script", flush=True)
            env = dict(os.environ,
                       PYTHONPATH=os.pathsep.join([str(BENCH_DIR.parent), os.environ.get("PYTHONPATH", "")]))
            if subprocess.run([sys.executable, str(script)], env=env).returncode != 0:
                print(f"[{name}] FAILED (exit status non-zero)", file=sys.stderr)
                failed += 1
            continue
        EXPERIMENT_FAILURES.clear()
        try:
            rows = module.run(dev, smoke=smoke)
        except CorrectnessError as e:
            print(f"\n[{name}] FAILED its correctness check, nothing timed: {e}", file=sys.stderr)
            failed += 1
            continue
        except Exception:  # a crash in one benchmark is a bug to report, not a reason to skip the others
            print(f"\n[{name}] CRASHED:\n{traceback.format_exc()}", file=sys.stderr)
            failed += 1
            continue
        print("\n" + markdown_table(name, rows), flush=True)
        if EXPERIMENT_FAILURES:
            print(f"[{name}] FAILED in part (the rows above still count): {'; '.join(EXPERIMENT_FAILURES)}",
                  file=sys.stderr)
            failed += 1
        if record and not smoke and record_results(name, rows, dev, command=f"p2p-engine bench --only {name}"):
            print(f"[{name}] recorded in {RESULTS_CSV.name} and {RESULTS_MD.name}")
    return 1 if failed else 0


def quiet_baselines() -> None:
    """diffusers' and transformers' loading advice (install accelerate, ...) would drown the tables."""
    for name in ("diffusers", "transformers"):
        try:
            logging = importlib.import_module(name).utils.logging
            logging.set_verbosity_error()
            logging.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def save_checkpoint(tmp: str, preset: str) -> str:
    """A random-weight checkpoint of `preset` in diffusers layout under `tmp` (no network)."""
    import p2p_engine as p2p
    quiet_baselines()
    path = os.path.join(tmp, preset)
    if not os.path.exists(path):
        p2p.save_random_checkpoint(path, preset, seed=0, layout="diffusers")
    return path


def script_main(name: str, description: str, argv=None) -> int:
    """The command line of one benchmark script: `python benchmarks/bench_<name>.py [--smoke] [--device D]`."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    return run_suite(only=[name], smoke=args.smoke, device=args.device, record=True)
