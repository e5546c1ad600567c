"""PIE-Bench: its files, its editing protocol run as dataset jobs, and the metrics that need no extra weights.

The files (REFERENCE.md, "PIE-Bench protocol"): PIE_DIR/mapping_file.json maps each key to an entry with
`image_path` (below PIE_DIR/annotation_images/), `original_prompt`, `editing_prompt` (edited words in
[brackets], stripped before use), `editing_instruction`, `editing_type_id` ("0".."9"), `blended_word`
("source_word target_word" or "") and `mask`, run-length pairs [start, length, ...] over the image's
flattened pixel grid, decoded with the border rows and columns set to 1 (the mask marks the edited region).

The protocol, per entry (PnPInversion's run_editing_p2p.py): invert the image with the source prompt, then edit
[source, target] from the inversion with 50 DDIM steps at guidance 7.5 (SDXL too), cross window 0.4, self window
0.6 on layers of up to 32 x 32 queries ((L/2)^2 for SDXL, at latent side L); Refine when the prompts' word counts
differ, else Replace; when blended words are given, LocalBlend(source word, target word; threshold 0.3, start 0.2)
and a Reweight of the target word by 2 stacked on the edit. A blended word missing from its prompt contributes
nothing, as in the reference (its mask row is empty, its reweight a no-op). Timesteps are the checkpoint's
(981 .. 1 for SD, as the reference's pipeline runs); `steps_offset` changes them.

Each method is one run of `jobs.run_jobs` (resumable, sharded under torchrun) into OUT/<method>/
(`pie_runs.run_pie`; with other editors, OUT/<editor>/<method>/):
    jobs.jsonl                                the protocol's jobs
    annotation_images/<image_path>            the edited image (the layout PnPInversion's evaluation reads)
    index.jsonl                               per entry: status, seconds, UNet evaluations
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import is_int
from .files import atomic_write

MAPPING_FILE = "mapping_file.json"
IMAGE_FOLDER = "annotation_images"
# method name -> (inversion method, edit options)
METHODS = {"ddim": ("ddim", {}), "null_text": ("null_text", {}), "negative_prompt": ("negative_prompt", {}),
           "direct": ("direct", {}), "proximal": ("negative_prompt", {"proximal": "l0", "quantile": 0.75})}
EDIT_TYPES = {"0": "random editing", "1": "change object", "2": "add object", "3": "delete object",
              "4": "change attribute content", "5": "change attribute pose", "6": "change attribute color",
              "7": "change attribute material", "8": "change background", "9": "change style"}
GUIDANCE, CROSS_STEPS, SELF_STEPS, SELF_MAX_QUERIES = 7.5, 0.4, 0.6, 32 * 32
BLEND_START, BLEND_THRESHOLD, REWEIGHT = 0.2, 0.3, 2.0
ENTRY_KEYS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "blended_word", "mask")


@dataclass(frozen=True)
class Entry:
    key: str
    image_path: str  # relative to PIE_DIR/annotation_images
    source: str  # prompts with the brackets stripped
    target: str
    type_id: str
    blended: tuple[str, str] | None
    mask: list  # run-length pairs

    @property
    def out(self) -> str:
        """Where a method's edited image goes, relative to OUT/<method>."""
        return f"{IMAGE_FOLDER}/{self.image_path}"


def clean(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


def read_mapping(pie_dir, types=None) -> list[Entry]:
    """The entries of PIE_DIR/mapping_file.json (in file order), of `types` only when given."""
    path = Path(pie_dir) / MAPPING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a PIE-Bench folder holds {MAPPING_FILE} and {IMAGE_FOLDER}/")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map keys to entries, got a {type(data).__name__}")
    out = []
    for key, item in data.items():
        _check_entry(path, key, item)
        if str(item["editing_type_id"]) not in EDIT_TYPES:
            raise ValueError(f"{path}: entry {key!r} has editing_type_id {item['editing_type_id']!r}, not one of "
                             f"{sorted(EDIT_TYPES)}")
        words = item["blended_word"].split(" ") if item["blended_word"] else []
        if words and len(words) != 2:
            raise ValueError(f"{path}: entry {key!r} has blended_word {item['blended_word']!r}; expected "
                             f"'source_word target_word' or ''")
        if types is not None and str(item["editing_type_id"]) not in types:
            continue
        out.append(Entry(key, item["image_path"], clean(item["original_prompt"]), clean(item["editing_prompt"]),
                         str(item["editing_type_id"]), tuple(words) if words else None, list(item["mask"])))
    return out


def _check_entry(path: Path, key, item) -> None:
    """Raise ValueError naming the entry and field of the mapping file that has the wrong type."""
    if not isinstance(item, dict):
        raise ValueError(f"{path}: entry {key!r} must be an object with {list(ENTRY_KEYS)}, got {item!r}")
    missing = [k for k in ENTRY_KEYS if k not in item]
    if missing:
        raise ValueError(f"{path}: entry {key!r} lacks {missing}")
    for name in ("image_path", "original_prompt", "editing_prompt", "blended_word"):
        if not isinstance(item[name], str) or (name == "image_path" and not item[name]):
            raise ValueError(f"{path}: entry {key!r} has {name} {item[name]!r}; expected a string")
    mask = item["mask"]
    if not (isinstance(mask, list) and len(mask) % 2 == 0
            and all(is_int(v) and v >= 0 for v in mask)):
        raise ValueError(f"{path}: entry {key!r} has mask {str(mask)[:60]!r}; expected run-length pairs "
                         f"[start, length, ...] of integers >= 0")


# -- masks ----------------------------------------------------------------------------------------

def mask_decode(encoded, shape=(512, 512)) -> np.ndarray:
    """The reference's mask_decode: (H, W) float 0/1 from [start, length, ...] over the flattened image,
    runs cut at the end of the image, the border rows and columns set to 1."""
    h, w = shape
    flat = np.zeros(h * w)
    for start, length in zip(encoded[0::2], encoded[1::2]):
        flat[start:start + max(0, min(length, h * w - start))] = 1
    mask = flat.reshape(h, w)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def mask_encode(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> run-length pairs [start, length, ...] over the flattened image (mask_decode's input)."""
    flat = np.concatenate([[0], np.asarray(mask, bool).reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


# -- the protocol as jobs ---------------------------------------------------------------------------

def protocol_job(entry: Entry, pie_dir, self_limit: int = SELF_MAX_QUERIES) -> dict:
    """The job (`jobs.py` format) that edits one entry by the protocol (self replacement up to `self_limit`)."""
    mode = "replace" if len(entry.source.split(" ")) == len(entry.target.split(" ")) else "refine"
    controller = {"mode": mode, "cross_steps": CROSS_STEPS, "self_steps": SELF_STEPS,
                  "self_max_queries": self_limit}
    job = {"image": str((Path(pie_dir) / IMAGE_FOLDER / entry.image_path).resolve()), "prompt": entry.source,
           "edits": [entry.target], "controller": controller, "out": entry.out}
    if entry.blended is not None:
        src_word, tgt_word = entry.blended
        # a word missing from its prompt blends nothing and re-weights nothing, as the reference's lookups
        job["blend"] = {"words": [[src_word] if src_word in entry.source.split(" ") else [],
                                  [tgt_word] if tgt_word in entry.target.split(" ") else []],
                        "start": BLEND_START, "threshold": BLEND_THRESHOLD}
        if tgt_word in entry.target.split(" "):
            controller["equalizer"] = {tgt_word: REWEIGHT}
    return job


# -- metrics ----------------------------------------------------------------------------------------

def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x / sigma) ** 2 / 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W, 3) float images in [0, 1] as torchmetrics' StructuralSimilarityIndexMeasure(data_range=1)
    computes it (the reference's metric): an 11 x 11 Gaussian window (sigma 1.5) on reflect-padded images, the
    index averaged over the pixels away from the border (5 on each side), k1 0.01, k2 0.03."""
    x = torch.from_numpy(np.ascontiguousarray(a, np.float64)).permute(2, 0, 1)[None]
    y = torch.from_numpy(np.ascontiguousarray(b, np.float64)).permute(2, 0, 1)[None]
    c = x.shape[1]
    pad = 5
    x, y = (torch.nn.functional.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    win = _gaussian_window().expand(c, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, win, groups=c)

    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx * mx).clamp(min=0)
    vy = (blur(y * y) - my * my).clamp(min=0)
    cov = blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[..., pad:-pad, pad:-pad].mean())


def unedited_metrics(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> dict:
    """PSNR, MSE and SSIM on the unedited part, as the reference computes them: both images (H, W, 3) uint8
    scaled to [0, 1] and multiplied by 1 - mask, then compared whole."""
    keep = (1 - mask)[:, :, None].astype(np.float32)
    if keep.sum() == 0:
        return {"psnr": math.nan, "mse": math.nan, "ssim": math.nan}
    a = source.astype(np.float32) / 255 * keep
    b = edited.astype(np.float32) / 255 * keep
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return {"psnr": math.inf if mse == 0 else 10 * math.log10(1.0 / mse), "mse": mse, "ssim": ssim(a, b)}


class ClipSimilarity:
    """CLIP similarity of an image (or its edited part) with a prompt, as the reference's torchmetrics CLIPScore:
    100 * max(cos(image features, text features), 0). `path` is a local transformers CLIP folder (the reference
    uses openai/clip-vit-large-patch14); nothing is downloaded."""

    def __init__(self, path, device=None):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers CLIP folder (config.json, weights, tokenizer and "
                                    f"preprocessor files): give the folder of openai/clip-vit-large-patch14")
        self.device = torch.device(device or "cpu")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ValueError(f"{path}: cannot load a transformers CLIP model from it ({e}); give the folder of "
                             f"openai/clip-vit-large-patch14") from None

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> float:
        if mask is not None:
            image = (image * mask[:, :, None]).astype(np.uint8)
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5 returns output objects
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
        return 100 * max(cos, 0.0)


ABSENT = {"lpips": "LPIPS needs torchvision's SqueezeNet and the LPIPS heads (the reference: net_type 'squeeze')",
          "structure_distance": "structure distance needs DINO ViT-B/8 (the reference: dino_vitb8 self-similarity)"}


def _index_by_output(folder: Path) -> dict[str, dict]:
    from .manifest import INDEX, _read_index

    by_out = {}
    for line in _read_index(folder / INDEX):
        for name in (line.get("outputs") or {}).get("edits", []):
            by_out[name] = line
        if line.get("status") != "ok" and line.get("out"):
            by_out.setdefault(line["out"], line)
    return by_out


def evaluate(pie_dir, out, methods=None, *, types=None, clip: ClipSimilarity | None = None,
             extra: dict | None = None) -> list[dict]:
    """Per image and method: the unedited part's PSNR, MSE, SSIM; seconds and UNet evaluations from the run's
    index; CLIP similarities when `clip` is given; `extra` {name: fn(entry, source, edited) -> float}.
    Rows of entries a method was run for but did not finish carry status "missing" or "error"; entries its runs
    left out (`pie --types`) have no rows."""
    from .images import load_image
    from .manifest import read_jobs

    pie_dir, out = Path(pie_dir), Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not the output folder of a `p2p-engine pie` run")
    methods = methods or sorted(p.name for p in out.iterdir() if (p / "jobs.jsonl").is_file())
    if not methods:
        raise FileNotFoundError(f"{out} holds no method folders (OUT/<method>/jobs.jsonl); run `p2p-engine pie` first")
    never = [m for m in methods if not (out / m / "jobs.jsonl").is_file()]
    if never:
        raise ValueError(f"{never} never ran into {out} (no OUT/<method>/jobs.jsonl): run `p2p-engine pie --methods "
                         f"{','.join(never)}` first, or leave them out of --methods")
    entries = read_mapping(pie_dir, types)
    rows = []
    for method in methods:
        index = _index_by_output(out / method)
        # what its runs were asked for: the last job file's outputs and every one the index records
        asked = {j.spec.get("out") for j in read_jobs(out / method / "jobs.jsonl")} | set(index)
        for e in (e for e in entries if e.out in asked):
            row = {"method": method, "key": e.key, "type": e.type_id}
            line = index.get(e.out)
            edited_path = out / method / e.out
            if line is None or line.get("status") != "ok" or not edited_path.is_file():
                row["status"] = "missing" if line is None or line.get("status") in ("ok", None) else line["status"]
                rows.append(row)
                continue
            source = load_image(pie_dir / IMAGE_FOLDER / e.image_path)
            edited = load_image(edited_path)
            if source.shape != edited.shape:
                raise ValueError(f"{edited_path} is {edited.shape[1]} x {edited.shape[0]} but its source is "
                                 f"{source.shape[1]} x {source.shape[0]}: edit at the benchmark's resolution")
            mask = mask_decode(e.mask, source.shape[:2])
            row.update(status="ok", **unedited_metrics(source, edited, mask), seconds=line.get("seconds"))
            cost = line.get("unet_evaluations") or {}
            if cost:  # a backward pass costs about two forwards
                row["unet_evaluations"] = cost["inversion"] + 2 * cost["inversion_backward"] + cost["edit"]
                row["inversion_evaluations"] = cost["inversion"] + 2 * cost["inversion_backward"]
            if clip is not None:
                row["clip_whole"] = clip(edited, e.target)
                row["clip_edited"] = clip(edited, e.target, mask)
            for name, fn in (extra or {}).items():
                row[name] = fn(e, source, edited)
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Means per (method, edit type) and per method over all types ("all"), ignoring missing values."""
    def mean(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return float(np.mean([float(v) for v in vals])) if vals else None

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["type"]), []).append(r)
        groups.setdefault((r["method"], "all"), []).append(r)
    out = []
    metrics = [k for k in ("psnr", "mse", "ssim", "clip_whole", "clip_edited", "seconds", "unet_evaluations",
                           "inversion_evaluations") if any(k in r for r in rows)]
    metrics += sorted({k for r in rows for k in r} - set(metrics) - {"method", "key", "type", "status"})
    for (method, t), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1])):
        ok = [r for r in group if r.get("status") == "ok"]
        s = {"method": method, "type": t, "images": len(ok), "failed": len(group) - len(ok)}
        for k in metrics:
            s[k] = mean(r.get(k) for r in ok)
        out.append(s)
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table (MSE x 1e4 and SSIM x 1e2, as the paper prints them)."""
    keys = [k for k in summary[0] if k not in ("method", "type", "images", "failed")] if summary else []
    head = {"psnr": "PSNR (unedited)", "mse": "MSE x1e4", "ssim": "SSIM x1e2", "clip_whole": "CLIP whole",
            "clip_edited": "CLIP edited", "seconds": "s / image", "unet_evaluations": "UNet evals / image",
            "inversion_evaluations": "of which inversion"}
    scale = {"mse": 1e4, "ssim": 1e2}
    lines = ["| method | edit type | images | " + " | ".join(head.get(k, k) for k in keys) + " |",
             "|---" * (3 + len(keys)) + "|"]
    for s in summary:
        cells = []
        for k in keys:
            v = s[k]
            cells.append("-" if v is None else f"{v * scale.get(k, 1):.{0 if 'evaluations' in k else 2}f}")
        kind = "all" if s["type"] == "all" else f"{s['type']} {EDIT_TYPES[s['type']]}"
        n = f"{s['images']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {s['method']} | {kind} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path, rows: list[dict]) -> None:
    import csv
    import io

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
