"""A diffusers script as a user writes it: one image from a diffusers folder with DPM++ 2M, fp32 or bf16 autocast.
compare_cpu.py runs it as a whole process beside `sdengine generate` (the import and the load count, as a user
waits for them).

    python benchmarks/diffusers_generate.py FOLDER OUT.png --size 512 --steps 20 --cfg 7.5 --seed 0 [--bf16]
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("out")
    ap.add_argument("--prompt", default="a red circle on a blue background")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="torch.autocast to bfloat16 (diffusers' CPU recipe)")
    args = ap.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None, requires_safety_checker=False)
    # SD1.5's published scheduler config names no timestep_spacing, so its DPM++ 2M runs diffusers' default
    # linspace; a folder saved by a recent diffusers writes PNDM's "leading", which would change the image
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        image = pipe(args.prompt, negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.cfg,
                     width=args.size, height=args.size, generator=torch.Generator().manual_seed(args.seed)).images[0]
    image.save(args.out)


if __name__ == "__main__":
    main()
