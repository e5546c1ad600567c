"""Test-wide set-up.

Without CUDA, Triton kernels run through Triton's interpreter, which must be
switched on before any kernel is decorated, hence before test modules import
`p2p_engine.kernels`: `triton_interpreter` is the engine's one switch.
"""
import os

import pytest
import torch

import p2p_engine as p2p
from p2p_engine.attention import triton_interpreter

triton_interpreter()

# The CI machine has 2 cores; more threads than cores only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny preset's random checkpoint (seed 0) as a diffusers folder, for tests that only read it."""
    return p2p.save_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    """`tiny_ckpt` loaded in float32 on the CPU with the pure-torch backend; tests must not modify it."""
    return p2p.load(tiny_ckpt, device="cpu", dtype=torch.float32, backend="torch")


@pytest.fixture(scope="session")
def load_float64():
    """A loader of checkpoints in float64, which `p2p.load` does not offer: truth free of float32 rounding, for
    tests that compare two ways of running the same loop. Returns load(path) -> Pipeline (CPU, torch backend)."""
    def load(path):
        pipe = p2p.load(path, device="cpu", dtype=torch.float32, backend="torch")
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            if m is not None:
                m.double()
        pipe.dtype = torch.float64
        return pipe
    return load
