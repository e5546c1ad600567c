"""Which queued edits run together: the batching policy, its two knobs named once.

Edits share one loop of `pipe.edit_batch` when the loop's settings are the same (`loop_key`: steps, sampler,
size, and an inversion's timesteps). The oldest queued edit leads: the queued edits of its loop join it in
queue order while their rows fit in `max_rows` (an edit of P prompts is 2P UNet rows per call; one larger than
`max_rows` runs alone). The batch runs when no more rows fit or when the oldest has waited `timeout_s` for
company; until then the worker sleeps for what is left of that wait. The oldest edit always leads, so none
waits behind later ones that keep arriving.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    max_rows: int  # --max-batch-rows
    timeout_s: float  # --batch-timeout-ms / 1000


def loop_key(spec) -> tuple:
    """What the edits of one `edit_batch` call must share."""
    return (spec.steps, spec.sampler, spec.latent_hw, spec.timesteps)


def take(queue, policy: Policy, now: float, force: bool = False) -> tuple[list, float | None]:
    """(the batch to run now, removed from `queue`, and None) or ([], seconds to wait before asking again).
    `force`: run what there is without waiting for company (shutting down)."""
    if not queue:
        return [], None
    lead = queue[0]
    key = loop_key(lead.spec)
    batch, rows, full = [lead], lead.rows, lead.rows >= policy.max_rows
    for job in list(queue)[1:]:
        if full:
            break
        if loop_key(job.spec) != key:
            continue
        if rows + job.rows > policy.max_rows:
            full = True
            break
        batch.append(job)
        rows += job.rows
        full = rows >= policy.max_rows
    waited = now - lead.created
    if not (full or force or waited >= policy.timeout_s):
        return [], policy.timeout_s - waited
    for job in batch:
        queue.remove(job)
    return batch, None
