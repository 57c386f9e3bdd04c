"""Training images/s of sdengine's UNet vs diffusers' UNet2DConditionModel of the same config, in the same loop
(AdamW, bf16 autocast, eps-MSE on random latents and contexts), measured in the same run.

    python benchmarks/train_throughput.py [--arch shapes] [--batch 32] [--latent 16] [--steps 20]

Run by hand; the ratio is what to read (these machines are noisy).
"""
from __future__ import annotations

import argparse
import time

import torch

from sdengine.config import PRESETS
from sdengine.nn.unet import UNetModel
from sdengine.weights.diffusers_folder import unet_config_to_diffusers


def throughput(model, call, batch: int, latent: int, context_dim: int, steps: int, precision: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    ctx = torch.randn(batch, 77, context_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn_like(x)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = (call(model, x, t, ctx).float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="shapes", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--context-dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    import dataclasses

    from diffusers import UNet2DConditionModel
    cfg = dataclasses.replace(PRESETS[args.arch].unet, context_dim=args.context_dim)
    torch.manual_seed(0)
    ours = UNetModel(cfg).train()
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**config).train()
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in ref.parameters()), "configs differ"
    print(f"UNet {params / 1e6:.1f} M parameters, latents {args.latent}x{args.latent}, batch {args.batch}, "
          f"{args.precision}, {torch.get_num_threads()} threads")
    results = {}
    for name, model, call in (("diffusers", ref, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample),
                              ("sdengine", ours, lambda m, x, t, c: m(x, t, c))):
        results[name] = throughput(model, call, args.batch, args.latent, args.context_dim, args.steps, args.precision)
        print(f"  {name}: {results[name]:.1f} images/s")
    print(f"  ratio sdengine / diffusers: {results['sdengine'] / results['diffusers']:.2f}")


if __name__ == "__main__":
    main()
