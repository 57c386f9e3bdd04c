"""The `sdengine` command line. Errors are one readable line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """An error whose message is meant for the user as it is."""


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def cmd_info(args: argparse.Namespace) -> None:
    if args.path.is_file() and args.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
        return image_info(args)
    from .weights import load

    model = load(args.path, dtype=None)
    counts = model.parameter_counts()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    info = {
        "path": str(args.path),
        "family": model.config.family,
        "prediction": model.config.prediction,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "parameters": counts,
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['path']}")
    print(f"  family:     {info['family']}")
    print(f"  prediction: {info['prediction']}")
    print(f"  dtype:      {info['dtype']}")
    for part, n in counts.items():
        print(f"  {part + ':':<13}{_format_count(n)} parameters")
    print(f"  total:         {_format_count(sum(counts.values()))} parameters")
    for part, cfg in info["config"].items():
        if isinstance(cfg, dict):
            print(f"  {part} config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))


def image_info(args: argparse.Namespace) -> None:
    """The generation parameters stored in a PNG (ours or AUTOMATIC1111's)."""
    from .metadata import parse_parameters, read_parameters

    text = read_parameters(args.path)
    if text is None:
        raise CLIError(f"{args.path} holds no generation parameters")
    if args.json:
        print(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False))
    else:
        print(text)


def cmd_convert(args: argparse.Namespace) -> None:
    from .weights import convert

    out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, force=args.force)
    print(f"wrote {out}")


def cmd_init(args: argparse.Namespace) -> None:
    from .config import PRESETS
    from .model import StableDiffusion
    from .weights import save
    from .weights.checkpoint import DTYPES

    model = StableDiffusion(PRESETS[args.preset]).init_weights(seed=args.seed)
    out = save(model, args.dst, to=args.to, dtype=DTYPES[args.dtype] if args.dtype else None, force=args.force)
    print(f"wrote {out} (fresh {args.preset} weights, seed {args.seed})")


def cmd_merge(args: argparse.Namespace) -> None:
    from .weights import merge, save
    from .weights.checkpoint import DTYPES

    if (args.mode == "add-difference") != (args.tertiary is not None):
        raise CLIError("add-difference takes three models (A + (B - C) * alpha), weighted-sum two"
                       if args.mode == "add-difference" else "weighted-sum takes two models; a third is for "
                       "--mode add-difference")
    if args.dst.exists() and not args.force:
        raise FileExistsError(f"{args.dst} exists (use --force to replace it)")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    model = merge(args.primary, args.secondary, args.alpha, args.tertiary, parts)
    out = save(model, args.dst, to=args.to, dtype=DTYPES[args.dtype] if args.dtype else None, force=args.force)
    print(f"wrote {out} ({args.mode}, alpha {args.alpha:g}, {', '.join(parts)})")


class Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line form as every other error (and argparse's exit code 2)."""

    def error(self, message: str):
        print(f"sdengine: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdengine", description="Stable Diffusion on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    from . import generate_cli

    generate_cli.register(sub)
    from .train import cli as train_cli

    train_cli.register(sub)
    from .server import cli as server_cli

    server_cli.register(sub)

    p = sub.add_parser("info", help="a checkpoint's family, prediction, sizes and config; or a PNG's parameters")
    p.add_argument("path", type=Path, help="checkpoint (.safetensors/.ckpt), diffusers folder, or PNG image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert between single-file and diffusers layouts")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=["diffusers", "single"], required=True)
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default=None,
                   help="cast floating-point weights (default: keep the source's)")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_convert)

    from .config import PRESETS
    p = sub.add_parser("init", help="write a checkpoint of a preset architecture with fresh weights (to train)")
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=["diffusers", "single"], default="single")
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("merge", help="merge checkpoints as A1111's Checkpoint Merger does: A*(1-alpha) + B*alpha, "
                       "or A + (B - C)*alpha")
    p.add_argument("primary", type=Path, help="A: its tokenizer, config and unmerged parts are kept")
    p.add_argument("secondary", type=Path, help="B")
    p.add_argument("tertiary", type=Path, nargs="?", help="C, for --mode add-difference")
    p.add_argument("--out", dest="dst", type=Path, required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="B's share, or the difference's scale (default 0.5)")
    p.add_argument("--mode", choices=["weighted-sum", "add-difference"], default="weighted-sum")
    p.add_argument("--parts", default="unet,text,vae", help="comma-separated parts to merge (default: all)")
    p.add_argument("--to", choices=["diffusers", "single"], default="single")
    p.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default=None, help="default: A's precision")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_merge)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print("sdengine: interrupted", file=sys.stderr)
        return 130
    except (CLIError, OSError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("SDENGINE_DEBUG"):
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.strerror and e.filename:
            message = f"{e.strerror}: {e.filename}"
        first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        print(f"sdengine: error: {first}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - a bug rather than bad input: still one line, as the CLI promises
        if os.environ.get("SDENGINE_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"sdengine: error: internal error: {type(e).__name__}: {first} (SDENGINE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_ERROR
    return 0


def main() -> None:
    # OpenMP's wait policy is left to the user. libgomp's default (spin briefly, then sleep) is the fast one on a
    # machine doing one job: forcing PASSIVE (sleep at once) made a 64x64 generation 1.7x slower here (UNet call
    # 28 -> 50 ms). On a CPU shared with other busy processes spinning threads stall each other (the same call:
    # 158 ms with a competing job vs 47 ms with PASSIVE), so there set OMP_WAIT_POLICY=PASSIVE.
    from .cpu_memory import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed memory instead of fresh, kernel-zeroed pages (see the module)
    sys.exit(run())


if __name__ == "__main__":
    main()
