"""Seconds per sampling step (one CFG step: the UNet on a batch of 2) for a full-size SD1.5-shaped UNet, ours vs
diffusers' UNet2DConditionModel with the same weights, measured in the same run; and the VAE decode.

    python benchmarks/speed_sd15.py [--size 512] [--repeats 3] [--dtypes fp32,bf16]

Run by hand (minutes; ~8 GB RAM). These machines are noisy: read the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
from timing import best_seconds

from sdengine.config import SD15
from sdengine.nn.unet import UNetModel
from sdengine.nn.vae import AutoencoderKL
from sdengine.weights.keys import from_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--vae", action="store_true", help="also time the VAE decode")
    args = ap.parse_args()
    from diffusers import AutoencoderKL as RefVAE
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref_unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    ours = UNetModel(SD15.unet).eval()
    sd = from_diffusers({"unet": ref_unet.state_dict()}, SD15)
    ours.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items()})
    latent = args.size // 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, UNet at {args.size}x{args.size} "
          f"(latent {latent}x{latent}), batch 2 (one CFG step)")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        x = torch.randn(2, 4, latent, latent, dtype=dtype)
        t = torch.tensor([500, 500])
        ctx = torch.randn(2, 77, 768, dtype=dtype)
        ref_unet.to(dtype)
        ours.to(dtype)
        with torch.inference_mode():
            t_ref = best_seconds(partial(ref_unet, x, t, encoder_hidden_states=ctx), args.repeats)
            t_ours = best_seconds(partial(ours, x, t, ctx), args.repeats)
        print(f"  {name}: sdengine {t_ours:.2f} s/step, diffusers {t_ref:.2f} s/step, ratio {t_ours / t_ref:.2f}")
    if args.vae:
        ref_vae = RefVAE(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4).eval()
        vae = AutoencoderKL(SD15.vae).eval()
        vsd = from_diffusers({"vae": ref_vae.state_dict()}, SD15)
        vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in vsd.items()})
        z = torch.randn(1, 4, latent, latent)
        with torch.inference_mode():
            t_ref = best_seconds(lambda: ref_vae.decode(z), 1)
            t_ours = best_seconds(lambda: vae.decode(z), 1)
        print(f"  VAE decode fp32: sdengine {t_ours:.2f} s, diffusers {t_ref:.2f} s, ratio {t_ours / t_ref:.2f}")


if __name__ == "__main__":
    main()
