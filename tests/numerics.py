"""Helpers shared by tests that compare two ways of running the same computation."""
import torch


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64: the worst entry's error, relative to the truth `b`'s scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def table_at(entry: torch.Tensor, decoys: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A table holding `entry` as row `at` among `decoys` (n, *entry.shape), and the (1,) int64 index of that
    row on entry's device: a kernel that reads any other row reads a decoy."""
    table = torch.cat([decoys[:at], entry[None], decoys[at:]])
    return table, torch.tensor([at], device=entry.device)
