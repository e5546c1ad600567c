"""PIE-Bench with MasaCtrl and Plug-and-Play beside Prompt-to-Prompt (`pie --editors`), the command line's
`edit --mode masactrl | pnp`, and the editors in dataset jobs, on the toy model."""
import json

import numpy as np
import pytest
from PIL import Image

import p2p_engine as p2p
from p2p_engine import pie, pie_runs
from p2p_engine.cli import main
from p2p_engine.manifest import read_jobs
from p2p_engine.toy import pie as toy_pie

BASE = ["--model", "toy", "--methods", "direct", "--steps", "3", "--inner-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def pie_dir(tmp_path_factory):
    return toy_pie.write(tmp_path_factory.mktemp("pie") / "pie", per_type=1)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def test_editors_layout_migrates_a_flat_run_and_resumes(pie_dir, tmp_path, capsys):
    """A Prompt-to-Prompt run of the flat layout moves into OUT/p2p/<method> untouched (nothing redone), the
    other editors run into OUT/<editor>/<method> with the references' jobs, and a second run redoes nothing."""
    out = tmp_path / "out"
    entries = pie.read_mapping(pie_dir)
    assert main(["pie", str(pie_dir), *BASE, "--out", str(out)]) == 0
    flat = _mtimes(out / "direct")
    assert len(flat) == len(entries)
    capsys.readouterr()
    args = ["pie", str(pie_dir), *BASE, "--out", str(out), "--editors", "p2p,masactrl,pnp"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "moved the Prompt-to-Prompt run" in printed.err
    assert f"p2p/direct: 0 done, {len(entries)} already done" in printed.out
    assert f"masactrl/direct: {len(entries)} done" in printed.out and f"pnp/direct: {len(entries)} done" in printed.out
    assert not (out / "direct").exists()
    assert {p.relative_to(out / "p2p"): t for p, t in _mtimes(out / "p2p").items()} == {
        p.relative_to(out): t for p, t in flat.items()}
    for editor in ("masactrl", "pnp"):
        assert all((out / editor / "direct" / e.out).is_file() for e in entries)
    jobs = {e: [j.spec for j in read_jobs(out / e / "direct" / "jobs.jsonl")] for e in ("masactrl", "pnp")}
    by_out = {e.out: e for e in entries}
    for job in jobs["masactrl"]:  # run_editing_masactrl.py: the empty prompt inverted and as the source branch
        assert job["prompt"] == "" and job["edits"] == [by_out[job["out"]].target]
        assert job["controller"] == {"mode": "masactrl"} and "blend" not in job
    for job in jobs["pnp"]:
        assert job["prompt"] == by_out[job["out"]].source and job["controller"] == {"mode": "pnp"}
    assert set(pie_runs.run_folders(out)) == {("p2p", "direct"), ("masactrl", "direct"), ("pnp", "direct")}
    before = _mtimes(out)
    assert main(args) == 0
    assert capsys.readouterr().out.count(f"0 done, {len(entries)} already done") == 3
    assert _mtimes(out) == before
    # a masactrl image differs from the Prompt-to-Prompt one of the same entry: another editor ran
    e = entries[0]
    a, b = (np.asarray(Image.open(out / ed / "direct" / e.out), dtype=float) for ed in ("p2p", "masactrl"))
    assert np.abs(a - b).mean() > 1.0


def test_unknown_editor_is_a_usage_error(pie_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pie", str(pie_dir), *BASE, "--out", str(tmp_path / "o"), "--editors", "p2p,zero"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="unknown PIE editors"):
        pie_runs.run_pie(pie_dir, "toy", tmp_path / "o", ["direct"], editors=["pix2pix_zero"])
    assert not (tmp_path / "o").exists()


def test_run_folders_reads_both_layouts(tmp_path):
    for folder in ("ddim", "p2p/direct", "masactrl/ddim", "pnp/null_text", "notes/x"):
        (tmp_path / folder).mkdir(parents=True)
        if folder != "notes/x":
            (tmp_path / folder / "jobs.jsonl").write_text("")
    assert pie_runs.run_folders(tmp_path) == {
        ("p2p", "ddim"): tmp_path / "ddim", ("p2p", "direct"): tmp_path / "p2p" / "direct",
        ("masactrl", "ddim"): tmp_path / "masactrl" / "ddim", ("pnp", "null_text"): tmp_path / "pnp" / "null_text"}


# -- the command line and dataset jobs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["random-checkpoint", str(path), "--preset", "tiny", "--seed", "0"]) == 0
    return path


@pytest.mark.parametrize("flags,controller", [
    (["--mode", "masactrl", "--start-step", "1", "--start-layer", "3"], p2p.MasaCtrl(start_step=1, start_layer=3)),
    (["--mode", "pnp", "--self-steps", "0.3", "--branch", "prompt", "--negative-prompt", "blurry"],
     p2p.PlugAndPlay(self_steps=0.3, branch="prompt", negative_prompt="blurry")),
    (["--mode", "pnp"], p2p.PlugAndPlay()),
])
def test_cli_edit_modes(ckpt, tmp_path, capsys, flags, controller):
    out = tmp_path / "e.png"
    argv = ["edit", "--model", str(ckpt), "--prompt", "a cat", "--target", "a dog", "--steps", "2", "--out", str(out)]
    assert main(argv + flags) == 0
    assert Image.open(out).size == (2 * 128, 128)
    want = p2p.load(ckpt, device="cpu").edit(["a cat", "a dog"], controller, steps=2, seed=0, progress=False).images
    got = np.asarray(Image.open(out))
    assert np.array_equal(got, np.concatenate([np.asarray(im) for im in want], axis=1))


@pytest.mark.parametrize("flags,wrong", [
    (["--mode", "masactrl", "--cross-steps", "0.5"], "--cross-steps does not apply to --mode masactrl"),
    (["--mode", "pnp", "--start-step", "2"], "--start-step does not apply to --mode pnp"),
    (["--mode", "replace", "--branch", "prompt"], "--branch does not apply to --mode replace"),
])
def test_cli_refuses_another_mode_s_flags(ckpt, tmp_path, capsys, flags, wrong):
    argv = ["edit", "--model", str(ckpt), "--prompt", "a cat", "--target", "a dog", "--steps", "2",
            "--out", str(tmp_path / "e.png")]
    assert main(argv + flags) == 1
    assert wrong in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()


def test_jobs_run_the_editors(ckpt, tmp_path):
    """A job file's controller {"mode": "masactrl" | "pnp", ...} edits as `pipe.edit_batch` (so `pipe.edit`) does;
    a key of another mode is recorded as the job's error before anything is inverted."""
    from p2p_engine.jobs import run_jobs

    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "prompt": "", "edits": ["a dog"], "controller": {"mode": "masactrl", "start_step": 1},
              "out": "m.png"},
             {"image": "a.png", "prompt": "a cat", "edits": ["a dog"], "controller": {"mode": "pnp"}, "out": "p.png"},
             {"image": "a.png", "prompt": "a cat", "edits": ["a dog"],
              "controller": {"mode": "pnp", "start_step": 1}, "out": "bad.png"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    pipe = p2p.load(ckpt, device="cpu")
    s = run_jobs(tmp_path / "jobs.jsonl", pipe, tmp_path / "out", steps=3, method="direct", progress=False)
    assert (s.ok, s.failed) == (2, 1)
    index = [json.loads(x) for x in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert any("unknown pnp controller keys" in (x.get("error") or "") for x in index)
    # the two good jobs were inverted together and edited in one edit_batch (which equals each `pipe.edit` alone to
    # float32 rounding: tests/test_edit_batch.py), so the same batch here
    invs = pipe.invert_batch([img, img], ["", "a cat"], steps=3, method="direct", progress=False)
    reqs = [p2p.EditRequest(["", "a dog"], p2p.MasaCtrl(start_step=1), inversion=invs[0]),
            p2p.EditRequest(["a cat", "a dog"], p2p.PlugAndPlay(), inversion=invs[1])]
    for name, out in zip(("m.png", "p.png"), pipe.edit_batch(reqs, steps=3, progress=False)):
        want = out.images[-1]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)), np.asarray(want))
