"""What `keep_freed_memory` (sdengine/cpu_memory.py, applied by the CLI) buys on a CPU: each workload runs in two
fresh processes, one with glibc's default malloc (SDENGINE_MALLOC=system) and one with the setting, and the
ratio of their times is printed, with each process's peak resident memory.

    python benchmarks/cpu_allocator.py [--repeats 3] [--full-size]

Workloads: the latent cache's VAE encode (the shipped model's VAE, 256 scenes of 64x64, fp32); one 64x64 image
of the shipped model (20 Euler steps, CFG 5, fp32 and bf16); one training step of its UNet (batch 64, fp32);
with --full-size, an SD1.5-shaped VAE decode to 512x512 (random weights). Run by hand on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from timing import best_seconds

WORKLOADS = ["vae_encode_256", "image_fp32", "image_bf16", "unet_train_step_64"]


def child(workload: str, repeats: int, tuned: bool) -> None:
    import torch

    from sdengine.cpu_memory import keep_freed_memory
    from sdengine.pipeline import Pipeline
    from sdengine.runtime import default_model
    from sdengine.weights import load

    applied = keep_freed_memory() if tuned else False
    torch.manual_seed(0)
    if workload == "vae_decode_512":
        from sdengine.config import SD15
        from sdengine.nn.vae import AutoencoderKL

        vae = AutoencoderKL(SD15.vae).eval()
        z = torch.randn(1, 4, 64, 64)
        fn = lambda: vae.decode(z)  # noqa: E731
    elif workload.startswith("image_"):
        dtype = torch.bfloat16 if workload == "image_bf16" else torch.float32
        pipe = Pipeline(load(default_model(), dtype=dtype))
        fn = lambda: pipe.generate("a red circle above a blue square", steps=20, cfg_scale=5.0, seed=0)  # noqa: E731
    else:
        model = load(default_model(), dtype=torch.float32)
        if workload == "vae_encode_256":
            x = torch.rand(256, 3, 64, 64) * 2 - 1
            fn = lambda: model.vae.encode(x)  # noqa: E731
        else:
            unet = model.unet.train().requires_grad_(True)  # load() freezes weights for inference
            side = model.config.image_size // model.config.vae.downscale
            x, ctx = torch.randn(64, 4, side, side), torch.randn(64, 77, model.config.text.width)
            t = torch.randint(0, 1000, (64,))

            def fn() -> None:
                unet(x, t, ctx).square().mean().backward()

    grad = workload == "unet_train_step_64"
    with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
        seconds = best_seconds(fn, repeats)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "applied": applied}))


def run(workload: str, repeats: int, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["SDENGINE_MALLOC"] = "" if tuned else "system"
    out = subprocess.run([sys.executable, __file__, "--child", workload, "--repeats", str(repeats)]
                         + (["--tuned"] if tuned else []), env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-size", action="store_true")
    ap.add_argument("--child", default=None)
    ap.add_argument("--tuned", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.repeats, args.tuned)
    for workload in WORKLOADS + (["vae_decode_512"] if args.full_size else []):
        system, tuned = run(workload, args.repeats, False), run(workload, args.repeats, True)
        assert tuned["applied"], "keep_freed_memory did not apply (not glibc on Linux?)"
        print(f"{workload:20s} glibc default {system['seconds'] * 1e3:8.1f} ms ({system['peak_mib']:6.0f} MiB peak)"
              f"   kept {tuned['seconds'] * 1e3:8.1f} ms ({tuned['peak_mib']:6.0f} MiB peak)"
              f"   speed-up {system['seconds'] / tuned['seconds']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
