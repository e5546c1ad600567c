"""LDM single-file checkpoints: same modules as the diffusers layout, diffusers' own single-file loader agrees,
and every bad input raises a CheckpointError that names what to fix."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import p2p_engine as p2p
from p2p_engine import keymap
from p2p_engine.loading import CheckpointError

PRESETS = ["tiny", "tiny-v"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {name: (p2p.save_random_checkpoint(root / name, name, seed=7),
                   p2p.save_random_checkpoint(root / f"{name}.safetensors", name, seed=7, layout="single_file"))
            for name in PRESETS}


@pytest.mark.parametrize("name", PRESETS)
def test_both_layouts_load_identically(ckpts, name):
    folder, single = ckpts[name]
    a, b = p2p.load(folder, device="cpu"), p2p.load(single, device="cpu")
    assert a.config == b.config
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert torch.equal(a.tokenize(["a cat"]), b.tokenize(["a cat"]))


@pytest.mark.parametrize("name", PRESETS)
def test_single_file_names(ckpts, name):
    keys = load_file(ckpts[name][1]).keys()
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in keys
    assert "model.diffusion_model.output_blocks.0.0.skip_connection.weight" in keys
    assert "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    if name == "tiny":
        assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight" in keys
    else:  # OpenCLIP: 2 used resblocks + the unused last one (penultimate-layer convention)
        assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.text_projection" in keys


@pytest.mark.parametrize("name", PRESETS)
def test_diffusers_single_file_loader_agrees(ckpts, name):
    """diffusers' own LDM converter runs offline when given the local config folder."""
    from diffusers import StableDiffusionPipeline

    folder, single = ckpts[name]
    ref = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                   safety_checker=None)
    ours = p2p.load(single, device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(ours, part).state_dict(), getattr(ref, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


# -- bad inputs -----------------------------------------------------------------------------------------------------

def _edited(ckpts, tmp_path, edit, name="tiny"):
    sd = load_file(ckpts[name][1])
    edit(sd)
    out = tmp_path / "edited.safetensors"
    save_file(sd, out)
    return out


def test_truncated_file(ckpts, tmp_path):
    bad = tmp_path / "cut.safetensors"
    data = ckpts["tiny"][1].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*(corrupt|truncated)"):
        p2p.load(bad)
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        p2p.load(bad)


def test_truncated_file_in_folder(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["tiny"][0], tmp_path / "f")
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        p2p.load(folder)


def test_missing_key(ckpts, tmp_path):
    gone = "model.diffusion_model.output_blocks.2.0.in_layers.2.weight"
    with pytest.raises(CheckpointError, match=r"1 missing key.*output_blocks\.2\.0\.in_layers\.2\.weight"):
        p2p.load(_edited(ckpts, tmp_path, lambda sd: sd.pop(gone)))


def test_unexpected_key(ckpts, tmp_path):
    def add(sd):
        sd["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected key.*extra_head"):
        p2p.load(_edited(ckpts, tmp_path, add))


def test_missing_key_in_folder(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["tiny-v"][0], tmp_path / "f")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    for k in [k for k in sd if k.startswith("up_blocks.0.")]:
        del sd[k]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"\d+ missing key.*up_blocks\.0\."):
        p2p.load(folder)


def test_wrong_shape(ckpts, tmp_path):
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"

    def widen(sd):
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    # The context width is read from attn2.to_k; a to_v that disagrees is a shape error naming the key.
    with pytest.raises(CheckpointError, match=r"middle_block\.1\.transformer_blocks\.0\.attn2\.to_v\.weight.*expected"):
        p2p.load(_edited(ckpts, tmp_path, widen))


def test_wrong_shape_openclip(ckpts, tmp_path):
    key = keymap.SD2_TEXT_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"

    def cut(sd):
        sd[key] = sd[key][:-3]
    with pytest.raises(CheckpointError, match="expected"):
        p2p.load(_edited(ckpts, tmp_path, cut, name="tiny-v"))


def test_sd1_file_with_sdxl_keys_is_refused(ckpts, tmp_path):
    """A file mixing SD 1.x and SDXL keys is not guessed at: its stray keys are named. (SDXL base files load:
    tests/test_sdxl.py; SDXL refiners are refused there too.)"""
    def xl(sd):
        sd["conditioner.embedders.1.model.token_embedding.weight"] = torch.zeros(4, 4)
        sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    with pytest.raises(CheckpointError, match="2 unexpected key.*sd1 single-file.*conditioner.embedders.1"):
        p2p.load(_edited(ckpts, tmp_path, xl))


def test_unknown_layout_is_unsupported(tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2)}, f)
    with pytest.raises(CheckpointError, match="sd1, sd2"):
        p2p.load(f)


def test_unsupported_diffusers_unet(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["tiny"][0], tmp_path / "xl")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not supported.*sd1, sd2"):
        p2p.load(folder)


def test_neither_layout(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a diffusers checkpoint folder"):
        p2p.load(tmp_path / "random")
    with pytest.raises(CheckpointError, match="does not exist"):
        p2p.load(tmp_path / "nowhere.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="neither"):
        p2p.load(tmp_path / "model.ckpt")


def test_folder_missing_part(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["tiny"][0], tmp_path / "f")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(CheckpointError, match="text_encoder.*missing"):
        p2p.load(folder)


def test_prediction_type_override(ckpts):
    single = ckpts["tiny-v"][1]
    assert p2p.load(single).config.prediction_type == "v_prediction"  # from the matching preset
    assert p2p.load(single, prediction_type="epsilon").scheduler.prediction_type == "epsilon"


def test_detection_outside_presets_uses_documented_defaults(tmp_path):
    """Shapes cannot show head counts, norm groups or the prediction type: a file matching no preset gets the
    SD 1.x conventions (8 heads, 32 groups, epsilon), and its observable sizes are read from the weights."""
    from p2p_engine import config

    odd = config.ModelConfig(
        unet=config.UNetConfig(block_out_channels=(32, 64), cross_attn=(True, False), layers_per_block=1,
                               num_heads=(4, 4), cross_attention_dim=48, sample_size=8),
        vae=config.VAEConfig(block_out_channels=(32, 32), layers_per_block=1, sample_size=16),
        text=config.TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=1,
                               projection_dim=64))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(config.PRESETS, "odd", odd)
        f = p2p.save_random_checkpoint(tmp_path / "odd.safetensors", "odd", layout="single_file")
    got = p2p.load(f).config
    assert got.unet.num_heads == (8, 8) and got.unet.norm_num_groups == 32 and got.prediction_type == "epsilon"
    unet = (got.unet.block_out_channels, got.unet.cross_attn, got.unet.cross_attention_dim)
    assert unet == ((32, 64), (True, False), 48)
    assert (got.text.hidden_size, got.text.num_hidden_layers, got.vae.block_out_channels) == (64, 1, (32, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_single_file(ckpts, dtype):
    """The converting read path (fused OpenCLIP q/k/v, 1x1-conv VAE attention) equals fp32-load-then-cast."""
    lo, ref = p2p.load(ckpts["tiny-v"][1], dtype=dtype), p2p.load(ckpts["tiny-v"][1])
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(lo, part).state_dict(), getattr(ref, part).state_dict()
        assert all(v.dtype == dtype and torch.equal(v, want[k].to(dtype)) for k, v in got.items()), part
