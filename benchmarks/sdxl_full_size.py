"""SDXL at full size, by hand: the `init sdxl` / `init sdxl-refiner` presets found again from their shapes and key
sets alone (the meta device: no memory, no time), then (--unet) one guided UNet step, batch 2, of a random-weight
diffusers SDXL base UNet and of ours holding the same tensors, timed side by side, with their difference and the
process's peak RSS.

    python benchmarks/sdxl_full_size.py [--unet] [--latent 128] [--dtype fp32|bf16]
    python benchmarks/sdxl_full_size.py --end-to-end DIR [--size 1024] [--dtype bf16]

--end-to-end writes a random-weight SDXL base in the real shapes (`sdengine init sdxl`, in --dtype: ~7 GB in bf16)
into DIR and times a one-step `sdengine generate` at --size in a fresh process, with that process's peak RSS: the
whole model read, conditioned, one guided UNet step and the VAE decode, as a user meets it. Measured 2026-12-07 on the
2-core Zen4 (AVX512-BF16), bf16, 1024²: 80-83 s, peak RSS 9.3-9.9 GB for 6.9 GB of weights (`init` alone peaks higher:
it builds fp32 weights before casting them).

--unet needs ~10.5 GB of RAM in fp32 (the weights are shared, not copied), ~5.5 GB in bf16. Needs the [test]
extra (diffusers). Measured 2026-12-06 on this 2-core AMD EPYC (no AVX512, no native bf16), fp32, batch 2:
256² diffusers 8.3 s / sdengine 8.7 s; 512² 21.8 s / 24.2 s; 1024² 120.9 s / 102.6 s (max difference 4.2e-6 of 1.6,
peak RSS 11.4 GB).
On the 2-core Zen4 with AVX512-BF16 (2026-12-07), bf16, 1024², batch 2: diffusers 26.5 s / sdengine 24.0 s (max
difference 0.016 of 1.5: bf16 rounding), peak RSS 5.8 GB. On the EPYC without native bf16 (above), bf16 was not a
fast path: NCHW bf16 convolutions run ~100x slower than fp32 (a 320-channel 3x3 conv on
2x32x32: fp32 0.03 s, bf16 3.5 s, bf16 channels_last 0.24 s), and a bf16 step at 256² did not finish in 9 CPU-min.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from sdengine.config import PRESETS, ModelConfig
from sdengine.model import StableDiffusion
from sdengine.nn.unet import UNetModel, sdxl_vector
from sdengine.weights.detect import detect
from sdengine.weights.keys import UNET, from_diffusers

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the fields that shape it)
DIFFUSERS_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def check_detection() -> None:
    for name in ("sdxl", "sdxl-refiner"):
        with torch.device("meta"):
            sd = StableDiffusion(PRESETS[name]).state_dict()
        found = detect(sd)
        same = found == PRESETS[name] or found == ModelConfig(**{**PRESETS[name].__dict__, "sample_size": None})
        counts = {k: sum(v.numel() for key, v in sd.items() if key.startswith(k))
                  for k in ("model.", "first_stage_model.", "conditioner.")}
        print(f"{name}: {len(sd)} tensors, detected family {found.family!r}, config equal to the preset: {same}; "
              + ", ".join(f"{k.rstrip('.')} {n / 1e6:.0f} M" for k, n in counts.items()))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


@torch.no_grad()
def time_unet(latent: int, dtype: torch.dtype) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target precision: no fp32 copy of 2.6 B parameters
    try:
        ref = UNet2DConditionModel(**DIFFUSERS_BASE).eval()
    finally:
        torch.set_default_dtype(default)
    cfg = PRESETS["sdxl"]
    sd = from_diffusers({"unet": ref.state_dict()}, cfg)  # renamed, the same tensors
    with torch.device("meta"):
        ours = UNetModel(cfg.unet)
    ours.load_state_dict({k[len(UNET):]: v for k, v in sd.items()}, strict=True, assign=True)
    ours.eval()
    print(f"UNet {sum(p.numel() for p in ours.parameters()) / 1e9:.2f} B parameters, {dtype}, "
          f"peak RSS so far {peak_rss_gb():.1f} GB")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=g).to(dtype)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 2048, generator=g).to(dtype)
    pooled = torch.randn(2, 1280, generator=g)
    size = torch.tensor([[latent * 8, latent * 8]] * 2)
    time_ids = torch.cat([size, torch.zeros(2, 2), size], dim=1).float()
    y = sdxl_vector(pooled, size, torch.zeros(2, 2), size).to(dtype)
    times = {}
    for name, run in (("diffusers", lambda: ref(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}).sample),
                      ("sdengine", lambda: ours(x, t, context, y))):
        start = time.perf_counter()
        out = run()
        times[name] = (time.perf_counter() - start, out.float())
    err = (times["sdengine"][1] - times["diffusers"][1]).abs().max().item()
    scale = times["diffusers"][1].abs().max().item()
    print(f"one guided step (batch 2) at {latent * 8}²: diffusers {times['diffusers'][0]:.1f} s, "
          f"sdengine {times['sdengine'][0]:.1f} s; max abs difference {err:.3g} (scale {scale:.3g}); "
          f"peak RSS {peak_rss_gb():.1f} GB")


def end_to_end(folder: str, size: int, dtype: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    model = Path(folder) / f"sdxl-{dtype}.safetensors"
    if not model.exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdengine.cli", "init", "sdxl", str(model), "--dtype", dtype], check=True)
        print(f"init sdxl ({dtype}): {model.stat().st_size / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s")
    out = Path(folder) / f"sdxl-{size}.png"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sdengine.cli", "generate", "a red circle", "--model", str(model),
                             "--steps", "1", "--width", str(size), "--height", str(size), "--precision", dtype,
                             "--seed", "0", "--out", str(out), "--force", "--quiet"])
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak (RUSAGE_CHILDREN would count the init too)
    if status != 0:
        raise SystemExit(f"generate failed (status {status})")
    peak = usage.ru_maxrss / 1024 ** 2
    print(f"generate {size}² SDXL, 1 step, {dtype}: {time.perf_counter() - start:.0f} s, peak RSS {peak:.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet", action="store_true", help="also time one UNet step against diffusers")
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--end-to-end", metavar="DIR", default=None, help="a fresh-process generation's time and peak RSS")
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    if args.end_to_end:
        end_to_end(args.end_to_end, args.size, args.dtype)
        return
    check_detection()
    if args.unet:
        time_unet(args.latent, torch.bfloat16 if args.dtype == "bf16" else torch.float32)


if __name__ == "__main__":
    main()
