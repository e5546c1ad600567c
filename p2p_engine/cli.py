"""The `p2p-engine` command line (also `python -m p2p_engine`).

Subcommands: `random-checkpoint`, `edit`, `invert`, `maps`, `bench`, `run` (dataset jobs, `jobs.py`),
`pie` / `pie-metrics` (the PIE-Bench protocol and its metrics, `pie.py`, `pie_runs.py` and `metrics/`), and
`serve` (the HTTP service, `serve/`).
The top of the package: it imports the engine's modules, and none of them imports it.
Exit status: 0 on success, 1 when an input or job failed (one clear line on
stderr, no traceback), 2 for a usage error (argparse's own convention).

The engine is imported inside each command, not at module level, so that
`--help` answers at once and a broken optional part cannot break the others.
A little longer than 400 lines: one function and one parser section per
subcommand, eight of them; their option types live in `cliargs.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cliargs import (DTYPES, METHODS, PIE_EDITORS, PIE_METHODS, PIE_TYPES, add_model_args, add_prediction_type,
                      add_sampling_args, blend_words, count, cross_steps, names, positive_int, quantile, reweight,
                      self_steps)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PRESET_NAMES = ("tiny", "tiny-sd", "tiny-v", "tiny-sdxl", "sd15", "sd21", "sdxl")


def _save_png(image, path: Path) -> None:
    from .images import save_image_atomic  # torch and PIL load only when a command runs, not for --help
    save_image_atomic(image, path)


class UserError(Exception):
    """An input the user must fix; printed as one line, exit status 1."""


# The engine's errors that mean "bad input", not "bug": printed as one line, exit status 1. Loading's
# CheckpointError is a ValueError.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


# -- shared helpers

def _load(args):
    import torch

    import p2p_engine as p2p

    model = args.model
    if model != "toy" and not Path(model).exists():
        raise UserError(f"model path {model!r} does not exist (give a diffusers folder, a .safetensors "
                        f"checkpoint, or 'toy'; `p2p-engine random-checkpoint` makes one to try)")
    return p2p.load(model, device=args.device, dtype=getattr(torch, args.dtype), backend=args.backend,
                    prediction_type=args.prediction_type)


def _check_out(path: str, suffix: str, flag: str = "--out") -> Path:
    """The output file a flag names, checked before any work: its suffix, its folder, and not a folder itself."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise UserError(f"{flag} {path!r} must end in {suffix}")
    if out.parent and not out.parent.exists():
        raise UserError(f"the folder of {flag} {path!r} does not exist")
    if out.is_dir():
        raise UserError(f"{flag} {path!r} is a folder; give a file name")
    return out


def _check_in(path: str, what: str, hint: str = "") -> Path:
    """An input file, checked: it exists and is a file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {path!r} is a folder, not a file")
    if not p.is_file():
        raise UserError(f"{what} {path!r} does not exist{hint}")
    return p


# -- subcommands

def cmd_random_checkpoint(args) -> int:
    import p2p_engine as p2p

    out = Path(args.path)
    if out.exists() and not args.overwrite:
        raise UserError(f"{args.path!r} already exists; pass --overwrite or choose another path")
    if out.exists():  # --overwrite replaces a checkpoint of the same layout, nothing else
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise UserError(f"{args.path!r} holds the current folder; it cannot be replaced")
        folder = args.layout == "diffusers"
        if folder and not (out / "model_index.json").is_file():
            raise UserError(f"{args.path!r} is not a diffusers checkpoint folder (no model_index.json); "
                            "--overwrite replaces only a checkpoint, so choose another path")
        if not folder and not (out.is_file() and out.suffix == ".safetensors"):
            raise UserError(f"{args.path!r} is not a .safetensors file; --overwrite replaces only a checkpoint, "
                            "so choose another path")
    p2p.save_random_checkpoint(str(out), args.preset, seed=args.seed, layout=args.layout)
    print(f"wrote a random {args.preset} checkpoint ({args.layout}) to {out}")
    return EXIT_OK


# The controller flags each --mode reads (its defaults where left out); another mode's flag is refused.
MODE_FLAGS = {"p2p": {"cross_steps": 0.8, "self_steps": 0.4, "reweight": None},
              "masactrl": {"start_step": None, "start_layer": None},
              "pnp": {"feature_steps": None, "self_steps": None, "branch": None, "negative_prompt": None}}


def _controller(args):
    """The controller of the edit flags, through the dict form the job files use."""
    from .controllers import from_spec

    kind = args.mode if args.mode in MODE_FLAGS else "p2p"
    flags = MODE_FLAGS[kind]
    given = {f: getattr(args, f) for f in {f for fs in MODE_FLAGS.values() for f in fs} if getattr(args, f) is not None}
    wrong = sorted(f for f in given if f not in flags)
    if wrong:
        raise UserError(f"--{wrong[0].replace('_', '-')} does not apply to --mode {args.mode} (its flags: "
                        f"{', '.join('--' + f.replace('_', '-') for f in flags)})")
    spec = {"mode": args.mode, **{f: v for f, v in flags.items() if v is not None}, **given}
    if spec.pop("reweight", None):
        spec["equalizer"] = dict(args.reweight)
    return from_spec(spec)


def cmd_edit(args) -> int:
    import p2p_engine as p2p
    from .images import side_by_side

    out_path = _check_out(args.out, ".png")
    inversion = None
    if args.inversion is not None:
        _check_in(args.inversion, "inversion file", " (make one with `p2p-engine invert`)")
        inversion = p2p.Inversion.load(args.inversion)
    prompt = args.prompt if args.prompt is not None or inversion is None else inversion.prompt
    if prompt is None:
        raise UserError("--prompt is required (unless --inversion gives the source prompt)")
    targets = list(args.target or [])
    if not targets and args.mode != "reweight":
        raise UserError(f"--mode {args.mode} needs at least one --target prompt")
    prompts = [prompt] + (targets or [prompt])  # a reweight of the prompt itself edits a copy of it

    controller = _controller(args)
    pipe = _load(args)
    kwargs = dict(controller=controller, seed=args.seed, steps=args.steps, guidance=args.guidance,
                  proximal=args.proximal, quantile=args.quantile)
    if inversion is None:
        kwargs.update(sampler=args.sampler, steps_offset=args.steps_offset)
    elif args.sampler != "ddim" or args.steps_offset is not None:
        raise UserError("--sampler and --steps-offset do not apply to --inversion: an edit from an inversion "
                        "runs DDIM on the timesteps it was made with")
    if args.blend:
        # one entry per prompt, source first; "cat,hat" blends several words of one prompt
        if len(args.blend) != len(prompts):
            raise UserError(f"--blend takes one entry per prompt, source first ({len(prompts)} here), "
                            f"got {len(args.blend)}: {' '.join(args.blend)}")
        kwargs["local_blend"] = p2p.LocalBlend([blend_words(w, p) for w, p in zip(args.blend, prompts)])
    if inversion is not None:
        kwargs["inversion"] = inversion
    if args.capture:
        kwargs["capture"] = True
    out = pipe.edit(prompts, progress=True, **kwargs)
    _save_png(side_by_side(out.images), out_path)
    how = f" (loop: {out.loop})" if args.capture else ""  # "eager" where recording failed (and warned)
    print(f"wrote {len(out.images)} images side by side to {out_path}{how}")
    used = []  # the defaults depend on the source's kind (a real image or a generated one): say which applied
    if out.self_max_queries is not None:
        used.append(f"self attention replaced in layers of up to {out.self_max_queries} queries")
    if out.blend_start is not None:
        used.append(f"LocalBlend from {out.blend_start:g} of the steps")
    if used:
        print("; ".join(used))
    return EXIT_OK


def cmd_invert(args) -> int:
    out_path = _check_out(args.out, ".safetensors")
    strip_path = _check_out(args.strip, ".png", "--strip") if args.strip else None
    _check_in(args.image, "image")

    pipe = _load(args)
    inv = pipe.invert(args.image, args.prompt, steps=args.steps, inner_steps=args.inner_steps, method=args.method,
                      guidance=args.guidance, steps_offset=args.steps_offset, progress=True)
    inv.save(str(out_path))
    args.written.append(out_path)
    print(f"wrote the {args.method} inversion of {args.image} to {out_path}")
    if strip_path is not None:
        _save_png(_reconstruction_strip(pipe, args, inv), strip_path)
        print(f"wrote the strip input | VAE reconstruction | {args.method} reconstruction to {strip_path}")
    return EXIT_OK


def _reconstruction_strip(pipe, args, inv):
    """input | VAE reconstruction | inversion reconstruction, as in the null-text paper's figures."""
    from .images import prepare, strip, to_pil
    from .inversion import reconstruct

    x = prepare(args.image, pipe.config.image_size)  # (1, 3, S, S) in [-1, 1]: what the inversion encoded
    vae = pipe.decode_latents(pipe.encode_images(x))  # (1, 3, S, S) in [-1, 1]
    rec = pipe.decode_latents(reconstruct(pipe, inv, progress=True))
    return strip([to_pil(x)[0], to_pil(vae)[0], to_pil(rec)[0]],
                 ["input", "VAE reconstruction", f"{args.method} reconstruction"])


def cmd_maps(args) -> int:
    import p2p_engine as p2p
    from .images import heat_row, prompt_tokens, stack_rows

    out_path = _check_out(args.out, ".png")
    pipe = _load(args)
    prompts = list(args.prompt)
    from .maps import level_hw

    side = pipe.config.latent_size
    cross = sorted({level_hw(side, side, l.level)[0] for l in pipe.unet.attn_layers if l.is_cross}, reverse=True)
    res = args.res if args.res is not None else next((r for r in (16, side // 4) if r in cross), cross[0])
    if res not in cross:
        raise UserError(f"--res {res}: this model's cross-attention maps are {cross} wide at its native size")
    out = pipe.edit(prompts, controller=p2p.Store(), seed=args.seed, steps=args.steps, guidance=args.guidance,
                    sampler=args.sampler, steps_offset=args.steps_offset, progress=True)
    maps = out.attention.cross(res=res)  # (P, res, res, 77), summed over steps, averaged over heads
    ids = pipe.tokenize(prompts)  # (P, 77)
    rows = []
    for i, prompt in enumerate(prompts):
        tokens = prompt_tokens(pipe.tokenizer, ids[i].tolist())
        rows.append(heat_row(out.images[i], maps[i], tokens))
    _save_png(stack_rows(rows), out_path)
    print(f"wrote {sum(len(r) - 1 for r in rows)} token maps at {res}x{res} to {out_path}")
    return EXIT_OK


def _benchmarks(folder: Path | None = None):
    """`benchmarks.common` of the source checkout this package runs from (`pip install -e .`), imported by
    its file path: the `benchmarks/` folder sits beside `p2p_engine/` and is not installed."""
    import importlib
    import importlib.util

    folder = folder or Path(__file__).resolve().parent.parent / "benchmarks"
    if not (folder / "common.py").is_file():
        raise UserError("`p2p-engine bench` runs the benchmarks/ folder of a source checkout, and this "
                        "installation (a wheel) has none: clone the repository, run `pip install -e \".[test]\"` "
                        "in it, and run `p2p-engine bench` from that install")
    if importlib.util.find_spec("diffusers") is None:
        raise UserError("the benchmarks compare against diffusers, which is not installed "
                        "(pip install 'p2p-engine[test]')")
    loaded = sys.modules.get("benchmarks")
    if loaded is None or Path(getattr(loaded, "__file__", "") or "").resolve().parent != folder:
        spec = importlib.util.spec_from_file_location("benchmarks", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("benchmarks.common")


def cmd_bench(args) -> int:
    return _benchmarks().run_suite(only=args.only, smoke=args.smoke, device=args.device, record=not args.no_record)


def cmd_run(args) -> int:
    import torch

    from .jobs import run_jobs

    if args.model != "toy" and not Path(args.model).exists():
        raise UserError(f"model path {args.model!r} does not exist (give a diffusers folder, a .safetensors "
                        f"checkpoint, or 'toy')")
    s = run_jobs(args.jobs, args.model, args.out, steps=args.steps, inner_steps=args.inner_steps,
                 batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype),
                 backend=args.backend, prediction_type=args.prediction_type, method=args.method,
                 steps_offset=args.steps_offset, max_batches=args.max_batches)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{s.ok} done, {s.skipped} already done, {s.failed} failed of {s.total} jobs "
              f"in {s.seconds:.1f} s; index: {s.index}")
    return s.exit_status


def cmd_pie(args) -> int:
    import torch

    from .pie_runs import run_pie

    if args.model != "toy" and not Path(args.model).exists():
        raise UserError(f"model path {args.model!r} does not exist")
    summaries = run_pie(args.pie_dir, args.model, args.out, args.methods, editors=args.editors, types=args.types,
                        steps=args.steps,
                        inner_steps=args.inner_steps, steps_offset=args.steps_offset, batch_size=args.batch_size,
                        device=args.device, dtype=getattr(torch, args.dtype), backend=args.backend,
                        prediction_type=args.prediction_type)
    if int(os.environ.get("RANK", "0")) == 0:
        for name, s in summaries.items():
            print(f"{name}: {s.ok} done, {s.skipped} already done, {s.failed} failed of {s.total} in {s.seconds:.1f} s")
    return max(s.exit_status for s in summaries.values())


def cmd_pie_metrics(args) -> int:
    from . import metrics

    extra = {}
    if (Path(args.pie_dir) / "toy_pie.json").is_file():  # written by `python -m p2p_engine.toy.pie`
        from .toy.pie import edit_success
        extra["edit_success"] = edit_success
    scorer = metrics.Scorer(args.metric_weights, args.device, clip_model=args.clip_model)
    rows = metrics.evaluate(args.pie_dir, args.out, args.methods, types=args.types, scorer=scorer, extra=extra,
                            progress=True)
    summary = metrics.summarize(rows)
    metrics.write_csv(Path(args.out) / "pie_metrics.csv", summary)
    metrics.write_csv(Path(args.out) / "pie_metrics_per_image.csv", rows)
    print(metrics.table(summary, scorer.absent) + "\n\nBy edit type:\n\n" + metrics.table(summary, scorer.absent,
                                                                                         by_type=True))
    for line in dict.fromkeys(scorer.absent.values()):
        print(f"absent: {line}")
    for line in scorer.notes:
        print(f"note: {line}")
    print(f"wrote {Path(args.out) / 'pie_metrics.csv'} and pie_metrics_per_image.csv")
    return EXIT_FAILED if any(r.get("status") != "ok" for r in rows) else EXIT_OK


def cmd_serve(args) -> int:
    from .serve.config import check, from_args

    config = from_args(args)
    try:
        check(config)
    except ValueError as e:
        print(f"p2p-engine serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if config.model != "toy" and not Path(config.model).exists():
        raise UserError(f"model path {config.model!r} does not exist (give a diffusers folder, a .safetensors "
                        f"checkpoint, or 'toy')")
    try:
        from .serve.server import serve
    except ImportError as e:
        raise UserError(f"serving needs FastAPI and uvicorn ({e}): pip install \"p2p-engine[serve]\"") from None
    return serve(config)


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
    add_model_args(p)
    p.add_argument("--prompt", help="source prompt (default: the prompt stored in --inversion)")
    p.add_argument("--target", action="append", metavar="PROMPT", help="edited prompt (repeatable)")
    p.add_argument("--mode", default="replace", choices=("replace", "refine", "reweight", "masactrl", "pnp"),
                   help="replace: word swap (same word count); refine: added words; reweight: scale words; "
                        "masactrl: mutual self-attention; pnp: Plug-and-Play (docs/editors.md)")
    p.add_argument("--cross-steps", type=cross_steps, default=None,
                   help="fraction of steps with cross-attention injection, or default_=F,WORD=F,... (default 0.8)")
    p.add_argument("--self-steps", type=self_steps, default=None,
                   help="fraction of steps, or START,END (default 0.4; pnp: its q, k injection, default 0.5)")
    p.add_argument("--start-step", type=int, default=None, help="masactrl: the first UNet call (default 4)")
    p.add_argument("--start-layer", type=int, default=None,
                   help="masactrl: the first transformer block (default: the decoder's two finest resolutions, 10 "
                        "of 16 on SD 1.x/2.x)")
    p.add_argument("--feature-steps", type=self_steps, default=None, help="pnp: feature injection's fraction of "
                                                                          "the steps (default 0.8)")
    p.add_argument("--branch", choices=("empty", "prompt"), default=None,
                   help="pnp: the source branch, its unconditional row (the empty prompt; default) or its prompt's")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="pnp: the targets' unconditional prompt (default the reference's)")
    p.add_argument("--blend", nargs="+", metavar="WORD",
                   help="local blend: change only these words' region; one word per prompt, source first "
                        "(--blend cat dog), several as cat,hat")
    p.add_argument("--reweight", action="append", type=reweight, metavar="WORD=SCALE",
                   help="scale a word's attention in the targets (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default 50; with --inversion, the inversion's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default the family's: 7.5, SDXL 5.0; with --inversion, the inversion's)")
    add_sampling_args(p)
    p.add_argument("--proximal", choices=("l0",), default=None,
                   help="proximal guidance (ProxEdit), for negative_prompt inversions: e_c - e_u soft-thresholded "
                        "at --quantile of its magnitudes")
    p.add_argument("--quantile", type=quantile, default=0.75, help="proximal guidance's quantile (default 0.75)")
    p.add_argument("--inversion", metavar="FILE", help="edit a real image inverted by `p2p-engine invert`")
    p.add_argument("--capture", action="store_true",
                   help="run the captured loop: on CUDA one step recorded as a CUDA graph and replayed (DDIM)")
    p.add_argument("--out", default="out.png", help="output PNG")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="invert a real image (null-text inversion) to a .safetensors file",
                       description="Invert a real image so that `p2p-engine edit --inversion FILE` can edit it.")
    add_model_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help="a prompt describing the image")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--inner-steps", type=count, default=10, help="null-text optimisation steps per step")
    p.add_argument("--method", default="null_text", choices=METHODS,
                   help="null_text (default); direct: Direct Inversion, no optimisation; negative_prompt; ddim")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default the family's: 7.5, SDXL 5.0)")
    add_sampling_args(p, samplers=False)
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--strip", metavar="PNG", help="also write input | VAE reconstruction | inversion reconstruction")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("maps", help="save a picture grid of per-token cross-attention maps",
                       description="Generate the prompts, store their cross-attention maps, and write one row per "
                                   "prompt: the image, then each token's heat map over it, labelled by token.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--res", type=int, default=None,
                   help="map resolution: one of the model's cross-attention sizes (default 16, the reference's, "
                        "where the model has it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default the family's: 7.5, SDXL 5.0)")
    add_sampling_args(p)
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

    p = sub.add_parser(
        "run", help="invert (and edit) every image of a JSONL job file; resumable, shards under torchrun",
        description="Each line of JOBS is {\"image\": path, \"prompt\": str, optional \"edits\": [str], "
                    "\"controller\": {\"mode\": replace|refine|reweight, \"cross_steps\", \"self_steps\", "
                    "\"equalizer\", \"self_max_queries\"} or {\"mode\": masactrl, \"start_step\", "
                    "\"start_layer\"} or {\"mode\": pnp, \"feature_steps\", \"self_steps\", \"branch\", "
                    "\"negative_prompt\"}, \"blend\": {\"words\": [source word, target word], \"subtract\", "
                    "\"start\", \"threshold\", \"subtract_threshold\", \"level\"}, \"out\": path, \"seed\"}; "
                    "every controller key is optional, a blend needs its words (docs/formats.md says what each "
                    "takes). "
                    "Outputs go to DIR/<job id>/ (or DIR/<out>) with one line per job in "
                    "DIR/index.jsonl. Run again to finish an interrupted run. To split the jobs over N processes "
                    "(one per GPU) start it with `torchrun --nproc-per-node N -m p2p_engine run ...` or "
                    "`torchrun --no-python --nproc-per-node N p2p-engine run ...`. "
                    "Exit status 1 when some jobs failed (each recorded in the index).")
    p.add_argument("jobs", metavar="JOBS.jsonl", help="job file, one JSON object per line")
    p.add_argument("--model", required=True, help="diffusers folder, single-file .safetensors, or 'toy'")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--inner-steps", type=count, default=10,
                   help="null-text optimisation iterations per step (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="jobs inverted together and edited together in one edit_batch (default 4: an inversion "
                        "takes about half the time per image of 1, benchmarks/RESULTS.md); each edit is the job's own")
    p.add_argument("--method", default="null_text", choices=METHODS, help="inversion method (default null_text)")
    add_sampling_args(p, samplers=False)
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when present; cuda:LOCAL_RANK "
                                                  "under torchrun)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    add_prediction_type(p)
    p.add_argument("--max-batches", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pie", help="run the PIE-Bench protocol (inversion + P2P edit per entry and method)",
                       description="Runs every entry of PIE_DIR/mapping_file.json with each method into "
                                   "OUT/<method>/annotation_images/<image_path>; resumable and sharded like `run`.")
    p.add_argument("pie_dir", metavar="PIE_DIR")
    add_model_args(p)
    p.add_argument("--methods", type=names(PIE_METHODS), default=["ddim", "null_text", "negative_prompt", "direct"],
                   help=f"comma-separated, from {','.join(PIE_METHODS)} (proximal: negative-prompt inversion with "
                        "proximal guidance)")
    p.add_argument("--editors", type=names(PIE_EDITORS), default=None,
                   help=f"comma-separated, from {','.join(PIE_EDITORS)}: each editor's run of each method goes to "
                        "OUT/<editor>/<method>/ (default: Prompt-to-Prompt into OUT/<method>/)")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--types", type=names(PIE_TYPES), default=None, help="edit type ids, e.g. 0,6,8 (default all)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--inner-steps", type=count, default=10)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="entries inverted together and edited together, as `run` (default 4)")
    add_sampling_args(p, samplers=False)
    p.set_defaults(func=cmd_pie)

    p = sub.add_parser("pie-metrics", help="PIE-Bench metrics of a `pie` run: a table and CSV files",
                       description="Per editor, method and edit type, as PnPInversion's evaluation computes them: "
                                   "structure distance, PSNR, LPIPS, MSE and SSIM on the unedited part, CLIP whole "
                                   "and edited (networks from --metric-weights DIR; a missing file leaves its "
                                   "metric absent), seconds and UNet evaluations per image; edit success on a toy "
                                   "PIE. Reads OUT/<method>/, OUT/<editor>/<method>/ and PnPInversion's "
                                   "OUT/<method>+<editor>/. Writes OUT/pie_metrics.csv and "
                                   "OUT/pie_metrics_per_image.csv.")
    p.add_argument("pie_dir", metavar="PIE_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--methods", type=lambda text: [t.strip() for t in text.split(",") if t.strip()], default=None,
                   help="comma-separated method names (PnPInversion's too, e.g. directinversion); default: every "
                        "run in OUT")
    p.add_argument("--types", type=names(PIE_TYPES), default=None)
    p.add_argument("--metric-weights", metavar="DIR", help="dino_vitbase8_pretrain.pth, squeezenet1_1-*.pth, "
                   "squeeze.pth (LPIPS v0.1) and clip-vit-large-patch14/, as published (docs/pie.md)")
    p.add_argument("--clip-model", metavar="DIR", help="a transformers CLIP folder (default: METRIC_WEIGHTS/"
                   "clip-vit-large-patch14)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_pie_metrics)

    p = sub.add_parser("serve", help="the engine as an HTTP service, with an editing page at /",
                       description="Serve the model over HTTP: API v1 (OpenAPI at /docs), the editing page at /, "
                                   "/metrics. Prints the URL when ready; SIGTERM or Ctrl-C finishes running jobs "
                                   "(--grace-s) and exits 0.")
    from .serve.config import add_arguments  # the flags live beside the settings they set (no engine import)
    add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on a usage error
    args.written = []  # files a command finished before an interrupt
    try:
        return args.func(args)
    except USER_ERRORS as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and e.filename not in msg:
            msg = f"{e.strerror or 'no such file'}: {e.filename}"
        print(f"p2p-engine {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        if args.command in ("run", "pie"):  # jobs.Interrupted says how many jobs finished
            kept = str(e) or "the jobs finished so far are kept; run the same command again to resume"
        elif args.written:
            kept = "only " + ", ".join(str(p) for p in args.written) + " was written"
        else:
            kept = "nothing was written"
        print(f"p2p-engine {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
