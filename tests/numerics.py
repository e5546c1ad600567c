"""Error measures shared by tests that compare two ways of running the same computation."""
import torch


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64: the worst entry's error, relative to the truth `b`'s scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
