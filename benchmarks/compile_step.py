"""What compiling the UNet buys on this CPU at full size: one guided UNet step (batch 2) of the SD1.5 shape, random
weights, eager against TorchInductor as `--compile` sets it up (freezing), inductor with max-autotune, and
OpenVINO's torch.compile backend when the `openvino` package is installed (it is not a dependency).

    python benchmarks/compile_step.py [--size 512] [--dtype bf16] [--repeats 3]
        [--backends eager,inductor,inductor-max-autotune,openvino]

Prints each backend's first call (the compilation), its best step of --repeats and the ratio to eager, and the
largest difference of its output from eager's. Run alone: compilation uses every core for minutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from timing import best_seconds

from sdengine.config import SD15
from sdengine.nn.unet import UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compiled(unet: UNetModel, backend: str) -> torch.nn.Module:
    """A fresh compiled wrapper of `unet` for `backend` (the module's own forward is left alone)."""
    torch._dynamo.reset()
    if backend == "inductor":
        return torch.compile(unet, options={"freezing": True})  # what sdengine.compile.compile_unet asks for
    if backend == "inductor-max-autotune":
        return torch.compile(unet, mode="max-autotune-no-cudagraphs", options={"freezing": True})
    if backend == "openvino":
        import openvino.torch  # noqa: F401  (registers the backend)

        return torch.compile(unet, backend="openvino")
    raise ValueError(f"unknown backend {backend!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="eager,inductor,inductor-max-autotune,openvino")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    unet = UNetModel(SD15.unet).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent, generator=g).to(dtype)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    print(f"SD1.5-shape UNet, one guided step (batch 2) at {args.size}x{args.size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'backend':<24}{'first call':>12}{'step':>9}{'vs eager':>10}{'max |diff|':>12}")
    with torch.inference_mode():
        reference = unet(x, t, ctx).float()
        eager = best_seconds(lambda: unet(x, t, ctx), args.repeats)
        print(f"{'eager':<24}{'':>12}{eager:>8.2f}s{1.0:>9.2f}x{0.0:>12.2e}", flush=True)
        for backend in args.backends.split(","):
            if backend == "eager":
                continue
            if backend == "openvino" and importlib.util.find_spec("openvino") is None:
                print(f"{backend:<24}not installed (pip install openvino)")
                continue
            model = compiled(unet, backend)
            start = time.perf_counter()
            out = model(x, t, ctx)
            first = time.perf_counter() - start
            step = best_seconds(lambda model=model: model(x, t, ctx), args.repeats)
            diff = (out.float() - reference).abs().max().item()
            print(f"{backend:<24}{first:>11.0f}s{step:>8.2f}s{eager / step:>9.2f}x{diff:>12.2e}", flush=True)


if __name__ == "__main__":
    main()
