"""The tiny SDXL-layout reference models (diffusers/transformers, random weights) shared by the SDXL, LoRA,
ControlNet and embedding tests."""
from __future__ import annotations

import torch

POOLED = 32
SDXL_UNET = dict(
    block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=(1, 2, 2), cross_attention_dim=64,
    transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=POOLED + 6 * 256)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """diffusers zero-initialises some output layers; perturb every weight so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


TEXT = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=1,
            intermediate_size=64, num_hidden_layers=3)


def sdxl_pipeline(folder, seed: int = 0, **unet_options):
    """A tiny StableDiffusionXLPipeline with random weights, saved by diffusers to `folder`; returns it.
    unet_options: UNet2DConditionModel arguments in place of SDXL_UNET's (a pruned layout)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFTokenizer

    from sdengine.tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    unet = perturbed(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                          **{**SDXL_UNET, **unet_options}), seed)
    vae = perturbed(AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=32, scaling_factor=0.13025,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2), seed + 1)
    clip_l = perturbed(CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, hidden_act="quick_gelu",
                                                    **TEXT)), seed + 2)
    big_g = perturbed(CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, num_attention_heads=2, hidden_act="gelu", projection_dim=32, **TEXT)), seed + 3)
    tokenizers = []
    for pad_with_eos in (True, False):
        tok_dir = folder.parent / f"{folder.name}-tokenizer-{pad_with_eos}"
        CLIPTokenizer.default(pad_with_eos=pad_with_eos).save(tok_dir)
        tokenizers.append(HFTokenizer.from_pretrained(tok_dir))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


def sdxl_refiner(folder, base, seed: int = 4):
    """A tiny StableDiffusionXLImg2ImgPipeline in the refiner's layout (4 levels, bigG alone as text_encoder_2,
    aesthetic score) sharing `base`'s VAE and bigG, saved by diffusers to `folder`; returns it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    unet = dict(SDXL_UNET, block_out_channels=(64, 128, 128, 128), attention_head_dim=(1, 2, 2, 2),
                cross_attention_dim=32, transformer_layers_per_block=2,
                projection_class_embeddings_input_dim=POOLED + 5 * 256,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(seed)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, scheduler=base.scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        unet=perturbed(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **unet), seed))
    pipe.save_pretrained(folder)
    return pipe
