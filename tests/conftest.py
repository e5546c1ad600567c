"""Test-wide set-up.

Without CUDA, Triton kernels run through Triton's interpreter, which must be
switched on before any kernel is decorated, hence before test modules import
`p2p_engine.kernels`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CI machine has 2 cores; more threads than cores only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))
