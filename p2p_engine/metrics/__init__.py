"""PIE-Bench's seven metrics, computed as cure-lab/PnPInversion's evaluation/evaluate.py and
matrics_calculator.py compute them (quirks included), from local weights files.

    weights.py      which files `--metric-weights DIR` holds, where to get them, reading them
    pixels.py       the unedited part (the mask recipe); PSNR, MSE, SSIM as torchmetrics
    squeezenet.py   SqueezeNet 1.1 (torchvision's names)           lpips.py   LPIPS v0.1 on it
    dino.py         DINO ViT-B/8 (DINO's names); structure distance and its input quirk
    clip.py         CLIP score (transformers' CLIPModel)
    scorer.py       `Scorer`: the seven metrics of one edit, absent ones named
    runs.py         the runs of an output folder (ours, per editor, PnPInversion's) and their scores
    report.py       means, the grid table, CSV
    standins.py     random stand-in weights in the publishers' formats (tests, the toy grid)

The networks are plain torch with the publishers' parameter names (torchvision, timm, torchmetrics and lpips
are not needed); docs/pie.md describes each recipe and quirk.
"""
from .report import summarize, table, write_csv
from .runs import evaluate, find_runs
from .scorer import METRICS, Scorer

__all__ = ["METRICS", "Scorer", "evaluate", "find_runs", "summarize", "table", "write_csv"]
