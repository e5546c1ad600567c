"""CUDA graphs: the one place the engine records work once and replays it.

At batch 1-2 on a large GPU the SD 1.5 UNet step is bound by kernel launches more than by arithmetic;
replaying a captured graph removes the launch cost without changing a single operation, so the output
equals the eager forward's bit for bit on the same inputs (checked by the CUDA tests).

Every capture (the UNet forward here, the edit and recording loops' step in `captured`, null-text
inversion's iteration in `nulltext`) goes through `can_capture` and `capture`, looked up on this module at
call time: the tests swap both for an emulation that records the step's aten operations on the CPU and
replays them without running Python (tests/tape.py), so a value the step baked in at recording shows there
as a replay that differs from the eager loop.
"""
from __future__ import annotations

from typing import Callable

import torch


def can_capture(device: torch.device) -> bool:
    """Whether work on `device` can be recorded and replayed (CUDA graphs: CUDA only)."""
    return device.type == "cuda"


def capture(run: Callable, *, warmup: int, reset: Callable | None = None) -> tuple[Callable[[], None], object]:
    """Record one call of `run()` in a CUDA graph: (replay, what the recorded call returned).

    `run` is first called `warmup` times on a side stream (Triton compiles, the allocator's pools settle), then
    `reset()` puts back what the warm-up advanced. Recording executes nothing: the state `run` reads stays as
    `reset` left it, and the returned tensors are the graph's own, filled by each replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph.replay, out


class GraphedUNet:
    """`unet(sample, t, ctx)` for inputs of one fixed shape, dtype and device, replayed from a CUDA graph.

    Inputs are copied into static buffers on each call; the returned tensor is the graph's static output,
    overwritten by the next call (clone it to keep it). Calls with another shape raise instead of
    silently re-capturing. Control plans are not captured: this is for uncontrolled forwards.
    """

    def __init__(self, unet: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                 warmup: int = 3):
        if not can_capture(sample.device):
            raise ValueError(f"CUDA graphs need CUDA tensors; the sample is on {sample.device}")
        self.unet = unet
        self._in = (sample.clone(), t.clone(), ctx.clone())
        with torch.inference_mode():
            self._replay, self._out = capture(lambda: unet(*self._in), warmup=warmup)

    def __call__(self, sample: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for dst, src, name in zip(self._in, (sample, t, ctx), ("sample", "t", "ctx")):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"GraphedUNet was captured for {name} {tuple(dst.shape)} {dst.dtype}, "
                                 f"got {tuple(src.shape)} {src.dtype}; capture another for that shape")
            dst.copy_(src)
        self._replay()
        return self._out
