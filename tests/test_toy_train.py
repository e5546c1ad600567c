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


def test_attention_targets_name_each_objects_words_and_cells():
    """The attention loss's targets: each object's size, colour and shape tokens (as the engine's own
    word_inds finds them) get that object's cells, and nothing else is supervised."""
    from p2p_engine.words import word_inds
    from p2p_engine.toy import TOY
    from p2p_engine.tokenizer import clip_tokenizer

    tok = clip_tokenizer(TOY.pad_token)
    words = train.WordTargets(tok)
    cap = "a big red circle and a small blue square on a white and red background"
    assert words(cap) == [word_inds(cap, "big", tok) + word_inds(cap, "red", tok)[:1] + word_inds(cap, "circle", tok),
                          word_inds(cap, "small", tok) + word_inds(cap, "blue", tok) + word_inds(cap, "square", tok)]
    imgs, caps, cells = train.scene_batch(0, 0, 6, 16)
    assert imgs.shape == (6, 64, 64, 3) and len(caps) == len(cells) == 6
    caps[1] = ""  # a dropped caption is not supervised
    target = train.attention_targets(caps, cells, words, 16)
    assert target[1].sum() == 0
    for b in (0, 2):
        toks = words(caps[b])
        assert len(toks) == len(cells[b])
        for t, c in zip(toks, cells[b]):
            assert all(torch.equal(target[b, i], torch.from_numpy(c).float()) for i in t)
        supervised = {i for t in toks for i in t}
        assert all(target[b, i].sum() == 0 for i in range(77) if i not in supervised)
    assert train.scene_batch(0, 0, 2, 0)[2] == [None, None]
    assert train.attention_targets(["", ""], [None, None], words, 16) is None


def test_attention_loss_pulls_maps_onto_their_objects():
    """The probe records the 16 x 16 cross maps with gradients; its loss is lower when a word's map sits on
    its object than when it sits elsewhere, and one optimiser step on it moves the map onto the object."""
    from p2p_engine.toy import TOY
    from p2p_engine.unet import UNet

    torch.manual_seed(0)
    unet = UNet(TOY.unet)
    probe = train.CrossMapProbe(unet, 16)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, TOY.unet.cross_attention_dim)
    t = torch.tensor([500, 500])
    target = torch.zeros(2, 77, 256)
    target[:, 3, :40] = 1.0  # token 3's object covers the first 40 cells
    unet(x, t, ctx)
    assert len(probe.maps) == 3 and probe.maps[0].shape == (2, 256, 77)  # TOY's three 16 x 16 cross layers
    before = probe.loss(target)
    assert probe.maps == []
    on = torch.zeros(2, 256, 77)
    on[:, :40, 3] = 1.0
    off = torch.zeros(2, 256, 77)
    off[:, 40:, 3] = 1.0
    probe.maps = [on.softmax(-1)]
    low = probe.loss(target)
    probe.maps = [off.softmax(-1)]
    assert low < probe.loss(target)
    opt = torch.optim.SGD(unet.parameters(), lr=0.5)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        unet(x, t, ctx)
        assert probe.loss(target) < before
    for h in probe.handles:
        h.remove()


def test_cover_loss_prefers_a_map_spread_over_the_object():
    """The "cover" kind scores a word's map spread evenly over its object's cells better than one peaked
    on a single cell of it (which "share" cannot tell apart), and worse maps off the object still score
    worse than both."""
    from p2p_engine.toy import TOY
    from p2p_engine.unet import UNet

    probe = train.CrossMapProbe(UNet(TOY.unet), 16, "cover")
    share = train.CrossMapProbe(UNet(TOY.unet), 16, "share")
    target = torch.zeros(1, 77, 256)
    target[0, 2, :40] = 1.0

    def score(p, cells, value=20.0):
        logits = torch.zeros(1, 256, 77)
        logits[0, cells, 2] = value
        p.maps = [logits.softmax(1)]  # each token's map normalised over space, as after the loss's own step
        return p.loss(target).item()

    spread, peaked, off = score(probe, slice(0, 40)), score(probe, slice(0, 1)), score(probe, slice(100, 140))
    assert spread < peaked < off
    assert abs(score(share, slice(0, 40)) - score(share, slice(0, 1))) < 1e-4
    with pytest.raises(ValueError, match="share' or 'cover"):
        train.CrossMapProbe(UNet(TOY.unet), 16, "nope")
