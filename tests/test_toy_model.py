"""The shipped toy model: it loads fast and verified, and its generations, edits, maps and inversions
measure up (thresholds of issue 8; the measures live in p2p_engine.toy.evaluate).

Each measure prints its numbers (pytest -s shows them); `python -m p2p_engine.toy.evaluate` prints them all.
"""
import shutil
import time

import numpy as np
import pytest

import p2p_engine as p2p
from p2p_engine import loading
from p2p_engine.toy import evaluate as E

STEPS = 25  # DDIM steps for the generation measures: half the reference's 50 keeps CI short


@pytest.fixture(scope="module")
def toy():
    return p2p.load("toy", device="cpu", backend="torch")


def test_loads_fast_and_verified():
    p2p.load("toy")  # warm the file cache and the imports
    t = time.perf_counter()
    pipe = p2p.load("toy")
    took = time.perf_counter() - t
    print(f"toy load {took:.3f} s")
    assert took < 1.0
    assert pipe.config.image_size == 64 and pipe.config.latent_size == 16


def test_corrupted_copy_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "toy"
    shutil.copytree(loading.toy_path(), copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(loading, "toy_path", lambda: copy)
    with pytest.raises(p2p.CheckpointError, match="corrupted.*reinstall"):
        p2p.load("toy")


def test_generation_follows_captions(toy):
    both, color, shape = E.generation_follows_captions(toy, 54, steps=STEPS)
    print(f"colour and shape {both}; colour {color}; shape {shape}")
    assert both.value >= 0.8


@pytest.fixture(scope="module")
def replace_ddim(toy):
    """The Replace measure at the reference's 50 DDIM steps (`E.STEPS`) on the evaluation's 40 seeds."""
    return E.replace_keeps_layout(toy, 40, steps=E.STEPS)


def test_replace_changes_colour_and_keeps_layout_better_than_no_control(replace_ddim):
    """Issue 8: a Replace of the colour word keeps the layout (largest blobs' IoU >= 0.8) in at least 80% of
    seeds, while generating the target from the same seed without control does not. Run at the reference's
    50 steps (`E.STEPS`, t = 981 .. 1) and windows (cross 0.8, self 0.4) on the evaluation's 40 seeds:
    measured 35/40 kept (39/40 at a self window of 0.8), colour reached 40/40."""
    kept, free, reached, m, mf = replace_ddim
    print(f"layout kept with Replace {kept} (mean IoU {m:.3f}); without control {free} (mean IoU {mf:.3f}); "
          f"target colour reached {reached}")
    assert kept.value >= 0.8
    assert reached.value >= 0.8
    assert free.value < 0.8
    assert kept.value >= 2 * free.value + 0.1 and m >= mf + 0.1


def test_fast_dpmsolver_edit_keeps_layout_as_often(toy, replace_ddim):
    """Issue 18: a 20-step DPM-Solver++ Replace (40% of the UNet evaluations of 50 DDIM steps) keeps the layout
    as often as the 50-step DDIM edit, within 5 points, on the same seeds. Measured: 35/40 both (mean IoU
    0.864 vs 0.881), new colour 39/40 vs 40/40."""
    kept, _, reached, m, _ = E.replace_keeps_layout(toy, 40, steps=E.FAST_STEPS, sampler="dpmsolver++", free=False)
    ddim_kept, _, _, ddim_m, _ = replace_ddim
    print(f"DPM-Solver++ {E.FAST_STEPS} steps: layout kept {kept} (mean IoU {m:.3f}), colour {reached}; "
          f"DDIM {E.STEPS} steps: {ddim_kept} (mean IoU {ddim_m:.3f})")
    assert E.FAST_STEPS <= 0.4 * E.STEPS
    assert kept.value >= ddim_kept.value - 0.05
    assert reached.value >= 0.8


def test_cross_maps_locate_the_shape(toy):
    """Issue 8 asks for a mean IoU >= 0.5 of the shape word's thresholded 16x16 map with the shape; this
    model reaches 0.93 over 30 seeds at 50 steps (its training pulled each object word's 16x16 maps onto the
    object: `--attn-weight`, see the README). Asserted here at 25 steps: the threshold, and the maps put
    clearly more weight inside the shape than outside in most images at 16x16 and 8x8."""
    overlap = E.attention_overlap(toy, 18, steps=STEPS)
    for res, (m, loc) in sorted(overlap.items(), reverse=True):
        print(f"{res}x{res}: mean IoU {m:.3f}, localised {loc}")
    assert overlap[16][0] >= 0.5
    assert overlap[16][1].value >= 0.8 and overlap[8][1].value >= 0.5


def test_null_text_inversion_reconstructs_held_out_scenes(toy):
    rows = E.inversion_quality(toy, 3)
    for r in rows:
        print({k: round(v, 4) for k, v in r.items()})
    gap = np.mean([r["psnr_vae"] - r["psnr_nti"] for r in rows])
    ratio = np.mean([r["mse_ddim"] for r in rows]) / np.mean([r["mse_nti"] for r in rows])
    print(f"PSNR gap VAE - null-text {gap:.2f} dB; latent MSE DDIM+CFG / null-text {ratio:.1f}x")
    assert gap <= 1.0
    assert ratio >= 10.0


def test_attention_by_layer_diagnosis(toy):
    """The per-layer diagnosis: every cross-attention layer reported, shares are fractions, each of the
    16x16 layers (the ones the attention loss trained; before it they reached 0.08-0.17) locates the shape
    with IoU >= 0.5, and the hooks are gone afterwards (later generations are untouched)."""
    from p2p_engine.unet import Attention

    layers = E.attention_by_layer(toy, 4, steps=10)
    cross = [n for n, m in toy.unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2")]
    assert sorted(layers) == sorted(cross)
    for name, (res, m, share, tail) in layers.items():
        print(f"{name}: {res}x{res} IoU {m:.2f} share {share:.3f} EOS+pad {tail:.2f}")
        assert res in (4, 8, 16) and 0 <= m <= 1 and 0 < share < 1 and 0 < tail < 1 and share + tail <= 1 + 1e-5
    at = lambda r: [v for v in layers.values() if v[0] == r]  # noqa: E731
    assert len(at(16)) == 3 and min(v[1] for v in at(16)) >= 0.5
    assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in toy.unet.modules())
