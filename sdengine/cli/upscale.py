"""`sdengine upscale IMAGE --upscaler NAME [--scale S] --out PATH`: a model upscaler (ESRGAN, Real-ESRGAN, its
compact net) from the upscalers folder, run in overlapping tiles; a scale other than the model's is reached as
A1111's extras tab does (the model until it covers the size, then Lanczos)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CLIError
from .options import non_negative_int, positive_float

MAX_SCALE = 16.0
MAX_SIDE = 16384  # the largest output side: a bigger one is refused before any work


def cmd_upscale(args: argparse.Namespace) -> None:
    from .. import runtime
    from ..metadata import read_parameters, save_png
    from ..upscalers import load_upscaler, resolve_upscaler, target_size, upscale_image
    from .generate import open_image

    folder = args.upscalers_dir or runtime.upscalers_dir()
    path = resolve_upscaler(args.upscaler, folder)
    if args.tile and args.tile_overlap >= args.tile:
        raise CLIError(f"--tile-overlap ({args.tile_overlap}) must be smaller than --tile ({args.tile})")
    if args.scale is not None and args.scale > MAX_SCALE:
        raise CLIError(f"--scale must be at most {MAX_SCALE:g}, got {args.scale:g}")
    if args.out.exists() and not args.force:
        raise CLIError(f"output {args.out} exists (use --force to replace it)")
    image = open_image(args.image, "image")
    device = runtime.pick_device(args.device)
    upscaler = load_upscaler(path, device, runtime.inference_dtype(args.precision, device))
    scale = upscaler.scale if args.scale is None else args.scale
    size = target_size(image.width, image.height, scale)
    if max(size) > MAX_SIDE:
        raise CLIError(f"{image.width}x{image.height} x{scale:g} would be {size[0]}x{size[1]}: at most {MAX_SIDE} "
                       "pixels a side")
    result = upscale_image(image, upscaler, scale, tile=args.tile, overlap=args.tile_overlap)
    try:
        parameters = read_parameters(args.image) or ""
    except OSError:
        parameters = ""
    save_png(result, args.out, parameters, force=args.force)
    if not args.quiet:
        print(f"wrote {args.out} ({result.width}x{result.height}, {upscaler.name}: {upscaler.architecture} "
              f"x{upscaler.scale} on {device.type})", file=sys.stderr)


def configure(name: str, p: argparse.ArgumentParser) -> None:
    from ..runtime import DEVICES, PRECISIONS

    p.add_argument("image", type=Path)
    p.add_argument("--upscaler", required=True, metavar="NAME",
                   help="a model's file name (without suffix) in the upscalers folder ($SDENGINE_HOME/upscalers)")
    p.add_argument("--scale", type=positive_float, default=None,
                   help="upscale by this factor (default: the model's; sides rounded down to multiples of 8)")
    p.add_argument("--tile", type=non_negative_int, default=192, help="tile side in input pixels (0: no tiling)")
    p.add_argument("--tile-overlap", type=non_negative_int, default=16, help="input pixels neighbouring tiles share")
    p.add_argument("--upscalers-dir", type=Path, default=None, help="the upscalers folder (default: "
                                                                   "$SDENGINE_UPSCALERS or $SDENGINE_HOME/upscalers)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write (keeps the image's parameters)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_upscale)

