"""sdengine against diffusers on this CPU: whole processes end to end, and each component, in the same run.

    python benchmarks/compare_cpu.py [--runs 256:10,512:20] [--rounds 3] [--workdir /tmp/sdengine-bench]
                                     [--contenders sdengine,diffusers-fp32,diffusers-bf16] [--no-components]
    (contenders also: sdengine-fp32, sdengine-bf16, and sdengine-openvino: `generate --compile openvino`)

End to end: `sdengine generate` with its defaults and a diffusers script (benchmarks/diffusers_generate.py, fp32
and bf16 autocast) as fresh processes, the same SD1.5-shaped random weights from one diffusers folder, DPM++ 2M,
CFG 7.5, seed 0; interleaved rounds, best of each; peak RSS per process; each image's PSNR against diffusers'
fp32 image. Components (in this process): the text encoder, one CFG UNet step (batch 2) and the VAE decode —
seconds, GFLOP/s and the share of this CPU's measured matmul peak in that precision. `--model shipped` runs the
same at the shipped model's 64x64 instead (its weights converted to a diffusers folder first).

Run by hand on a quiet machine (512² rounds take minutes each; ~10 GB RAM): ratios, not seconds, are the result.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import best_seconds

import sdengine
from sdengine import runtime
from sdengine.openvino_unet import openvino_available

HERE = Path(__file__).resolve().parent
PROMPT = "a red circle on a blue background"


def matmul_peak(dtype: torch.dtype) -> float:
    """GFLOP/s of the best large square matmul in `dtype` on all threads: the roof the components are measured
    against."""
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, 2 * n ** 3 / best_seconds(lambda a=a, b=b: torch.mm(a, b), 3) / 1e9)
    return best


def reference_folder(workdir: Path, model: str) -> Path:
    """The diffusers folder both sides load: random SD1.5 shapes (built once), or the shipped model converted."""
    folder = workdir / ("sd15" if model == "sd15" else "shipped")
    if (folder / "model_index.json").exists():
        return folder
    workdir.mkdir(parents=True, exist_ok=True)
    if model == "sd15":
        from parity_full_size import build_reference
        build_reference("sd15", folder)
    else:
        default = runtime.default_model()
        if default is None:
            raise SystemExit("no shipped model found")
        sdengine.save(sdengine.load(default), folder, to="diffusers")
    return folder


def run_process(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 2 ** 20


def command(contender: str, folder: Path, out: Path, size: int, steps: int) -> list[str]:
    if contender.startswith("sdengine"):
        option = contender.split("-", 1)[1] if "-" in contender else None  # sdengine-fp32, sdengine-openvino
        extra = [] if option is None else ["--compile", "openvino"] if option == "openvino" else ["--precision", option]
        return [sys.executable, "-m", "sdengine", "generate", PROMPT, "--model", str(folder), "--sampler", "dpmpp_2m",
                "--steps", str(steps), "--cfg", "7.5", "--seed", "0", "--width", str(size), "--height", str(size),
                "--out", str(out), "--force", "--quiet", *extra]
    bf16 = ["--bf16"] if contender == "diffusers-bf16" else []
    return [sys.executable, str(HERE / "diffusers_generate.py"), str(folder), str(out), "--prompt", PROMPT,
            "--size", str(size), "--steps", str(steps), "--cfg", "7.5", "--seed", "0", *bf16]


def psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def end_to_end(folder: Path, outdir: Path, size: int, steps: int, rounds: int, contenders: list[str]) -> None:
    best: dict[str, tuple[float, float]] = {}
    for r in range(rounds):  # interleaved: a slow spell of the machine hits every contender alike
        for name in contenders:
            seconds, rss = run_process(command(name, folder, outdir / f"{name}-{size}.png", size, steps))
            print(f"    round {r + 1} {name}: {seconds:.1f} s, peak RSS {rss:.2f} GB", flush=True)
            old = best.get(name, (float("inf"), 0.0))
            best[name] = (min(old[0], seconds), max(old[1], rss))
    print(f"  {size}x{size}, {steps} steps DPM++ 2M, CFG 7.5 (best of {rounds}, whole processes):")
    reference = outdir / f"diffusers-fp32-{size}.png"
    for name, (seconds, rss) in best.items():
        ratios = "  ".join(f"{best[other][0] / seconds:.2f}x {other}" for other in best
                           if other.startswith("diffusers") and other != name)
        quality = f"PSNR {psnr(outdir / f'{name}-{size}.png', reference):.1f} dB" if reference.exists() else ""
        print(f"    {name:16s} {seconds:7.1f} s  peak RSS {rss:5.2f} GB  {quality}  {ratios}")


def components(folder: Path, size: int, peaks: dict[torch.dtype, float]) -> None:
    """Text encoder, one CFG UNet step, VAE decode: sdengine at its default precision, diffusers fp32 and bf16."""
    from accel_quality import flop_counter  # torch's counter plus the CPU attention kernel's FLOPs
    from diffusers import StableDiffusionPipeline

    dtype = runtime.inference_dtype("auto", torch.device("cpu"))
    model = sdengine.load(folder, dtype=dtype)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    latent = size // 8
    tokens = ref.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768)
    ours = {"text encoder": lambda: model.encode_prompt([PROMPT] * 2),
            "UNet CFG step": lambda: model.unet(x.to(dtype), t, ctx.to(dtype)),
            "VAE decode": lambda: model.vae.decode(x[:1].to(dtype))}
    theirs = {"text encoder": lambda: ref.text_encoder(tokens),
              "UNet CFG step": lambda: ref.unet(x, t, encoder_hidden_states=ctx),
              "VAE decode": lambda: ref.vae.decode(x[:1])}
    if openvino_available():  # the same step through `--compile openvino`, its conversion paid before timing
        from sdengine.openvino_unet import OpenVINOForward

        graph = OpenVINOForward(model.unet, model.unet.forward, cache=False)  # random weights: not kept
        with torch.inference_mode():
            graph(x.to(dtype), t, ctx.to(dtype))
        ours["UNet, openvino"] = lambda: graph(x.to(dtype), t, ctx.to(dtype))
        theirs["UNet, openvino"] = theirs["UNet CFG step"]
    print(f"  components at {size}x{size} (best of 3; sdengine {str(dtype).removeprefix('torch.')}):")
    counted: dict[str, float] = {}
    for part in ours:
        with torch.inference_mode():
            with flop_counter() as counter:
                ours[part]()
            # OpenVINO's kernels are invisible to torch's counter: the same step's FLOPs as PyTorch's
            flops = counter.get_total_flops() or counted["UNet CFG step"]
            counted[part] = flops
            mine = best_seconds(ours[part], 3)
            fp32 = best_seconds(theirs[part], 3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = best_seconds(theirs[part], 3)
        rate = flops / mine / 1e9
        print(f"    {part:14s} sdengine {mine:7.3f} s {rate:6.0f} GFLOP/s ({rate / peaks[dtype]:4.0%} of peak) | "
              f"diffusers fp32 {fp32:7.3f} s ({fp32 / mine:.2f}x), bf16 autocast {bf16:7.3f} s ({bf16 / mine:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="256:10,512:20", help="SIZE:STEPS,... (default 256:10,512:20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", choices=("sd15", "shipped"), default="sd15")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sdengine-bench"))
    ap.add_argument("--contenders", default="sdengine,diffusers-fp32,diffusers-bf16",
                    help="sdengine[-fp32|-bf16], diffusers-fp32, diffusers-bf16")
    ap.add_argument("--no-components", action="store_true")
    ap.add_argument("--no-end-to-end", action="store_true")
    args = ap.parse_args()
    runs = [tuple(int(v) for v in item.split(":")) for item in args.runs.split(",")]
    if args.model == "shipped":
        runs = [(64, steps) for _, steps in runs[:1]]
    folder = reference_folder(args.workdir, args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: "
          f"{runtime.cpu_has_native_bf16()}, sdengine --precision auto = "
          f"{runtime.inference_dtype('auto', torch.device('cpu'))}")
    peaks = {dtype: matmul_peak(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks[torch.float32]:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16]:.0f} GFLOP/s")
    outdir = args.workdir / "images"
    outdir.mkdir(parents=True, exist_ok=True)
    for size, steps in runs:
        if not args.no_end_to_end:
            end_to_end(folder, outdir, size, steps, args.rounds, args.contenders.split(","))
        if not args.no_components:
            components(folder, size, peaks)


if __name__ == "__main__":
    main()
