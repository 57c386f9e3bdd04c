"""Seconds per 64x64 image (20 Euler steps, CFG 5) with the shipped model, end to end through Pipeline.generate,
eager and compiled (--compile: TorchInductor, and OpenVINO when it is installed), fp32 and bf16; and the UNet step
against diffusers' UNet2DConditionModel holding the same weights, measured in the same run.

    python benchmarks/default_model_latency.py [--repeats 5] [--dtypes fp32,bf16] [--backends inductor,openvino]

Run by hand on an otherwise idle machine (compilation takes ~20-45 s per dtype on 2 cores). These machines are
noisy: read the ratios and medians, not single numbers. The issue's target is <= 0.5 s per image on this CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from sdengine.compile import compile_unet
from sdengine.openvino_unet import openvino_available
from sdengine.pipeline import Pipeline
from sdengine.runtime import default_model
from sdengine.weights import load
from sdengine.weights.diffusers_folder import unet_config_to_diffusers
from sdengine.weights.keys import to_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a red circle above a blue square"


def image_seconds(pipe: Pipeline, repeats: int) -> list[float]:
    pipe.generate(PROMPT, steps=20, cfg_scale=5.0, seed=0)  # warm-up (and compilation, when compiled)
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        pipe.generate(PROMPT, steps=20, cfg_scale=5.0, seed=seed)
        times.append(time.perf_counter() - start)
    return times


def step_seconds(fn, repeats: int, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--backends", default="inductor,openvino", help="compile backends to time ('' for none)")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    path = default_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {path}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        model = load(path, dtype=dtype)
        cfg = model.config
        ref = UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)).eval()
        ref.load_state_dict(to_diffusers(model.state_dict(), cfg)["unet"])
        ref.to(dtype)
        side = cfg.image_size // cfg.vae.downscale
        x = torch.randn(2, 4, side, side, dtype=dtype)
        t = torch.tensor([500, 500])
        ctx = torch.randn(2, 77, cfg.text.width, dtype=dtype)
        with torch.inference_mode():
            ours = step_seconds(partial(model.unet, x, t, ctx), args.repeats)
            theirs = step_seconds(partial(ref, x, t, encoder_hidden_states=ctx), args.repeats)
        print(f"{name}: UNet step (batch 2) ours {ours * 1e3:.1f} ms, diffusers {theirs * 1e3:.1f} ms, "
              f"ratio {theirs / ours:.2f}x")
        eager = image_seconds(Pipeline(model), args.repeats)
        print(f"{name}: image eager    median {statistics.median(eager):.3f} s (best {min(eager):.3f})")
        for backend in filter(None, args.backends.split(",")):
            if backend == "openvino" and not openvino_available():
                print(f"{name}: openvino not installed")
                continue
            start = time.perf_counter()
            pipe = Pipeline(compile_unet(load(path, dtype=dtype), backend))
            pipe.generate(PROMPT, steps=20, cfg_scale=5.0, seed=0)
            first = time.perf_counter() - start
            compiled = image_seconds(pipe, args.repeats)
            cached = " from the disk cache" if getattr(pipe.model.unet.forward, "reads", 0) else ""
            ratio = statistics.median(eager) / statistics.median(compiled)
            print(f"{name}: image {backend:<9} median {statistics.median(compiled):.3f} s (best {min(compiled):.3f}; "
                  f"first call {first:.1f} s{cached}), {ratio:.2f}x eager")


if __name__ == "__main__":
    main()
