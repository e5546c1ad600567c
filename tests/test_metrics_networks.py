"""The network metrics (p2p_engine/metrics: structure distance, LPIPS, CLIP) against re-statements of the reference.

The reference is PnPInversion's evaluation/matrics_calculator.py on torchmetrics 1.2, torchvision 0.13 and DINO's
vision_transformer.py. torchvision cannot import beside this CPU torch (its compiled ops are missing), and
torchmetrics' LPIPS and timm import torchvision, so none of them can run here: each test below re-states the
reference's code in its own structure (torchvision's SqueezeNet `features` Sequential and LPIPS' slices of it,
DINO's VisionTransformer read through a forward hook on the last block's qkv as VitExtractor does, torchvision
0.13's tensor Resize, torchmetrics' CLIPScore update), draws random weights with the reference's own
initialisation, saves them in the publishers' file formats (torch.save of a state dict; LPIPS' heads alone),
and checks that p2p_engine's metrics, loading those files, give the reference's numbers to float32 rounding.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2p_engine.files import CheckpointError
from p2p_engine.metrics import Scorer, weights
from p2p_engine.metrics.dino import DinoViT
from p2p_engine.metrics.scorer import load_dino, load_lpips
from p2p_engine.metrics.squeezenet import SqueezeNet11

RTOL = 1e-6  # float32 rounding: the two sides run the same float32 operations (equal bit for bit here)


def _images(seed, shape=(64, 64, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    return a, b


def _mask(shape, seed=0):
    from p2p_engine.pie import mask_decode, mask_encode

    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    y, x = rng.integers(5, shape[0] // 2), rng.integers(5, shape[1] // 2)
    m[y:y + shape[0] // 3, x:x + shape[1] // 3] = True
    return mask_decode(mask_encode(m), shape)  # float64 0/1 with the border set, as the reference decodes it


# -- SqueezeNet + LPIPS, restated: torchvision 0.13's squeezenet1_1 and torchmetrics 1.2's _LPIPS ------------------

class RefFire(nn.Module):
    def __init__(self, inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class RefSqueezeNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            RefFire(64, 16, 64, 64), RefFire(128, 16, 64, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            RefFire(128, 32, 128, 128), RefFire(256, 32, 128, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            RefFire(256, 48, 192, 192), RefFire(384, 48, 192, 192), RefFire(384, 64, 256, 256),
            RefFire(512, 64, 256, 256))
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        for m in self.modules():  # random biases too, so a bias mix-up cannot hide behind zeros
            if isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.bias, -0.05, 0.05)


class RefNetLinLayer(nn.Module):
    def __init__(self, chn_in, chn_out=1, use_dropout=False):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        layers += [nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False)]
        self.model = nn.Sequential(*layers)


class RefLPIPS(nn.Module):
    """torchmetrics' _LPIPS(net="squeeze", version 0.1): SqueezeNet slices, scaling layer, normalised
    feature differences, linear heads, spatial average, sum."""

    def __init__(self, features):
        super().__init__()
        self.slices = nn.ModuleList()
        for r in (range(2), range(2, 5), range(5, 8), range(8, 10), range(10, 11), range(11, 12), range(12, 13)):
            seq = nn.Sequential()
            for i in r:
                seq.add_module(str(i), features[i])
            self.slices.append(seq)
        self.register_buffer("shift", torch.Tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.Tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.chns = [64, 128, 256, 384, 384, 512, 512]
        for i, c in enumerate(self.chns):
            setattr(self, f"lin{i}", RefNetLinLayer(c, use_dropout=True))
            nn.init.uniform_(getattr(self, f"lin{i}").model[1].weight, 0, 2.0 / c)

    def forward(self, in0, in1):
        in0, in1 = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale
        outs0, outs1, x0, x1 = [], [], in0, in1
        for s in self.slices:
            x0, x1 = s(x0), s(x1)
            outs0.append(x0)
            outs1.append(x1)

        def normalize_tensor(f, eps=1e-10):
            return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

        res = [getattr(self, f"lin{k}").model((normalize_tensor(outs0[k]) - normalize_tensor(outs1[k])) ** 2)
               .mean([2, 3], keepdim=True) for k in range(7)]
        return sum(res)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    torch.manual_seed(1)
    net = RefSqueezeNet().eval()
    ref = RefLPIPS(net.features).eval()
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(net.state_dict(), folder / "squeezenet1_1-b8a52dc0.pth")
    torch.save({k: v for k, v in ref.state_dict().items() if k.startswith("lin")}, folder / "squeeze.pth")
    return folder, ref


def ref_calculate_lpips(ref, src, tgt, mask_pred, mask_gt):
    """MetricsCalculator.calculate_lpips restated: [0, 1] float32 images x mask, x 2 - 1, the metric's value."""
    a = np.array(src).astype(np.float32) / 255 * np.array(mask_pred).astype(np.float32)
    b = np.array(tgt).astype(np.float32) / 255 * np.array(mask_gt).astype(np.float32)
    a, b = (torch.tensor(x).permute(2, 0, 1).unsqueeze(0) for x in (a, b))
    with torch.no_grad():
        return ref(a * 2 - 1, b * 2 - 1).squeeze().item()


def test_lpips_matches_the_reference(lpips_files):
    folder, ref = lpips_files
    scorer = Scorer(folder, "cpu")
    assert "lpips" not in scorer.absent and "structure_distance" in scorer.absent
    for seed, shape in ((0, (64, 64, 3)), (1, (45, 70, 3))):  # odd sizes: ceil-mode pooling
        src, tgt = _images(seed, shape)
        mask = _mask(shape[:2], seed)
        keep = (1 - mask)[:, :, None].repeat(3, axis=2)
        want = ref_calculate_lpips(ref, src, tgt, keep, keep)
        got = scorer(src, tgt, mask, "a prompt")["lpips"]
        assert got == pytest.approx(want, rel=RTOL) and want > 0
        assert scorer(src, src, mask, "a prompt")["lpips"] == 0.0


def test_squeezenet_file_keys_are_torchvisions(lpips_files):
    """The publisher's key set loads strictly; a file with a key missing or a wrong shape is refused by name."""
    folder, _ = lpips_files
    state = torch.load(folder / "squeezenet1_1-b8a52dc0.pth", weights_only=True)
    assert set(state) == set(SqueezeNet11().state_dict())
    bad = dict(state)
    del bad["features.12.expand3x3.bias"]
    torch.save(bad, folder / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth.*features.12.expand3x3.bias"):
        load_lpips(folder / "bad.pth", folder / "squeeze.pth")
    bad = dict(state, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    torch.save(bad, folder / "bad.pth")
    with pytest.raises(CheckpointError, match=r"features.0.weight has shape \(64, 3, 5, 5\)"):
        load_lpips(folder / "bad.pth", folder / "squeeze.pth")


# -- DINO ViT + VitExtractor + LossG, restated -------------------------------------------------------------------

class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x):
        y, _ = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class RefViT(nn.Module):
    """DINO's VisionTransformer (img_size 224, num_classes 0), its weights drawn as DINO draws them."""

    def __init__(self, patch=8, dim=768, depth=12, num_heads=12):
        super().__init__()
        self.patch_embed = RefPatchEmbed(patch, dim)
        n = (224 // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList([RefBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if self.pos_embed.device.type != "meta":
            # DINO draws these with std 0.02; beside the patch embeddings of 0-255 input (hundreds) that would
            # make the position embedding, and so its interpolation, invisible in float32
            nn.init.normal_(self.pos_embed, std=30.0)
            nn.init.normal_(self.cls_token, std=30.0)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=.02)
                    nn.init.uniform_(m.bias, -0.02, 0.02)  # DINO zeroes them; random here so they are checked
                elif isinstance(m, nn.LayerNorm):
                    nn.init.uniform_(m.weight, 0.5, 1.5)
                    nn.init.uniform_(m.bias, -0.1, 0.1)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def ref_structure_distance(vit, num_heads, src, tgt):
    """MetricsCalculator.calculate_structure_distance -> LossG.calculate_global_ssim_loss -> VitExtractor:
    float32 0-255 images, Resize(224, max_size=480) (torchvision 0.13 tensor path: bilinear, no antialias),
    Normalize(ImageNet), the last block's qkv output caught by a hook, keys (heads concatenated), cosine
    self-similarity, MSE."""
    def resize(img, size=224, max_size=480):  # torchvision 0.13 F_t.resize for a (C, H, W) float tensor
        _, h, w = img.shape
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (w, h) == (new_w, new_h):
            return img
        return F.interpolate(img[None], size=[new_h, new_w], mode="bilinear", align_corners=False)[0]

    def transform(img):
        img = resize(img)
        mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
        std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
        return (img - mean) / std

    def keys_self_sim(x):
        caught = []
        handle = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: caught.append(o))
        with torch.no_grad():
            vit(x)
        handle.remove()
        qkv = caught[0]
        patch_num = 1 + (x.shape[2] // 8) * (x.shape[3] // 8)
        dim = qkv.shape[-1] // 3
        k = qkv.reshape(patch_num, 3, num_heads, dim // num_heads).permute(1, 2, 0, 3)[1]
        h, t, d = k.shape
        concatenated = k.transpose(0, 1).reshape(t, h * d)[None, None, ...][0]
        norm1 = concatenated.norm(dim=2, keepdim=True)
        factor = torch.clamp(norm1 @ norm1.permute(0, 2, 1), min=1e-08)
        return (concatenated @ concatenated.permute(0, 2, 1)) / factor

    img_pred = torch.from_numpy(np.transpose(np.array(src).astype(np.float32), (2, 0, 1)))[None]
    img_gt = torch.from_numpy(np.transpose(np.array(tgt).astype(np.float32), (2, 0, 1)))[None]
    loss = 0.0
    for a, b in zip(img_pred, img_gt):  # calculate_global_ssim_loss(outputs=img_gt, inputs=img_pred)
        target = keys_self_sim(transform(a).unsqueeze(0))
        loss += F.mse_loss(keys_self_sim(transform(b).unsqueeze(0)), target)
    return float(loss)


DIM, DEPTH, HEADS = 128, 3, 2  # a small DINO (head width 64, as every DINO ViT) keeps the test quick


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    torch.manual_seed(2)
    vit = RefViT(dim=DIM, depth=DEPTH, num_heads=HEADS).eval()
    folder = tmp_path_factory.mktemp("dino")
    torch.save(vit.state_dict(), folder / "dino_vitbase8_pretrain.pth")
    return folder, vit


@pytest.mark.parametrize("shape", [(64, 64, 3), (48, 72, 3), (64, 66, 3), (600, 300, 3)],
                         ids=["square", "wide", "28x28-tokens-not-square", "long-side-capped"])
def test_structure_distance_matches_the_reference(dino_file, shape):
    """Square inputs keep the trained position embedding; others resample it as DINO does (even a 224 x 231
    input, whose token grid is still 28 x 28); a 600 x 300 image is resized to 448 x 224, then capped to
    480 x 240."""
    folder, vit = dino_file
    scorer = Scorer(folder, "cpu")
    assert "structure_distance" not in scorer.absent
    assert any("not DINO ViT-B/8" in n for n in scorer.notes)  # a small ViT is named as not comparable
    src, tgt = _images(3, shape)
    want = ref_structure_distance(vit, HEADS, src, tgt)
    got = scorer(src, tgt, _mask(shape[:2]), "a prompt")["structure_distance"]
    assert got == pytest.approx(want, rel=RTOL) and want > 1e-6
    assert scorer(src, src, _mask(shape[:2]), "a prompt")["structure_distance"] == 0.0


def test_dino_keys_are_dinos_vit_b8():
    """Our ViT-B/8 has exactly the parameter names and shapes of DINO's vit_base(patch_size=8)."""
    with torch.device("meta"):
        ours, ref = DinoViT(), RefViT()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_dino_file_errors(dino_file, tmp_path):
    folder, _ = dino_file
    (tmp_path / "dino_vitbase8_pretrain.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read it as a weights file"):
        load_dino(tmp_path / "dino_vitbase8_pretrain.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a DINO ViT state dict"):
        load_dino(tmp_path / "other.pth")
    torch.save({"net": 1}, tmp_path / "notensors.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_dino(tmp_path / "notensors.pth")
    # the same tensors as safetensors load the same model
    from safetensors.torch import save_file

    state = torch.load(folder / "dino_vitbase8_pretrain.pth", weights_only=True)
    save_file(state, tmp_path / "dino_vitbase8_pretrain.safetensors")
    a, b = load_dino(folder / "dino_vitbase8_pretrain.pth"), load_dino(tmp_path / "dino_vitbase8_pretrain.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- CLIP: torchmetrics' CLIPScore, restated -------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from p2p_engine.metrics.standins import write_clip

    return write_clip(tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14", seed=3)


def ref_clip_score(folder, image, text, mask=None):
    """MetricsCalculator.calculate_clip_similarity + torchmetrics 1.2's _clip_score_update and compute."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)  # torchvision missing: transformers' PIL backend
    img = np.array(image)
    if mask is not None:
        img = np.uint8(img * np.array(mask))
    images = [torch.tensor(img).permute(2, 0, 1)]
    processed = processor(text=[text], images=[i.cpu() for i in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        f_img = model.get_image_features(processed["pixel_values"]).pooler_output
        f_img = f_img / f_img.norm(p=2, dim=-1, keepdim=True)
        limit = model.config.text_config.max_position_embeddings
        ids, att = processed["input_ids"][..., :limit], processed["attention_mask"][..., :limit]
        f_txt = model.get_text_features(ids, att).pooler_output
        f_txt = f_txt / f_txt.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (f_img * f_txt).sum(axis=-1)
    return torch.max(score / 1, torch.zeros_like(score)).item(), (100 * (f_img * f_txt).sum()).item()


def test_clip_matches_the_reference(clip_folder, tmp_path):
    scorer = Scorer(tmp_path, "cpu", clip_model=clip_folder)
    assert "clip_whole" not in scorer.absent and "lpips" in scorer.absent
    signs = set()
    prompts = ["a red circle on a white background", "a photo of a cat", "blue", "a big green square and a small "
               "yellow triangle on a gray background", " ".join(["word"] * 90)]  # the last one is cut at 77 tokens
    for seed, prompt in enumerate(prompts):
        src, tgt = _images(10 + seed, (64, 80, 3))
        mask = _mask((64, 80), seed)
        got = scorer(src, tgt, mask, prompt)
        want_whole, raw = ref_clip_score(clip_folder, tgt, prompt)
        want_edited, raw_edited = ref_clip_score(clip_folder, tgt, prompt, mask[:, :, None].repeat(3, axis=2))
        assert got["clip_whole"] == pytest.approx(want_whole, rel=RTOL, abs=1e-5)
        assert got["clip_edited"] == pytest.approx(want_edited, rel=RTOL, abs=1e-5)
        signs |= {raw > 0, raw_edited > 0}
    assert signs == {True, False}  # both sides of the clamp at 0 were exercised


def test_absent_metrics_name_their_files(tmp_path):
    scorer = Scorer(tmp_path, "cpu")
    assert set(scorer.absent) == {"structure_distance", "lpips", "clip_whole", "clip_edited"}
    assert "dino_vitbase8_pretrain.pth" in scorer.absent["structure_distance"]
    assert "dl.fbaipublicfiles.com" in scorer.absent["structure_distance"]
    assert "squeezenet1_1-b8a52dc0.pth" in scorer.absent["lpips"] and "squeeze.pth" in scorer.absent["lpips"]
    assert "clip-vit-large-patch14" in scorer.absent["clip_whole"]
    src, tgt = _images(0)
    assert set(scorer(src, tgt, _mask((64, 64)), "p")) == {"psnr", "mse", "ssim"}
    assert "no --metric-weights" in Scorer(None, "cpu").absent["lpips"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Scorer(tmp_path / "nowhere", "cpu")
    assert weights.SQUEEZENET.find(tmp_path) is None
