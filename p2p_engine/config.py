"""Model configurations and named presets.

One dataclass per model part, plus `ModelConfig` that ties them to a family.
The field names are ours; `to_diffusers`/`from_diffusers` translate to and
from the `config.json` files of a diffusers-layout checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attn: tuple[bool, ...] = (True, True, True, False)  # per down level; up levels mirror it
    layers_per_block: int = 2
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; the mid block uses the last
    cross_attention_dim: int = 768
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False  # SD 2.1: QK^T and softmax in fp32
    norm_num_groups: int = 32
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # latent side at the native resolution
    transformer_layers: tuple[int, ...] | None = None  # per level (SDXL: 1, 2, 10); None: one each; mid: the last
    # SDXL's "text_time" added conditioning: the pooled text embedding and 6 sinusoidally embedded time ids
    addition_time_embed_dim: int | None = None  # 256 for SDXL; None: no added conditioning
    pooled_dim: int = 0  # width of the pooled text embedding the added conditioning takes (1280 for SDXL)

    def depth(self, level: int) -> int:
        """Transformer blocks in each attention module of this level."""
        return 1 if self.transformer_layers is None else self.transformer_layers[level]

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        added = {} if self.addition_time_embed_dim is None else {
            "addition_embed_type": "text_time", "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.pooled_dim + 6 * self.addition_time_embed_dim}
        if self.transformer_layers is not None:
            added["transformer_layers_per_block"] = list(self.transformer_layers)
        return added | {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attn],
            "up_block_types": ["CrossAttnUpBlock2D" if self.cross_attn[n - 1 - i] else "UpBlock2D" for i in range(n)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(self.num_heads),  # diffusers' historical name: it holds head counts
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "act_fn": "silu",
            "downsample_padding": 1,
            "center_input_sample": False,
        }

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        n = len(d["block_out_channels"])
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        if isinstance(heads, int):
            heads = [heads] * n
        layers = d.get("transformer_layers_per_block", 1)
        layers = None if layers == 1 else tuple([layers] * n if isinstance(layers, int) else layers)
        time_dim = d.get("addition_time_embed_dim") if d.get("addition_embed_type") == "text_time" else None
        pooled = d["projection_class_embeddings_input_dim"] - 6 * time_dim if time_dim else 0
        return cls(
            block_out_channels=tuple(d["block_out_channels"]),
            cross_attn=tuple(t.startswith("CrossAttn") for t in d["down_block_types"]),
            layers_per_block=d.get("layers_per_block", 2),
            num_heads=tuple(heads),
            cross_attention_dim=d.get("cross_attention_dim", 768),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=bool(d.get("upcast_attention", False)),
            norm_num_groups=d.get("norm_num_groups", 32),
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            sample_size=d.get("sample_size", 64),
            transformer_layers=layers,
            addition_time_embed_dim=time_dim,
            pooled_dim=pooled,
        )


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215
    sample_size: int = 512
    # The SDXL VAE overflows in float16: decode (and encode) in float32, as diffusers' SDXL pipelines do when
    # the config says so (diffusers' default is True; SD 1.x/2.x pipelines never upcast, nor does the engine).
    force_upcast: bool = True

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "act_fn": "silu",
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "force_upcast": self.force_upcast,
        }

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        return cls(
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=d.get("layers_per_block", 2),
            latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32),
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            scaling_factor=d.get("scaling_factor", 0.18215),
            sample_size=d.get("sample_size", 512),
            force_upcast=bool(d.get("force_upcast", True)),
        )

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextConfig:
    """Keyword arguments of transformers' CLIPTextConfig that differ between families."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    vocab_size: int = 49408
    max_position_embeddings: int = 77

    def to_transformers(self) -> dict:
        d = dataclasses.asdict(self)
        # SD 1.x tokenizers pad with <|endoftext|> (49407); transformers wants the ids spelled out.
        d.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
        return d


@dataclass(frozen=True)
class ModelConfig:
    family: str = "sd1"  # one of SUPPORTED_FAMILIES
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prediction_type: str = "epsilon"  # or "v_prediction"
    pad_token: str = "<|endoftext|>"  # SD 2.x (OpenCLIP) pads with "!"
    # SDXL: the second text encoder (OpenCLIP ViT-bigG, with a projection: the pooled embedding); it pads with
    # "!". The context is both encoders' penultimate hidden states side by side.
    text_2: TextConfig | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the empty unconditional prompt is all zeros

    @property
    def latent_size(self) -> int:
        return self.unet.sample_size

    @property
    def image_size(self) -> int:
        return self.unet.sample_size * self.vae.downscale


SD2_TEXT = TextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                      num_attention_heads=16, hidden_act="gelu", projection_dim=512)
SDXL_TEXT_2 = TextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                         hidden_act="gelu", projection_dim=1280)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(),
    "sd21": ModelConfig(
        family="sd2",
        unet=UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                        upcast_attention=True, sample_size=96),
        vae=VAEConfig(sample_size=768),
        text=SD2_TEXT,
        prediction_type="v_prediction",
        pad_token="!",
    ),
    # A few hundred thousand UNet parameters: attention at 16, 8 (cross) and the 4x4 mid block.
    "tiny": ModelConfig(
        unet=UNetConfig(block_out_channels=(32, 64, 64), cross_attn=(True, True, False), layers_per_block=1,
                        num_heads=(2, 2, 2), cross_attention_dim=32, norm_num_groups=8, sample_size=16),
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128),
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32),
    ),
    # SD 1.x's block layout at the tiny preset's width: four levels, two resnets per down block (three per up
    # block), attention at the first three, so 16 transformer blocks numbered as SD 1.5's (the editors' layers).
    "tiny-sd": ModelConfig(
        unet=UNetConfig(block_out_channels=(32, 32, 64, 64), num_heads=(2, 2, 2, 2), cross_attention_dim=32,
                        norm_num_groups=8, sample_size=16),
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128),
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32),
    ),
    # The tiny model with the SD 2.x choices: linear projections, upcast attention, v-prediction, "!" padding.
    "tiny-v": ModelConfig(
        family="sd2",
        unet=UNetConfig(block_out_channels=(32, 64, 64), cross_attn=(True, True, False), layers_per_block=1,
                        num_heads=(2, 2, 2), cross_attention_dim=32, norm_num_groups=8, sample_size=16,
                        use_linear_projection=True, upcast_attention=True),
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128),
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32, hidden_act="gelu"),
        prediction_type="v_prediction",
        pad_token="!",
    ),
    "sdxl": ModelConfig(
        family="sdxl",
        unet=UNetConfig(block_out_channels=(320, 640, 1280), cross_attn=(False, True, True), num_heads=(5, 10, 20),
                        cross_attention_dim=2048, use_linear_projection=True, sample_size=128,
                        transformer_layers=(1, 2, 10), addition_time_embed_dim=256, pooled_dim=1280),
        vae=VAEConfig(scaling_factor=0.13025, sample_size=1024),
        text=TextConfig(),
        text_2=SDXL_TEXT_2,
        force_zeros_for_empty_prompt=True,
    ),
    # The SDXL architecture at the tiny preset's size: no attention at the first level, two transformer blocks
    # at the last (and in the mid block), "text_time" added conditioning, two text encoders (32 + 32 wide).
    "tiny-sdxl": ModelConfig(
        family="sdxl",
        unet=UNetConfig(block_out_channels=(32, 64, 64), cross_attn=(False, True, True), layers_per_block=1,
                        num_heads=(2, 2, 2), cross_attention_dim=64, norm_num_groups=8, sample_size=16,
                        use_linear_projection=True, transformer_layers=(1, 1, 2), addition_time_embed_dim=8,
                        pooled_dim=32),
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128,
                      scaling_factor=0.13025),
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32),
        text_2=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=32, hidden_act="gelu"),
        force_zeros_for_empty_prompt=True,
    ),
}
