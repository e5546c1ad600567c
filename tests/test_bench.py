"""The benchmark harness: its helpers, and the CPU smoke runs of the benchmarks through pytest-benchmark.

The smoke runs use the tiny preset and a few steps; what they assert is that each benchmark's correctness gate
passed (ours against the baseline in higher precision) and that every row carries a timing.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks/` is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.common import CorrectnessError, Row, Timing  # noqa: E402

CPU = torch.device("cpu")


# -- helpers

def test_timing_statistics():
    t = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0 and t.min == 1.0 and t.max == 5.0
    assert t.iqr == pytest.approx(3.0)  # quartiles 1.5 and 4.5 (exclusive method)


def test_measure_counts_repeats_and_warmup():
    calls = []
    t = common.measure(lambda: calls.append(1), CPU, warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.samples_ms) == 5
    assert t.mem_kind == "rss" and t.peak_mem_bytes > 0


def test_check_close_gates_on_drift():
    ref_hi = torch.linspace(-1, 1, 100, dtype=torch.float64)
    base_lo = ref_hi + 1e-4  # the baseline's own drift: 1e-4
    assert "<=" in common.check_close("ok", ref_hi + 1.5e-4, ref_hi, base_lo, torch.float32)
    with pytest.raises(CorrectnessError, match="exceeds"):
        common.check_close("bad", ref_hi + 3e-4, ref_hi, base_lo, torch.float32)
    with pytest.raises(CorrectnessError, match="NaN"):
        common.check_close("nan", ref_hi * float("nan"), ref_hi, base_lo, torch.float32)


def test_markdown_table_has_ratio_and_floor():
    rows = [Row("batch 2", "ours torch", Timing([2.0, 2.0, 2.0]), "diffusers SDPA", Timing([3.0] * 3), floor_ms=0.5,
                check="err 1e-7 <= 2e-7")]
    table = common.markdown_table("unet", rows)
    assert "| batch 2 | ours torch | 2 |" in table and "1.50x" in table and "| 0.5 |" in table


def test_record_results_only_on_gpu(tmp_path):
    csv_path, md_path = tmp_path / "results.csv", tmp_path / "RESULTS.md"
    md_path.write_text("# Benchmark results\n\n## GPU\n\nNo GPU run has been recorded yet (no GPU was lent to the "
                       "sessions so far).\n")
    rows = [Row("b1", "ours", Timing([1.0]))]
    assert common.record_results("unet", rows, CPU, command="x", csv_path=csv_path, md_path=md_path) is False
    assert not csv_path.exists() and "No GPU run" in md_path.read_text()


def test_marked_section_is_replaced_not_duplicated():
    text = "# R\n\n## GPU\n\nNo GPU run has been recorded yet (no GPU was lent to the sessions so far).\n\n## CPU\n"
    first = common.update_marked_section(text, "unet", "<!-- bench:unet begin -->\nA\n<!-- bench:unet end -->")
    assert "No GPU run" not in first and first.index("A") < first.index("## CPU")
    second = common.update_marked_section(first, "unet", "<!-- bench:unet begin -->\nB\n<!-- bench:unet end -->")
    assert "B" in second and "\nA\n" not in second and second.count("bench:unet begin") == 1
    both = common.update_marked_section(second, "pipeline", "<!-- bench:pipeline begin -->\nC\n"
                                                            "<!-- bench:pipeline end -->")
    assert "B" in both and "C" in both


def test_cpu_banner_says_no_gpu():
    assert "NO GPU PRESENT" in common.banner(CPU, smoke=True)


# -- CPU smoke runs (tiny preset): the correctness gates must pass

def _assert_rows(rows):
    assert rows
    for r in rows:
        assert r.ours.samples_ms and r.ours.median > 0
        assert r.baseline is None or r.baseline.median > 0


def test_bench_unet_smoke(benchmark):
    from benchmarks import bench_unet
    rows = benchmark.pedantic(bench_unet.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    _assert_rows(rows)
    assert {r.baseline_name for r in rows} == {"diffusers SDPA", "diffusers AttnProcessor"}
    assert all("<=" in r.check for r in rows) and all(r.floor_ms > 0 for r in rows)


def test_bench_pipeline_smoke(benchmark):
    from benchmarks import bench_pipeline
    rows = benchmark.pedantic(bench_pipeline.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    _assert_rows(rows)
    gated = [r for r in rows if "generation" not in r.baseline_name]
    assert len(gated) == 8 and all("<=" in r.check for r in gated)
    assert sum("static-state loop" in r.ours_name for r in rows) == 5  # the captured loop's rows, ungraphed here
    assert any(r.check.startswith("captured re-edit: err") for r in rows)


def test_cli_bench_cpu_says_smoke(capsys):
    from p2p_engine.cli import main
    assert main(["bench", "--only", "unet"]) == 0
    out = capsys.readouterr().out
    assert "NO GPU PRESENT" in out and "| batch 1 |" in out


def test_cli_bench_from_another_folder(tmp_path):
    """`p2p-engine bench` finds the checkout's benchmarks/ from an editable install wherever it is started
    (no sys.path edits, no need to stand in the checkout)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "p2p_engine", "bench", "--only", "unet", "--no-record"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| batch 1 |" in r.stdout


def test_cli_bench_without_a_checkout_says_what_to_do(tmp_path):
    from p2p_engine.cli import UserError, _benchmarks
    with pytest.raises(UserError, match="pip install -e"):
        _benchmarks(tmp_path / "benchmarks")


def test_cli_bench_unknown_name(capsys):
    from p2p_engine.cli import main
    assert main(["bench", "--only", "nope"]) == 1
    assert "unknown benchmark nope" in capsys.readouterr().err


def test_bench_methods_smoke(benchmark):
    from benchmarks import bench_methods
    rows = benchmark.pedantic(bench_methods.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    assert [r.case.split(":")[0] for r in rows] == ["direct", "ddim", "negative_prompt", "null_text"]
    assert all(r.ours.median > 0 and r.floor_ms > 0 for r in rows)
    assert "bit for bit" in rows[0].check


def test_bench_sdxl_smoke(benchmark):
    from benchmarks import bench_sdxl
    rows = benchmark.pedantic(bench_sdxl.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    assert rows[0].case.startswith("UNet step") and "<=" in rows[0].check  # the correctness gate passed
    assert any("peak memory" in r.case for r in rows) and all(r.ours.median > 0 for r in rows)
