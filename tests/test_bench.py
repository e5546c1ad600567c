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


def test_a_failed_experiment_leaves_the_other_rows(monkeypatch, capsys):
    """Code not yet run on a GPU runs as an `experiment` inside a benchmark: when it fails its gate or crashes, it
    is reported in full and its rows are left out, the benchmark's other rows still come out (and would be
    recorded), and the run's exit status says it failed."""
    import types
    fake = types.ModuleType("benchmarks.bench_fake")

    def run(device, smoke=False):
        rows = [Row("established", "ours", Timing([1.0]), "baseline", Timing([2.0]), 0.5, check="err 1e-3 <= 2e-3")]
        with common.experiment("fake", "the new kernel"):
            raise CorrectnessError("new kernel: relative error 1.0e-01 exceeds 2.0e-03")
        with common.experiment("fake", "the new loop"):
            raise IndexError("grid too large")
        with common.experiment("fake", "the other variant"):
            rows.append(Row("other variant", "ours", Timing([1.5]), "baseline", Timing([2.0]), 0.5, check="ok"))
        return rows

    fake.run = run
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fake", fake)
    monkeypatch.setattr(common, "SUITE", common.SUITE + ("fake",))
    assert common.run_suite(only=["fake"], device="cpu", record=False) == 1
    out, err = capsys.readouterr()
    assert "| established |" in out and "| other variant |" in out
    assert "[fake] the new kernel FAILED its correctness check, its rows left out: new kernel: relative" in err
    assert "[fake] the new loop CRASHED" in err and "IndexError: grid too large" in err
    assert "[fake] FAILED in part" in err and len(common.EXPERIMENT_FAILURES) == 2
    common.EXPERIMENT_FAILURES.clear()


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
    assert sum("static-state loop" in r.ours_name for r in rows) == 6  # the captured loop's rows, ungraphed here
    assert any(r.check.startswith("captured re-edit: err") for r in rows)
    assert any(r.check.startswith("captured recording: err") for r in rows)


def test_bench_pipeline_meets_its_deadline(monkeypatch, capsys):
    """Near P2P_BENCH_DEADLINE the pipeline benchmark times what issue 16's goals need first and leaves out the
    rest, saying so (a benchmark killed at its time limit records nothing)."""
    from benchmarks import bench_pipeline
    timed = []
    monkeypatch.setattr(bench_pipeline, "seconds_left", lambda: float("inf") if len(timed) < 4 else 0.0)
    real_measure = bench_pipeline.measure
    monkeypatch.setattr(bench_pipeline, "measure", lambda *a, **kw: timed.append(1) or real_measure(*a, **kw))
    rows = bench_pipeline.run(CPU, smoke=True)
    assert len(timed) == 4
    assert [(r.ours_name, r.baseline_name) for r in rows] == [
        ("ours, static-state loop", "reference way on diffusers"),
        ("ours, static-state loop edit", "ours, static-state loop generation"),
        ("ours, static-state loop cached re-edit", "ours, static-state loop edit")]
    out = capsys.readouterr().out
    assert "[pipeline] edit_ours left out" in out and "[pipeline] build_cap left out" in out


def test_capture_failures_are_read_from_outputs():
    """`capture_failures` collects the failures engine outputs state (single outputs and lists of inversions, in
    order, each once); an output without the field (a checkout older than it) states none."""
    from types import SimpleNamespace
    ok, a, b = (SimpleNamespace(capture_failure=f) for f in (None, "a", "b"))
    assert common.capture_failures(ok, [ok, a], a, object(), [b]) == ["a", "b"]
    assert common.capture_failures() == [] and common.capture_failures(ok, [ok]) == []
    assert common.fallback_note([]) == "" and common.fallback_name("ours", []) == "ours"
    assert common.fallback_note(["a", "b"]) == "CAPTURE FAILED, timed the eager fallback: a; "
    assert common.fallback_name("ours", ["a"]) == "ours [eager: capture failed]"


def test_bench_inversion_names_a_capture_that_fell_back(monkeypatch):
    """An inversion whose iteration could not be recorded says so (`capture_failure`), and its row is named for
    the eager fallback it timed."""
    from benchmarks import bench_inversion
    from p2p_engine import inversion
    real = inversion.null_optimize

    def fell_back(*args, **kwargs):
        *out, _ = real(*args, **kwargs)
        return (*out, ("eager", "RuntimeError: operation not permitted when stream is capturing"))

    monkeypatch.setattr(inversion, "null_optimize", fell_back)
    [row] = bench_inversion.run(CPU, smoke=True)
    assert row.ours_name == "ours [eager: capture failed]"
    assert row.check.startswith("CAPTURE FAILED, timed the eager fallback: RuntimeError: operation not permitted")


@pytest.mark.parametrize("failing", ["every recording", "the timed runs' only"])
def test_bench_pipeline_names_a_capture_that_fell_back(monkeypatch, failing):
    """Where recording the loop fails, the engine runs it eagerly: the rows of captured loops say so, in the name
    of the side that fell back and in the check, rather than pass eager times off as the graph's. The timed runs'
    shapes record graphs of their own, so a failure there alone, after the gates recorded theirs, counts too."""
    from benchmarks import bench_pipeline
    from p2p_engine import captured, editing
    real, calls = captured.static_sample, []

    def fail(*args, **kwargs):
        calls.append(1)
        if failing == "the timed runs' only" and len(calls) <= 3:  # the gates: edit, generation, re-edit
            return real(*args, **kwargs)
        raise captured.CaptureFailed("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(captured, "static_sample", fail)
    monkeypatch.setattr(editing, "_capture_failures", set())
    timed = []
    monkeypatch.setattr(bench_pipeline, "seconds_left", lambda: float("inf") if len(timed) < 4 else 0.0)
    real_measure = bench_pipeline.measure
    monkeypatch.setattr(bench_pipeline, "measure", lambda *a, **kw: timed.append(1) or real_measure(*a, **kw))
    with pytest.warns(RuntimeWarning, match="recording the edit step as a CUDA graph failed"):
        rows = bench_pipeline.run(CPU, smoke=True)
    tag = " [eager: capture failed]"
    assert [(r.ours_name, r.baseline_name) for r in rows] == [
        ("ours, static-state loop" + tag, "reference way on diffusers"),
        ("ours, static-state loop edit" + tag, "ours, static-state loop generation" + tag),
        ("ours, static-state loop cached re-edit" + tag, "ours, static-state loop edit" + tag)]
    assert all(r.check.startswith("CAPTURE FAILED, timed the eager fallback: RuntimeError: operation not permitted")
               for r in rows)


def test_bench_pipeline_keeps_its_eager_rows_when_a_captured_loop_crashes(monkeypatch, capsys):
    """The captured loops have not yet run on a GPU: if one raises (other than a recording failure, which falls
    back), its gate reports the crash and the captured rows are left out; the eager rows and the recording run's
    row still come out."""
    from benchmarks import bench_pipeline
    from p2p_engine import captured

    def crash(*args, **kwargs):
        raise ValueError("static buffers of the wrong shape")

    monkeypatch.setattr(captured, "static_sample", crash)
    common.EXPERIMENT_FAILURES.clear()
    rows = bench_pipeline.run(CPU, smoke=True)
    assert [r.ours_name for r in rows] == ["ours", "ours", "ours edit", "ours cached re-edit",
                                           "ours, static-state loop"]  # the last: the edit cache's recording run
    assert common.EXPERIMENT_FAILURES == [f"{what}: ValueError: static buffers of the wrong shape"
                                          for what in ("captured edit and generation",
                                                       "captured re-edit from an edit cache")]
    assert "[pipeline] captured edit and generation CRASHED" in capsys.readouterr().err
    common.EXPERIMENT_FAILURES.clear()


def test_bench_inversion_full_run_meets_its_deadline(monkeypatch, capsys):
    """The full run's shape on the tiny model (5 steps of 10 iterations): the fp32 single-image row says what 50
    steps make per image, and once P2P_BENCH_DEADLINE leaves no room the batched variants are left out, said so."""
    from benchmarks import bench_inversion
    real_save, real_measure = bench_inversion.save_checkpoint, bench_inversion.measure_grad
    timed = []
    monkeypatch.setattr(bench_inversion, "save_checkpoint", lambda tmp, preset: real_save(tmp, "tiny"))
    monkeypatch.setattr(bench_inversion, "measure_grad", lambda *a, **kw: timed.append(1) or real_measure(*a, **kw))
    monkeypatch.setattr(bench_inversion, "seconds_left", lambda: float("inf") if len(timed) < 2 else 0.0)
    rows = bench_inversion.run(CPU, smoke=False)
    assert len(timed) == 2  # the reference loop, then ours
    assert [r.ours_name for r in rows] == ["ours"] and rows[0].case.startswith("null-text inversion per image, 5 steps")
    assert "50 steps: " in rows[0].check and "null embeddings: err" in rows[0].check
    out = capsys.readouterr().out
    assert "ours batched x8 left out" in out and "ours batched x4 left out" in out


def test_bench_inversion_smoke(benchmark):
    from benchmarks import bench_inversion
    rows = benchmark.pedantic(bench_inversion.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    _assert_rows(rows)
    assert [r.ours_name for r in rows] == ["ours"] and rows[0].baseline_name.startswith("reference loop")
    assert rows[0].check.startswith("z_T: err") and "null embeddings: err" in rows[0].check  # both gates passed
    assert rows[0].floor_ms > 0


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


def test_bench_editors_smoke(benchmark):
    """Each editor's Direct Inversion edit, its source row pinned to the image's latent and its target moved."""
    from benchmarks import bench_editors
    rows = benchmark.pedantic(bench_editors.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    assert [r.case.split(":")[0] for r in rows] == ["p2p", "masactrl", "pnp"]
    assert all(r.ours.median > 0 and r.floor_ms > 0 and "bit for bit" in r.check for r in rows)


def test_bench_methods_sizes_null_text_by_its_warm_up(monkeypatch, capsys):
    """Null-text's timed runs fit the deadline as its timed warm-up run says: with no room after it, the row is
    left out and said so (a benchmark killed at its limit records nothing); the other methods' rows stay."""
    from benchmarks import bench_methods
    asked = []
    monkeypatch.setattr(bench_methods, "seconds_left", lambda: asked.append(1) or (0.0 if len(asked) >= 5 else 1e9))
    rows = bench_methods.run(CPU, smoke=True)
    assert len(asked) == 5  # three methods, the edit before null-text's warm-up, the repeats after it
    assert [r.case.split(":")[0] for r in rows] == ["direct", "ddim", "negative_prompt"]
    assert "[methods] null_text left out" in capsys.readouterr().out


def test_bench_methods_names_a_null_text_capture_that_fell_back(monkeypatch):
    """Null-text's row is named for the eager loop it timed where its iteration's graph could not be recorded."""
    from benchmarks import bench_methods
    from p2p_engine import inversion
    real = inversion.null_optimize

    def fell_back(*args, **kwargs):
        *out, _ = real(*args, **kwargs)
        return (*out, ("eager", "RuntimeError: operation not permitted when stream is capturing"))

    monkeypatch.setattr(inversion, "null_optimize", fell_back)
    rows = bench_methods.run(CPU, smoke=True)
    assert [r.ours_name for r in rows] == ["ours"] * 3 + ["ours [eager: capture failed]"]
    assert rows[-1].check.startswith("CAPTURE FAILED, timed the eager fallback: RuntimeError: operation not")


def test_bench_sdxl_smoke(benchmark):
    from benchmarks import bench_sdxl
    rows = benchmark.pedantic(bench_sdxl.run, args=(CPU,), kwargs={"smoke": True}, rounds=1, iterations=1)
    assert rows[0].case.startswith("UNet step") and "<=" in rows[0].check  # the correctness gate passed
    assert any("peak memory" in r.case for r in rows) and all(r.ours.median > 0 for r in rows)


# -- profile_step: the kernel-time breakdown of one UNet step

KERNELS = {  # names as torch.profiler reports them (demangled), abridged where they run to a page
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>(long, float, c10::Half "
    "const*, float*, float*)": "norm",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::(anonymous "
    "namespace)::GroupNormKernelImplInternal<c10::Half>(...)::{lambda(c10::Half, float, float)#1}>(...)": "norm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t, "
    "Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, false, false, false, true, true, false, "
    "false>(pytorch_flash::Flash_fwd_params)": "attention",
    "fmha_cutlassF_f16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, "
    "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "attention",
    "_cross_fwd": "attention", "_gn_partials": "norm", "_gn_apply": "norm",
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute_"
    "segment_k_off_kernel__5x_cudnn": "convolution",
    "void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>(cudnn::ops::"
    "nchw2nhwc_params_t<float>, __half const*, __half*)": "layout",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_"
    "cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda("
    "c10::Half)#1}>(at::TensorIteratorBase&)::{lambda(int)#1}>(int, ...)": "layout",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
    "unsigned int, 4, 64, 64>(...)": "cat",
    "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
    "cublas": "gemm",
    "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, "
    "3ul> >(int, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>)": "elementwise",
    # the CPU smoke run's aten operators
    "aten::mkldnn_convolution": "convolution", "aten::_slow_conv2d_forward": "convolution", "aten::addmm": "gemm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::native_group_norm": "norm",
    "aten::copy_": "layout", "aten::cat": "cat", "aten::silu": "elementwise", "aten::add_": "elementwise",
    "aten::expand": "other", "aten::upsample_bilinear2d": "other", "a_kernel_nobody_has_named_yet": "other",
}


@pytest.mark.parametrize("name", sorted(KERNELS), ids=[n.removeprefix("void ")[:48] for n in sorted(KERNELS)])
def test_profile_classifies_kernel_names(name):
    from benchmarks.profile_step import classify
    assert classify(name) == KERNELS[name]


def test_profile_breakdown_sums_to_the_total():
    from benchmarks.profile_step import breakdown
    items = [(name, 10.0 * (i + 1), 1) for i, name in enumerate(sorted(KERNELS))]
    items += [("aten::addmm", 500.0, 3), ("a_kernel_nobody_has_named_yet", 30.0, 1)]  # repeated names merge
    b = breakdown(items, steps=2)
    total_us, calls = sum(us for _, us, _ in items), sum(n for _, _, n in items)
    assert b.total_ms == pytest.approx(total_us / 1e3 / 2) and b.total_calls == pytest.approx(calls / 2)
    assert sum(ms for _, ms, _ in b.categories) == pytest.approx(b.total_ms)
    assert sum(calls for _, _, calls in b.categories) == pytest.approx(b.total_calls)
    assert len(b.kernels) == len(KERNELS) and b.kernels[0][0] == "aten::addmm"  # most time first
    assert dict((c, calls) for c, _, calls in b.categories)["other"] == pytest.approx(4 / 2)


def test_profile_step_smoke(tmp_path, capsys):
    import csv

    from benchmarks import profile_step
    path = tmp_path / "profile.csv"
    assert profile_step.main(["--smoke", "--device", "cpu", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| convolution |" in out and "eager wall time" in out
    rows = list(csv.DictReader(path.open()))
    assert {r["config"] for r in rows} == {"channels-last", "usual layout"}
    for config in ("channels-last", "usual layout"):
        mine = [r for r in rows if r["config"] == config]
        cats = {r["name"]: float(r["ms_per_step"]) for r in mine if r["kind"] == "category"}
        total = next(float(r["ms_per_step"]) for r in mine if r["kind"] == "total" and r["name"] == "op time")
        assert total > 0 and cats["convolution"] > 0 and cats["norm"] > 0
        assert sum(cats.values()) == pytest.approx(total, rel=1e-3)


def test_gpu_session_script_names_what_exists():
    """benchmarks/gpu_session.sh is the one call a lent GPU gets, with minutes for at most one rerun: it parses,
    every test it names exists (a renamed test would be 'not found' there), and every benchmark it runs is in the
    suite (`p2p-engine bench --only` refuses others)."""
    import re
    import shutil
    import subprocess

    script = ROOT / "benchmarks" / "gpu_session.sh"
    text = script.read_text()
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    named = re.findall(r"(tests/test_\w+\.py)(?:::(\w+))?", text)
    assert len(named) >= 10
    for path, test in named:
        source = (ROOT / path).read_text()
        assert not test or re.search(rf"^def {test}\(", source, re.M), f"{path}::{test} is not a test any more"
    specs = re.search(r"for spec in ([\w: ]+); do", text).group(1).split()
    benches = [s.split(":")[0] for s in specs]
    assert {b for b in benches if b != "profile"} <= set(common.SUITE) and "pipeline" in benches
    assert (ROOT / "benchmarks" / "profile_step.py").exists()


def test_cpu_edit_batch_smoke(capsys):
    """The edit_batch benchmark checks each batched edit against its own edit before it times, and prints a ratio
    per pair and per batch size."""
    from benchmarks import cpu_edit_batch

    cpu_edit_batch.main(["--edits", "2", "--steps", "2", "--runs", "1", "--sizes", "1", "2"])
    out = capsys.readouterr().out
    assert "(ok)" in out and "median" in out and "2 edits in batches of 2" in out
