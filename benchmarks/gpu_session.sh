#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one call of the device tool: install the engine on the
# GPU machine's own torch and triton, run the CUDA tests, then each benchmark under its own time limit.
# Logs, results.csv and RESULTS.md come back under $OUT; copy the two result files into benchmarks/.
#
# Prepare once in the checkout (diffusers is the baseline and is not on the GPU machine; .whl/ and
# .commit are in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl diffusers==0.42.1 importlib_metadata
# then call the device tool with
#   command: COMMIT=$(cat .commit) bash benchmarks/gpu_session.sh   (after: git rev-parse --short HEAD > .commit)
#   carry: [".whl", ".commit"], timeout_s: 590
# The limits below (seconds per part) add up to 9 minutes with the install; trim them to the time left.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export P2P_COMMIT=${COMMIT:-unknown}

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    | tee "$OUT/device.txt"

# 1. CUDA tests: the kernel files run every case compiled on the GPU (fp16/bf16 included), and the
#    CUDA-graph null-text loop and the graphed UNet forward against the eager ones.
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_cross.py tests/test_kernel_self.py \
    "tests/test_inversion.py::test_cuda_graph_equals_eager" tests/test_graphs.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15

# 2. Benchmarks, one at a time so that one running long does not take the others with it.
for spec in attention:60 unet:90 pipeline:210 load:60; do
    name=${spec%%:*}
    echo "== bench $name"
    timeout "${spec##*:}" p2p-engine bench --only "$name" 2>&1 | tee "$OUT/bench_$name.log" | tail -25
done
cp benchmarks/results.csv benchmarks/RESULTS.md "$OUT/" 2>/dev/null
exit 0
