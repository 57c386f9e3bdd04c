"""Images/s of the UNet stage's real training step (Trainer.train_step on cached latents: text encoder, min-SNR
loss, AdamW, gradient clipping, EMA), by batch size, eager and compiled, on any device.

    python benchmarks/train_step_speed.py [--model M] [--device cuda] [--batches 256,1024,4096] [--compile]
        [--seconds 8] [--train-text-encoder] [--budget 150]

If images/s barely grows with the batch, the step is bound by host-side dispatch (Python and kernel launches),
not by the device's arithmetic: larger batches or a compiled UNet are then nearly free speed. Run by hand.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sdengine.train.latent_cache import LatentCache
from sdengine.train.stages import UNetStage
from sdengine.train.trainer import TrainConfig, Trainer
from sdengine.weights import load

DEFAULT_MODEL = Path(__file__).parents[1] / "sdengine" / "models" / "default" / "model.safetensors"


def synthetic_cache(model, n: int, device: torch.device) -> LatentCache:
    g = torch.Generator().manual_seed(0)
    size = (model.config.sample_size or 64) // model.config.vae.downscale
    ids = model.tokenizer(["a red circle above a blue square"] * n, max_length=model.config.text.max_positions)
    return LatentCache(torch.randn(n, 4, size, size, generator=g).half(), torch.rand(n, 4, size, size).half() * 0.1,
                       ids.int(), "synthetic").to(device)


def measure(model_path: Path, device: torch.device, batch: int, compiled: bool, seconds: float,
            train_text: bool, precision: str) -> tuple[float, float]:
    """(images/s, seconds of warm-up including compilation) of `batch`-image steps."""
    model = load(model_path).float()
    model.requires_grad_(True)
    stage = UNetStage(model, source=None, seed=0, train_text=train_text)
    stage.use_cache(synthetic_cache(model, 4096, device))
    model.to(device)
    if compiled:
        from sdengine.compile import compile_unet_for_training
        compile_unet_for_training(model)
    cfg = TrainConfig(run_dir=Path("/nonexistent"), steps=10 ** 9, batch_size=batch, lr=1e-4, warmup=10,
                      ema_decay=0.999, precision=precision, quiet=True)
    trainer = Trainer(stage, cfg, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(3):
        trainer.train_step()
        trainer.step += 1
    sync()
    warm = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or steps < 3:
        trainer.train_step()
        trainer.step += 1
        steps += 1
    sync()
    return batch * steps / (time.perf_counter() - start), warm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--compile", action="store_true", help="also measure the compiled UNet")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per case")
    ap.add_argument("--train-text-encoder", action="store_true")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--budget", type=float, default=1e9, help="skip cases once this many seconds have passed")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    began = time.perf_counter()
    cases = [(b, False) for b in map(int, args.batches.split(","))]
    if args.compile:
        cases += [(b, True) for b in map(int, args.batches.split(","))]
    print(f"{'batch':>6} {'compiled':>9} {'images/s':>10} {'ms/step':>8} {'warm-up s':>10}", flush=True)
    for batch, compiled in cases:
        if time.perf_counter() - began > args.budget:
            print(f"{batch:>6} {str(compiled):>9}  skipped (budget)", flush=True)
            continue
        try:
            rate, warm = measure(args.model, device, batch, compiled, args.seconds, args.train_text_encoder,
                                 args.precision)
        except Exception as e:  # noqa: BLE001 - one failing case (out of memory, a compiler error) must not end the rest
            print(f"{batch:>6} {str(compiled):>9}  failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        print(f"{batch:>6} {str(compiled):>9} {rate:>10.0f} {1000 * batch / rate:>8.1f} {warm:>10.1f}", flush=True)
    print(f"total {time.perf_counter() - began:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
