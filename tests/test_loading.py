"""`p2p.load` of a diffusers folder matches diffusers' and transformers' own loaders of the same files."""
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import config

# Odd sizes everywhere: channels not multiples of 32, 3 heads of 8/16, 2 layers per block, an odd text width.
ODD = config.ModelConfig(
    unet=config.UNetConfig(block_out_channels=(24, 48), cross_attn=(True, True), layers_per_block=2,
                           num_heads=(3, 3), cross_attention_dim=40, norm_num_groups=4, sample_size=12),
    vae=config.VAEConfig(block_out_channels=(8, 12), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                         sample_size=24),
    text=config.TextConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                           projection_dim=40),
)
CONFIGS = ["tiny", "tiny-v", "odd"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(config.PRESETS, "odd", ODD)
        for name in CONFIGS:
            out[name] = p2p.save_random_checkpoint(root / name, name, seed=3)
    return out


def _unet_out(m, x, t, ctx):
    y = m(x, t, ctx)
    return getattr(y, "sample", y)


def _encode(m, x):
    y = m.encode(x)
    return y.latent_dist.mean if hasattr(y, "latent_dist") else y


def _decode(m, z):
    y = m.decode(z)
    return getattr(y, "sample", y)


def _check(ours, ref32, ref64, run):
    """err(ours, fp64) <= 2 * err(torch fp32, fp64) + eps: the bound is torch's own fp32 drift."""
    with torch.no_grad():
        gold, base, got = run(ref64, torch.float64), run(ref32, torch.float32), run(ours, torch.float32)
    scale = gold.abs().max()
    err_ref, err_ours = (base.double() - gold).abs().max() / scale, (got.double() - gold).abs().max() / scale
    assert err_ours <= 2 * err_ref + 1e-6, (float(err_ours), float(err_ref))


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_and_transformers(folders, name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = folders[name]
    pipe = p2p.load(path, device="cpu", backend="torch")
    cfg = pipe.config
    g = torch.Generator().manual_seed(0)
    s = cfg.unet.sample_size
    x = torch.randn(2, 4, s, s, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.cross_attention_dim, generator=g)
    t = torch.tensor([10, 900])

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True).eval()
    unet64 = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True).eval().double()
    _check(pipe.unet, unet, unet64, lambda m, dt: _unet_out(m, x.to(dt), t, ctx.to(dt)))

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True).eval()
    vae64 = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True).eval().double()
    img = torch.rand(1, 3, 8 * s // 2, 8 * s // 2, generator=g) * 2 - 1
    z = torch.randn(1, 4, s // 2, s // 2, generator=g)
    _check(pipe.vae, vae, vae64, lambda m, dt: _encode(m, img.to(dt)))
    _check(pipe.vae, vae, vae64, lambda m, dt: _decode(m, z.to(dt)))

    # Same transformers class on both sides: the weights must be bit-identical, and so the outputs.
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True).eval()
    ref, ours = te.state_dict(), pipe.text_encoder.state_dict()
    assert ref.keys() == ours.keys() and all(torch.equal(ref[k], ours[k]) for k in ref)
    ids = pipe.tokenize(["a cat sitting on a car", "a dog"])
    with torch.no_grad():
        assert torch.equal(te(ids)[0], pipe.encode_prompt(["a cat sitting on a car", "a dog"]))


def test_config_and_prediction_type(folders):
    a, b = p2p.load(folders["tiny"], device="cpu"), p2p.load(folders["tiny-v"], device="cpu")
    assert a.config == config.PRESETS["tiny"] and b.config == config.PRESETS["tiny-v"]
    assert (a.family, a.scheduler.prediction_type) == ("sd1", "epsilon")
    assert (b.family, b.scheduler.prediction_type) == ("sd2", "v_prediction")
    assert a.backend == "torch" and a.device == torch.device("cpu")
    assert b.tokenizer.pad_token == "!" and a.tokenizer.pad_token == "<|endoftext|>"
    assert p2p.load(folders["tiny-v"], prediction_type="epsilon").config.prediction_type == "epsilon"
    assert p2p.load(folders["tiny"], device="cpu").encode_prompt(["a cat"]).shape == (1, 77, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_load(folders, dtype):
    pipe = p2p.load(folders["tiny"], device="cpu", dtype=dtype)
    ref = p2p.load(folders["tiny"], device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        for k, v in got.items():
            if want[k].is_floating_point():
                assert v.dtype == dtype and torch.equal(v, want[k].to(dtype)), k
        assert not any(p.device.type == "meta" for p in getattr(pipe, part).parameters())
    assert pipe.encode_prompt("a cat").dtype == dtype


def test_argument_validation(folders):
    with pytest.raises(ValueError, match="backend"):
        p2p.load(folders["tiny"], backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        p2p.load(folders["tiny"], dtype=torch.int8)
    with pytest.raises(ValueError, match="prediction_type"):
        p2p.load(folders["tiny"], prediction_type="sample")
    with pytest.raises(ValueError, match="torch device"):
        p2p.load(folders["tiny"], device="gpu")
    # a device this machine lacks is named as such, not read as a corrupt checkpoint
    missing = "mps" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=f"'{missing}' is not available"):
        p2p.load(folders["tiny"], device=missing)
    with pytest.raises(ValueError, match="preset"):
        p2p.save_random_checkpoint(folders["tiny"].parent / "x", "sd3")
    for seed in ("0", -1, True):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            p2p.save_random_checkpoint(folders["tiny"].parent / "x", "tiny", seed=seed)
    assert not (folders["tiny"].parent / "x").exists()


def test_deterministic_and_atomic(folders, tmp_path):
    a = p2p.save_random_checkpoint(tmp_path / "a", "tiny", seed=3)
    files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]
    for f in files:
        assert (a / f).read_bytes() == (folders["tiny"] / f).read_bytes()
    b = p2p.save_random_checkpoint(tmp_path / "a", "tiny", seed=4)  # overwrite in place
    assert (b / files[0]).read_bytes() != (folders["tiny"] / files[0]).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers
    # Random weights are never zero (diffusers zero-initialises some convs; those would hide bugs).
    sd = p2p.load(a).unet.state_dict()
    assert all(v.abs().max() > 0 for v in sd.values() if v.is_floating_point())


def test_public_exports():
    assert callable(p2p.load) and callable(p2p.save_random_checkpoint)
    assert issubclass(p2p.CheckpointError, ValueError)
    with pytest.raises(AttributeError):
        p2p.NoSuchName  # noqa: B018


def test_toy_not_shipped_is_clear(tmp_path, monkeypatch):
    """A build without the toy model's files (a trimmed install) says so instead of failing deep inside."""
    from p2p_engine import loading
    monkeypatch.setattr(loading, "toy_path", lambda: tmp_path / "toy")
    with pytest.raises(p2p.CheckpointError, match="toy model is not shipped"):
        p2p.load("toy")


def test_checksums_catch_a_corrupted_or_missing_file(folders, tmp_path):
    """The shipped toy model is verified at load through SHA256SUMS; the same check on a copy of a folder."""
    import shutil

    from p2p_engine.files import verify_checksums, write_checksums

    folder = tmp_path / "m"
    shutil.copytree(folders["tiny"], folder)
    sums = write_checksums(folder)
    listed = [line.split("  ", 1)[1] for line in sums.read_text().splitlines()]
    assert "unet/diffusion_pytorch_model.safetensors" in listed and "model_index.json" in listed
    verify_checksums(folder)  # intact: no error
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(p2p.CheckpointError, match="diffusion_pytorch_model.safetensors is corrupted"):
        verify_checksums(folder)
    weights.unlink()
    with pytest.raises(p2p.CheckpointError, match="is missing"):
        verify_checksums(folder)
    sums.unlink()
    with pytest.raises(p2p.CheckpointError, match="SHA256SUMS is missing"):
        verify_checksums(folder)
