"""The DiT-XL/2 baseline, built from diffusers components with random weights (nothing is downloaded)."""
from __future__ import annotations

# DiT-XL/2 at its published configuration (facebookresearch/DiT models.py DiT_XL_2; 256 px, SD-VAE
# latent 32x32x4): 28 layers, width 16 x 72 = 1152, patch 2, learned sigma (8 output channels).
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
DIT_NAME = "DiT-XL/2"


def dit_xl_2():
    """DiTTransformer2DModel with random weights, on the current default device."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIT_XL_2)


def dit_pipeline(transformer, vae):
    """DiTPipeline as the original conversion builds it: DDPM, 1000 training steps, linear betas."""
    from diffusers import DDPMScheduler, DiTPipeline

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
