#!/usr/bin/env bash
# The test suite on the GPU machine's releases, on this CPU, before a GPU session spends device time on them.
# The lent H200 has Python 3.12, torch 2.11 (a CUDA build), triton 3.6 and transformers 5.17, and gets diffusers
# 0.42.1 without its dependencies from the wheel gpu_session.sh carries; CI has torch 2.13 and the newest triton.
# This makes a venv of those releases (about 5 GB, once, in $VENV outside the repository), installs a clean clone
# of HEAD the way gpu_session.sh does (--no-deps --no-build-isolation -e .) and runs the whole suite there; the
# CUDA tests skip.
# NumPy stays below 2.4, which Triton 3.6's interpreter cannot run with (p2p_engine.attention.interpreter_problem).
#   bash benchmarks/gpu_releases.sh [pytest arguments]        (about 12 minutes of tests on 2 cores)
# Found this way (2026-12-02): torch 2.11's torch.quantile read the device back, which a CUDA graph refuses.
set -euo pipefail
VENV=${VENV:-/tmp/p2p-gpu-releases}
PYTHON=${PYTHON:-python3.12}
if ! "$PYTHON" -c "" 2>/dev/null; then
    # a pyenv shim for a version that is installed but not selected fails to run: take the interpreter itself
    PYTHON=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
    [ -n "$PYTHON" ] || { echo "no Python 3.12 here: set PYTHON=/path/to/python3.12" >&2; exit 1; }
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "numpy<2.4" requests \
        pillow tqdm safetensors pytest pytest-benchmark pybind11 setuptools wheel
    "$VENV/bin/pip" install -q --no-deps "diffusers==0.42.1" importlib_metadata
fi
git clone -q "$REPO" "$WORK/repo"
cd "$WORK/repo"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 \
    || { tail -30 "$WORK/install.log"; exit 1; }
"$VENV/bin/python" -c "import torch, triton, transformers, diffusers, numpy, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'numpy', numpy.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
