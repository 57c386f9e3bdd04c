"""What the opt-in accelerations (sdengine/accel) cost in quality and buy in compute, measured:

1. the shipped model: ShapesEval (sdengine/evaluate.py's run_eval) exact vs each acceleration, same seeds;
2. an SD1.5-shaped UNet and VAE with random weights (PyTorch's default init): one txt2img run (DPM++ 2M, CFG 7.5)
   exact vs each acceleration from the same noise: PSNR of the decoded image and of the latents against the exact
   run, UNet FLOPs (torch.utils.flop_counter: convs, linears, attention) and seconds (one run each, timed with the
   counter on, not a best-of: this machine is shared; read the ratios);
3. ToMe's speed where it is meant to pay: one SD1.5-shape UNet call at 512² in the dtype generation uses here,
   plain and merged in interleaved rounds.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/accel_quality.py [--limit 5] [--seeds 4] [--size 256]
        [--steps 10] [--eval-steps 20] [--deepcache 3,5] [--skip-eval] [--skip-sd15] [--skip-512]
        [--tome-size 512] [--tome-ratios 0.3,0.5] [--precision auto]

Random weights say little about how a trained model's deep features drift between steps (what DeepCache relies
on): the ShapesEval rows are the quality verdict, the SD1.5-shape rows the cost.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdengine import runtime
from sdengine.accel import Accelerations, accelerate_denoiser, accelerated, token_merging
from sdengine.config import SD15
from sdengine.diffusion.denoiser import CFGDenoiser, Conditioning, Denoiser
from sdengine.diffusion.samplers import BatchNoise, get_sampler
from sdengine.diffusion.schedule import SD_SCHEDULE
from sdengine.evaluate import run_eval
from sdengine.nn.unet import UNetModel
from sdengine.nn.vae import AutoencoderKL
from sdengine.pipeline import Pipeline, follow_steps


def _cpu_attention_flops(query, key, value, *_args, out_shape=None, **_kwargs) -> int:
    """softmax(q kᵀ) v: 2 FLOPs per multiply-add in each product (torch's counter has no formula for the CPU flash
    kernel, so attention would count zero and token merging's main saving would not show)."""
    b, h, sq, d = query
    return 2 * b * h * sq * key[-2] * (d + value[-1])


COUNTED = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=COUNTED)


def configs(steps: int, intervals: list[int]) -> dict[str, Accelerations]:
    k = max(1, steps // 5)  # the last fifth of the steps unguided
    return {"exact": Accelerations(), **{f"deepcache N={n} b=0": Accelerations(deepcache=n) for n in intervals},
            "tome 0.5": Accelerations(tome=0.5),
            f"cfg-skip last {k}": Accelerations(cfg_skip=k)}


class AcceleratedPipeline(Pipeline):
    """The pipeline with the per-pass accelerations on every txt2img pass (the integration, for this script)."""

    def __init__(self, model, settings: Accelerations):
        super().__init__(model)
        self.settings = settings

    def denoiser(self, req, cond, uncond) -> CFGDenoiser:
        guided = super().denoiser(req, cond, uncond)
        accelerate_denoiser(guided, self.settings, req.steps)  # txt2img: the pass runs req.steps steps
        return guided


def shapes_eval(args: argparse.Namespace) -> None:
    path = runtime.default_model()
    if path is None:
        raise SystemExit("no shipped model in this install")
    dtype = runtime.inference_dtype(args.precision, torch.device("cpu"))
    model = runtime.load_for_inference(path, torch.device("cpu"), dtype)
    print(f"ShapesEval on the shipped model, {dtype}: {args.seeds} seeds, first {args.limit} prompts per category, "
          f"{args.eval_steps} Euler steps, CFG 5, 64x64")
    base = None
    exact_flops = None
    for name, settings in configs(args.eval_steps, args.deepcache).items():
        def tome(settings: Accelerations = settings):  # a fresh patch per use
            return token_merging(model.unet, settings.tome) if settings.tome else nullcontext()

        pipe = AcceleratedPipeline(model, settings)
        with tome(), flop_counter() as counter:  # one eval-sized generation: the UNet's share of FLOPs dominates
            pipe.generate("a red circle", steps=args.eval_steps, sampler="euler", cfg_scale=5.0, seed=0, width=64,
                          height=64, batch_size=args.seeds)
        exact_flops = exact_flops or counter.get_total_flops()
        start = time.perf_counter()
        with tome():
            scores, _, _ = run_eval(pipe, seeds=args.seeds, steps=args.eval_steps, limit=args.limit, quiet=True)
        seconds = time.perf_counter() - start
        base = base or scores
        cats = " ".join(f"{c[:6]} {scores[c]:.3f}" for c in ("single_object", "two_object", "counting", "colors",
                                                               "position", "color_attr") if c in scores)
        print(f"  {name:<20} overall {scores['overall']:.3f} ({100 * (scores['overall'] - base['overall']):+.1f} "
              f"points)  {cats}  [{scores['images']} images, {seconds:.0f} s, "
              f"{exact_flops / counter.get_total_flops():.2f}x fewer FLOPs]", flush=True)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def sd15_shapes(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    unet = UNetModel(SD15.unet).eval()
    vae = AutoencoderKL(SD15.vae).eval()
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 77, 768, generator=g))
    uncond = Conditioning(torch.randn(1, 77, 768, generator=g))
    spec = get_sampler("dpmpp_2m")
    sigmas = torch.from_numpy(spec.sigmas(SD_SCHEDULE, args.steps, "karras"))
    latent = args.size // 8
    print(f"\nSD1.5-shape random weights: {args.size}x{args.size}, {args.steps} steps DPM++ 2M Karras, CFG 7.5, "
          f"fp32, {torch.get_num_threads()} threads")

    def run(settings: Accelerations) -> tuple[torch.Tensor, float, float]:
        guided = CFGDenoiser(Denoiser(unet, SD_SCHEDULE), cond, uncond, 7.5)
        noise = BatchNoise([torch.Generator().manual_seed(7)], (1, 4, latent, latent), "cpu")
        x = noise() * sigmas[0]
        counter = flop_counter()
        start = time.perf_counter()
        with torch.inference_mode(), counter, accelerated(guided, settings, len(sigmas) - 1):
            out = spec(guided, x, sigmas, callback=follow_steps(guided, None), noise=noise)
        seconds = time.perf_counter() - start
        return out, counter.get_total_flops(), seconds

    rows = {}
    for name, settings in configs(args.steps, args.deepcache).items():
        latents, flops, seconds = run(settings)  # timed with the counter on: one run each on a shared machine
        with torch.inference_mode():
            image = (vae.decode(latents / SD15.vae.scaling_factor) / 2 + 0.5).clamp(0, 1)
        rows[name] = (latents, image, flops, seconds)
    exact = rows["exact"]
    peak = exact[0].abs().max().item()
    print(f"  {'':<20}{'UNet GFLOP':>11}{'FLOP ratio':>11}{'seconds':>9}{'speed-up':>9}{'PSNR img':>10}"
          f"{'PSNR lat':>10}")
    for name, (latents, image, flops, seconds) in rows.items():
        print(f"  {name:<20}{flops / 1e9:>11.0f}{exact[2] / flops:>10.2f}x{seconds:>9.1f}{exact[3] / seconds:>8.2f}x"
              f"{psnr(image, exact[1], 1.0):>10.1f}{psnr(latents, exact[0], peak):>10.1f}", flush=True)


def tome_512(args: argparse.Namespace) -> None:
    dtype = runtime.inference_dtype(args.precision, torch.device("cpu"))
    torch.manual_seed(0)
    unet = UNetModel(SD15.unet).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    latent = args.tome_size // 8
    x, ctx = torch.randn(2, 4, latent, latent, generator=g), torch.randn(2, 77, 768, generator=g)
    x, t, ctx = x.to(dtype), torch.tensor([500, 500]), ctx.to(dtype)

    def once(ratio: float) -> float:
        with torch.inference_mode(), token_merging(unet, ratio) if ratio else nullcontext():
            start = time.perf_counter()
            unet(x, t, ctx)
            return time.perf_counter() - start

    def flops(ratio: float) -> float:
        with torch.inference_mode(), token_merging(unet, ratio) if ratio else nullcontext(), flop_counter() as c:
            unet(x, t, ctx)
        return c.get_total_flops()

    ratios = [0.0, *(float(r) for r in args.tome_ratios.split(","))]
    times: dict[float, list[float]] = {r: [] for r in ratios}
    for r in ratios:  # warm-up, then interleaved rounds: a busy spell on a shared machine hits every setting alike
        once(r)
    for _ in range(args.tome_rounds):
        for r in ratios:
            times[r].append(once(r))
    plain = min(times[0.0])
    print(f"\nToMe, one SD1.5-shape UNet call at {args.tome_size}x{args.tome_size}, batch 2, {dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.tome_rounds} interleaved rounds: plain {plain:.2f} s")
    for r in ratios[1:]:
        best = min(times[r])
        print(f"  ratio {r}: {best:.2f} s ({plain / best:.2f}x), FLOPs {flops(0.0) / flops(r):.2f}x fewer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=5, help="ShapesEval prompts per category (0: all)")
    ap.add_argument("--deepcache", type=lambda s: [int(n) for n in s.split(",")], default=[3],
                    help="DeepCache intervals to measure, comma-separated (3)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--skip-512", action="store_true", help="skip the ToMe timing at full size")
    ap.add_argument("--tome-size", type=int, default=512, help="image size of the ToMe timing")
    ap.add_argument("--tome-ratios", default="0.3,0.5", help="ToMe ratios timed against the plain UNet")
    ap.add_argument("--tome-rounds", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the dtype of the ShapesEval runs and the ToMe timing (auto: what generation uses here)")
    args = ap.parse_args()
    args.limit = args.limit or None
    if not args.skip_eval:
        shapes_eval(args)
    if not args.skip_sd15:
        sd15_shapes(args)
    if not args.skip_512:
        tome_512(args)


if __name__ == "__main__":
    main()
