"""`sdengine grid`: A1111's X/Y/Z plot from the command line (sdengine/xyz.py): every cell's PNG with its parameters
and one labelled grid image, in an output folder; every cell checked, and the grid's size, before any model loads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CLIError
from .generate import add_generation_args, lora_options, request_from_args


def run_grid_command(args: argparse.Namespace) -> None:
    from .. import runtime
    from ..metadata import format_parameters, save_png
    from ..xyz import MAX_GRID_SIDE, cells, grid_size, parse_axis, run_grid

    if args.prompts_file:
        raise CLIError("--prompts-file is for generate; a grid takes one prompt (vary it with a prompt_sr axis)")
    model_path = runtime.resolve_model(args.model)
    size = runtime.native_size(model_path)
    loras, args.lora_tags = lora_options(args)
    base = request_from_args(args, "generate", size, size)
    try:
        axes = [parse_axis(spec) if spec else None for spec in (args.x, args.y, args.z)]
        planned = cells(base, axes)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if all(a is None for a in axes):
        raise CLIError("give at least one axis: --x FIELD:VALUES (and --y, --z)")
    width = max(c.request.width or size for c in planned)
    height = max(c.request.height or size for c in planned)
    if args.margin < 0 or args.margin > 512:
        raise CLIError(f"--margin must be 0 to 512 pixels, got {args.margin}")
    gw, gh = grid_size(axes, width, height, not args.no_legend, args.margin)
    if max(gw, gh) > MAX_GRID_SIDE:
        raise CLIError(f"the grid would be {gw}x{gh} pixels; at most {MAX_GRID_SIDE} a side (fewer values or "
                       "smaller images)")
    checkpoints = {c.checkpoint: runtime.resolve_model(c.checkpoint) for c in planned if c.checkpoint}
    out = Path(args.out or "sdengine-grid")
    if not out.parent.is_dir():
        raise CLIError(f"output folder {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    if (out / "grid.png").exists() and not args.force:
        raise CLIError(f"{out / 'grid.png'} exists (use --force to replace it)")

    from ..networks import Networks
    from ..pipeline import Pipeline

    device = runtime.pick_device(args.device)
    dtype = runtime.inference_dtype(args.precision, device)
    loaded: dict[str | None, Pipeline] = {}

    def pipeline_for(checkpoint: str | None) -> Pipeline:
        if checkpoint not in loaded:
            loaded.clear()  # cells come checkpoint by checkpoint: one model in memory at a time
            model = runtime.load_for_inference(checkpoints.get(checkpoint, model_path), device, dtype, vae=args.vae,
                                               compile=args.compile)
            networks = Networks(model, embedding_dirs=[args.embeddings_dir or runtime.embeddings_dir()], loras=loras)
            loaded[checkpoint] = Pipeline(model, networks=networks)
            loaded[checkpoint].wildcards = args.wildcards_dir or runtime.wildcards_dir()
        return loaded[checkpoint]

    def on_cell(cell, images) -> None:
        i, j, k = cell.index
        for n, image in enumerate(images):
            path = out / f"cell-{i}-{j}-{k}{f'-{n}' if n else ''}.png"
            save_png(image, path, image.info["parameters"], force=args.force)
        if not args.quiet:
            print(f"cell {i},{j},{k}: {len(images)} image(s)", file=sys.stderr)

    grids = run_grid(base, axes, pipeline_for, on_cell, not args.no_legend, args.margin, with_sub_grids=True)
    grid = grids[0]
    axes_text = {f"{name.upper()} Type": a.field for name, a in zip("xyz", axes) if a is not None}
    axes_text.update({f"{name.upper()} Values": ", ".join(map(str, a.values)) for name, a in zip("xyz", axes) if a})
    save_png(grid, out / "grid.png", format_parameters(base.prompt, base.negative_prompt, axes_text), force=True)
    if args.sub_grids:   # one grid per z value, as A1111's include_sub_grids
        for k, sub in enumerate(grids[1:]):
            save_png(sub, out / f"grid-z{k}.png", format_parameters(base.prompt, base.negative_prompt, axes_text),
                     force=True)
    print(f"wrote {out / 'grid.png'} ({len(planned)} cells) and each cell's PNG in {out}")


def configure(name: str, p: argparse.ArgumentParser) -> None:
    add_generation_args(p, "generate")
    p.description = ("X/Y/Z plot: one generation per combination of axis values (FIELD:V1,V2,... with FIELD a "
                     "generation field such as steps, cfg, sampler, seed, clip_skip; prompt_sr; checkpoint; numbers "
                     "take ranges 1-4, 1-10 (+3), 1-10 [4]); --out is a folder")
    for axis in ("x", "y", "z"):
        p.add_argument(f"--{axis}", default=None, metavar="FIELD:VALUES", help=f"the {axis} axis")
    p.add_argument("--no-legend", action="store_true", help="no axis labels (A1111's draw legend off)")
    p.add_argument("--margin", type=int, default=0, metavar="PX", help="pixels between cells and sub-grids (0)")
    p.add_argument("--sub-grids", action="store_true", help="also one grid-zK.png per z value")
    p.set_defaults(func=run_grid_command)
