"""p2p_engine.graphs: a replayed CUDA graph gives the eager forward's output for new inputs; and the CPU's
emulation of graphs (tests/tape.py), which the captured loops' tests replay with, bakes in what a graph bakes in."""
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import graphs
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


def test_the_emulation_bakes_in_what_a_graph_bakes_in(emulated_graphs):
    """What a step reads from tensors is read again by every replay; what Python decided while recording is not
    (a Python step counter, a value read back with .item(), which is also listed as a sync). Recording leaves
    the state as it found it, and the recording's own tensors hold NaN until a replay fills them."""
    table = torch.arange(12.0).reshape(4, 3)
    x, counter, python_counter = torch.zeros(3), torch.zeros(1, dtype=torch.long), [0]

    def reset():
        x.zero_()
        counter.zero_()
        python_counter[0] = 0

    def device_step():
        x.add_(table.index_select(0, counter)[0])
        counter.add_(1)
        return x * 2

    def python_step():
        x.add_(table[python_counter[0]])
        python_counter[0] += 1

    def synced_step():
        x.add_(table[int(counter.item())])
        counter.add_(1)

    replay, doubled = graphs.capture(device_step, warmup=2, reset=reset)
    assert torch.equal(x, torch.zeros(3)) and counter.item() == 0 and doubled.isnan().all()
    for _ in range(3):
        replay()
    assert torch.equal(x, table[:3].sum(0)) and torch.equal(doubled, 2 * x) and not emulated_graphs[-1].syncs
    for step in (python_step, synced_step):
        replay, _ = graphs.capture(step, warmup=2, reset=reset)
        for _ in range(3):
            replay()
        assert torch.equal(x, 3 * table[0]), step.__name__  # the recording's step, every time
    assert not emulated_graphs[-2].syncs and "counter.item()" in emulated_graphs[-1].describe_syncs()


def test_the_emulation_keeps_addresses_not_tensors(emulated_graphs):
    """A graph does not keep alive the tensors its step reads: replaying after one was dropped fails on the tape
    (on a GPU it would read whatever the allocator put there since), and works while it is held."""
    held = {"scale": torch.full((3,), 2.0)}
    x = torch.ones(3)
    replay, out = graphs.capture(lambda: x * held["scale"], warmup=1)
    replay()
    assert torch.equal(out, torch.full((3,), 2.0))
    del held["scale"]
    with pytest.raises(RuntimeError, match="freed since its recording"):
        replay()


def test_emulated_unet_graph_reads_new_inputs(tmp_path, emulated_graphs):
    """GraphedUNet on the emulation: the recorded forward replays on inputs it never saw."""
    p2p.save_random_checkpoint(tmp_path / "m", "tiny", seed=0)
    pipe = p2p.load(tmp_path / "m", backend="torch")
    graphed = GraphedUNet(pipe.unet, *_inputs(pipe, 2, 0, "cpu"))
    for seed in (1, 2):
        x = _inputs(pipe, 2, seed, "cpu")
        with torch.inference_mode():
            eager = pipe.unet(*x)
        assert torch.equal(graphed(*x), eager)
    assert len(emulated_graphs) == 1 and not emulated_graphs[0].syncs


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
