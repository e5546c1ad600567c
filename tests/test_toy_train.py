"""The toy model's training script on a few steps: deterministic, loadable, and `--init` / `--pool` /
`--vae-stop` do what they say."""
import json

import pytest
import torch
from safetensors.torch import load_file

import p2p_engine as p2p
from p2p_engine.toy import train

TINY_RUN = ["--batch", "2", "--vae-batch", "2", "--log-every", "1", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_state():
    """train.main sets process-wide threads, determinism and seed, as a script may: undo that here."""
    threads, det, rng = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    torch.set_rng_state(rng)


def _weights(folder, part):
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / part / name))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "a"
    train.main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", *TINY_RUN])
    return out


def test_deterministic_and_loadable(first, tmp_path):
    again = tmp_path / "b"
    train.main(["--out", str(again), "--vae-steps", "2", "--unet-steps", "2", *TINY_RUN])
    for part in ("unet", "vae", "text_encoder"):
        assert _same(_weights(first, part), _weights(again, part)), part
    pipe = p2p.load(first, backend="torch")
    assert pipe.config.latent_size == 16
    img = pipe.generate(["a big red circle on a white background"], seed=0, steps=2, progress=False).images[0]
    assert img.size == (64, 64)


def test_init_keeps_the_vae_and_trains_the_unet_from_the_pool(first, tmp_path, capsys):
    out = tmp_path / "c"
    train.main(["--out", str(out), "--init", str(first), "--vae-steps", "0", "--unet-steps", "1",
                "--pool", "4", *TINY_RUN])
    log = capsys.readouterr().out
    assert "pool: 4 scenes encoded" in log and "unet final: steps 1" in log
    assert _same(_weights(first, "vae"), _weights(out, "vae"))
    assert not _same(_weights(first, "unet"), _weights(out, "unet"))  # one step from A's weights
    rec = json.loads((out / "training.json").read_text())
    assert rec["scaling_factor"] == json.loads((first / "vae" / "config.json").read_text())["scaling_factor"]
    assert rec["init"]["args"]["unet_steps"] == 2


def test_stop_ends_a_phase_early(tmp_path, capsys):
    train.main(["--out", str(tmp_path / "d"), "--vae-steps", "3", "--vae-stop", "1", "--unet-steps", "3",
                "--unet-stop", "2", *TINY_RUN])
    log = capsys.readouterr().out
    assert "vae final: steps 1 " in log and "unet final: steps 2 " in log


def test_init_from_another_config_is_refused(first, tmp_path):
    with pytest.raises(ValueError, match="another --config"):
        train.main(["--out", str(tmp_path / "e"), "--config", "toy32", "--init", str(first), "--vae-steps", "0",
                    "--unet-steps", "1", *TINY_RUN])
