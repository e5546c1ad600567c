"""PSNR, MSE and SSIM on the unedited part (p2p_engine/metrics/pixels.py), and `pie-metrics` over the three output
layouts (runs.py, report.py, the CLI).

torchmetrics cannot be imported here (its image metrics pull in torchvision, which does not load beside this CPU
torch), so PnPInversion's MetricsCalculator and torchmetrics 1.2's PSNR, MSE and SSIM are re-stated below in their
own structure, in float32, as the reference runs them; a float64 SSIM written from its definition checks both.
The networks' metrics are in tests/test_metrics_networks.py.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from p2p_engine import metrics, pie
from p2p_engine.cli import main
from p2p_engine.metrics import pixels, report, runs
from p2p_engine.toy import pie as toy_pie
from reference import ref_mask_decode

RTOL = 1e-6  # float32 rounding: the same float32 operations on both sides


# -- torchmetrics 1.2 and MetricsCalculator, restated ---------------------------------------------------------------

def tm_psnr(preds, target, data_range=1.0, base=10.0):
    sum_squared_error = torch.sum(torch.pow(preds - target, 2))
    num_obs = torch.tensor(target.numel())
    psnr_base_e = 2 * torch.log(torch.tensor(float(data_range))) - torch.log(sum_squared_error / num_obs)
    return psnr_base_e * (10 / torch.log(torch.tensor(base)))


def tm_mse(preds, target):
    diff = preds - target
    return torch.sum(diff * diff) / target.numel()


def tm_ssim(preds, target, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    """torchmetrics 1.2's _ssim_update (2-D, Gaussian kernel) and the metric's elementwise mean."""
    def gaussian(kernel_size, s, dtype):
        dist = torch.arange(start=(1 - kernel_size) / 2, end=(1 + kernel_size) / 2, step=1, dtype=dtype)
        gauss = torch.exp(-torch.pow(dist / s, 2) / 2)
        return (gauss / gauss.sum()).unsqueeze(dim=0)

    c1, c2 = pow(k1 * data_range, 2), pow(k2 * data_range, 2)
    channel, dtype = preds.size(1), preds.dtype
    gauss_kernel_size = [int(3.5 * s + 0.5) * 2 + 1 for s in (sigma, sigma)]
    pad_h, pad_w = (gauss_kernel_size[0] - 1) // 2, (gauss_kernel_size[1] - 1) // 2
    preds = F.pad(preds, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    target = F.pad(target, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    kx, ky = gaussian(gauss_kernel_size[0], sigma, dtype), gaussian(gauss_kernel_size[1], sigma, dtype)
    kernel = torch.matmul(kx.t(), ky).expand(channel, 1, *gauss_kernel_size)
    input_list = torch.cat((preds, target, preds * preds, target * target, preds * target))
    output_list = F.conv2d(input_list, kernel, groups=channel).split(preds.shape[0])
    mu_pred_sq, mu_target_sq = output_list[0].pow(2), output_list[1].pow(2)
    mu_pred_target = output_list[0] * output_list[1]
    sigma_pred_sq = output_list[2] - mu_pred_sq
    sigma_target_sq = output_list[3] - mu_target_sq
    sigma_pred_target = output_list[4] - mu_pred_target
    upper = 2 * sigma_pred_target.to(dtype) + c2
    lower = (sigma_pred_sq + sigma_target_sq).to(dtype) + c2
    ssim_idx = ((2 * mu_pred_target + c1) * upper) / ((mu_pred_sq + mu_target_sq + c1) * lower)
    ssim_idx = ssim_idx[..., pad_h:-pad_h, pad_w:-pad_w]
    return ssim_idx.reshape(ssim_idx.shape[0], -1).mean(-1).sum() / preds.shape[0]


def ref_unedited(src, tgt, mask):
    """evaluate.py's *_unedit_part metrics through MetricsCalculator: 'nan' without an unedited part."""
    mask3 = mask[:, :, np.newaxis].repeat([3], axis=2)
    if (1 - mask3).sum() == 0:
        return {"psnr": math.nan, "mse": math.nan, "ssim": math.nan}
    out = {}
    for name, fn, batch in (("psnr", tm_psnr, True), ("mse", tm_mse, False), ("ssim", tm_ssim, True)):
        a = np.array(src).astype(np.float32) / 255 * np.array(1 - mask3).astype(np.float32)
        b = np.array(tgt).astype(np.float32) / 255 * np.array(1 - mask3).astype(np.float32)
        a, b = (torch.tensor(x).permute(2, 0, 1) for x in (a, b))
        if batch:
            a, b = a.unsqueeze(0), b.unsqueeze(0)
        out[name] = fn(a.contiguous(), b.contiguous()).item()
    return out


def ssim_from_definition(a, b):
    """SSIM in float64 from its definition: at every pixel 5 or more from the border, the Gaussian-weighted
    (11 x 11, sigma 1.5) means, variances and covariance over the reflect-padded images; per channel, averaged."""
    k = np.arange(11) - 5
    g = np.exp(-(k / 1.5) ** 2 / 2)
    w = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for ch in range(a.shape[2]):
        x = np.pad(a[:, :, ch].astype(np.float64), 5, mode="reflect")
        y = np.pad(b[:, :, ch].astype(np.float64), 5, mode="reflect")
        for i in range(5, a.shape[0] - 5):
            for j in range(5, a.shape[1] - 5):
                px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cov = (w * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def _pair(seed, shape=(40, 36, 3), spread=30):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-spread, spread + 1, shape), 0, 255).astype(np.uint8)
    return a, b


def _mask(shape, box):
    m = np.zeros(shape, bool)
    m[box] = True
    return ref_mask_decode(pie.mask_encode(m), shape)


# -- the unedited part --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, shape", [(0, (40, 36, 3)), (1, (64, 64, 3)), (2, (17, 23, 3))])
def test_psnr_mse_ssim_match_the_reference(seed, shape):
    a, b = _pair(seed, shape)
    mask = _mask(shape[:2], np.s_[3:shape[0] // 2, 4:shape[1] // 2])
    got, want = pixels.unedited_metrics(a, b, mask), ref_unedited(a, b, mask)
    for k in ("psnr", "mse", "ssim"):
        assert got[k] == pytest.approx(want[k], rel=RTOL), k
    # the float32 recipe is the float64 definition up to float32 rounding
    keep = (1 - mask)[:, :, None]
    assert got["ssim"] == pytest.approx(ssim_from_definition(a / 255.0 * keep, b / 255.0 * keep), abs=2e-6)
    assert got["mse"] == pytest.approx(np.mean((a / 255.0 * keep - b / 255.0 * keep) ** 2), rel=1e-5)
    # the edited region does not count: an edit inside the mask (its border excluded) changes nothing
    c = b.copy()
    c[5:shape[0] // 2 - 1, 6:shape[1] // 2 - 1] = 0
    assert pixels.unedited_metrics(a, c, mask) == got


def test_recipe_edge_cases():
    a, b = _pair(4)
    everything = np.ones(a.shape[:2])
    assert all(math.isnan(v) for v in pixels.unedited_metrics(a, b, everything).values())
    assert all(math.isnan(v) for v in ref_unedited(a, b, everything).values())
    border_only = _mask(a.shape[:2], np.s_[0:0, 0:0])
    same = pixels.unedited_metrics(a, a, border_only)
    assert same == {"psnr": math.inf, "mse": 0.0, "ssim": 1.0}
    # the zeroed border is in the images compared: the whole image, zeros included
    a2, b2 = a.copy(), b.copy()
    a2[0], b2[0] = 0, 255
    assert pixels.unedited_metrics(a2, b2, border_only) == pixels.unedited_metrics(a, b, border_only)
    with pytest.raises(ValueError, match="larger than 5 x 5"):
        pixels.ssim(torch.zeros(1, 3, 5, 9), torch.zeros(1, 3, 5, 9))


# -- the output layouts and the grid ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    return toy_pie.write(tmp_path_factory.mktemp("pie") / "pie", per_type=1)


def _edit(source, seed):
    return _pair(seed, source.shape, spread=12)[1] if seed else source


def _native_run(folder, run, entries, seed, seconds=2.0):
    """A run folder as `p2p-engine pie` writes it: jobs.jsonl, index.jsonl and the edited images."""
    from p2p_engine.images import load_image

    jobs = [pie.protocol_job(e, folder) for e in entries]
    run.mkdir(parents=True)
    (run / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    lines = []
    for n, e in enumerate(entries):
        edited = _edit(load_image(folder / pie.IMAGE_FOLDER / e.image_path), seed + n)
        (run / e.out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(edited).save(run / e.out)
        lines.append({"id": f"j{n}", "status": "ok", "outputs": {"edits": [e.out]}, "seconds": seconds,
                      "unet_evaluations": {"inversion": 50, "inversion_backward": 0, "edit": 200}})
    (run / "index.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _pnp_run(folder, run, entries, seed):
    """A run as PnPInversion's run_editing_*.py save it: [source | ... | edit] side by side, no job files."""
    from p2p_engine.images import load_image

    for n, e in enumerate(entries):
        source = load_image(folder / pie.IMAGE_FOLDER / e.image_path)
        noise = _pair(99, source.shape)[0]
        (run / e.out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([source, noise, noise, _edit(source, seed + n)], axis=1)).save(run / e.out)


@pytest.fixture(scope="module")
def layouts(toy_folder, tmp_path_factory):
    entries = pie.read_mapping(toy_folder)
    out = tmp_path_factory.mktemp("out")
    _native_run(toy_folder, out / "direct", entries, seed=1)  # today's OUT/<method>
    _native_run(toy_folder, out / "masactrl" / "ddim", entries, seed=20, seconds=3.0)  # OUT/<editor>/<method>
    _pnp_run(toy_folder, out / "directinversion+p2p", entries[:4], seed=1)  # PnPInversion's, one image short
    return out, entries


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """Random stand-ins in the publishers' formats, DINO at a small width so the test stays quick."""
    from p2p_engine.metrics import standins

    folder = tmp_path_factory.mktemp("weights")
    g = torch.Generator().manual_seed(0)
    dino = standins.random_dino(g, dim=128, depth=2, patch=8, grid=28, hidden=512)
    torch.save(dino, folder / "dino_vitbase8_pretrain.pth")
    torch.save(standins.random_squeezenet(g), folder / "squeezenet1_1-b8a52dc0.pth")
    torch.save(standins.random_heads(g), folder / "squeeze.pth")
    standins.write_clip(folder / "clip-vit-large-patch14")
    return folder


def test_find_runs_reads_the_three_layouts(layouts, tmp_path):
    out, _ = layouts
    found = [(r.editor, r.method, r.folder.relative_to(out).as_posix(), r.native) for r in runs.find_runs(out)]
    assert found == [("masactrl", "ddim", "masactrl/ddim", True), ("p2p", "direct", "direct", True),
                     ("p2p", "directinversion", "directinversion+p2p", False)]
    (tmp_path / "p2p" / "direct").mkdir(parents=True)
    (tmp_path / "p2p" / "direct" / "jobs.jsonl").write_text("")
    (tmp_path / "direct").symlink_to(tmp_path / "p2p" / "direct")  # a migrated run, linked back: one run
    assert [r.folder.name for r in runs.find_runs(tmp_path)] == ["direct"]
    (tmp_path / "direct").unlink()
    (tmp_path / "direct").mkdir()
    (tmp_path / "direct" / "jobs.jsonl").write_text("")
    with pytest.raises(ValueError, match="both hold p2p runs of direct"):
        runs.find_runs(tmp_path)


def test_pnpinversion_outputs_are_cropped_and_scored(layouts, toy_folder):
    """PnPInversion's side-by-side files are scored on their right-most square, as its evaluate.py crops them;
    a file it never wrote is a missing row."""
    out, entries = layouts
    rows = metrics.evaluate(toy_folder, out, ["directinversion"])
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["missing"]
    native = {r["key"]: r for r in metrics.evaluate(toy_folder, out, ["direct"])}
    for r in rows[:4]:  # the same edits as the native run's, so the same numbers
        assert {k: r[k] for k in ("psnr", "mse", "ssim")} == {k: native[r["key"]][k] for k in ("psnr", "mse", "ssim")}
        assert "seconds" not in r and r["editor"] == "p2p"
    wide = np.zeros((64, 256, 3), np.uint8)
    wide[:, 192:] = 7
    assert (runs.crop_like_reference(wide, (64, 64, 3)) == 7).all()


def test_pie_metrics_prints_the_grid(layouts, toy_folder, small_weights, capsys):
    out, entries = layouts
    assert main(["pie-metrics", str(toy_folder), str(out), "--metric-weights", str(small_weights),
                 "--device", "cpu"]) == 1  # the PnPInversion run lacks an image
    printed = capsys.readouterr().out
    head = printed.splitlines()[0]
    for column in ("Structure distance x1e3", "PSNR", "LPIPS x1e3", "MSE x1e4", "SSIM x1e2", "CLIP whole",
                   "CLIP edited", "s / image", "UNet evals / image", "edit success"):
        assert column in head
    assert "| masactrl | ddim | 5 |" in printed and "| p2p | directinversion | 4 (1 failed) |" in printed
    assert "note:" in printed and "random stand-in" not in printed  # the stand-ins here carry no marker
    assert "not DINO ViT-B/8" in printed and "absent" not in printed
    grid = {(s["editor"], s["method"]): s for s in metrics.summarize(metrics.evaluate(
        toy_folder, out, scorer=metrics.Scorer(small_weights, "cpu"))) if s["type"] == "all"}
    direct = grid["p2p", "direct"]
    assert direct["seconds"] == 2.0 and direct["unet_evaluations"] == 250
    assert all(direct[k] is not None for k in metrics.METRICS)
    csv = (out / "pie_metrics.csv").read_text().splitlines()
    assert csv[0].startswith("editor,method,type,images,failed,structure_distance,psnr,lpips,mse,ssim,clip_whole,"
                             "clip_edited,seconds")


def test_table_scales_and_absent_cells():
    rows = [{"editor": "p2p", "method": "ddim", "key": "1", "type": "6", "status": "ok", "psnr": 20.0,
             "mse": 0.01, "ssim": 0.5, "seconds": 1.0},
            {"editor": "p2p", "method": "ddim", "key": "2", "type": "8", "status": "ok", "psnr": math.nan,
             "mse": math.nan, "ssim": math.nan, "seconds": 3.0}]
    summary = report.summarize(rows)
    grid = report.table(summary, absent={"lpips": "LPIPS: ...", "structure_distance": "..."})
    assert "| p2p | ddim | 2 | absent | 20.00 | absent | 100.00 | 50.00 | 2.00 |" in grid  # NaN left out of means
    by_type = report.table(summary, by_type=True)
    assert "| p2p | ddim | 8 change background | 1 | - | - | - | 3.00 |" in by_type
