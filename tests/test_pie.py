"""PIE-Bench support (p2p_engine/pie.py): masks as the reference decodes them, the protocol's jobs, a resumable
run in PnPInversion's output layout and `pie-metrics` on it (the metrics themselves: tests/test_metrics*.py)."""
import json

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import metrics, pie
from p2p_engine.cli import main
from p2p_engine.pie_runs import run_pie
from p2p_engine.toy import pie as toy_pie
from reference import ref_mask_decode


# -- masks ------------------------------------------------------------------------------------------

def test_mask_decode_matches_the_reference():
    rng = np.random.default_rng(0)
    for shape in ((512, 512), (64, 64), (7, 9)):
        n = shape[0] * shape[1]
        starts = np.sort(rng.choice(n, 6, replace=False))
        encoded = [int(v) for s in starts for v in (s, rng.integers(1, n // 5))] + [n - 3, 10]  # a run past the end
        assert np.array_equal(pie.mask_decode(encoded, shape), ref_mask_decode(encoded, shape))


def test_toy_writer_masks_decode_exactly():
    """The run-length masks the toy writer stores decode to the masks it built (plus the decoder's border)."""
    for p in toy_pie.make_pairs(per_type=3):
        got = pie.mask_decode(p.entry["mask"], (64, 64))
        assert np.array_equal(got[1:-1, 1:-1].astype(bool), p.mask[1:-1, 1:-1])
        assert got[0].all() and got[-1].all() and got[:, 0].all() and got[:, -1].all()
        assert np.array_equal(ref_mask_decode(pie.mask_encode(p.mask), (64, 64)), got)


# -- the protocol -----------------------------------------------------------------------------------

def _entry(source, target, blended="", type_id="6"):
    return pie.Entry("000", "6_x/1.png", pie.clean(source), pie.clean(target), type_id,
                     tuple(blended.split()) if blended else None, [])


def test_protocol_jobs():
    job = pie.protocol_job(_entry("a cat on a sofa", "a [dog] on a sofa", "cat dog"), "/pie")
    ctrl = job["controller"]
    assert (ctrl["mode"], ctrl["cross_steps"], ctrl["self_steps"], ctrl["self_max_queries"]) == ("replace", 0.4, 0.6,
                                                                                                1024)
    assert ctrl["equalizer"] == {"dog": 2.0} and job["blend"] == {"words": [["cat"], ["dog"]], "start": 0.2,
                                                                  "threshold": 0.3}
    assert job["prompt"] == "a cat on a sofa" and job["edits"] == ["a dog on a sofa"]
    assert job["out"] == "annotation_images/6_x/1.png" and job["image"].endswith("/pie/annotation_images/6_x/1.png")
    refine = pie.protocol_job(_entry("a cat on a sofa", "a [fluffy] cat on a sofa", "cat cat"), "/pie")
    assert refine["controller"]["mode"] == "refine"
    plain = pie.protocol_job(_entry("a cat", "a dog"), "/pie")
    assert "blend" not in plain and "equalizer" not in plain["controller"]
    # a blended word missing from its prompt blends and re-weights nothing, as the reference's lookups
    missing = pie.protocol_job(_entry("a cat, sitting", "a dog sitting", "cat dog,"), "/pie")
    assert missing["blend"]["words"] == [[], []] and "equalizer" not in missing["controller"]
    controller = p2p.controllers.from_spec(job["controller"])
    assert isinstance(controller, p2p.Reweight) and isinstance(controller.prev, p2p.Replace)
    assert controller.prev.self_max_queries == 1024


def test_bad_mapping_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mapping_file.json"):
        pie.read_mapping(tmp_path)
    (tmp_path / "mapping_file.json").write_text(json.dumps({"1": {"image_path": "a.png"}}))
    with pytest.raises(ValueError, match="lacks"):
        pie.read_mapping(tmp_path)


# -- a run, resumed, and its metrics -------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pie")
    folder = toy_pie.write(root / "pie", per_type=1)
    out = root / "out"
    args = ["pie", str(folder), "--model", "toy", "--methods", "direct,null_text", "--out", str(out),
            "--steps", "3", "--inner-steps", "2", "--device", "cpu"]
    assert main(args) == 0
    return folder, out, args


def test_run_writes_the_reference_layout_and_resumes(toy_run, capsys):
    folder, out, args = toy_run
    entries = pie.read_mapping(folder)
    assert len(entries) == 5
    files = {m: [out / m / e.out for e in entries] for m in ("direct", "null_text")}
    assert all(f.is_file() for fs in files.values() for f in fs)
    assert not list((out / "direct").rglob("*.safetensors"))  # PIE runs keep only the edited images
    mtimes = {f: f.stat().st_mtime_ns for fs in files.values() for f in fs}
    capsys.readouterr()
    assert main(args) == 0  # resumed: nothing to redo
    assert "0 done, 5 already done" in capsys.readouterr().out
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())
    gone = files["direct"][2]
    gone.unlink()
    assert main(args) == 0
    assert "direct: 1 done, 4 already done" in capsys.readouterr().out
    assert gone.is_file() and all(f.stat().st_mtime_ns == t for f, t in mtimes.items() if f != gone)


def test_metrics_table_and_csv(toy_run, capsys):
    folder, out, _ = toy_run
    assert main(["pie-metrics", str(folder), str(out), "--types", "6,8"]) == 0
    printed = capsys.readouterr().out
    assert "| p2p | direct | 6 change attribute color | 1 |" in printed and "absent: LPIPS" in printed
    lines = (out / "pie_metrics.csv").read_text().splitlines()
    assert lines[0].startswith("editor,method,type,images,failed,psnr,mse,ssim")
    assert any(line.startswith("p2p,null_text,all,2,0,") for line in lines)
    per_image = (out / "pie_metrics_per_image.csv").read_text()
    assert "edit_success" in per_image  # a toy PIE folder adds the detector's measure
    rows = metrics.evaluate(folder, out, ["null_text"], types=["6"])
    (row,) = rows
    assert row["unet_evaluations"] == row["inversion_evaluations"] + 3 * 2 * 2  # 3 steps x [uncond, cond] x 2


def test_unet_evaluations_are_counted_right(tiny_pipe):
    """The costs an Inversion states equal the rows a hook on the UNet counts (forward rows, and rows whose
    inputs need gradients: the null-text iterations' backward passes)."""
    counts = {"forward": 0, "backward": 0}

    def hook(module, args, kwargs):
        x, ctx = args[0], args[2] if len(args) > 2 else kwargs.get("context")
        counts["forward"] += x.shape[0]
        counts["backward"] += x.shape[0] if torch.is_grad_enabled() and ctx.requires_grad else 0

    handle = tiny_pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    image = (np.random.default_rng(1).uniform(0, 1, (48, 48, 3)) * 255).astype(np.uint8)
    try:
        for method in ("null_text", "direct"):
            counts.update(forward=0, backward=0)
            inv = tiny_pipe.invert(image, "a cat", steps=4, inner_steps=3, method=method, progress=False,
                                   use_graph=False)
            cost = inv.unet_evaluations(2)
            assert (counts["forward"], counts["backward"]) == (cost["inversion"], cost["inversion_backward"])
            counts.update(forward=0, backward=0)
            tiny_pipe.edit(["a cat", "a dog"], p2p.Replace(), inversion=inv, progress=False, decode_images=False)
            assert counts["forward"] == cost["edit"]
    finally:
        handle.remove()


def test_torchrun_shards_like_one_process(toy_run, tmp_path):
    """Under torchrun the two ranks share each method's entries and together write what one process wrote."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    folder, out, args = toy_run
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the Python running the tests"
    dist = tmp_path / "dist"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "p2p_engine", *args]
    cmd[cmd.index("--out") + 1] = str(dist)
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for method in ("direct", "null_text"):
        lines = [json.loads(x) for x in (dist / method / "index.jsonl").read_text().splitlines()]
        assert {x["rank"] for x in lines} == {0, 1} and all(x["status"] == "ok" for x in lines)
        for e in pie.read_mapping(folder):
            assert (dist / method / e.out).is_file()
    a = metrics.evaluate(folder, out, ["direct"])
    b = metrics.evaluate(folder, dist, ["direct"])
    for x, y in zip(a, b):  # the same edits up to float reassociation (each rank runs its own batches)
        assert x["key"] == y["key"] and abs(x["psnr"] - y["psnr"]) < 0.5


# -- bad input and missing outputs ------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"a": 5}, "entry 'a' must be an object"),
    ({"blended_word": 5}, "blended_word 5; expected a string"),
    ({"mask": "garbage"}, "mask 'garbage'"),
    ({"mask": [1, 2, 3]}, "run-length pairs"),
    ({"original_prompt": None}, "original_prompt None")])
def test_mapping_entries_of_the_wrong_type(tmp_path, change, message):
    folder = toy_pie.write(tmp_path / "pie", per_type=1)
    data = json.loads((folder / pie.MAPPING_FILE).read_text())
    key = next(iter(data))
    data.update(change) if "a" in change else data[key].update(change)
    (folder / pie.MAPPING_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        pie.read_mapping(folder)
    assert main(["pie-metrics", str(folder), str(tmp_path)]) == 1  # one line, no traceback
    assert main(["pie", str(folder), "--model", "toy", "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_metrics_count_missing_images_and_refuse_methods_never_run(toy_run, tmp_path):
    import shutil

    folder, out, _ = toy_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    gone = copy / "direct" / pie.read_mapping(folder)[1].out
    gone.unlink()
    rows = metrics.evaluate(folder, copy, ["direct"])
    assert [r["status"] for r in rows].count("missing") == 1
    assert next(r for r in rows if r["status"] == "missing")["key"] == pie.read_mapping(folder)[1].key
    (total,) = [s for s in metrics.summarize(rows) if s["type"] == "all"]
    assert (total["images"], total["failed"]) == (4, 1)
    assert main(["pie-metrics", str(folder), str(copy)]) == 1  # a missing image is a failure
    table = (copy / "pie_metrics.csv").read_text()
    assert main(["pie-metrics", str(folder), str(copy), "--methods", "proximal"]) == 1  # never run
    assert (copy / "pie_metrics.csv").read_text() == table  # the good table is kept


def test_resume_redoes_another_model_and_bad_output_writes_nothing(toy_run, tmp_path, tiny_ckpt, capsys):
    folder, _, _ = toy_run
    args = ["pie", str(folder), "--methods", "direct", "--types", "6", "--out", str(tmp_path / "out"), "--steps", "3",
            "--device", "cpu"]
    assert main([*args, "--model", "toy"]) == 0
    # the entries a --types run left out are not failures of it
    assert main(["pie-metrics", str(folder), str(tmp_path / "out")]) == 0
    assert {r["type"] for r in metrics.evaluate(folder, tmp_path / "out")} == {"6"}
    assert main([*args, "--model", "toy", "--steps-offset", "1"]) == 0  # the toy's own offset: nothing to redo
    assert "direct: 0 done, 1 already done" in capsys.readouterr().out
    assert main([*args, "--model", str(tiny_ckpt)]) == 0
    assert "direct: 1 done, 0 already done" in capsys.readouterr().out
    (tmp_path / "afile").write_text("")
    assert main([*args[:-5], str(tmp_path / "afile"), "--model", "toy"]) == 1
    (tmp_path / "empty").mkdir()
    assert main([*args[:-5], str(tmp_path / "new"), "--model", str(tmp_path / "empty")]) == 1
    assert not (tmp_path / "new").exists()


def test_batched_edits_leave_the_results_unchanged(toy_run, tmp_path):
    """A toy PIE run edits its entries in one edit_batch per inversion batch (the default); the same run with one
    entry per edit_batch writes the same edited images, byte for byte, and the same index records (timing aside).
    Both runs are fresh: the module's run is partly redone by the resume test, with another inversion batch."""
    folder = toy_run[0]
    runs = {}
    for name, size in (("batched", None), ("single", 1)):
        runs[name] = tmp_path / name
        run_pie(folder, "toy", runs[name], ["direct", "null_text"], steps=3, inner_steps=2, device="cpu",
                progress=False, edit_batch_size=size)

    def records(index):
        return sorted(({k: v for k, v in e.items() if k != "seconds"} for e in map(json.loads, index.read_text()
                                                                                   .splitlines())), key=str)
    for method in ("direct", "null_text"):
        ours, theirs = runs["batched"] / method, runs["single"] / method
        images = sorted(p.relative_to(theirs) for p in (theirs / pie.IMAGE_FOLDER).rglob("*") if p.is_file())
        assert len(images) == 5
        assert all((ours / p).read_bytes() == (theirs / p).read_bytes() for p in images)
        assert records(ours / "index.jsonl") == records(theirs / "index.jsonl")
        # the protocol gives the self limit and the blend's start itself: the defaults of issue 36 change nothing
        used = {(e["self_max_queries"], e["blend_start"]) for e in records(ours / "index.jsonl")}
        assert used <= {(32 * 32, 0.2), (32 * 32, None)} and (32 * 32, 0.2) in used
