"""`sdengine batch PROMPTS.jsonl --out DIR`: one generation per JSON line, resumable, in one process, one per rank
under torchrun, or on a Ray cluster (--ray). The work is sdengine/batch.py's; this maps the options."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_runtime_args, positive_int


def cmd_batch(args: argparse.Namespace) -> None:
    from .. import runtime
    from ..batch import Settings, run_batch, run_batch_ray

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; batch writes into a folder")
    for flag, value in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir),
                        ("--controlnet-dir", args.controlnet_dir)):
        if value is not None and not value.is_dir():
            raise ValueError(f"{flag} {value} is not a folder")
    model = runtime.resolve_model(args.model)
    settings = Settings(model=model, size=runtime.native_size(model), seed_base=args.seed_base, vae=args.vae,
                        lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, wildcards_dir=args.wildcards_dir,
                        controlnet_dir=args.controlnet_dir, device=args.device, precision=args.precision,
                        compile=args.compile, threads=args.threads)
    if args.ray is not None:
        run_batch_ray(args.prompts, args.out, settings, args.ray, workers=args.workers, force=args.force)
    else:
        if args.workers is not None:
            raise ValueError("--workers is for --ray (under torchrun each rank is one worker)")
        run_batch(args.prompts, args.out, settings, force=args.force)


def configure(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", type=Path, metavar="PROMPTS.jsonl",
                   help="one JSON object of Request fields per line (prompt, steps, seed, sampler, width, ...)")
    p.add_argument("--out", type=Path, required=True, help="the folder for NNNNN.png (item = line number - 1) and "
                   "manifest.json; a rerun makes only what is missing")
    p.add_argument("--model", default=None, help="checkpoint path or name in the models folder (default: shipped)")
    p.add_argument("--vae", type=Path, default=None, help="a standalone VAE file to use instead of the model's")
    p.add_argument("--seed-base", type=int, default=0, help="lines without a seed get one derived from this and "
                   "their index (default 0)")
    p.add_argument("--force", action="store_true", help="remake items whose line changed since they were made")
    p.add_argument("--lora-dir", type=Path, default=None, help="where <lora:NAME:W> finds LoRAs")
    p.add_argument("--embeddings-dir", type=Path, default=None, help="textual-inversion embeddings")
    p.add_argument("--wildcards-dir", type=Path, default=None, help="__name__ wildcards")
    p.add_argument("--controlnet-dir", type=Path, default=None, help="ControlNets named by lines' controls")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run on a Ray cluster through Ray Data ('local' "
                   "starts one here, 'auto' joins this machine's): one actor per GPU (pip install 'sdengine[ray]')")
    p.add_argument("--workers", type=positive_int, default=None, help="--ray: actors (default: one per GPU of the "
                   "cluster; on CPUs one)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per worker (default: torch's; "
                   "byte-identical CPU images need the same count)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_batch)
