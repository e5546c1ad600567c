"""Dataset jobs (p2p_engine/jobs.py): failures recorded, resume without redoing, torchrun shards.

Tiny preset, 2 DDIM steps x 2 inner steps, 7 small images (one unreadable), batch size 2.
The reference for every inversion is an independent `pipe.invert` of the same image.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import cli, jobs, manifest

STEPS, INNER, BATCH = 2, 2, 2
PROMPTS = ["a cat", "a red car", "a dog on grass", "a blue house", "a small boat", "a tree", "a cup of tea"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    model = p2p.save_random_checkpoint(root / "tiny", "tiny", seed=0)
    from PIL import Image
    (root / "img").mkdir()
    lines = []
    for k, prompt in enumerate(PROMPTS):
        name = f"img/{k}.png"
        if k == 3:  # not an image: the job must fail with the file named, the others go on
            (root / name).write_bytes(b"this is not a png")
        else:
            a = np.random.RandomState(k).randint(0, 256, (48 + 8 * k, 64, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / name)
        job = {"image": name, "prompt": prompt}
        lines.append(json.dumps(job))
    (root / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    return root, Path(model)


def _index(out):
    return {e["id"]: e for e in map(json.loads, (out / "index.jsonl").read_text().splitlines())}


def _run(setup, out, **kw):
    root, model = setup
    return jobs.run_jobs(root / "jobs.jsonl", str(model), out, steps=STEPS, inner_steps=INNER,
                         batch_size=BATCH, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def single_run(setup):
    """One single-process CLI run over all 7 jobs: (output dir, exit status)."""
    root, model = setup
    out = root / "single"
    status = cli.main(["run", str(root / "jobs.jsonl"), "--model", str(model), "--out", str(out),
                        "--steps", str(STEPS), "--inner-steps", str(INNER), "--batch-size", str(BATCH),
                        "--device", "cpu"])
    return out, status


def assert_same_inversion(pipe, a, b):
    """Two inversions of one image and prompt with the same settings, made in different batches or
    processes: equal up to fp32 reassociation. The DDIM inversion is compared elementwise. Adam turns a
    rounding difference in a near-zero gradient into a step of up to its learning rate on single elements,
    so the null embeddings are compared as a whole, and by what they do, their reconstructions (relative
    norms: batching and sharding moved them by at most 1.7e-4 and 8.5e-5 here, most images by ~1e-6; a wrong
    image or prompt moves them by ~1, an image reading another's gradient by ~1e-2). tests/test_inversion.py
    shows batched == singles to the last bit in float64."""
    from p2p_engine.inversion import reconstruct

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    torch.testing.assert_close(a.latent_T, b.latent_T, rtol=1e-5, atol=1e-5)
    assert rel(a.null_embeddings, b.null_embeddings) < 1e-3
    assert rel(reconstruct(pipe, a), reconstruct(pipe, b)) < 1e-3


def test_six_results_one_recorded_error(setup, single_run):
    root, model = setup
    out, status = single_run
    assert status == 1  # some jobs failed
    index = _index(out)
    assert len(index) == 7
    ok = [e for e in index.values() if e["status"] == "ok"]
    bad = [e for e in index.values() if e["status"] == "error"]
    assert len(ok) == 6 and len(bad) == 1
    assert bad[0]["image"] == "img/3.png" and "3.png" in bad[0]["error"]
    assert not (out / bad[0]["id"]).exists()

    pipe = p2p.load(str(model), device="cpu")
    assert all(len(e["final_losses"]) == STEPS and e["seconds"] > 0 for e in ok)
    # how the loops ran (on the CPU, eagerly; these jobs ask for no edit)
    assert all(e["loops"] == {"inversion": "eager", "edit": None} and "capture_failures" not in e for e in ok)
    for e in ok[::2]:  # three of them (the cost is one inversion each) against a one-image run
        inv = p2p.Inversion.load(out / e["outputs"]["inversion"])
        ref = pipe.invert(str(root / e["image"]), e["prompt"], steps=STEPS, inner_steps=INNER, progress=False)
        assert_same_inversion(pipe, inv, ref)
        assert inv.prompt == e["prompt"]
        last = [row[~torch.isnan(row)][-1].item() for row in ref.losses]
        assert e["final_losses"] == pytest.approx(last, rel=1e-4, abs=1e-6)
    assert all(e["outputs"]["edits"] == [] for e in ok)


def test_pipeline_reused_across_runs(setup, single_run, tmp_path):
    """A loaded Pipeline passed to run_jobs twice, releasing its cache in between, gives the same files as
    loading from the path."""
    root, model = setup
    pipe = p2p.load(str(model), device="cpu")
    ref, _ = single_run
    first_batch = (root / "jobs.jsonl").read_text().splitlines()[:BATCH]
    (root / "first_batch.jsonl").write_text("\n".join(first_batch) + "\n")  # same folder: same relative paths
    for k in range(2):
        out = tmp_path / str(k)
        s = jobs.run_jobs(root / "first_batch.jsonl", pipe, out, steps=STEPS, inner_steps=INNER,
                          batch_size=BATCH, progress=False)
        assert (s.ok, s.failed) == (BATCH, 0)
        for e in _index(out).values():
            a = (out / e["outputs"]["inversion"]).read_bytes()
            assert a == (ref / e["outputs"]["inversion"]).read_bytes()
        pipe.release_memory()  # between runs: the second run must still give the same files


def test_edit_requests_reach_pipe_edit_batch(setup, tmp_path):
    """The job's edit prompts, controller, seed and inversion go to pipe.edit_batch as its EditRequest; every image
    it returns is saved, and the index line says how its loop ran (here a capture that failed)."""
    from PIL import Image

    from p2p_engine.editing import EditOutput
    root, model = setup
    pipe = p2p.load(str(model), device="cpu")
    calls = []

    def fake_edit_batch(requests, **kw):  # stands in for the UNet-driven edit loop; records what it was asked
        calls.append((requests, kw))
        return [EditOutput([Image.new("RGB", (8, 8), (40 * k, 0, 0)) for k in range(len(r.prompts))], None, None,
                           loop="eager", capture_failure="RuntimeError: not capturable")  # a graph that failed
                for r in requests]

    pipe.edit_batch = fake_edit_batch
    job = {"image": str(root / "img/2.png"), "prompt": "a dog on grass", "edits": ["a cat on grass", "a cow on grass"],
           "seed": 5, "controller": {"mode": "replace", "cross_steps": 0.6, "self_steps": [0.1, 0.5],
                                     "equalizer": {"grass": 3.0}}}
    f = tmp_path / "edit.jsonl"
    f.write_text(json.dumps(job) + "\n")
    s = jobs.run_jobs(f, pipe, tmp_path / "out", steps=STEPS, inner_steps=INNER, progress=False)
    assert s.ok == 1
    (([request], kw),) = calls
    assert request.prompts == ["a dog on grass", "a cat on grass", "a cow on grass"] and request.seed == 5
    assert kw["steps"] == STEPS
    ctrl = request.controller
    assert isinstance(ctrl, p2p.Reweight) and ctrl.equalizer == {"grass": 3.0} and ctrl.cross_steps == 0.6
    assert isinstance(ctrl.prev, p2p.Replace) and list(ctrl.prev.self_steps) == [0.1, 0.5]
    assert request.inversion.prompt == "a dog on grass"
    (e,) = _index(tmp_path / "out").values()
    assert len(e["outputs"]["edits"]) == 3 and e["loops"] == {"inversion": "eager", "edit": "eager"}
    assert e["capture_failures"] == ["RuntimeError: not capturable"]
    for k, name in enumerate(e["outputs"]["edits"]):
        assert Image.open(tmp_path / "out" / name).getpixel((0, 0)) == (40 * k, 0, 0)


def test_edits_written(setup, tmp_path):
    """A job with edit prompts writes the reconstruction and each edit, equal to pipe.edit on its inversion."""
    root, model = setup
    job = {"image": "img/1.png", "prompt": "a red car", "edits": ["a red car"], "seed": 3,
           "controller": {"mode": "reweight", "equalizer": {"red": 2.0}, "cross_steps": 0.8, "self_steps": 0.4}}
    f = root / "edit_jobs.jsonl"
    f.write_text(json.dumps(job) + "\n")
    s = jobs.run_jobs(f, str(model), tmp_path, steps=STEPS, inner_steps=INNER, device="cpu", progress=False)
    (e,) = _index(tmp_path).values()
    assert s.ok == 1, e.get("error")
    assert len(e["outputs"]["edits"]) == 2  # reconstruction + one edit
    assert e["loops"] == {"inversion": "eager", "edit": "eager"} and "capture_failures" not in e
    pipe = p2p.load(str(model), device="cpu")
    inv = p2p.Inversion.load(tmp_path / e["outputs"]["inversion"])
    ref = pipe.edit(["a red car", "a red car"], controller=p2p.Reweight(equalizer={"red": 2.0}), inversion=inv,
                    seed=3, progress=False)
    from PIL import Image
    for name, im in zip(e["outputs"]["edits"], ref.images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name).convert("RGB")), np.asarray(im.convert("RGB")))


KILL_AFTER_FIRST_BATCH = '''
import os, signal, sys
from p2p_engine import cli, jobs
append = jobs._append  # the name run_jobs calls
def killing_append(path, entry):
    append(path, entry)
    killing_append.ok += entry["status"] == "ok"
    if killing_append.ok == int(os.environ["KILL_AFTER"]):  # no clean-up, no merge: as kill -9 from outside
        os.kill(os.getpid(), signal.SIGKILL)
killing_append.ok = 0
jobs._append = killing_append
sys.exit(cli.main(sys.argv[1:]))
'''


def test_max_batches_stops_after_first_batch(setup, tmp_path):
    s = _run(setup, tmp_path, max_batches=1)
    assert (s.ok, s.failed, s.skipped) == (BATCH, 0, 0)
    assert len(_index(tmp_path)) == BATCH


def test_resume_after_kill(setup, single_run, tmp_path):
    root, model = setup
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_BATCH, "run", str(root / "jobs.jsonl"),
                           "--model", str(model), "--out", str(out), "--steps", str(STEPS), "--inner-steps",
                           str(INNER), "--batch-size", str(BATCH), "--device", "cpu"],
                          env={**os.environ, "KILL_AFTER": str(BATCH), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    done = {jid: e for jid, e in _index(out).items() if e["status"] == "ok"}
    assert len(done) == BATCH
    mtimes = {jid: (out / e["outputs"]["inversion"]).stat().st_mtime_ns for jid, e in done.items()}

    # the killed run was sharded differently (as if by a torchrun rank): its index file still counts
    (out / "index.jsonl").rename(out / "index.rank1.jsonl")
    second = _run(setup, out)
    assert not (out / "index.rank1.jsonl").exists()
    assert (second.ok, second.failed, second.skipped) == (6 - BATCH, 1, BATCH)
    index = _index(out)
    assert sum(e["status"] == "ok" for e in index.values()) == 6
    for jid, t in mtimes.items():  # finished images were not redone
        assert (out / done[jid]["outputs"]["inversion"]).stat().st_mtime_ns == t
        assert index[jid] == done[jid]
    # the resumed run's files equal the uninterrupted run's
    ref, _ = single_run
    for jid, e in index.items():
        if e["status"] == "ok":
            a = p2p.Inversion.load(out / e["outputs"]["inversion"])
            b = p2p.Inversion.load(ref / e["outputs"]["inversion"])
            torch.testing.assert_close(a.latent_T, b.latent_T, rtol=1e-5, atol=1e-5)

    # killed between writing a job's files and its index line: only that job is redone
    victim = next(jid for jid, e in index.items() if e["status"] == "ok")
    keep = [line for line in (out / "index.jsonl").read_text().splitlines() if json.loads(line)["id"] != victim]
    (out / "index.jsonl").write_text("\n".join(keep) + "\n" + '{"id": "cut sh')  # and a half-written line
    third = _run(setup, out)
    assert (third.ok, third.failed, third.skipped) == (1, 1, 5)
    assert len(_index(out)) == 7


def test_job_file_errors_and_stable_ids(setup, tmp_path):
    root, _ = setup
    img = str(root / "img/0.png")
    lines = [json.dumps({"image": img, "prompt": "a cat"}),
             json.dumps({"prompt": "a cat", "image": img}, indent=None, separators=(", ", " : ")),  # same job
             "{not json",
             json.dumps({"image": img, "prompt": "a cat", "colour": "red"}),
             json.dumps({"image": img, "prompt": "a cat", "controller": {"mode": "swap"}, "edits": ["a dog"]}),
             json.dumps({"image": img, "prompt": " ".join(["cat"] * 100)})]
    f = tmp_path / "jobs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    parsed = manifest.read_jobs(f)
    assert len(parsed) == 5  # the reordered duplicate runs once
    assert parsed[0].id == manifest.job_id({"prompt": "a cat", "image": img}) and parsed[0].error is None
    assert "not valid JSON" in parsed[1].error and "colour" in parsed[2].error and "swap" in parsed[3].error
    s = jobs.run_jobs(f, str(setup[1]), tmp_path / "out", steps=STEPS, inner_steps=INNER, device="cpu",
                      progress=False)
    assert (s.ok, s.failed) == (1, 4)
    errors = [e["error"] for e in _index(tmp_path / "out").values() if e["status"] == "error"]
    assert any("tokens" in e and "at most 77" in e for e in errors)
    f.write_bytes(b'{"image": "x.png", "prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match="jobs.jsonl is not UTF-8"):
        manifest.read_jobs(f)


def test_torchrun_two_ranks_equals_single_process(setup, single_run, tmp_path):
    root, model = setup
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the Python running the tests"
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "p2p_engine", "run",
                           str(root / "jobs.jsonl"), "--model", str(model), "--out", str(out), "--steps", str(STEPS),
                           "--inner-steps", str(INNER), "--batch-size", str(BATCH), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "one job fails, so the run must report failure"
    assert "1 failed of 7 jobs" in proc.stdout, proc.stdout + proc.stderr
    assert not list(out.glob("index.rank*.jsonl"))  # merged into index.jsonl by rank 0

    ref_dir, _ = single_run
    pipe = p2p.load(str(model), device="cpu")
    got, ref = _index(out), _index(ref_dir)
    assert sorted(got) == sorted(ref)
    assert {e["rank"] for e in got.values()} == {0, 1}  # both ranks did work
    for jid, e in ref.items():
        assert got[jid]["status"] == e["status"] and got[jid].get("outputs") == e.get("outputs")
        if e["status"] != "ok":
            continue
        a = p2p.Inversion.load(out / e["outputs"]["inversion"])
        b = p2p.Inversion.load(ref_dir / e["outputs"]["inversion"])
        # shards batch different images together; batching is per-image independent up to fp32 reassociation
        assert_same_inversion(pipe, a, b)
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "index.jsonl"}
    assert files == {p.relative_to(ref_dir) for p in ref_dir.rglob("*") if p.is_file() and p.name != "index.jsonl"}


# -- input errors found before any work, and resuming only what the same model and settings made ------------

def _job_file(tmp_path, specs, name="jobs.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(s) + "\n" for s in specs))
    return f


@pytest.fixture(scope="module")
def toy_pipe():
    return p2p.load("toy", device="cpu")


def test_duplicate_outputs_refused(setup, tmp_path):
    """Two jobs writing one "out" file would overwrite each other: both are errors naming the other line."""
    img = str(setup[0] / "img/0.png")
    f = _job_file(tmp_path, [{"image": img, "prompt": "a cat", "edits": ["a dog"], "out": "x.png"},
                             {"image": img, "prompt": "a red cat", "edits": ["a red dog"], "out": "./x.png"},
                             {"image": img, "prompt": "a cat", "edits": ["a cow"], "out": "y.png"}])
    a, b, c = manifest.read_jobs(f)
    assert "line 1" in a.error and "also the output of line 2" in a.error
    assert "line 2" in b.error and "also the output of line 1" in b.error and c.error is None
    s = jobs.run_jobs(_job_file(tmp_path, [a.spec, b.spec], "dup.jsonl"), "toy", tmp_path / "out",
                      steps=STEPS, method="ddim", device="cpu", progress=False)
    assert (s.ok, s.failed, s.exit_status) == (0, 2, 1) and not (tmp_path / "out" / "x.png").exists()


def test_resume_checks_model_and_every_setting(setup, toy_pipe, tmp_path):
    """A job is done only for the same model and settings, defaults included."""
    f = _job_file(tmp_path, [{"image": str(setup[0] / "img/0.png"), "prompt": "a cat"}])
    out = tmp_path / "out"

    def run(model=toy_pipe, **kw):
        s = jobs.run_jobs(f, model, out, steps=STEPS, method="ddim", device="cpu", progress=False, **kw)
        return s.ok, s.skipped

    assert run(steps_offset=0) == (1, 0)
    assert run() == (1, 0)  # the checkpoint's offset (1 for the toy) differs from 0
    assert run(steps_offset=toy_pipe.scheduler.config.steps_offset) == (0, 1)  # the default given explicitly
    assert run(guidance=toy_pipe.default_guidance) == (0, 1)
    assert run(guidance=3.0) == (1, 0)
    assert run(guidance=3.0) == (0, 1)
    assert run(str(setup[1]), guidance=3.0) == (1, 0)  # another checkpoint: redone
    (e,) = _index(out).values()
    assert e["model"] == jobs.model_fingerprint(p2p.load(str(setup[1]), device="cpu")) != \
        jobs.model_fingerprint(toy_pipe)
    assert e["model_path"] == str(setup[1].resolve()) and e["dtype"] == "float32"
    old = {k: v for k, v in e.items() if k != "steps_offset"}  # a line of a run that did not record a setting
    assert manifest._complete(e, out, {k: e[k] for k in manifest.SETTINGS})
    assert not manifest._complete(old, out, {k: e[k] for k in manifest.SETTINGS})


def test_edits_checked_before_inverting(setup, toy_pipe, tmp_path, monkeypatch):
    """Word counts, blend and reweight words, windows: errors before the inversion, no files left behind."""
    img = str(setup[0] / "img/0.png")
    f = _job_file(tmp_path, [
        {"image": img, "prompt": "a cat", "edits": ["a big dog"], "controller": {"mode": "replace"}},
        {"image": img, "prompt": "a cat", "edits": ["a dog"], "blend": {"words": ["zebra", "dog"]}},
        {"image": img, "prompt": "a cat", "edits": ["a dog"], "controller": {"equalizer": {"zebra": 2.0}}},
        {"image": img, "prompt": "a cat", "edits": ["a dog"], "controller": {"cross_steps": 1.5}},
        {"image": img, "prompt": "a cat", "edits": ["a dog"]}])
    inverted = []
    invert_batch = toy_pipe.invert_batch
    monkeypatch.setattr(toy_pipe, "invert_batch", lambda images, prompts, **kw: inverted.extend(prompts) or
                        invert_batch(images, prompts, **kw))
    s = jobs.run_jobs(f, toy_pipe, tmp_path / "out", steps=STEPS, method="ddim", progress=False)
    assert (s.ok, s.failed) == (1, 4) and inverted == ["a cat"]
    errors = sorted(e["error"] for e in _index(tmp_path / "out").values() if e["status"] == "error")
    assert any("same number of words" in e for e in errors) and any("cross_steps = 1.5" in e for e in errors)
    assert sum("'zebra' is not in the prompt" in e for e in errors) == 2
    assert len(list((tmp_path / "out").rglob("*.safetensors"))) == 1


def test_failed_edit_leaves_no_inversion(setup, toy_pipe, tmp_path, monkeypatch):
    def broken_edit(*args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(toy_pipe, "edit_batch", broken_edit)
    f = _job_file(tmp_path, [{"image": str(setup[0] / "img/0.png"), "prompt": "a cat", "edits": ["a dog"]}])
    s = jobs.run_jobs(f, toy_pipe, tmp_path / "out", steps=STEPS, method="ddim", progress=False)
    assert s.failed == 1 and not list((tmp_path / "out").rglob("*.safetensors"))


def test_interrupt_says_what_was_kept(setup, toy_pipe, tmp_path, monkeypatch):
    f = _job_file(tmp_path, [{"image": str(setup[0] / f"img/{k}.png"), "prompt": "a cat"} for k in (0, 1, 2)])
    finish = jobs._finish

    def interrupted_after_one(*args):
        if args[-2].ok:  # the summary: one job finished before Ctrl-C
            raise KeyboardInterrupt
        finish(*args)

    monkeypatch.setattr(jobs, "_finish", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt, match="1 job finished and was kept .* run again to resume"):
        jobs.run_jobs(f, toy_pipe, tmp_path / "out", steps=STEPS, method="ddim", progress=False)
    assert [e["status"] for e in _index(tmp_path / "out").values()] == ["ok"]


def test_bad_output_folder_or_model_writes_nothing(setup, tmp_path):
    f = _job_file(tmp_path, [{"image": str(setup[0] / "img/0.png"), "prompt": "a cat"}])
    (tmp_path / "afile").write_text("")
    assert cli.main(["run", str(f), "--model", "toy", "--out", str(tmp_path / "afile")]) == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["run", str(f), "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def _records(out) -> dict:
    """The index lines by job id, without what a run's timing puts in them."""
    return {jid: {k: v for k, v in e.items() if k != "seconds"} for jid, e in _index(out).items()}


def _files(out) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "index.jsonl"}


def test_batched_edits_give_the_files_and_records_of_one_by_one(setup, toy_pipe, tmp_path):
    """The toy model's edits of five jobs in one edit_batch write the same files, byte for byte, and the same index
    records as the same run with one job per edit_batch (the inversions batched alike), and a job whose edit
    fails (a seed out of range, found only when it is edited) fails alone."""
    root, _ = setup
    specs = [{"image": str(root / f"img/{k}.png"), "prompt": p, "edits": [e], "seed": k, **extra}
             for k, (p, e, extra) in zip((0, 1, 2, 4, 5, 6), [  # img/3.png is not an image
                 ("a cat", "a dog", {}),
                 ("a red car", "a blue car", {"blend": {"words": ["red", "blue"]}}),  # its start left to the default
                 ("a dog on grass", "a big dog on grass", {"controller": {"mode": "refine", "cross_steps": 0.5}}),
                 ("a small boat", "a small boat", {"controller": {"mode": "reweight", "equalizer": {"small": 2.0}}}),
                 ("a tree", "a bush", {"seed": -1}),  # refused by the edit, after the inversion
                 ("a cup of tea", "a cup of coffee", {"out": "tea/coffee.png"})])]
    f = _job_file(tmp_path, specs)
    runs = {}
    for name, kw in [("batched", {}), ("one by one", {"edit_batch_size": 1})]:
        s = jobs.run_jobs(f, toy_pipe, tmp_path / name, steps=STEPS, inner_steps=INNER, batch_size=6,
                          progress=False, **kw)
        assert (s.ok, s.failed) == (5, 1), name
        runs[name] = tmp_path / name
    batched, single = runs["batched"], runs["one by one"]
    assert _records(batched) == _records(single)
    assert _files(batched) == _files(single) and len(_files(batched)) == 5 + 2 * 4 + 1  # inversions, edits, out
    # each record states the defaults of an edit from an inversion it used: the null-text notebook's
    used = {e["prompt"]: (e["self_max_queries"], e["blend_start"]) for e in _index(batched).values()
            if e["status"] == "ok"}
    assert used == {"a cat": (1024, None), "a red car": (1024, 0.2), "a dog on grass": (1024, None),
                    "a small boat": (1024, None), "a cup of tea": (1024, None)}
    (bad,) = [e for e in _index(batched).values() if e["status"] == "error"]
    assert bad["prompt"] == "a tree" and "seed must be an integer in [0, 2**63)" in bad["error"]
    assert not [f for f in (batched / bad["id"]).rglob("*") if f.is_file()]  # its inversion file removed
