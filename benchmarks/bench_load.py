"""Load time and peak RSS of a random SD-sized checkpoint: p2p.load vs diffusers' from_pretrained.

Each measurement runs in a fresh subprocess (so peak RSS, from getrusage's ru_maxrss, belongs to that load
alone) and is repeated; the table shows medians. An "imports only" row gives the baseline RSS of torch +
transformers + diffusers, so the difference is what the weights cost. Napkin math: SD 1.5 in fp32 is
~1.07 G parameters = ~4.3 GB (UNet 3.4 GB, VAE 0.33 GB, text encoder 0.49 GB); a loader that keeps one copy
peaks near baseline + 4.3 GB.

    python benchmarks/bench_load.py [--preset sd15] [--dir /tmp/p2p_bench] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNNERS = {
    "imports only": "",
    "p2p.load (ours)": "import p2p_engine as p2p\npipe = p2p.load(PATH, device='cpu', backend='torch')",
    # safetensors hands out tensors backed by the file mapping: pages are read on first use. This row pays
    # that cost up front (a sum over every weight) so the comparison with an eager loader is fair.
    "p2p.load (ours) + touch all weights": (
        "import p2p_engine as p2p\npipe = p2p.load(PATH, device='cpu', backend='torch')\n"
        "for m in (pipe.unet, pipe.vae, pipe.text_encoder):\n"
        "    for p in m.parameters():\n        p.sum()"),
    "diffusers from_pretrained": (
        "from diffusers import AutoencoderKL, UNet2DConditionModel\nfrom transformers import CLIPTextModel\n"
        "u = UNet2DConditionModel.from_pretrained(PATH, subfolder='unet', local_files_only=True)\n"
        "v = AutoencoderKL.from_pretrained(PATH, subfolder='vae', local_files_only=True)\n"
        "t = CLIPTextModel.from_pretrained(PATH, subfolder='text_encoder', local_files_only=True)"),
}
RUNNERS["p2p.load (ours), fp16"] = "import p2p_engine as p2p\npipe = p2p.load(PATH, device='cpu', dtype=torch.float16)"
RUNNERS["diffusers from_pretrained, fp16"] = RUNNERS["diffusers from_pretrained"].replace(
    "local_files_only=True)", "local_files_only=True, torch_dtype=torch.float16)")
RUNNERS["diffusers from_pretrained + touch all weights"] = (
    RUNNERS["diffusers from_pretrained"] + "\nfor m in (u, v, t):\n    for p in m.parameters():\n        p.sum()")

CHILD = """
import json, resource, time, sys
import torch, transformers, diffusers  # every runner pays the same imports
torch.set_num_threads(2)
PATH = sys.argv[1]
t0 = time.perf_counter()
{body}
dt = time.perf_counter() - t0
print(json.dumps({{"s": dt, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(body: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(body=body), str(path)], capture_output=True, text=True,
                         cwd="/", env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--dir", default="/tmp/p2p_bench")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch

    import p2p_engine as p2p

    path = Path(args.dir) / args.preset
    if not (path / "model_index.json").exists():
        t0 = time.perf_counter()
        p2p.save_random_checkpoint(path, args.preset, seed=0)
        print(f"wrote random {args.preset} checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    size_gb = sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e9
    # Correctness before timing: both loaders see the same UNet weights.
    ours = p2p.load(path, device="cpu").unet.state_dict()
    from safetensors import safe_open
    with safe_open(str(path / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        k = sorted(ours)[len(ours) // 2]
        assert torch.equal(ours[k], f.get_tensor(k)), k
    del ours

    rows = []
    for name, body in RUNNERS.items():
        runs = [measure(body, path) for _ in range(args.repeat)]
        rows.append((name, statistics.median(r["s"] for r in runs), statistics.median(r["maxrss_mb"] for r in runs)))
    base = rows[0][2]
    print(f"Checkpoint: random `{args.preset}`, fp32, {size_gb:.2f} GB of safetensors; CPU, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; median of {args.repeat} fresh processes.\n")
    print("| loader | load time (s) | peak RSS (MB) | RSS over imports (MB) |")
    print("|---|---:|---:|---:|")
    for name, s, rss in rows:
        print(f"| {name} | {s:.2f} | {rss:.0f} | {rss - base:.0f} |")


if __name__ == "__main__":
    main()
