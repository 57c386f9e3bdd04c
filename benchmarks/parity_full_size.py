"""Parity at full size: SD1.5- (or SD2.1-) shaped random-weight models built with diffusers/transformers, loaded
by sdengine from a diffusers folder and from a 2 GB fp16 single file; prints max errors and load times.

    python benchmarks/parity_full_size.py [--family sd15|sd21] [--latent 64] [--workdir /tmp/sdengine-bench]

Run by hand (minutes, ~12 GB of RAM, ~6 GB of disk); needs the [test] extra.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import sdengine


def build_reference(family: str, folder: Path) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    from sdengine.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    if family == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, hidden_act="quick_gelu")
        prediction, pad_with_eos = "epsilon", True
    else:
        unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        text_cfg = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, hidden_act="gelu")
        prediction, pad_with_eos = "v_prediction", False
    text_cfg.vocab_size, text_cfg.max_position_embeddings = 49408, 77
    text_cfg.bos_token_id, text_cfg.eos_token_id = 49406, 49407
    text = CLIPTextModel(text_cfg)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    with torch.no_grad():  # move every weight off its init so each one shows in the outputs
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tok_dir = folder.parent / "tokenizer"
    CLIPTokenizer.default(pad_with_eos=pad_with_eos).save(tok_dir)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, prediction_type=prediction)
    parts = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(), "scheduler": scheduler,
             "tokenizer": HFTokenizer.from_pretrained(tok_dir)}
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return parts


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> str:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    return f"max abs err {err:.3g}, scale {scale:.3g}, ratio {err / scale:.2e}"


@torch.no_grad()
def compare(model: sdengine.StableDiffusion, parts: dict, latent: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, model.config.unet.context_dim, generator=g)
    t = torch.tensor([500])
    start = time.perf_counter()
    ref = parts["unet"](x, t, encoder_hidden_states=ctx).sample
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    ours = model.unet(x, t, ctx)
    t_ours = time.perf_counter() - start
    print(f"  unet {latent}x{latent}: {rel_error(ours, ref)}  (time ours/diffusers {t_ours / t_ref:.2f})")
    pixels = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    post_ref, post = parts["vae"].encode(pixels).latent_dist, model.vae.encode(pixels)
    print(f"  vae encode mean: {rel_error(post.mean, post_ref.mean)}; "
          f"logvar: {rel_error(post.logvar, post_ref.logvar)}")
    z = torch.randn(1, 4, 32, 32, generator=g)
    print(f"  vae decode 256x256: {rel_error(model.vae.decode(z), parts['vae'].decode(z).sample)}")
    ids = model.tokenizer(["a photograph of an astronaut riding a horse", ""])
    out = parts["text_encoder"](ids, output_hidden_states=True)
    print(f"  text last: {rel_error(model.text_encoder(ids)[0], out.last_hidden_state)}")
    pen = parts["text_encoder"].final_layer_norm(out.hidden_states[-2])
    print(f"  text penultimate (clip skip 2): {rel_error(model.text_encoder(ids, clip_skip=2)[0], pen)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["sd15", "sd21"], default="sd15")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sdengine-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    folder = args.workdir / "pipe"
    print(f"building a random-weight {args.family} reference ...")
    parts = build_reference(args.family, folder)

    start = time.perf_counter()
    model = sdengine.load(folder)
    print(f"loaded the diffusers folder in {time.perf_counter() - start:.1f} s: {model.config.family}, "
          f"{sum(model.parameter_counts().values()) / 1e6:.0f} M parameters")
    compare(model, parts, args.latent)

    single = args.workdir / "model-fp16.safetensors"
    sdengine.save(model, single, dtype=torch.float16)
    size = single.stat().st_size / 1e9
    del model
    for dtype in (torch.float16, torch.float32):
        start = time.perf_counter()
        model = sdengine.load(single, dtype=dtype)
        print(f"loaded the {size:.2f} GB fp16 single file as {str(dtype)[6:]} in {time.perf_counter() - start:.1f} s")
    print("fp16 file, computed in fp32 (the error is fp16 rounding of the weights):")
    compare(model, parts, args.latent)


if __name__ == "__main__":
    main()
