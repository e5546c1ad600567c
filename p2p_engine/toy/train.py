"""Train the toy Stable-Diffusion-architecture model on the procedural shapes dataset.

    python -m p2p_engine.toy.train --out DIR [--config NAME] [--vae-steps N] [--unet-steps N] [--minutes M]
        [--init DIR] [--pool N] [--vae-stop N] [--unet-stop N] [--attn-weight W] [--attn-res R]
        [--attn-loss share|cover] [--threads T]

Phase 1 trains the VAE (L1 + MSE reconstruction, small KL). Phase 2 freezes it and trains the UNet and
the text encoder jointly (epsilon prediction, SD scaled-linear schedule, 10% empty captions for CFG).
The text encoder is trained with the UNet because a random CLIP gives the UNet nothing to attend to.
Deterministic for a seed and step counts: seeded data stream, fixed threads, deterministic algorithms.
`--minutes` caps wall time (then the step count, and so the result, depends on the machine's speed);
`--vae-stop`/`--unet-stop` end a phase after that many steps of its schedule, which replays what a cap did.
`--init DIR` continues from an earlier output folder of the same config (its VAE and scaling factor are
kept; pass `--vae-steps 0`). `--pool N` renders and encodes N scenes once and draws every UNet batch from
them (reshuffled each pass): rendering and VAE-encoding each batch afresh costs about as much as the
UNet's own step on the 2-core machine.
`--attn-weight W` adds W x an attention loss: in the cross-attention layers at `--attn-res` (16: the
latent grid), each object word's map (size, colour, shape), normalised over space, is pulled onto the
cells its object covers (`--attn-loss share`: -log of the share that falls there; `cover`: the
cross-entropy from the uniform distribution on those cells). The procedural scenes know every object's
mask; the loss teaches the layers that read the words to read them where the object is.
Writes a diffusers-layout folder (weights stored in fp16) that `p2p_engine.load(DIR)` reads.
A little longer than 400 lines: it is one script, read top to bottom (data, the two phases, the attention
loss, saving, the command line), and the parts serve no other module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import CONFIGS
from .analysis import grid_cells
from .dataset import COLORS, SHAPES, SIZES, make_batch, make_scene


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    # (B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    # Linear warmup then cosine decay to 10%: stable start, and the last steps polish.
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)))


def _drop_sizes(caption: str) -> str:
    for size in SIZES:
        caption = caption.replace(f"a {size} ", "a ")
    return caption


def train_vae(vae, args, deadline: float) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    lat = vae.cfg.latent_channels
    ema = None
    done = 0
    t0 = time.time()
    for step in range(min(args.vae_steps, args.vae_stop or args.vae_steps)):
        if time.time() > deadline:
            print(f"vae: time cap reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.vae_steps, args.vae_lr)
        imgs, _ = make_batch(args.seed, step * args.vae_batch, args.vae_batch)
        x = _to_tensor(imgs)
        moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = moments[:, :lat], moments[:, lat:].clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = vae.decode(z)
        rec_loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec_loss + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done += 1
        ema = rec_loss.item() if ema is None else 0.98 * ema + 0.02 * rec_loss.item()
        if step % args.log_every == 0:
            print(f"vae step {step:6d}  rec {rec_loss.item():.4f} (ema {ema:.4f})  kl {kl.item():.3f}", flush=True)
    ema = float("nan") if ema is None else ema
    print(f"vae final: steps {done}  rec ema {ema:.4f}  ({(time.time() - t0) / max(1, done):.2f} s/step)", flush=True)
    return ema


@torch.no_grad()
def latent_scale(vae, args) -> float:
    # SD's scaling_factor makes the latents unit-variance; measure it on held-out scenes (stream seed+1).
    imgs, _ = make_batch(args.seed + 1, 0, 256)
    z = torch.cat([vae.encode(_to_tensor(imgs[i:i + 64])) for i in range(0, 256, 64)])
    return float(1.0 / z.std())


class LatentPool:
    """`args.pool` scenes of stream `args.seed` from `offset`, rendered and encoded once; batch k of
    each pass through them follows a seeded permutation, so the draw is deterministic."""

    def __init__(self, vae, scale: float, args, offset: int, chunk: int = 64):
        t0 = time.time()
        self.batch_size, self.seed = args.batch, args.seed
        latents, self.captions, self.cells = [], [], []
        for start in range(0, args.pool, chunk):
            n = min(chunk, args.pool - start)
            imgs, caps, cells = scene_batch(args.seed, offset + start, n, args.attn_res if args.attn_weight else 0)
            with torch.no_grad():
                latents.append(vae.encode(_to_tensor(imgs)) * scale)
            self.captions += caps
            self.cells += cells
        self.latents = torch.cat(latents)
        self.per_pass = args.pool // args.batch
        self._order, self._pass = None, -1
        print(f"pool: {args.pool} scenes encoded in {time.time() - t0:.0f} s", flush=True)

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], list]:
        p, k = divmod(step, self.per_pass)
        if p != self._pass:
            g = torch.Generator().manual_seed(self.seed * 1000 + p)
            self._order, self._pass = torch.randperm(len(self.captions), generator=g), p
        idx = self._order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
        return self.latents[idx], [self.captions[i] for i in idx], [self.cells[i] for i in idx]


def scene_batch(seed: int, start: int, count: int, res: int) -> tuple[np.ndarray, list[str], list]:
    """`make_batch` plus, when res > 0, each object's cells on the res x res attention grid (the cells more
    than half covered, as the evaluation counts them; the covered ones for a shape too small for that), in
    caption order: a list per scene of (res*res,) bool arrays."""
    if res <= 0:
        imgs, caps = make_batch(seed, start, count)
        return imgs, caps, [None] * count
    scenes = [make_scene(seed, i) for i in range(start, start + count)]
    cells = []
    for sc in scenes:
        per = []
        for o in sc.objects:
            c = grid_cells(o.mask, res)
            per.append((c if c.any() else grid_cells(o.mask, res, over=0.0)).reshape(-1))
        cells.append(per)
    return np.stack([sc.image for sc in scenes]), [sc.caption for sc in scenes], cells


class WordTargets:
    """Token positions of each object's words (size, colour, shape) in a caption, for the attention loss.

    Captions read "a [size] colour shape and ... on a ... background": words before "on" belong to the
    objects in order, a shape word closing each object's phrase. Every word of this dataset's vocabulary
    is split into BPE tokens alone (CLIP splits on whitespace first), so positions add up word by word."""

    OBJECT_WORDS = set(SIZES) | set(COLORS) | set(SHAPES)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._n: dict[str, int] = {}

    def _tokens(self, word: str) -> int:
        if word not in self._n:
            self._n[word] = len(self.tokenizer(word, add_special_tokens=False).input_ids)
        return self._n[word]

    def __call__(self, caption: str) -> list[list[int]]:
        objects: list[list[int]] = [[]]
        pos = 1  # after the start token
        for word in caption.split():
            if word == "on":
                break
            n = self._tokens(word)
            if word in self.OBJECT_WORDS:
                objects[-1] += range(pos, min(pos + n, 77))
                if word in SHAPES:
                    objects.append([])
            pos += n
        return [o for o in objects if o]


def attention_targets(captions: list[str], cells: list, words: WordTargets, res: int) -> torch.Tensor | None:
    """(B, 77, res*res) float: for each caption's object words, the cells of that object; zeros elsewhere
    (empty captions, padding, background words). None when nothing is supervised."""
    target = torch.zeros(len(captions), 77, res * res)
    for b, (cap, per) in enumerate(zip(captions, cells)):
        if not cap or per is None:
            continue
        for toks, c in zip(words(cap), per):
            target[b, toks] = torch.from_numpy(c.astype(np.float32))
    return target if target.any() else None


class CrossMapProbe:
    """Forward hooks on the UNet's cross-attention layers at res x res: each call's head-averaged
    probabilities (B, N, 77), recomputed from the layer's input with gradients (the layer itself runs SDPA,
    which never forms them)."""

    def __init__(self, unet, res: int, kind: str = "share"):
        from ..unet import Attention

        if kind not in ("share", "cover"):
            raise ValueError(f"attention loss must be 'share' or 'cover', got {kind!r}")
        self.res, self.kind, self.maps = res, kind, []
        self.handles = [m.register_forward_hook(self._record, with_kwargs=True) for name, m in unet.named_modules()
                        if isinstance(m, Attention) and name.endswith("attn2")]

    def _record(self, module, args, kwargs, out):
        x, ctx = module.hook_inputs(args, kwargs)
        if x.shape[1] == self.res * self.res:
            self.maps.append(module.probabilities(x, ctx))

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        """Mean over layers and supervised tokens, of each word's map normalised over space: "share",
        -log(the share that falls on its object's cells), pulls the map onto the object; "cover", the
        cross-entropy from the uniform distribution on those cells, spreads it over the whole object."""
        w = (target.sum(-1) > 0).float()  # (B, 77)
        total, n = 0.0, len(self.maps)
        for p in self.maps:
            spatial = p.transpose(1, 2)  # (B, 77, N)
            spatial = spatial / spatial.sum(-1, keepdim=True)
            if self.kind == "share":
                per_token = -torch.log((spatial * target).sum(-1) + 1e-6)
            else:
                uniform = target / target.sum(-1, keepdim=True).clamp_min(1)
                per_token = -(uniform * torch.log(spatial + 1e-6)).sum(-1)
            total = total + (per_token * w).sum() / w.sum()
        self.maps.clear()
        return total / max(1, n)


def load_init(folder: Path, part: str, module: torch.nn.Module) -> None:
    """One part ("unet", "vae" or "text_encoder") of an earlier `train` output (same config) into `module`."""
    from safetensors.torch import load_file

    from ..loading import text_file_key

    name = text_file_key if part == "text_encoder" else (lambda k: k)
    fname = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    stored = load_file(str(folder / part / fname))
    sd = module.state_dict()
    wrong = [k for k, v in sd.items() if not k.endswith("position_ids")
             and (name(k) not in stored or stored[name(k)].shape != v.shape)]
    if wrong:
        raise ValueError(f"--init {folder}: its {part} lacks or reshapes {wrong[:3]}...; "
                         "was it trained with another --config?")
    module.load_state_dict({k: stored[name(k)].to(v.dtype) if name(k) in stored else v for k, v in sd.items()})


def train_unet(unet, text_encoder, vae, tokenizer, scale: float, args, deadline: float) -> float:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0).float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 7)  # caption dropout, timesteps and noise
    offset = 10_000_000  # UNet phase reads other scenes than the VAE phase did
    pool = LatentPool(vae, scale, args, offset=2 * offset) if args.pool else None
    probe = CrossMapProbe(unet, args.attn_res, args.attn_loss) if args.attn_weight else None
    words = WordTargets(tokenizer)
    ema = attn_ema = None
    done = 0
    t0 = time.time()
    for step in range(min(args.unet_steps, args.unet_stop or args.unet_steps)):
        if time.time() > deadline:
            print(f"unet: time cap reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.unet_steps, args.unet_lr)
        if pool is None:
            imgs, caps, cells = scene_batch(args.seed, offset + step * args.batch, args.batch,
                                            args.attn_res if probe else 0)
            with torch.no_grad():
                z0 = vae.encode(_to_tensor(imgs)) * scale
        else:
            z0, caps, cells = pool.batch(step)
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        # Some captions lose their size words ("a red circle on ..."), so prompts without sizes work too.
        no_size = torch.rand(args.batch, generator=gen) < args.size_word_dropout
        caps = [_drop_sizes(c) if d else c for c, d in zip(caps, no_size.tolist())]
        ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        ctx = text_encoder(ids)[0]
        eps_loss = loss = F.mse_loss(unet(zt, t, ctx), eps)
        if probe is not None:
            target = attention_targets(caps, cells, words, args.attn_res)
            if target is not None:
                attn = probe.loss(target)
                loss = loss + args.attn_weight * attn
                attn_ema = attn.item() if attn_ema is None else 0.99 * attn_ema + 0.01 * attn.item()
            probe.maps.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done += 1
        ema = eps_loss.item() if ema is None else 0.99 * ema + 0.01 * eps_loss.item()
        if step % args.log_every == 0:
            extra = "" if attn_ema is None else f"  attention loss ema {attn_ema:.3f}"
            print(f"unet step {step:6d}  eps mse {eps_loss.item():.4f} (ema {ema:.4f}){extra}", flush=True)
    ema = float("nan") if ema is None else ema
    per_step = (time.time() - t0) / max(1, done)
    print(f"unet final: steps {done}  eps mse ema {ema:.4f}  ({per_step:.2f} s/step)", flush=True)
    return ema


def save(out: Path, cfg, unet, vae, text_encoder, losses: dict) -> None:
    """The trained model as a diffusers folder (fp16 weights), replacing `out` whole once written."""
    from safetensors.torch import save_file

    from ..checkpoint import write_configs
    from ..files import atomic_folder, write_checksums, write_json
    from ..loading import text_file_key

    def half(sd, rename=lambda k: k):
        # fp16 storage halves the shipped size; the loader casts to the requested dtype.
        return {rename(k): v.detach().to(torch.float16).contiguous() for k, v in sd.items()
                if not k.endswith("position_ids")}

    with atomic_folder(out) as tmp:  # safetensors writes into the temporary folder, renamed when complete
        write_configs(tmp, cfg)
        save_file(half(unet.state_dict()), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        save_file(half(vae.state_dict()), str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
        save_file(half(text_encoder.state_dict(), text_file_key), str(tmp / "text_encoder" / "model.safetensors"))
        write_json(tmp / "training.json", losses)
        write_checksums(tmp)  # verified by p2p.load("toy")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (diffusers layout); replaced if it exists")
    p.add_argument("--config", default="toy", choices=sorted(CONFIGS), help="model size (see toy/__init__.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--steps", type=int, default=None, help="shortcut: unet steps = STEPS, vae steps = STEPS // 4")
    p.add_argument("--minutes", type=float, default=None, help="wall-time cap: 1/4 for the VAE, the rest the UNet")
    p.add_argument("--batch", type=int, default=32, help="UNet batch")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--size-word-dropout", type=float, default=0.3, help="captions trained without size words")
    p.add_argument("--init", type=Path, default=None, help="continue from this earlier output folder")
    p.add_argument("--pool", type=int, default=0, help="encode this many scenes once and train the UNet on them")
    p.add_argument("--vae-stop", type=int, default=None, help="stop the VAE phase after this many steps")
    p.add_argument("--unet-stop", type=int, default=None, help="stop the UNet phase after this many steps")
    p.add_argument("--attn-weight", type=float, default=0.0,
                   help="weight of the attention loss: each object word's cross map at --attn-res pulled onto "
                        "its object (0: none)")
    p.add_argument("--attn-res", type=int, default=16, help="side of the cross-attention grid it supervises")
    p.add_argument("--attn-loss", default="share", choices=("share", "cover"),
                   help="share: -log of the map's share on the object; cover: cross-entropy from the uniform "
                        "distribution on the object's cells (spreads the map over all of it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.steps is not None:
        args.unet_steps, args.vae_steps = args.steps, max(1, args.steps // 4)

    from transformers import CLIPTextModel

    from ..loading import clip_config
    from ..tokenizer import clip_tokenizer
    from ..unet import UNet
    from ..vae import VAE

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    start = time.time()
    budget = float("inf") if args.minutes is None else args.minutes * 60

    cfg = CONFIGS[args.config]
    vae = VAE(cfg.vae)
    if args.init is not None:
        load_init(args.init, "vae", vae)
    vae_loss = train_vae(vae, args, start + budget / 4)
    vae.eval().requires_grad_(False)
    if args.init is not None and args.vae_steps == 0:
        # A kept VAE keeps its scaling factor: the UNet it comes with was trained on latents scaled by it.
        scale = float(json.loads((args.init / "vae" / "config.json").read_text())["scaling_factor"])
    else:
        scale = latent_scale(vae, args)
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=round(scale, 5)))
    print(f"latent scaling_factor {scale:.5f}", flush=True)

    torch.manual_seed(args.seed + 1)
    unet = UNet(cfg.unet)
    text_encoder = CLIPTextModel(clip_config(cfg.text))
    if args.init is not None:
        load_init(args.init, "unet", unet)
        load_init(args.init, "text_encoder", text_encoder)
    tokenizer = clip_tokenizer(cfg.pad_token)
    unet_loss = train_unet(unet, text_encoder, vae, tokenizer, scale, args, start + budget)

    losses = {"vae_rec": None if np.isnan(vae_loss) else vae_loss, "unet_eps_mse": unet_loss, "scaling_factor": scale,
              "minutes": (time.time() - start) / 60,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.init is not None:  # the record of the run this one continued
        losses["init"] = json.loads((args.init / "training.json").read_text())
    save(Path(args.out), cfg, unet.eval(), vae, text_encoder.eval(), losses)
    print(json.dumps({k: v for k, v in losses.items() if k != "args"}), flush=True)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
