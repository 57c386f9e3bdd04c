"""`sdengine info | models | convert | init | merge`: checkpoints and the models folder."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CLIError

DTYPE_CHOICES = ["fp16", "fp32", "bf16"]


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def _is_image(path: Path) -> bool:
    """PNG, JPEG or WebP by their first bytes (what generation writes; a checkpoint is none of them)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return (head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff"
            or (head[:4] == b"RIFF" and head[8:] == b"WEBP"))


def cmd_info(args: argparse.Namespace) -> None:
    if args.path.is_file() and _is_image(args.path):
        return image_info(args)
    from ..weights import load

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
    """The generation parameters stored in a PNG, JPEG or WebP (ours or AUTOMATIC1111's)."""
    from ..metadata import parse_parameters, read_parameters

    text = read_parameters(args.path)
    if text is None:
        raise CLIError(f"{args.path} holds no generation parameters")
    if args.json:
        print(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False))
    else:
        print(text)


def cmd_models(args: argparse.Namespace) -> None:
    from ..errors import first_line
    from ..runtime import list_models, models_dir
    from ..weights import read_checkpoint

    found = list_models()
    if not found:
        print(f"no models in {models_dir()} (set SDENGINE_HOME or copy checkpoints there)")
        return
    for path in found:
        try:
            family = read_checkpoint(path)[1].family
        except (OSError, ValueError, KeyError) as e:
            family = f"unreadable: {first_line(e)}"
        print(f"{path.name:<48} {family}")


def _dtype(name: str | None):
    from ..runtime import dtype_of

    return dtype_of(name) if name else None


def cmd_convert(args: argparse.Namespace) -> None:
    from ..weights import convert

    out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, force=args.force)
    print(f"wrote {out}")


def cmd_init(args: argparse.Namespace) -> None:
    from ..config import PRESETS
    from ..model import StableDiffusion
    from ..weights import save

    model = StableDiffusion(PRESETS[args.preset]).init_weights(seed=args.seed)
    out = save(model, args.dst, to=args.to, dtype=_dtype(args.dtype), force=args.force)
    print(f"wrote {out} (fresh {args.preset} weights, seed {args.seed})")


def _lora_arg(value: str) -> tuple[Path, float]:
    """FILE or FILE:W (W a number) for `merge --lora`."""
    path, _, weight = value.rpartition(":") if not Path(value).exists() and ":" in value else (value, "", "1")
    try:
        return Path(path), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected FILE or FILE:WEIGHT") from None


def cmd_merge(args: argparse.Namespace) -> None:
    from ..lora import LoraPatcher, LoraUse, read_lora
    from ..weights import load, merge, save

    if args.secondary is None and not args.lora:
        raise CLIError("merge needs a second model, or --lora FILE:W to bake a LoRA into the first")
    if (args.mode == "add-difference") != (args.tertiary is not None):
        raise CLIError("add-difference takes three models (A + (B - C) * alpha), weighted-sum two"
                       if args.mode == "add-difference" else "weighted-sum takes two models; a third is for "
                       "--mode add-difference")
    if args.dst.exists() and not args.force:
        raise FileExistsError(f"{args.dst} exists (use --force to replace it)")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    loras = [(read_lora(path), weight) for path, weight in args.lora]  # a bad file fails before any model loads
    if args.secondary is None:
        model, done = load(args.primary, dtype=None), []
    else:
        model = merge(args.primary, args.secondary, args.alpha, args.tertiary, parts)
        done = [f"{args.mode}, alpha {args.alpha:g}, {', '.join(parts)}"]
    if loras:  # baked in as kohya's merge scripts do: W + w * delta, saved in the model's precision
        report = LoraPatcher(model).apply([LoraUse(lora, unet=w, text=w) for lora, w in loras])
        for warning in report.warnings():
            print(f"sdengine: warning: {warning}", file=sys.stderr)
        done.append("LoRA " + ", ".join(f"{lora.name} x{w:g}" for lora, w in loras))
    out = save(model, args.dst, to=args.to, dtype=_dtype(args.dtype), force=args.force)
    print(f"wrote {out} ({'; '.join(done)})")


def configure(name: str, p: argparse.ArgumentParser) -> None:
    if name == "info":
        p.add_argument("path", type=Path, help="checkpoint (.safetensors/.ckpt), diffusers folder, or PNG image")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=cmd_info)
    elif name == "models":
        p.set_defaults(func=cmd_models)
    elif name == "convert":
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        p.add_argument("--to", choices=["diffusers", "single"], required=True)
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="cast floating-point weights (default: keep the source's)")
        p.add_argument("--force", action="store_true", help="replace an existing destination")
        p.set_defaults(func=cmd_convert)
    elif name == "init":
        from ..config import PRESETS

        p.add_argument("preset", choices=sorted(PRESETS))
        p.add_argument("dst", type=Path)
        p.add_argument("--to", choices=["diffusers", "single"], default="single")
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--force", action="store_true", help="replace an existing destination")
        p.set_defaults(func=cmd_init)
    elif name == "merge":
        p.add_argument("primary", type=Path, help="A: its tokenizer, config and unmerged parts are kept")
        p.add_argument("secondary", type=Path, nargs="?", help="B (optional with --lora)")
        p.add_argument("tertiary", type=Path, nargs="?", help="C, for --mode add-difference")
        p.add_argument("--out", dest="dst", type=Path, required=True)
        p.add_argument("--alpha", type=float, default=0.5, help="B's share, or the difference's scale (default 0.5)")
        p.add_argument("--mode", choices=["weighted-sum", "add-difference"], default="weighted-sum")
        p.add_argument("--parts", default="unet,text,vae", help="comma-separated parts to merge (default: all)")
        p.add_argument("--lora", type=_lora_arg, action="append", default=[], metavar="FILE[:W]",
                       help="bake a LoRA (any format sdengine reads) into the result at weight W (repeatable)")
        p.add_argument("--to", choices=["diffusers", "single"], default="single")
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: A's precision")
        p.add_argument("--force", action="store_true", help="replace an existing destination")
        p.set_defaults(func=cmd_merge)
