"""The toy model: procedural shapes dataset, its analysis, and the config of the model trained on it.

`TOY` is the ModelConfig the training script (`python -m p2p_engine.toy.train`) builds; the trained
weights ship in `p2p_engine/data/toy` and load with `p2p.load("toy")`. 64 x 64 images, a VAE with
downscale 4 -> 16 x 16 latents, so the UNet attends at 16 x 16 and 8 x 8 and in the 4 x 4 mid block.
"""
from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig

TOY = ModelConfig(
    unet=UNetConfig(block_out_channels=(32, 64, 128), cross_attn=(True, True, False), layers_per_block=1,
                    num_heads=(2, 4, 4), cross_attention_dim=64, norm_num_groups=8, sample_size=16),
    # scaling_factor is a placeholder: the training script measures 1/std of the latents and stores that.
    vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64),
    # The real CLIP vocabulary (49408) with a 64-wide embedding: ~3.2M parameters, 6.3 MB in fp16.
    text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=64),
)

# An experiment, not shipped: 32 x 32 latents (VAE downscale 2) and a four-level UNet without attention
# at its full resolution, so its 16 x 16 and 8 x 8 cross maps sit below the top level as SD's 16 x 16
# maps do at 64 x 64 latents. Trained with `--config toy32 --vae-steps 1500 --unet-steps 6000
# --minutes 80` (the cap stopped it at 1292 VAE + 4787 UNet steps on the 2-core machine), its shape
# word's 16 x 16 maps reached a mean IoU of 0.51 with the shape (TOY's first run: 0.16), but its generations
# followed the caption in 15% of 60 seeds (TOY's first run: 92%). Continued for 7000 more UNet steps (`--init`,
# `--pool 32000`, 55 min) its loss fell from 0.0170 to 0.0114, yet it followed captions in only 30%, its
# samples had smeared backgrounds and its 16 x 16 maps fell to 0.43: not a way out. See the README.
TOY32 = ModelConfig(
    unet=UNetConfig(block_out_channels=(16, 32, 64, 64), cross_attn=(False, True, True, True), layers_per_block=1,
                    num_heads=(1, 2, 4, 4), cross_attention_dim=64, norm_num_groups=8, sample_size=32),
    vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64),
    text=TOY.text,
)
CONFIGS = {"toy": TOY, "toy32": TOY32}
