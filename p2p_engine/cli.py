"""The `p2p-engine` command line (also `python -m p2p_engine`).

Subcommands: `random-checkpoint`, `edit`, `invert`, `maps`, `bench`, and `run` (dataset jobs, defined in
`jobs.py`).
Exit status: 0 on success, 1 when an input or job failed (one clear line on
stderr, no traceback), 2 for a usage error (argparse's own convention).

The engine is imported inside each command, not at module level, so that
`--help` answers at once and a broken optional part cannot break the others.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = ("float32", "float16", "bfloat16")
PRESET_NAMES = ("tiny", "tiny-v", "sd15", "sd21")


def _save_png(image, path: Path) -> None:
    from .images import save_png_atomic  # torch and PIL load only when a command runs, not for --help
    save_png_atomic(image, path)


class UserError(Exception):
    """An input the user must fix; printed as one line, exit status 1."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The engine's errors that mean "bad input", not "bug": caught and printed without a traceback."""
    errs: list[type[BaseException]] = [UserError, ValueError, FileNotFoundError, IsADirectoryError,
                                       NotADirectoryError, PermissionError]
    for mod in ("p2p_engine", "p2p_engine.loading", "p2p_engine.checkpoint"):
        try:
            module = __import__(mod, fromlist=["CheckpointError"])
        except Exception:  # a part not built yet must not hide the user's real error
            continue
        err = getattr(module, "CheckpointError", None)
        if isinstance(err, type) and issubclass(err, BaseException) and err not in errs:
            errs.append(err)
    return tuple(errs)


# -- argument types: a malformed value is a usage error (exit 2), caught by argparse

def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def _cross_steps(text: str):
    """`0.8`, or per-word fractions `default_=0.8,cat=0.4` (the reference's dict form)."""
    if "=" not in text:
        return _fraction(text)
    out = {}
    for part in text.split(","):
        word, sep, value = part.partition("=")
        if not sep or not word.strip():
            raise argparse.ArgumentTypeError(f"expected WORD=FRACTION pairs separated by commas, got {text!r}")
        out[word.strip()] = _fraction(value)
    out.setdefault("default_", 1.0)
    return out


def _self_steps(text: str):
    """`0.4` (window 0..0.4) or `START,END`."""
    if "," not in text:
        return _fraction(text)
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected FRACTION or START,END, got {text!r}")
    start, end = (_fraction(p) for p in parts)
    if start > end:
        raise argparse.ArgumentTypeError(f"self-steps start {start} is after end {end}")
    return (start, end)


def _reweight(text: str) -> tuple[str, float]:
    word, sep, value = text.partition("=")
    try:
        scale = float(value)
    except ValueError:
        scale = None
    if not sep or not word or scale is None:
        raise argparse.ArgumentTypeError(f"expected WORD=SCALE (e.g. fluffy=2.0), got {text!r}")
    return word, scale


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# -- shared helpers

def _load(args):
    import torch

    import p2p_engine as p2p

    model = args.model
    if model != "toy" and not Path(model).exists():
        raise UserError(f"model path {model!r} does not exist (give a diffusers folder, a .safetensors "
                        f"checkpoint, or 'toy'; `p2p-engine random-checkpoint` makes one to try)")
    return p2p.load(model, device=args.device, dtype=getattr(torch, args.dtype), backend=args.backend)


def _check_out(path: str, suffix: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise UserError(f"--out {path!r} must end in {suffix}")
    if out.parent and not out.parent.exists():
        raise UserError(f"the folder of --out {path!r} does not exist")
    return out


def _side_by_side(images):
    """One PIL image with `images` left to right, no gaps: P images of W pixels give P * W."""
    from PIL import Image
    w = sum(im.width for im in images)
    h = max(im.height for im in images)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return canvas


def _progress_kwargs(fn) -> dict:
    """Ask for the engine's progress bar where the entry point offers one (keyword `progress`)."""
    import inspect
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"progress": True}
    return {}


def _call_with_progress(fn, *args, **kwargs):
    extra = _progress_kwargs(fn)
    try:
        return fn(*args, **kwargs, **extra)
    except TypeError as e:
        # **kwargs forwarders may reach a callee without `progress`; retry plainly rather than fail the run.
        if extra and "progress" in str(e):
            return fn(*args, **kwargs)
        raise


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers folder, single-file .safetensors, or 'toy'")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))


# -- subcommands

def cmd_random_checkpoint(args) -> int:
    import p2p_engine as p2p

    out = Path(args.path)
    if out.exists() and not args.overwrite:
        raise UserError(f"{args.path!r} already exists; pass --overwrite or choose another path")
    p2p.save_random_checkpoint(str(out), args.preset, seed=args.seed, layout=args.layout)
    print(f"wrote a random {args.preset} checkpoint ({args.layout}) to {out}")
    return EXIT_OK


def _controller(args, p2p):
    kw = {"cross_steps": args.cross_steps, "self_steps": args.self_steps}
    equalizer = dict(args.reweight or [])
    if args.mode == "reweight":
        if not equalizer:
            raise UserError("--mode reweight needs at least one --reweight WORD=SCALE")
        return p2p.Reweight(equalizer=equalizer, **kw)
    base = (p2p.Replace if args.mode == "replace" else p2p.Refine)(**kw)
    # --reweight with replace/refine stacks the reweight on the word edit, as the reference's `controller=prev`.
    return p2p.Reweight(equalizer=equalizer, prev=base, **kw) if equalizer else base


def cmd_edit(args) -> int:
    import p2p_engine as p2p

    out_path = _check_out(args.out, ".png")
    inversion = None
    if args.inversion is not None:
        if not Path(args.inversion).is_file():
            raise UserError(f"inversion file {args.inversion!r} does not exist (make one with `p2p-engine invert`)")
        inversion = p2p.Inversion.load(args.inversion)
    prompt = args.prompt if args.prompt is not None else getattr(inversion, "prompt", None)
    if prompt is None:
        raise UserError("--prompt is required (unless --inversion gives the source prompt)")
    targets = list(args.target or [])
    if not targets and args.mode != "reweight":
        raise UserError(f"--mode {args.mode} needs at least one --target prompt")
    prompts = [prompt] + (targets or [prompt])  # a reweight of the prompt itself edits a copy of it

    pipe = _load(args)
    controller = _controller(args, p2p)
    kwargs = dict(controller=controller, seed=args.seed, steps=args.steps, guidance=args.guidance)
    if args.blend:
        # one entry per prompt, source first; "cat,hat" blends several words of one prompt
        kwargs["local_blend"] = p2p.LocalBlend([w.split(",") if "," in w else w for w in args.blend])
    if inversion is not None:
        kwargs["inversion"] = inversion
    out = _call_with_progress(pipe.edit, prompts, **kwargs)
    _save_png(_side_by_side(out.images), out_path)
    print(f"wrote {len(out.images)} images side by side to {out_path}")
    return EXIT_OK


def cmd_invert(args) -> int:
    out_path = Path(args.out)
    if not out_path.name.endswith(".safetensors"):
        raise UserError(f"--out {args.out!r} must end in .safetensors")
    if not out_path.parent.exists():
        raise UserError(f"the folder of --out {args.out!r} does not exist")
    strip_path = _check_out(args.strip, ".png") if args.strip else None
    if not Path(args.image).is_file():
        raise UserError(f"image {args.image!r} does not exist")

    pipe = _load(args)
    inv = _call_with_progress(pipe.invert, args.image, args.prompt, steps=args.steps,
                              inner_steps=args.inner_steps, method=args.method, guidance=args.guidance)
    inv.save(str(out_path))
    print(f"wrote the {args.method} inversion of {args.image} to {out_path}")
    if strip_path is not None:
        _save_png(_reconstruction_strip(pipe, args, inv), strip_path)
        print(f"wrote the strip input | VAE reconstruction | {args.method} reconstruction to {strip_path}")
    return EXIT_OK


def _reconstruction_strip(pipe, args, inv):
    """input | VAE reconstruction | inversion reconstruction, as in the null-text paper's figures."""
    import torch

    from .images import prepare, strip, to_pil
    from .inversion import decode_latents, encode_image

    x = prepare(args.image, pipe.config.image_size)  # (1, 3, S, S) in [-1, 1]: what the inversion encoded
    with torch.no_grad():
        rec = decode_latents(pipe, encode_image(pipe, x))  # (1, 3, S, S) in [-1, 1]
    out = _call_with_progress(pipe.edit, [inv.prompt], controller=None, steps=inv.null_embeddings.shape[0],
                              guidance=getattr(inv, "guidance", args.guidance), inversion=inv)
    return strip([to_pil(x)[0], to_pil(rec.float())[0], out.images[0]],
                 ["input", "VAE reconstruction", f"{args.method} reconstruction"])


def cmd_maps(args) -> int:
    import p2p_engine as p2p

    out_path = _check_out(args.out, ".png")
    pipe = _load(args)
    prompts = list(args.prompt)
    out = _call_with_progress(pipe.edit, prompts, controller=p2p.Store(), seed=args.seed, steps=args.steps,
                              guidance=args.guidance)
    maps = out.attention.cross(res=args.res)  # (P, res, res, 77), summed over steps, averaged over heads
    ids = pipe.tokenize(prompts)  # (P, 77)
    rows = []
    for i, prompt in enumerate(prompts):
        tokens = _prompt_tokens(pipe.tokenizer, ids[i].tolist())
        rows.append(_heat_row(out.images[i], maps[i], tokens))
    _save_png(_stack_rows(rows), out_path)
    print(f"wrote {sum(len(r) - 1 for r in rows)} token maps at {args.res}x{args.res} to {out_path}")
    return EXIT_OK


def _prompt_tokens(tokenizer, ids: list[int]) -> list[tuple[int, str]]:
    """(position, text) of the prompt's own tokens: BOS, EOS and padding left out; positions count BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for pos, tok in enumerate(ids):
        if pos == 0 and tok == bos:
            continue
        if tok == eos:
            break
        text = tokenizer.decode([tok]).strip() or tokenizer.convert_ids_to_tokens(tok)
        out.append((pos, text))
    return out


def _heat_row(image, maps, tokens):
    """[image, heat map of token 1 over the image, ...]; each map scaled to its own max, as the reference shows."""
    import numpy as np
    import torch
    from PIL import Image

    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    h, w = base.shape[:2]
    tiles = [(image.convert("RGB"), "image")]  # the row's first tile: the generated image itself
    for pos, text in tokens:
        m = maps[..., pos].float()[None, None]  # (1, 1, res, res)
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)
        heat = _colormap(m.cpu().numpy())  # (H, W, 3)
        mixed = 0.45 * base + 0.55 * heat
        tiles.append((Image.fromarray((mixed * 255).round().astype(np.uint8)), text))
    return tiles


def _colormap(v):
    """A small blue-cyan-yellow-red ramp for values in [0, 1] -> (H, W, 3) floats."""
    import numpy as np
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def _stack_rows(rows):
    """Labelled tiles, one prompt per row, into one picture."""
    from PIL import Image, ImageDraw

    label_h = 14
    tile_w = max(im.width for row in rows for im, _ in row)
    tile_h = max(im.height for row in rows for im, _ in row)
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * tile_w, len(rows) * (tile_h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (tile_h + label_h)
        for c, (im, text) in enumerate(row):
            canvas.paste(im, (c * tile_w, y))
            draw.text((c * tile_w + 2, y + tile_h + 1), text[: max(1, tile_w // 6)], fill="black")
    return canvas


def cmd_bench(args) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "common.py").is_file():
        raise UserError("the benchmarks/ folder is not next to this installation; run from a source checkout "
                        "(pip install -e .)")
    import importlib.util
    if importlib.util.find_spec("diffusers") is None:
        raise UserError("the benchmarks compare against diffusers, which is not installed "
                        "(pip install 'p2p-engine[test]')")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.common import run_suite

    return run_suite(only=args.only, smoke=args.smoke, device=args.device, record=not args.no_record)


# -- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-engine",
                                     description="Prompt-to-Prompt editing and null-text inversion for Stable "
                                                 "Diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("random-checkpoint", help="write a checkpoint of random weights for a preset",
                       description="Write a checkpoint of random weights (with a real CLIP tokenizer) to try the "
                                   "engine before you have real weights.")
    p.add_argument("path", help="output folder (diffusers layout) or .safetensors file (single_file)")
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="diffusers", choices=("diffusers", "single_file"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at PATH")
    p.set_defaults(func=cmd_random_checkpoint)

    p = sub.add_parser("edit", help="edit an image with Prompt-to-Prompt; writes the images side by side",
                       description="Generate the source prompt and its edits with shared attention; writes the "
                                   "images (source first) side by side in one PNG.")
    _add_model_args(p)
    p.add_argument("--prompt", help="source prompt (default: the prompt stored in --inversion)")
    p.add_argument("--target", action="append", metavar="PROMPT", help="edited prompt (repeatable)")
    p.add_argument("--mode", default="replace", choices=("replace", "refine", "reweight"),
                   help="replace: word swap (same word count); refine: added words; reweight: scale words")
    p.add_argument("--cross-steps", type=_cross_steps, default=0.8,
                   help="fraction of steps with cross-attention injection, or default_=F,WORD=F,...")
    p.add_argument("--self-steps", type=_self_steps, default=0.4, help="fraction of steps, or START,END")
    p.add_argument("--blend", nargs="+", metavar="WORD", help="local blend: change only these words' region; one word per prompt, source first "
                        "(--blend cat dog), several as cat,hat")
    p.add_argument("--reweight", action="append", type=_reweight, metavar="WORD=SCALE",
                   help="scale a word's attention in the targets (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--inversion", metavar="FILE", help="edit a real image inverted by `p2p-engine invert`")
    p.add_argument("--out", default="out.png", help="output PNG")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="invert a real image (null-text inversion) to a .safetensors file",
                       description="Invert a real image so that `p2p-engine edit --inversion FILE` can edit it.")
    _add_model_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help="a prompt describing the image")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--inner-steps", type=_positive_int, default=10, help="null-text optimisation steps per step")
    p.add_argument("--method", default="null_text", choices=("null_text", "negative_prompt", "ddim"))
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--strip", metavar="PNG", help="also write input | VAE reconstruction | inversion reconstruction")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("maps", help="save a picture grid of per-token cross-attention maps",
                       description="Generate the prompts, store their cross-attention maps, and write one row per "
                                   "prompt: the image, then each token's heat map over it, labelled by token.")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--res", type=int, default=16, choices=(8, 16, 32, 64), help="map resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default="maps.png", help="output PNG")
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("bench", help="run the benchmark suite (CPU: a smoke run on the tiny preset)",
                       description="Benchmarks against diffusers. Without a GPU this is a smoke run on the tiny "
                                   "preset whose numbers mean nothing for GPU use.")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark (unet, pipeline, ...)")
    p.add_argument("--smoke", action="store_true", help="tiny preset and few steps, even on a GPU")
    p.add_argument("--device", default=None)
    p.add_argument("--no-record", action="store_true", help="do not append GPU results to benchmarks/results.csv")
    p.set_defaults(func=cmd_bench)

    # `run JOBS.jsonl` (dataset jobs) is defined beside its implementation; absent from a build without it.
    try:
        from .jobs import add_run_parser
    except ImportError:
        add_run_parser = None
    if add_run_parser is not None:
        add_run_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on a usage error
    try:
        return args.func(args)
    except _user_errors() as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and e.filename not in msg:
            msg = f"{e.strerror or 'no such file'}: {e.filename}"
        print(f"p2p-engine {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"p2p-engine {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
