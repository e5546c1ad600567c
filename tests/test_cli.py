"""The `p2p-engine` command line, run in-process through `main([...])` on a tiny random checkpoint.

Exit status contract: 0 success, 1 bad input (one clear line, no traceback, nothing written), 2 usage error.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2p_engine.cli import main
from p2p_engine.cliargs import blend_words

STEPS = ["--steps", "3"]
SIZE = 128  # the tiny preset's image side


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["random-checkpoint", str(path), "--preset", "tiny", "--seed", "0"]) == 0
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A photograph-like PNG: gradients and a disc, not a constant."""
    yy, xx = np.mgrid[0:160, 0:200] / 160
    img = np.stack([xx * 0.7, yy * 0.6 + 0.2, 0.5 + 0.0 * xx], -1)
    img[(yy - 0.5) ** 2 + (xx - 0.6) ** 2 < 0.06] = (0.9, 0.2, 0.1)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path


def _no_leftovers(folder: Path, expected: set[str]) -> None:
    """Atomic writes leave no temporary files behind."""
    assert {p.name for p in folder.iterdir()} == expected


# -- usage

@pytest.mark.parametrize("cmd", ["random-checkpoint", "edit", "invert", "maps", "bench", "run"])
def test_help_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"p2p-engine {cmd}" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["run", "pie"])
def test_batch_size_help_states_the_default(cmd, capsys):
    """The help's default batch size is the one `run_jobs` uses when --batch-size is left out."""
    from p2p_engine.jobs import DEFAULT_BATCH_SIZE
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert f"(default {DEFAULT_BATCH_SIZE}" in " ".join(capsys.readouterr().out.split())


def test_run_help_names_every_job_key(capsys):
    """`run --help` names every key a job line may hold (the job, its controller of each mode, its blend): the keys
    the job reader accepts, so the help cannot fall behind it."""
    from p2p_engine.controllers import BLEND_KEYS, EDITOR_KEYS, MODES, SPEC_KEYS
    from p2p_engine.manifest import JOB_KEYS
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    keys = set(JOB_KEYS) | set(SPEC_KEYS) | set(BLEND_KEYS) | {k for ks in EDITOR_KEYS.values() for k in ks}
    assert not [k for k in sorted(keys) if f'"{k}"' not in text]
    assert not [m for m in [*MODES, *EDITOR_KEYS] if m not in text]


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "p2p_engine", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("edit", "invert", "maps", "bench", "random-checkpoint"):
        assert cmd in r.stdout


@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["edit", "--prompt", "a cat"],  # --model missing
    ["edit", "--model", "toy", "--reweight", "cat"],  # not WORD=SCALE
    ["edit", "--model", "toy", "--cross-steps", "1.5"],  # outside [0, 1]
    ["edit", "--model", "toy", "--mode", "swap"],
    ["edit", "--model", "toy", "--proximal", "l0", "--quantile", "0"],  # outside (0, 1], as edit() takes it
    ["invert", "--model", "toy", "--image", "x.png", "--prompt", "p"],  # --out missing
    ["invert", "--model", "toy", "--image", "x.png", "--prompt", "p", "--out", "x.st", "--inner-steps", "-1"],
    ["maps", "--model", "toy", "--prompt", "a cat", "--res", "x"],  # not a number
])
def test_usage_error_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


# -- user errors: exit 1, a message, no traceback, nothing written

def _fails_cleanly(argv, capsys, *needles):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error:" in err
    for n in needles:
        assert n.lower() in err.lower(), err
    return err


def test_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    _fails_cleanly(["edit", "--model", str(missing), "--prompt", "a cat", "--target", "a dog",
                    "--out", str(tmp_path / "o.png"), *STEPS], capsys, str(missing), "does not exist")
    _no_leftovers(tmp_path, set())


def test_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file" * 10)
    _fails_cleanly(["edit", "--model", str(bad), "--prompt", "a cat", "--target", "a dog",
                    "--out", str(tmp_path / "o.png"), *STEPS], capsys, "bad.safetensors")
    _no_leftovers(tmp_path, {"bad.safetensors"})


def test_replace_with_different_word_counts(ckpt, tmp_path, capsys):
    err = _fails_cleanly(["edit", "--model", str(ckpt), "--prompt", "a cat riding a bicycle",
                          "--target", "a big dog riding a bicycle", "--mode", "replace",
                          "--out", str(tmp_path / "o.png"), *STEPS], capsys)
    assert "refine" in err.lower()  # the engine suggests the mode that handles added words
    _no_leftovers(tmp_path, set())


def test_missing_image(ckpt, tmp_path, capsys):
    _fails_cleanly(["invert", "--model", str(ckpt), "--image", str(tmp_path / "nope.png"), "--prompt", "a cat",
                    "--out", str(tmp_path / "x.safetensors"), *STEPS], capsys, "nope.png")
    _no_leftovers(tmp_path, set())


def test_existing_checkpoint_not_overwritten(ckpt, capsys):
    _fails_cleanly(["random-checkpoint", str(ckpt), "--preset", "tiny"], capsys, "already exists")


def test_overwrite_replaces_only_a_checkpoint(tmp_path, capsys, monkeypatch):
    """--overwrite never removes a folder or file that is not a checkpoint of the layout asked for."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "thesis.txt").write_text("precious")
    _fails_cleanly(["random-checkpoint", str(data), "--preset", "tiny", "--overwrite"], capsys, "model_index.json")
    _fails_cleanly(["random-checkpoint", str(data / "thesis.txt"), "--preset", "tiny", "--layout", "single_file",
                    "--overwrite"], capsys, "not a .safetensors file")
    monkeypatch.chdir(data)
    _fails_cleanly(["random-checkpoint", ".", "--preset", "tiny", "--overwrite"], capsys, "current folder")
    assert (data / "thesis.txt").read_text() == "precious"


def test_output_and_input_that_are_folders(ckpt, photo, tmp_path, capsys):
    """A folder where a file is wanted is named before any work, and nothing is written."""
    (tmp_path / "strip.png").mkdir()
    argv = ["invert", "--model", str(ckpt), "--image", str(photo), "--prompt", "a cat", "--method", "ddim",
            "--out", str(tmp_path / "x.safetensors"), *STEPS]
    _fails_cleanly(argv + ["--strip", str(tmp_path / "strip.png")], capsys, "--strip", "is a folder")
    _fails_cleanly(argv[:4] + [str(tmp_path)] + argv[5:], capsys, "is a folder, not a file")
    _no_leftovers(tmp_path, {"strip.png"})
    _fails_cleanly(["maps", "--model", str(ckpt), "--prompt", "a cat", "--res", "5", *STEPS,
                    "--out", str(tmp_path / "m.png")], capsys, "--res 5", "cross-attention maps")


# -- successful runs

def test_random_checkpoint_layouts(ckpt, tmp_path):
    assert (ckpt / "model_index.json").is_file() and (ckpt / "unet").is_dir()
    single = tmp_path / "tiny.safetensors"
    assert main(["random-checkpoint", str(single), "--preset", "tiny", "--layout", "single_file"]) == 0
    assert single.is_file()


def test_edit_writes_images_side_by_side(ckpt, tmp_path, capsys):
    out = tmp_path / "edit.png"
    code = main(["edit", "--model", str(ckpt), "--prompt", "a cat riding a bicycle",
                 "--target", "a dog riding a bicycle", "--target", "a fox riding a bicycle",
                 "--cross-steps", "0.8", "--self-steps", "0.4", "--blend", "cat", "dog", "fox",
                 "--seed", "1", *STEPS, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (3 * SIZE, SIZE)  # three prompts, source first
        tiles = np.asarray(im.convert("RGB")).reshape(SIZE, 3, SIZE, 3)
    assert not np.array_equal(tiles[:, 0], tiles[:, 1])  # the edit changed the target
    _no_leftovers(tmp_path, {"edit.png"})



def test_blend_words_that_end_in_commas(ckpt, tmp_path, capsys):
    """Prompt words are split on spaces and matched whole (the reference's rule), so "a cat, riding" has the word
    "cat,": --blend names it as written, and the comma that separates several words does not eat it. A word
    given without its comma is refused with the prompt's spelling named; a wrong entry count is refused."""
    assert blend_words("cat,", "a cat, on a mat") == "cat,"
    assert blend_words("cat,mat", "a cat, on a mat") == ["cat,", "mat"]
    assert blend_words("cat,,mat", "a cat, on a mat") == ["cat,", "mat"]
    assert blend_words("mat,cat,", "a cat, on a mat") == ["mat", "cat,"]
    assert blend_words("cat,hat", "a cat with a hat") == ["cat", "hat"]
    with pytest.raises(ValueError, match="names no word"):
        blend_words(",", "a cat, on a mat")
    base = ["edit", "--model", str(ckpt), "--prompt", "a cat, riding a bicycle",
            "--target", "a dog, riding a bicycle", *STEPS, "--out", str(tmp_path / "comma.png")]
    assert main([*base, "--blend", "cat,", "dog,bicycle"]) == 0, capsys.readouterr().err
    _fails_cleanly([*base, "--blend", "cat", "dog,"], capsys, "the word 'cat' is not in the prompt",
                   "the prompt has 'cat,'")
    _fails_cleanly([*base, "--blend", "cat,"], capsys, "one entry per prompt", "2 here")

def test_edit_refine_with_reweight(ckpt, tmp_path, capsys):
    out = tmp_path / "refine.png"
    code = main(["edit", "--model", str(ckpt), "--prompt", "a cat riding a bicycle",
                 "--target", "a fluffy cat riding a bicycle", "--mode", "refine", "--reweight", "fluffy=2",
                 "--cross-steps", "default_=0.8,fluffy=0.5", "--self-steps", "0.1,0.5", *STEPS, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (2 * SIZE, SIZE)


def test_edit_reweight_alone(ckpt, tmp_path, capsys):
    out = tmp_path / "rw.png"
    code = main(["edit", "--model", str(ckpt), "--prompt", "a smiling bunny doll", "--mode", "reweight",
                 "--reweight", "smiling=-1", *STEPS, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (2 * SIZE, SIZE)  # the prompt and its re-weighted copy


def test_maps_writes_token_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "maps.png"
    code = main(["maps", "--model", str(ckpt), "--prompt", "a cat riding a bicycle", "--res", "8",
                 *STEPS, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        # the image plus one tile per token ("a", "cat", "riding", "a", "bicycle"), one row per prompt
        assert im.width == 6 * SIZE and SIZE < im.height < 2 * SIZE


def test_invert_then_edit(ckpt, photo, tmp_path, capsys):
    import p2p_engine as p2p

    inv_path = tmp_path / "photo.inversion.safetensors"
    strip = tmp_path / "strip.png"
    code = main(["invert", "--model", str(ckpt), "--image", str(photo), "--prompt", "a red ball",
                 "--steps", "3", "--inner-steps", "2", "--out", str(inv_path), "--strip", str(strip)])
    assert code == 0, capsys.readouterr().err
    inv = p2p.Inversion.load(str(inv_path))
    assert inv.prompt == "a red ball"
    assert tuple(inv.null_embeddings.shape) == (3, 77, 32)  # steps x tokens x tiny's text width
    with Image.open(strip) as im:
        assert im.width >= 3 * SIZE  # input | VAE reconstruction | null-text reconstruction

    out = tmp_path / "edited.png"
    code = main(["edit", "--model", str(ckpt), "--inversion", str(inv_path), "--target", "a blue ball",
                 "--steps", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (2 * SIZE, SIZE)
    # an edit of a real image: the null-text notebook's self-replacement limit, stated
    assert "self attention replaced in layers of up to 1024 queries" in capsys.readouterr().out


def test_written_files_have_ordinary_permissions(ckpt, photo, tmp_path, capsys):
    """Under umask 022 the files the engine writes are 0644 and its folders 0755, as open() and mkdir make
    them (a temporary file's 0600 would hide them from a web server or another user)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        png, inv = tmp_path / "x.png", tmp_path / "x.inversion.safetensors"
        assert main(["edit", "--model", "toy", "--prompt", "a big red circle on a white background",
                     "--target", "a big blue circle on a white background", "--steps", "2", "--out", str(png)]) == 0
        assert main(["invert", "--model", str(ckpt), "--image", str(photo), "--prompt", "a red ball",
                     "--steps", "2", "--inner-steps", "0", "--out", str(inv)]) == 0  # 0: no optimisation
        folder = tmp_path / "ck"
        assert main(["random-checkpoint", str(folder), "--preset", "tiny"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for f in (png, inv, folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "model_index.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    for d in (folder, folder / "unet"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    import p2p_engine as p2p
    assert p2p.Inversion.load(inv).inner_steps == 0


def test_edit_samplers_and_offset(ckpt, photo, tmp_path, capsys):
    """--sampler and --steps-offset reach the sampling loop (each gives a different picture); with
    --inversion they are refused, since an edit from an inversion runs its DDIM timesteps."""
    base = ["edit", "--model", str(ckpt), "--prompt", "a cat riding a bicycle", "--target", "a dog riding a bicycle",
            *STEPS]
    pictures = {}
    for name, extra in (("ddim", []), ("pndm", ["--sampler", "pndm"]), ("dpm", ["--sampler", "dpmsolver++"]),
                        ("offset0", ["--steps-offset", "0"])):
        out = tmp_path / f"{name}.png"
        assert main([*base, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        with Image.open(out) as im:
            pictures[name] = np.asarray(im.convert("RGB"))
    names = list(pictures)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(pictures[a], pictures[b]), (a, b)
    inv = tmp_path / "p.inversion.safetensors"
    assert main(["invert", "--model", str(ckpt), "--image", str(photo), "--prompt", "a red ball", "--steps", "2",
                 "--inner-steps", "1", "--steps-offset", "0", "--out", str(inv)]) == 0
    _fails_cleanly(["edit", "--model", str(ckpt), "--inversion", str(inv), "--target", "a blue ball", "--sampler",
                    "pndm", "--out", str(tmp_path / "no.png")], capsys, "--sampler")
    assert not (tmp_path / "no.png").exists()


def test_edit_capture(ckpt, tmp_path, capsys):
    """--capture runs the captured loop (on the CPU its static step, call by call, and says so): the picture of
    the eager loop to float rounding; a sampler it cannot capture is refused with the one it can."""
    base = ["edit", "--model", str(ckpt), "--prompt", "a cat riding a bicycle", "--target", "a dog riding a bicycle",
            "--blend", "cat", "dog", *STEPS]
    pictures = []
    for extra in ([], ["--capture"]):
        out = tmp_path / f"capture{len(extra)}.png"
        assert main([*base, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        wrote = capsys.readouterr().out.splitlines()[0]  # then the line of the settings the edit used
        assert wrote.endswith(f"{out} (loop: static)" if extra else str(out))
        with Image.open(out) as im:
            pictures.append(np.asarray(im.convert("RGB")).astype(int))
    assert np.abs(pictures[0] - pictures[1]).max() <= 1
    _fails_cleanly([*base, "--capture", "--sampler", "pndm", "--out", str(tmp_path / "no.png")], capsys, "ddim")
    assert not (tmp_path / "no.png").exists()


def test_prediction_type_overrides_the_checkpoints(ckpt, photo, tmp_path, capsys):
    """--prediction-type reaches p2p.load: left out or naming the config's own it changes nothing, the other one
    changes the image; `run` passes it on (its index names another model fingerprint), and run_jobs refuses it
    beside a loaded Pipeline, which keeps its own."""
    import json

    from p2p_engine import cliargs, loading
    from p2p_engine.jobs import run_jobs

    assert cliargs.PREDICTION_TYPES == loading.PREDICTION_TYPES
    edit = ["edit", "--model", str(ckpt), "--prompt", "a red ball", "--target", "a blue ball", "--steps", "2"]
    pngs = {}
    for kind in (None, "epsilon", "v_prediction"):
        pngs[kind] = tmp_path / f"{kind}.png"
        assert main([*edit, "--out", str(pngs[kind]), *(["--prediction-type", kind] if kind else [])]) == 0
    assert pngs[None].read_bytes() == pngs["epsilon"].read_bytes() != pngs["v_prediction"].read_bytes()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(photo), "prompt": "a red ball"}) + "\n")
    models = []
    for kind in ("epsilon", "v_prediction"):
        out = tmp_path / kind
        assert main(["run", str(jobs), "--model", str(ckpt), "--out", str(out), "--steps", "2", "--inner-steps", "0",
                     "--prediction-type", kind]) == 0
        models.append(json.loads((out / "index.jsonl").read_text().splitlines()[0])["model"])
    assert models[0] != models[1]
    capsys.readouterr()
    import p2p_engine as p2p
    with pytest.raises(ValueError, match="prediction_type applies to a checkpoint"):
        run_jobs(jobs, p2p.load(ckpt), tmp_path / "x", prediction_type="epsilon")
