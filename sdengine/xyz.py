"""X/Y/Z plots, as AUTOMATIC1111's "X/Y/Z plot" script makes them: one generation per combination of axis values,
each cell's image kept with its parameters, and one labelled grid.

An axis is `field:values`. Fields: any Request field by name (steps, cfg_scale or cfg, sampler, schedule, seed,
clip_skip, width, height, strength, subseed_strength, ...), `prompt_sr` (Prompt S/R: the first value is searched
for in the prompt and negative prompt, each value replaces it) and `checkpoint` (a model per value). Values are
comma-separated; numbers also take A1111's ranges: `1-4` (1, 2, 3, 4), `1-10 (+3)` (1, 4, 7, 10), `1-10 [3]`
(three values evenly spread), `0.5-1.5 [3]`. Every cell's Request is built, and so checked, before any work.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .request import FieldError, Request

MAX_VALUES = 100  # per axis
MAX_CELLS = 1000
MAX_GRID_SIDE = 16384  # pixels: a grid larger than this is refused before any work
ALIASES = {"cfg": "cfg_scale", "clip skip": "clip_skip", "denoising": "strength", "prompt s/r": "prompt_sr",
           "model": "checkpoint", "variation strength": "subseed_strength", "variation seed": "subseed"}
SPECIAL = ("prompt_sr", "checkpoint")
FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf",
              "/Library/Fonts/Arial.ttf", "C:/Windows/Fonts/arial.ttf")
_INT_RANGE = re.compile(r"\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*(?:\(\s*([+-]\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$")
_FLOAT_RANGE = re.compile(r"\s*([+-]?\d*\.?\d+)\s*-\s*([+-]?\d*\.?\d+)\s*(?:\(\s*([+-]\d*\.?\d+)\s*\)|\[\s*(\d+)\s*\])?"
                          r"\s*$")


@dataclass(frozen=True)
class Axis:
    field: str
    values: tuple[Any, ...]

    def label(self, value: Any) -> str:
        if self.field == "sampler":
            from .diffusion.samplers import get_sampler

            return get_sampler(str(value)).display
        if self.field == "checkpoint":
            return Path(str(value)).stem
        return f"{self.field}: {value:g}" if isinstance(value, float) else f"{self.field}: {value}"


def _field_type(field: str) -> type:
    hints = {f.name: f.type for f in dataclasses.fields(Request)}
    text = str(hints[field])
    return int if text.startswith("int") else float if text.startswith("float") else str


def _numbers(token: str, kind: type) -> list[Any]:
    m = (_INT_RANGE if kind is int else _FLOAT_RANGE).match(token)
    if m is None or (kind is int and "." in token):
        try:
            return [kind(token.strip())]
        except ValueError:
            raise ValueError(f"{token.strip()!r} is not a number") from None
    start, end = kind(m.group(1)), kind(m.group(2))
    if m.group(4) is not None:  # [count]: evenly spread
        count = int(m.group(4))
        if not 1 <= count <= MAX_VALUES:
            raise ValueError(f"{token.strip()!r}: a count from 1 to {MAX_VALUES}")
        if count == 1:
            return [start]
        values = [start + (end - start) * i / (count - 1) for i in range(count)]
        return [int(v) for v in values] if kind is int else values
    step = kind(m.group(3)) if m.group(3) is not None else kind(1 if end >= start else -1)
    if step == 0 or (end - start) / step < 0:
        raise ValueError(f"{token.strip()!r}: the step {step} never reaches {end}")
    n = int(math.floor((end - start) / step + 1e-9)) + 1
    if n > MAX_VALUES:
        raise ValueError(f"{token.strip()!r} makes {n} values; at most {MAX_VALUES} per axis")
    return [start + step * i for i in range(n)] if kind is int else [round(start + step * i, 10) for i in range(n)]


def parse_axis(spec: str) -> Axis:
    """`field:values` -> Axis (ValueError names what is wrong)."""
    name, sep, values = spec.partition(":")
    name = name.strip().lower()
    field = ALIASES.get(name, name.replace(" ", "_"))
    if not sep or not values.strip():
        raise ValueError(f"axis {spec!r}: expected FIELD:VALUE,VALUE,...")
    known = {f.name for f in dataclasses.fields(Request)} - {"hires", "prompt"}
    if field not in known and field not in SPECIAL:
        raise ValueError(f"axis {spec!r}: unknown field {name!r} (Request fields, prompt_sr or checkpoint)")
    tokens = [t for t in values.split(",") if t.strip()] if field != "prompt_sr" else values.split(",")
    if field in SPECIAL or _field_type(field) is str:
        parsed: list[Any] = [t.strip() for t in tokens]
    else:
        kind = _field_type(field)
        parsed = [v for t in tokens for v in _numbers(t, kind)]
    if len(parsed) > MAX_VALUES:
        raise ValueError(f"axis {name}: {len(parsed)} values; at most {MAX_VALUES}")
    if field == "prompt_sr" and len(parsed) < 2:
        raise ValueError(f"axis {spec!r}: Prompt S/R needs the text to search for and at least one replacement")
    return Axis(field, tuple(parsed))


@dataclass(frozen=True)
class Cell:
    index: tuple[int, int, int]  # (x, y, z)
    request: Request
    checkpoint: str | None


def cells(base: Request, axes: list[Axis | None]) -> list[Cell]:
    """Every combination's Request (checked now), checkpoint axis outermost so each model loads once."""
    x, y, z = (axes + [None] * 3)[:3]
    dims = [a.values if a is not None else (None,) for a in (x, y, z)]
    if math.prod(len(d) for d in dims) > MAX_CELLS:
        raise ValueError(f"{math.prod(len(d) for d in dims)} cells; at most {MAX_CELLS}")
    out = []
    for k, vz in enumerate(dims[2]):
        for j, vy in enumerate(dims[1]):
            for i, vx in enumerate(dims[0]):
                fields: dict[str, Any] = {}
                checkpoint = None
                prompt, negative = base.prompt, base.negative_prompt
                for axis, value in ((x, vx), (y, vy), (z, vz)):
                    if axis is None:
                        continue
                    if axis.field == "checkpoint":
                        checkpoint = value
                    elif axis.field == "prompt_sr":
                        search = axis.values[0]
                        if search not in base.prompt and search not in base.negative_prompt:
                            raise ValueError(f"Prompt S/R did not find {search!r} in the prompt or negative prompt")
                        prompt, negative = prompt.replace(search, value), negative.replace(search, value)
                    else:
                        fields[axis.field] = value
                try:
                    req = dataclasses.replace(base, prompt=prompt, negative_prompt=negative, **fields)
                except FieldError as e:
                    raise ValueError(f"cell {i, j, k}: {e}") from None
                out.append(Cell((i, j, k), req, checkpoint))
    out.sort(key=lambda c: (c.checkpoint or "", c.index[2], c.index[1], c.index[0]))
    return out


def font(size: int) -> ImageFont.ImageFont:
    for path in FONT_PATHS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def grid_size(axes: list[Axis | None], width: int, height: int, legend: bool = True, margin: int = 0
              ) -> tuple[int, int]:
    """The grid image's size for cells of width x height: checked before any work."""
    x, y, z = (axes + [None] * 3)[:3]
    cols, rows, pages = (len(a.values) if a else 1 for a in (x, y, z))
    left, top, title = _padding(width) if legend else (0, 0, 0)
    sub_w = left + cols * width + (cols - 1) * margin
    return sub_w * pages + (pages - 1) * margin, top + rows * height + (rows - 1) * margin + (title if z else 0)


def _padding(width: int) -> tuple[int, int, int]:
    size = max(12, width // 16)
    return (size * 12, size * 3, size * 2)  # left (y labels), top (x labels), z title


def draw_grid(images: dict[tuple[int, int, int], Image.Image], axes: list[Axis | None], legend: bool = True,
              margin: int = 0) -> Image.Image:
    """Cells with their axis labels: x above the columns, y left of the rows, z over each sub-grid (the z
    sub-grids side by side). legend=False: no labels (A1111's draw_legend); margin: pixels between cells and
    between sub-grids (A1111's margin_size)."""
    x, y, z = (axes + [None] * 3)[:3]
    first = next(iter(images.values()))
    w, h = first.size
    left, top, title = _padding(w) if legend else (0, 0, 0)
    grid = Image.new("RGB", grid_size(axes, w, h, legend, margin), "white")
    draw = ImageDraw.Draw(grid)
    face = font(max(12, w // 16))
    pages = len(z.values) if z else 1
    cols = len(x.values) if x else 1
    sub_w = left + cols * w + (cols - 1) * margin + margin  # a sub-grid and the margin after it
    offset_y = title if z else 0
    for (i, j, k), image in images.items():
        grid.paste(image.convert("RGB"), (k * sub_w + left + i * (w + margin), offset_y + top + j * (h + margin)))
    if not legend:
        return grid
    for k in range(pages):
        base_x = k * sub_w
        if z:
            draw.text((base_x + (sub_w - margin) // 2, title // 2), z.label(z.values[k]), fill="black", font=face,
                      anchor="mm")
        for i, value in enumerate(x.values if x else ()):
            draw.text((base_x + left + i * (w + margin) + w // 2, offset_y + top // 2), x.label(value), fill="black",
                      font=face, anchor="mm")
        for j, value in enumerate(y.values if y else ()):
            draw.text((base_x + left - 6, offset_y + top + j * (h + margin) + h // 2), y.label(value), fill="black",
                      font=face, anchor="rm")
    return grid


def sub_grids(images: dict[tuple[int, int, int], Image.Image], axes: list[Axis | None], legend: bool = True,
              margin: int = 0) -> list[Image.Image]:
    """One x/y grid per z value (A1111's include_sub_grids); [] without a z axis."""
    x, y, z = (axes + [None] * 3)[:3]
    if z is None:
        return []
    return [draw_grid({(i, j, 0): im for (i, j, kk), im in images.items() if kk == k}, [x, y], legend, margin)
            for k in range(len(z.values))]


def run_grid(base: Request, axes: list[Axis | None], pipeline_for: Callable[[str | None], Any],
             on_cell: Callable[[Cell, list[Image.Image]], None] | None = None, legend: bool = True,
             margin: int = 0, with_sub_grids: bool = False) -> Image.Image | list[Image.Image]:
    """Generate every cell (pipeline_for(checkpoint) gives the pipeline of a checkpoint axis value, or of the
    model for None) and return the labelled grid (with_sub_grids: [grid, one grid per z value]); on_cell gets each
    cell's images as they are made."""
    planned = cells(base, axes)
    made: dict[tuple[int, int, int], Image.Image] = {}
    for cell in planned:
        images = pipeline_for(cell.checkpoint).run(cell.request)
        if on_cell is not None:
            on_cell(cell, images)
        made[cell.index] = images[0]
    grid = draw_grid(made, axes, legend, margin)
    return [grid, *sub_grids(made, axes, legend, margin)] if with_sub_grids else grid
