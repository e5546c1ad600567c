"""Means of the per-image rows (`runs.evaluate`) and the tables `pie-metrics` prints and writes.

The grid: one row per editor and method, the seven metrics at the published table's scales (structure
distance and LPIPS x 10^3, MSE x 10^4, SSIM x 10^2), then seconds and UNet evaluations per image. NaN values
(an entry with nothing unedited) are left out of means, as the reference's means skip them.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from ..files import atomic_write
from ..pie import EDIT_TYPES
from .scorer import METRICS

COSTS = ("seconds", "unet_evaluations", "inversion_evaluations")
HEADS = {"structure_distance": "Structure distance x1e3", "psnr": "PSNR", "lpips": "LPIPS x1e3",
         "mse": "MSE x1e4", "ssim": "SSIM x1e2", "clip_whole": "CLIP whole", "clip_edited": "CLIP edited",
         "seconds": "s / image", "unet_evaluations": "UNet evals / image",
         "inversion_evaluations": "of which inversion"}
SCALES = {"structure_distance": 1e3, "lpips": 1e3, "mse": 1e4, "ssim": 1e2}
GROUP = ("editor", "method", "type", "images", "failed")


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def summarize(rows: list[dict]) -> list[dict]:
    """Means per (editor, method, edit type) and per (editor, method) over all types ("all")."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["editor"], r["method"], r["type"]), []).append(r)
        groups.setdefault((r["editor"], r["method"], "all"), []).append(r)
    keys = [k for k in (*METRICS, *COSTS) if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys) - {"editor", "method", "key", "type", "status"})
    out = []
    for (editor, method, t), group in sorted(groups.items(), key=lambda kv: (*kv[0][:2], kv[0][2] == "all",
                                                                              kv[0][2])):
        ok = [r for r in group if r.get("status") == "ok"]
        s = {"editor": editor, "method": method, "type": t, "images": len(ok), "failed": len(group) - len(ok)}
        s.update({k: _mean(r.get(k) for r in ok) for k in keys})
        out.append(s)
    return out


def _cell(key: str, value, absent) -> str:
    if key in absent:
        return "absent"
    if value is None:
        return "-"
    if key.endswith("evaluations"):
        return f"{value:.0f}"
    if key == "edit_success":
        return f"{value:.0%}"
    return f"{value * SCALES.get(key, 1):.2f}"


def table(summary: list[dict], absent=(), by_type: bool = False) -> str:
    """The grid (by_type False: the "all" rows) or the per-type table, as markdown. `absent`: the metrics
    whose weights were missing (their cells say so)."""
    rows = [s for s in summary if (s["type"] != "all") == by_type]
    keys = [k for k in (*METRICS, *COSTS) if k in absent or any(s.get(k) is not None for s in rows)]
    keys += [k for k in (rows[0] if rows else {}) if k not in keys and k not in GROUP and k not in METRICS + COSTS]
    first = ["editor", "method"] + (["edit type"] if by_type else []) + ["images"]
    lines = ["| " + " | ".join(first + [HEADS.get(k, k.replace("_", " ")) for k in keys]) + " |",
             "|---" * (len(first) + len(keys)) + "|"]
    for s in rows:
        kind = [f"{s['type']} {EDIT_TYPES[s['type']]}"] if by_type else []
        n = f"{s['images']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        cells = [_cell(k, s.get(k), absent) for k in keys]
        lines.append("| " + " | ".join([s["editor"] or "-", s["method"], *kind, n, *cells]) + " |")
    return "\n".join(lines)


def write_csv(path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
