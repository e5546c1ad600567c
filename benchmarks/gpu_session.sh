#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one call of the device tool: install the engine on the
# GPU machine's own torch and triton, run the CUDA tests, then each benchmark under its own time limit, with
# the kernel-time profile of one UNet step (benchmarks/profile_step.py) between pipeline and methods.
# session.log, install.log, results.csv, RESULTS.md and profile.csv (the profile's categories, top kernels and
# wall times per configuration and batch) come back under $OUT; copy results.csv and RESULTS.md into benchmarks/.
#
# Before spending device time, `bash benchmarks/gpu_releases.sh` runs the test suite on this machine's releases
# (torch 2.11, triton 3.6, Python 3.12) on the CPU. Prepare once in the checkout (diffusers is the baseline and
# is not on the GPU machine; .whl/ and .commit are in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl diffusers==0.42.1 importlib_metadata
# and, for the server's rows (step 3), its extra with what it pulls in:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 python-multipart==0.0.34 h11==0.16.0 click==8.5.1 \
#       anyio==4.16.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3 pydantic==2.14.4 pydantic_core==2.50.5 \
#       typing-inspection==0.4.5 annotated-types==0.8.0
# then call the device tool with
#   command: COMMIT=$(cat .commit) bash benchmarks/gpu_session.sh   (after: git rev-parse --short HEAD > .commit)
#   carry: [".whl", ".commit"], timeout_s: TOTAL + 40
# The whole script keeps within TOTAL seconds (default 520): each part gets its own limit, cut to what is
# left, and a benchmark is told its deadline (P2P_BENCH_DEADLINE) so that it leaves out its last variants
# rather than being killed with nothing recorded.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
export P2P_COMMIT=${COMMIT:-unknown}
TOTAL=${TOTAL:-520}
START=$(date +%s)

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
limit() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; echo "$want"; }
say() { echo "== $* (t=$(( $(date +%s) - START )) s)" | tee -a "$LOG"; }

say install
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log" | tee -a "$LOG"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, diffusers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"; } 2>&1 | tee -a "$LOG"

# 1. CUDA tests: the kernel files run every case compiled on the GPU (fp16/bf16 included), and the
#    CUDA-graph null-text loop, the graphed UNet forward and the captured edit loop (test_captured: if it
#    passes, editing.CAPTURE_BY_DEFAULT may be turned on) against the eager ones, cached re-edits (eager and
#    captured), and channels-last memory (load's CUDA default) against the usual layout, with torch's GroupNorms
#    and with the fused Triton ones (if they pass and bench unet's fused graph rows are faster,
#    unet.FUSED_NORMS may be turned on).
say cuda tests
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
# The tests the defaults wait on (captured loops, cached re-edits, channels-last, gathered inversion, fused
# GroupNorms) run first, the many cross-attention kernel cases last,
# so that a time limit cuts kernel cases, not them; -v writes each test's outcome to the log as it ends (a
# killed run has no summary), the last lines come to the screen.
timeout "$(limit 90)" python3 -m pytest -v -p no:cacheprovider $XDIST \
    "tests/test_captured.py::test_cuda_graph_replay_equals_eager" \
    "tests/test_captured.py::test_cuda_graph_re_edit_from_a_cache" \
    "tests/test_captured.py::test_cuda_graph_from_a_null_text_inversion" \
    "tests/test_cache.py::test_cuda_cached_edit_equals_uncached" \
    "tests/test_cache.py::test_cuda_graph_recording_equals_eager" \
    "tests/test_channels_last.py::test_triton_kernels_read_the_same_inputs" \
    "tests/test_inversion.py::test_cuda_graph_buckets_equal_the_masked_graph" \
    "tests/test_inversion.py::test_cuda_graph_equals_eager" tests/test_graphs.py tests/test_kernel_norm.py \
    "tests/test_editors_run.py::test_captured_loop_equals_eager" \
    "tests/test_editors_run.py::test_a_kept_loop_serves_later_editor_edits" \
    tests/test_kernel_self.py tests/test_kernel_cross.py \
    2>&1 | tee -a "$LOG" | grep -v " PASSED" | tail -40

# 2. Benchmarks, one at a time so that one running long does not take the others with it.
# pipeline and inversion (the open issue's goals) before methods and sdxl; load's CPU figures are in RESULTS.md.
# Each is told its deadline and leaves out its last timings (the least needed) rather than overrun it.
# profile: where the UNet step's time goes (kernel time by category against wall time), not a benchmark row.
# editors (prepared, not yet run on a GPU): seconds per image of Prompt-to-Prompt, MasaCtrl and Plug-and-Play
# with Direct Inversion at SD 1.5's size (benchmarks/bench_editors.py).
for spec in attention:40 unet:70 pipeline:130 inversion:110 profile:40 methods:60 editors:60 sdxl:100; do
    name=${spec%%:*}
    lim=$(limit "${spec##*:}")
    if [ "$lim" -lt 30 ]; then say "bench $name left out: $lim s left"; continue; fi
    say "bench $name (limit $lim s)"
    export P2P_BENCH_DEADLINE=$(( $(date +%s) + lim - 10 ))
    if [ "$name" = profile ]; then
        timeout "$lim" python3 -m benchmarks.profile_step --batch 2 4 --steps 3 --csv "$OUT/profile.csv" 2>&1 \
            | tee -a "$LOG" | tail -40
    else
        timeout "$lim" p2p-engine bench --only "$name" 2>&1 | tee -a "$LOG" | tail -30
    fi
done
unset P2P_BENCH_DEADLINE

# 3. Edits in one batch (issue 33; prepared, not yet run on a GPU: no figure of it is claimed): SD 1.5's
#    architecture (random weights) at 512 x 512 in fp16, 8 two-prompt edits (Replace with LocalBlend and stored
#    maps, 50 steps) in one edit_batch against the same edits one after another, each batched edit checked
#    against its own edit first; prints the ratio per back-to-back pair (goal >= 3x) and the peak memory above
#    the model, per edit for the batch.
lim=$(limit 150)
if [ "$lim" -lt 60 ]; then say "edit_batch left out: $lim s left"; else
    say "edit_batch (limit $lim s)"
    timeout "$lim" python3 -m benchmarks.cpu_edit_batch --preset sd15 --size 512 --device cuda --dtype float16 \
        --runs 2 2>&1 | tee -a "$LOG" | tail -8
fi

# 4. The server (benchmarks/bench_serve.py), prepared and not yet run on a GPU: SD 1.5's architecture at 512 x 512
#    in fp16 (random weights: none can be downloaded), 16 clients x 4 two-prompt edits of 50 steps, batched
#    (--max-batch-rows 32) against one edit per loop (4 rows); it prints requests/s, the ratio and p50 / p95
#    latency. Needs the serve extra's wheels in .whl (above).
lim=$(limit 150)
if [ "$lim" -ge 60 ]; then
    say "bench serve (limit $lim s)"
    p2p-engine random-checkpoint /tmp/sd15-serve --preset sd15 --overwrite >/dev/null 2>&1
    timeout "$lim" python3 -m benchmarks.bench_serve --model /tmp/sd15-serve --device cuda --dtype float16 \
        --steps 50 --clients 16 --edits 4 2>&1 | tee -a "$LOG" | tail -8
else
    say "bench serve left out: $lim s left"
fi
cp benchmarks/results.csv benchmarks/RESULTS.md "$OUT/" 2>/dev/null
say done
exit 0
