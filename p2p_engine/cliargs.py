"""The command line's option values and shared option groups (argparse types raise usage errors, exit 2).

Kept apart from `cli.py` so that the commands read without the parsing details; only `cli.py` imports it.
"""
from __future__ import annotations

import argparse

DTYPES = ("float32", "float16", "bfloat16")
SAMPLERS = ("ddim", "pndm", "dpmsolver++")
METHODS = ("null_text", "direct", "negative_prompt", "ddim")  # inversion methods, as inversion.METHODS
PIE_METHODS = ("ddim", "null_text", "negative_prompt", "direct", "proximal")  # as pie.METHODS
PIE_TYPES = tuple(str(i) for i in range(10))
PIE_EDITORS = ("p2p", "masactrl", "pnp")  # as pie_runs.EDITORS


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def quantile(text: str) -> float:
    """Proximal guidance's quantile, in (0, 1] as `edit` takes it."""
    v = fraction(text)
    if v == 0.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def cross_steps(text: str):
    """`0.8`, or per-word fractions `default_=0.8,cat=0.4` (the reference's dict form)."""
    if "=" not in text:
        return fraction(text)
    out = {}
    for part in text.split(","):
        word, sep, value = part.partition("=")
        if not sep or not word.strip():
            raise argparse.ArgumentTypeError(f"expected WORD=FRACTION pairs separated by commas, got {text!r}")
        out[word.strip()] = fraction(value)
    out.setdefault("default_", 1.0)
    return out


def self_steps(text: str):
    """`0.4` (window 0..0.4) or `START,END`."""
    if "," not in text:
        return fraction(text)
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected FRACTION or START,END, got {text!r}")
    start, end = (fraction(p) for p in parts)
    if start > end:
        raise argparse.ArgumentTypeError(f"self-steps start {start} is after end {end}")
    return (start, end)


def reweight(text: str) -> tuple[str, float]:
    word, sep, value = text.partition("=")
    try:
        scale = float(value)
    except ValueError:
        scale = None
    if not sep or not word or scale is None:
        raise argparse.ArgumentTypeError(f"expected WORD=SCALE (e.g. fluffy=2.0), got {text!r}")
    return word, scale


def blend_words(entry: str, prompt: str) -> str | list[str]:
    """One --blend entry for one prompt: a word of the prompt, or several as cat,hat. Prompt words are split on
    spaces and matched whole, so a word may end in a comma ("a cat, on a mat" has "cat,"): a piece that is not a
    word of the prompt but is one with a comma after it takes the comma back ("cat," and "cat,,hat" both name
    "cat,")."""
    words = prompt.split(" ")
    if entry in words:
        return entry
    pieces = entry.split(",")
    out = []
    for i, piece in enumerate(pieces):
        if piece == "" and out and out[-1].endswith(","):
            continue  # the second comma of "cat,,hat": the first went back on "cat"
        if piece not in words and piece + "," in words and i + 1 < len(pieces):
            piece += ","
        out.append(piece)
    out = [p for p in out if p]
    if not out:
        raise ValueError(f"--blend: {entry!r} names no word of {prompt!r}")
    return out[0] if len(out) == 1 else out


def names(choices):
    """A comma-separated list of some of `choices` (e.g. --methods ddim,direct)."""
    def parse(text: str) -> list[str]:
        got = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in got if t not in choices]
        if not got or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return list(dict.fromkeys(got))
    return parse


def positive_int(text: str) -> int:
    return _int_from(text, 1, "a positive integer")


def count(text: str) -> int:
    """An integer >= 0 (an optional number of iterations: 0 runs none)."""
    return _int_from(text, 0, "an integer >= 0")


def _int_from(text: str, least: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def add_sampling_args(p: argparse.ArgumentParser, samplers: bool = True) -> None:
    if samplers:
        p.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                       help="ddim (default); pndm: PLMS as the stable notebook (steps + 1 UNet calls); "
                            "dpmsolver++: second order, for 20-25 steps")
    p.add_argument("--steps-offset", type=int, default=None, metavar="K",
                   help="offset of 'leading' timesteps (default: the checkpoint's, 1 for SD: 981 .. 1 at 50 "
                        "steps; 0 reproduces 980 .. 0)")


PREDICTION_TYPES = ("epsilon", "v_prediction")  # loading.PREDICTION_TYPES, without importing torch for --help


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers folder, single-file .safetensors, or 'toy'")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    add_prediction_type(p)


def add_prediction_type(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNet predicts, overriding the checkpoint's config (default: the config's; a "
                        "single file cannot say, and an SD 2.x single file is read as 768-v, v_prediction, so an "
                        "SD 2.x-base single file needs epsilon)")
