"""Test-wide set-up.

Without CUDA, Triton kernels run through Triton's interpreter, which must be
switched on before any kernel is decorated, hence before test modules import
`p2p_engine.kernels`: `triton_interpreter` is the engine's one switch.
"""
import os

import torch

from p2p_engine.attention import triton_interpreter

triton_interpreter()

# The CI machine has 2 cores; more threads than cores only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))
