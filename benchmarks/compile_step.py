"""What compiling the UNet buys on this CPU at full size: one guided UNet step (batch 2) of the SD1.5 shape, random
weights, eager against TorchInductor as `--compile` sets it up (freezing), inductor with max-autotune, and, when
the `openvino` package is installed (it is not a dependency), OpenVINO's torch.compile backend and its own graph
(openvino.convert_model, then the CPU plugin in the same precision: the route FastSD CPU takes).

    python benchmarks/compile_step.py [--size 512] [--dtype bf16] [--repeats 3]
        [--backends eager,inductor,inductor-max-autotune,openvino,openvino-ir]

Prints each backend's first call (the compilation), its best step of --repeats and the ratio to eager, and the
largest difference of its output from eager's. Run alone: compilation uses every core for minutes.
"""
from __future__ import annotations

import argparse
import copy
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
        return torch.compile(unet, options={"freezing": True, "max_autotune": True})
    if backend == "openvino":
        import openvino.torch  # noqa: F401  (registers the backend)

        return torch.compile(unet, backend="openvino", dynamic=False)
    raise ValueError(f"unknown backend {backend!r}")


class OpenVINOModel:
    """The UNet converted to OpenVINO's graph (openvino.convert_model, FastSD CPU's route) and compiled for the CPU
    plugin in `precision` ("bf16" or "f32"), called like the module; the conversion happens at the first call."""

    def __init__(self, unet: UNetModel, precision: str):
        self.unet, self.precision, self.compiled = unet, precision, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        import openvino

        if self.compiled is None:
            fp32 = copy.deepcopy(self.unet).float()  # traced in fp32; the plugin runs it in `precision`
            model = openvino.convert_model(fp32, example_input=(x.float(), t, ctx.float()))
            config = {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
            self.compiled = openvino.Core().compile_model(model, "CPU", config)
        out = self.compiled((x.float().numpy(), t.numpy(), ctx.float().numpy()))[0]
        return torch.from_numpy(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="eager,inductor,inductor-max-autotune,openvino,openvino-ir")
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
            if backend.startswith("openvino") and importlib.util.find_spec("openvino") is None:
                print(f"{backend:<24}not installed (pip install openvino)")
                continue
            model = OpenVINOModel(unet, "bf16" if dtype == torch.bfloat16 else "f32") \
                if backend == "openvino-ir" else compiled(unet, backend)
            start = time.perf_counter()
            try:
                out = model(x, t, ctx)
            except Exception as e:  # a backend that cannot take this model: say so, measure the others
                print(f"{backend:<24}failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
                continue
            first = time.perf_counter() - start
            step = best_seconds(lambda model=model: model(x, t, ctx), args.repeats)
            diff = (out.float() - reference).abs().max().item()
            print(f"{backend:<24}{first:>11.0f}s{step:>8.2f}s{eager / step:>9.2f}x{diff:>12.2e}", flush=True)


if __name__ == "__main__":
    main()
