"""`Scorer`: the seven PIE-Bench metrics of one edit, with the networks loaded once from local weights.

    structure_distance   DINO ViT-B/8 key self-similarity MSE, whole images          (dino.py)
    psnr, mse, ssim      on the unedited part                                           (pixels.py)
    lpips                SqueezeNet LPIPS on the unedited part                          (lpips.py)
    clip_whole           CLIP score of the edit and the editing prompt                  (clip.py)
    clip_edited          CLIP score of uint8(edit x mask) and the editing prompt

A metric whose weights are missing is absent (`Scorer.absent` says which file and where to get it) while the
others are computed; a file that is there but unreadable or of the wrong shape is an error naming it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from . import weights as w
from .clip import VIT_L14, ClipScore
from .dino import VIT_B8, DinoViT, StructureDistance
from .lpips import Lpips, LpipsHeads
from .pixels import mse, psnr, ssim, unedited_part
from .squeezenet import SqueezeNet11

METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")


def load_dino(path, device=None) -> DinoViT:
    state = w.read_state_dict(path)
    try:
        config = DinoViT.config_of(state)
    except KeyError as e:
        raise w.CheckpointError(f"{path}: not a DINO ViT state dict (no {e}); give {w.DINO.pattern}") from None
    with torch.device("meta"):
        model = DinoViT(**config)
    return w.fill(model, state, path, device)


def load_lpips(net_path, heads_path, device=None) -> Lpips:
    with torch.device("meta"):
        net, heads = SqueezeNet11(), LpipsHeads()
    w.fill(net, w.read_state_dict(net_path), net_path, device)
    w.fill(heads, w.read_state_dict(heads_path), heads_path, device)
    return Lpips(net, heads).to(device or "cpu")


class Scorer:
    """Args: weights: the --metric-weights folder (weights.py) or None; clip_model: a CLIP folder that
    overrides weights/clip-vit-large-patch14; device: where the networks run (float32)."""

    def __init__(self, weights=None, device=None, clip_model=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.absent: dict[str, str] = {}
        self.notes: list[str] = []
        folder = Path(weights) if weights is not None else None
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"--metric-weights {folder} is not a folder")
        self.structure = self._structure(folder)
        self.lpips = self._lpips(folder)
        self.clip = self._clip(folder, clip_model)
        if folder is not None and (folder / w.STANDINS_MARKER).is_file():
            seed = json.loads((folder / w.STANDINS_MARKER).read_text()).get("seed")
            self.notes.append(f"{folder} holds random stand-in weights (seed {seed}, written by python -m "
                              f"p2p_engine.metrics.standins): structure distance, LPIPS and CLIP measure nothing")

    def _missing(self, folder, *files: w.WeightsFile) -> str | None:
        if folder is None:
            return "no --metric-weights DIR given; it needs " + "; ".join(f"{f.pattern} ({f.what}) from {f.source}"
                                                                        for f in files)
        gone = [f.missing(folder) for f in files if f.find(folder) is None]
        return "; ".join(gone) or None

    def _structure(self, folder) -> StructureDistance | None:
        why = self._missing(folder, w.DINO)
        if why:
            self.absent["structure_distance"] = f"structure distance: {why}"
            return None
        path = w.DINO.find(folder)
        model = load_dino(path, self.device)
        if model.config != VIT_B8:
            self.notes.append(f"structure distance: {path} holds a ViT of {model.config}, not DINO ViT-B/8 "
                              f"{VIT_B8}: its numbers do not compare with the published table")
        return StructureDistance(model)

    def _lpips(self, folder) -> Lpips | None:
        why = self._missing(folder, w.SQUEEZENET, w.LPIPS_HEADS)
        if why:
            self.absent["lpips"] = f"LPIPS: {why}"
            return None
        return load_lpips(w.SQUEEZENET.find(folder), w.LPIPS_HEADS.find(folder), self.device)

    def _clip(self, folder, clip_model) -> ClipScore | None:
        path = Path(clip_model) if clip_model is not None else None
        if path is None and folder is not None and (folder / w.CLIP_FOLDER).is_dir():
            path = folder / w.CLIP_FOLDER
        if path is None:
            where = "no --metric-weights DIR given" if folder is None else f"{folder / w.CLIP_FOLDER} not found"
            self.absent["clip_whole"] = self.absent["clip_edited"] = (
                f"CLIP: {where} (a transformers folder of openai/clip-vit-large-patch14: {w.CLIP_SOURCE})")
            return None
        clip = ClipScore(path, self.device)
        if clip.architecture != VIT_L14:
            self.notes.append(f"CLIP: {path} holds a vision tower of {clip.architecture}, not ViT-L/14 "
                              f"{VIT_L14}: its numbers do not compare with the published table")
        return clip

    def metrics(self) -> list[str]:
        return [m for m in METRICS if m not in self.absent]

    @torch.no_grad()
    def prepare(self, source: np.ndarray, mask: np.ndarray) -> dict:
        """What every edit of one source shares: its unedited part, LPIPS features and DINO self-similarity."""
        out = {"unedited": unedited_part(source, mask)}
        if self.lpips is not None and out["unedited"] is not None:
            out["lpips"] = self.lpips.features(out["unedited"].to(self.device) * 2 - 1)
        if self.structure is not None:
            out["similarity"] = self.structure.similarity(source)
        return out

    @torch.no_grad()
    def __call__(self, source: np.ndarray, edited: np.ndarray, mask: np.ndarray, prompt: str,
                 prepared: dict | None = None) -> dict[str, float]:
        """The metrics (those not absent) of `edited` against `source`: (H, W, 3) uint8 images, (H, W) 0/1
        mask of the edited region (border included), `prompt` the editing prompt without brackets."""
        prepared = prepared if prepared is not None else self.prepare(source, mask)
        out = {}
        if self.structure is not None:
            out["structure_distance"] = self.structure(source, edited, prepared["similarity"])
        a, b = prepared["unedited"], unedited_part(edited, mask)
        if a is None:  # nothing unedited: the reference's "nan"
            out.update({k: math.nan for k in ("psnr", "mse", "ssim")})
            if self.lpips is not None:
                out["lpips"] = math.nan
        else:
            out.update(psnr=psnr(a, b), mse=mse(a, b), ssim=ssim(a, b))
            if self.lpips is not None:
                out["lpips"] = float(self.lpips.distance(prepared["lpips"], b.to(self.device) * 2 - 1)[0])
        if self.clip is not None:
            out["clip_whole"] = self.clip(edited, prompt)
            out["clip_edited"] = self.clip(edited, prompt, mask) if mask.sum() > 0 else math.nan
        return {k: out[k] for k in METRICS if k in out}
