"""p2p_engine.graphs.GraphedUNet: a replayed CUDA graph gives the eager forward's output for new inputs."""
import pytest
import torch

import p2p_engine as p2p
from p2p_engine.graphs import GraphedUNet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _inputs(pipe, batch, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.config.unet
    s = cfg.sample_size
    sample = torch.randn(batch, cfg.in_channels, s, s, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 300 + seed, dtype=torch.int64, device=device)
    return sample, t, ctx


def test_refuses_cpu_tensors(tmp_path):
    p2p.save_random_checkpoint(tmp_path / "m", "tiny", seed=0)
    pipe = p2p.load(tmp_path / "m", backend="torch")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedUNet(pipe.unet, *_inputs(pipe, 1, 0, "cpu"))


@cuda
def test_replay_equals_eager(tmp_path):
    """GraphedUNet captures uncontrolled forwards, which take SDPA on every backend: one backend covers it."""
    p2p.save_random_checkpoint(tmp_path / "m", "tiny", seed=0)
    pipe = p2p.load(tmp_path / "m", device="cuda", dtype=torch.float16)
    graphed = GraphedUNet(pipe.unet, *_inputs(pipe, 2, 0, "cuda", torch.float16))
    for seed in (1, 2):  # inputs the capture never saw: the replay must read the new ones
        x = _inputs(pipe, 2, seed, "cuda", torch.float16)
        with torch.inference_mode():
            eager = pipe.unet(*x)
        out = graphed(*x).clone()
        assert torch.equal(out, eager), (out.float() - eager.float()).abs().max()
    with pytest.raises(ValueError, match="captured for sample"):
        graphed(*_inputs(pipe, 1, 3, "cuda", torch.float16))
