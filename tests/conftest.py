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
    tests that compare two ways of running the same loop. Returns load(path, device="cpu") -> Pipeline (torch
    backend)."""
    def load(path, device="cpu"):
        pipe = p2p.load(path, device=device, dtype=torch.float32, backend="torch")
        # new parameters, not `.data =`, which would keep a tensor subclass's old values (tests/emulated_device.py)
        before = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                if m is not None:
                    m.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(before)
        pipe.dtype = torch.float64
        return pipe
    return load


@pytest.fixture
def emulated_graphs(monkeypatch):
    """CUDA graphs emulated on the CPU (tests/tape.py): `p2p_engine.graphs` accepts the CPU and records on a tape,
    so `capture=True`, the null-text inversion's iteration and `GraphedUNet` record once and replay as a graph
    does. Yields the list of tapes recorded (check their `syncs`); loops kept for later edits are dropped after."""
    from p2p_engine import captured, graphs
    from tape import capture_on_tape

    tapes = []
    monkeypatch.setattr(graphs, "can_capture", lambda device: True)
    monkeypatch.setattr(graphs, "capture", lambda run, **kw: capture_on_tape(run, tapes=tapes, **kw))
    yield tapes
    captured._kept_by_pipe.clear()


@pytest.fixture(params=["call by call", "replayed"])
def capture_way(request):
    """How `capture=True` runs the recorded step on the CPU: call by call (the step's Python runs every call), or
    recorded once and replayed as a CUDA graph replays it (`emulated_graphs`). Yields a check to call after the
    captured runs: replayed, at least one step was recorded and none read the device back to the host."""
    if request.param == "call by call":
        yield lambda: None
        return
    from tape import assert_recorded_cleanly

    tapes = request.getfixturevalue("emulated_graphs")
    yield lambda: assert_recorded_cleanly(tapes)
