"""Compiling Triton kernels for an H100 (sm_90) without a GPU: Triton's bundled ptxas does the work."""
import os
import subprocess
import sys

import pytest

SM90_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def compile_in_child(script: str) -> None:
    """Run `script` (which compiles kernels and prints "compiled") in a child with the interpreter switched
    off; skip where Triton's NVIDIA backend or its ptxas is missing, fail with the child's error otherwise."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # an explicit 0: importing p2p_engine leaves it alone
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
