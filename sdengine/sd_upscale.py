"""SD upscale, AUTOMATIC1111's img2img script: enlarge an image with an upscaler, cut the result into overlapping tiles
of the request's size, run img2img on every tile, and paste the tiles back with their overlaps cross-faded.

Exactly A1111's scripts/sd_upscale.py and its modules/images.py split_grid/combine_grid: the tiles are spread evenly
so the first and last touch the borders; overlaps are blended with a linear ramp over `overlap` pixels, columns
within a row first, then rows; the tiles go through img2img `batch_size` at a time, batch i seeded seed + i (A1111
sets the next batch's seed to the previous batch's first seed + 1, so the seeds of a batch's images overlap the
next batch's); `n_iter` upscales the whole image again from seed + n. The images' parameters are the first
batch's (Size is the tile's) plus "SD upscale overlap" and "SD upscale upscaler".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from .pipeline import Callback, Pipeline
    from .request import Request

# Upscalers that need no model file, as A1111 lists them first
PLAIN_UPSCALERS: dict[str, Image.Resampling | None] = {"None": None, "Lanczos": Image.Resampling.LANCZOS,
                                                       "Nearest": Image.Resampling.NEAREST}
MAX_TILES = 1024  # an upscale that would need more img2img runs than this is refused before any work


@dataclass
class Grid:
    """An image cut into tiles: rows of (y, height, [(x, width, tile), ...])."""

    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int
    tiles: list[tuple[int, int, list[list]]] = field(default_factory=list)

    def images(self) -> list[Image.Image]:
        return [tile for _, _, row in self.tiles for _, _, tile in row]

    def replace(self, images: list[Image.Image]) -> None:
        it = iter(images)
        for _, _, row in self.tiles:
            for entry in row:
                entry[2] = next(it)


def tile_counts(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> tuple[int, int]:
    """(columns, rows) split_grid makes for an image of this size."""
    return (math.ceil((width - overlap) / (tile_w - overlap)), math.ceil((height - overlap) / (tile_h - overlap)))


def split_grid(image: Image.Image, tile_w: int = 512, tile_h: int = 512, overlap: int = 64) -> Grid:
    """Tiles of tile_w x tile_h covering `image`, neighbours sharing at least `overlap` pixels (A1111's rule)."""
    w, h = image.width, image.height
    cols, rows = tile_counts(w, h, tile_w, tile_h, overlap)
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid(tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        entries = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            entries.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        grid.tiles.append((y, tile_h, entries))
    return grid


def _ramp(length: int, overlap: int, horizontal: bool) -> Image.Image:
    """A1111's blend mask: 0 to 255 * (overlap - 1) / overlap along the overlap, truncated to uint8."""
    r = np.arange(overlap, dtype=np.float32) * 255 / overlap
    r = np.repeat(r.reshape(1, overlap), length, axis=0) if horizontal else np.repeat(r.reshape(overlap, 1), length,
                                                                                      axis=1)
    return Image.fromarray(r.astype(np.uint8), "L")


def combine_grid(grid: Grid) -> Image.Image:
    """The tiles pasted back, each one's first `overlap` columns (then rows) faded in over what is there."""
    mask_w = _ramp(grid.tile_h, grid.overlap, horizontal=True)
    mask_h = _ramp(grid.image_w, grid.overlap, horizontal=False)
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.tiles:
        line = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                line.paste(tile, (0, 0))
                continue
            line.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            line.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, line.width, grid.overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, grid.overlap, line.width, h)), (0, y + grid.overlap))
    return combined


def enlarge(image: Image.Image, upscaler: str, scale: float, folder: Path | None = None,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Image.Image:
    """`image` upscaled by `scale` with an upscaler named as A1111 lists them ("None" keeps the image as it is,
    as A1111's script does; "Lanczos"/"Nearest"; or a model file's name in the upscalers folder), to the size A1111's
    upscalers make (each side int(side * scale) rounded down to a multiple of 8)."""
    from .upscalers import load_by_name, target_size, upscale_image

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # A1111 flattens onto white
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    if upscaler == "None":
        return image
    if upscaler in PLAIN_UPSCALERS:
        return image.resize(target_size(image.width, image.height, scale), PLAIN_UPSCALERS[upscaler])
    return upscale_image(image, load_by_name(upscaler, folder, device, dtype), scale)


def upscaled_size(width: int, height: int, upscaler: str, scale: float) -> tuple[int, int]:
    """The size `enlarge` makes (known before any upscaler is loaded)."""
    from .upscalers import target_size

    return (width, height) if upscaler == "None" else target_size(width, height, scale)


def check_plan(width: int, height: int, tile_w: int, tile_h: int, overlap: int, upscaler: str) -> None:
    """Raise ValueError (one line) for a tiling A1111's script could not do sensibly, before any work; width and
    height: the upscaled image's."""
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"SD upscale: the overlap ({overlap}) must be at least 0 and less than the tile's sides "
                         f"({tile_w}x{tile_h})")
    if width < tile_w or height < tile_h:
        raise ValueError(f"SD upscale: the upscaled image ({width}x{height}, upscaler {upscaler}) is smaller than a "
                         f"tile ({tile_w}x{tile_h}); raise the scale or lower the width/height")
    cols, rows = tile_counts(width, height, tile_w, tile_h, overlap)
    if cols * rows > MAX_TILES:
        raise ValueError(f"SD upscale: {width}x{height} in {tile_w}x{tile_h} tiles overlapping by {overlap} is "
                         f"{cols * rows} tiles; at most {MAX_TILES}")


def sd_upscale(pipe: Pipeline, req: Request, image: Image.Image, upscaler: str = "None", scale: float = 2.0,
               overlap: int = 64, callback: Callback | None = None, folder: Path | None = None
               ) -> list[Image.Image]:
    """One upscaled image per iteration (req.n_iter). req: the img2img of each tile — its width/height are the
    tile's (None: the model's training size), its strength, steps, seed, batch_size (tiles per img2img run)."""
    tile_w = req.width or pipe.model.config.image_size
    tile_h = req.height or pipe.model.config.image_size
    req = dataclasses.replace(req, width=tile_w, height=tile_h)
    device = next(pipe.model.unet.parameters()).device
    dtype = next(pipe.model.unet.parameters()).dtype
    check_plan(*upscaled_size(image.width, image.height, upscaler, scale), tile_w, tile_h, overlap, upscaler)
    big = enlarge(image, upscaler, scale, folder, device, dtype if device.type != "cpu" else torch.float32)
    extra = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}
    results = []
    for n in range(req.n_iter):
        grid = split_grid(big, tile_w, tile_h, overlap)
        work = grid.images()
        done: list[Image.Image] = []
        parameters = None
        for i in range(math.ceil(len(work) / req.batch_size)):
            chunk = work[i * req.batch_size:(i + 1) * req.batch_size]
            batch = dataclasses.replace(req, seed=req.seed + n + i, batch_size=len(chunk), n_iter=1)
            done += pipe.run(batch, init=chunk, callback=callback)
            if parameters is None:
                parameters = pipe.infotext(pipe.resolve(batch), 0, extra)
        grid.replace(done)
        combined = combine_grid(grid)
        combined.info["parameters"] = parameters
        combined.info["seed"] = req.seed + n
        results.append(combined)
    return results
