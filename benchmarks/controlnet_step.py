"""The per-step cost of ControlNet units on the full-size SD1.5 shape: one guided denoiser call (batch 2, the two
halves of CFG) with 0, 1 and 2 units, random weights (time, not pixels, is measured).

    python benchmarks/controlnet_step.py [--size 512] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--repeats 3]

Run by hand on an otherwise idle machine; read the ratio to the plain step, not single numbers. The ControlNet is
the UNet's encoder half plus the hint encoder, so a unit costs about 40-50% of a UNet call; "control" mode runs it on
the conditional half only (half that).

Measured 2026-12-07 on the idle 2-core Zen4 (AVX512-BF16), 512², bf16, best of 3: plain 3.70 s; one unit 5.05 s
(1.37x); two units 6.31 s (1.71x); one unit in "ControlNet is more important" mode 4.38 s (1.19x).
"""
from __future__ import annotations

import argparse

import torch
from timing import best_seconds

from sdengine.config import PRESETS
from sdengine.diffusion.denoiser import CFGDenoiser, Conditioning, Control, Denoiser
from sdengine.diffusion.schedule import SD_SCHEDULE
from sdengine.nn.controlnet import ControlNet, ControlNetConfig
from sdengine.nn.unet import UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = PRESETS["sd15"].unet
    torch.manual_seed(0)
    unet = UNetModel(cfg).to(device, dtype).eval()
    nets = [ControlNet(ControlNetConfig(unet=cfg)).to(device, dtype).eval() for _ in range(2)]
    n = args.size // 8
    x = torch.randn(1, 4, n, n, device=device)
    context = torch.randn(1, 77, cfg.context_dim, device=device)
    hint = torch.rand(1, 3, args.size, args.size, device=device)
    sigma = torch.tensor([5.0])
    results = {}
    for label, units, rows in (("plain", 0, None), ("1 unit", 1, None), ("2 units", 2, None),
                               ("1 unit, control mode", 1, (False,))):
        controls = tuple(Control(net, hint, (1.0,) * net.residuals) for net in nets[:units])
        uncontrols = controls if rows is None else tuple(
            Control(c.net, hint[:0], c.scales, rows=rows) for c in controls)
        guided = CFGDenoiser(Denoiser(unet, SD_SCHEDULE), Conditioning(context, controls=controls),
                             Conditioning(context, controls=uncontrols), 7.5)

        def step(guided: CFGDenoiser = guided) -> None:
            with torch.no_grad():
                guided(x, sigma)
            if device.type == "cuda":
                torch.cuda.synchronize()

        results[label] = best_seconds(step, args.repeats)
        print(f"{label:22s} {results[label]:.3f} s  ({results[label] / results['plain']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
