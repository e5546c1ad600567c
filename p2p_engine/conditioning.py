"""Text conditioning as the UNet reads it: the cross-attention context and, for SDXL, the pooled embedding.

`Text` is the conditioning of B prompts (what `Pipeline.encode_text` and `Pipeline.unconditional` return);
`StepTexts` is an unconditional conditioning that changes per sampling step (null-text inversion's optimised
embeddings), as an `Inversion` holds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Text:
    """The text conditioning of B prompts."""

    context: torch.Tensor  # (B, 77, D): what every cross-attention layer reads
    pooled: torch.Tensor | None = None  # (B, P): SDXL's pooled embedding, read by the UNet's added conditioning

    def expand(self, n: int) -> "Text":
        """The one prompt's conditioning repeated for n rows."""
        return Text(self.context.expand(n, -1, -1), None if self.pooled is None else self.pooled.expand(n, -1))

    def to(self, dtype: torch.dtype) -> "Text":
        return Text(self.context.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    @staticmethod
    def cat(parts: list["Text"]) -> "Text":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Text(torch.cat([p.context for p in parts]), pooled)

    def to_device(self, device, dtype: torch.dtype) -> "Text":
        return Text(self.context.to(device, dtype), None if self.pooled is None else self.pooled.to(device, dtype))


def unconditional_rows(source: Text, targets: Text | None, rows: int) -> Text:
    """The unconditional conditioning of `rows` prompts, source first: `source` (one row) for every row, or for
    the source's only, with `targets` (one row: Plug-and-Play's negative prompt) for the others."""
    if targets is None:
        return source.expand(rows)
    return Text.cat([source, targets.expand(rows - 1)])


@dataclass
class StepTexts:
    """One unconditional conditioning per sampling step."""

    context: torch.Tensor  # (steps, 77, D)
    pooled: torch.Tensor | None = None  # (steps, P), SDXL

    def step(self, i: int) -> Text:
        return Text(self.context[i][None], None if self.pooled is None else self.pooled[i][None])

    def to(self, device, dtype: torch.dtype) -> "StepTexts":
        return StepTexts(self.context.to(device, dtype), None if self.pooled is None else self.pooled.to(device, dtype))
