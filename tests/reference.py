"""Tiny random-weight reference models built with diffusers/transformers (the oracle), saved as diffusers folders.

Two layouts: "sd1" (conv projections, a fixed head count, CLIP with quick_gelu, eps) and "sd2" (linear
projections, 64 channels per head, OpenCLIP-style gelu text model, v-prediction) — the same structural
differences as the full-size families, at sizes that run in milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import torch

LAYOUTS = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2, cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="quick_gelu"),
        prediction="epsilon", pad="<|endoftext|>"),
    "sd2": dict(
        unet=dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
                  cross_attention_dim=64, use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                  hidden_act="gelu"),
        prediction="v_prediction", pad="!"),
}


def make_components(layout: str, seed: int = 0, in_channels: int = 4) -> dict:
    """Random-weight diffusers/transformers components of one layout (weights perturbed away from init)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = LAYOUTS[layout]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=4, norm_num_groups=32,
                                **spec["unet"])
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                        bos_token_id=49406, pad_token_id=1, **spec["text"]))
    # diffusers zero-initialises some output layers; perturb every weight so each one matters in the outputs.
    for module in (unet, vae, text):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                              prediction_type=spec["prediction"])
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(), "scheduler": scheduler}


def save_pipeline(layout: str, folder: Path, seed: int = 0, in_channels: int = 4) -> dict:
    """Write a StableDiffusionPipeline folder of the given layout; returns its components."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    from sdengine.tokenizer import CLIPTokenizer

    parts = make_components(layout, seed, in_channels)
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    CLIPTokenizer.default(pad_with_eos=LAYOUTS[layout]["pad"] != "!").save(tok_dir)
    parts["tokenizer"] = HFTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return parts


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """max |ours - ref| <= rel x output scale (max |ref|), the fp32 parity bound."""
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape
    assert scale > 1e-3, "degenerate reference output"
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"
