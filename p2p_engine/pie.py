"""PIE-Bench: its files and its editing protocol run as dataset jobs (the metrics: p2p_engine/metrics/).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import is_int

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
