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
