"""A1111's scripts through `script_name` + positional `script_args`: "x/y/z plot" (sdengine/xyz.py) in txt2img and
img2img, "outpainting mk2" and "poor man's outpainting" (sdengine/outpaint.py) and "sd upscale"
(sdengine/sd_upscale.py) in img2img.

script_args are read in A1111's layouts (the order of each script's ui() values); an axis type is an index into
A1111's axis list for that tab, as its API takes it. Axes without an sdengine equivalent are a 422 naming them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import xyz
from .errors import BadInput
from .samplers import AUTOMATIC_SCHEDULE, SCHEDULER_KEYS, resolve_sampler

if TYPE_CHECKING:
    from ..request import Request
    from .jobs import Job
    from .registry import ModelRegistry
    from .service import Service
    from .validation import GenJob

XYZ, MK2, POOR, SDU = "x/y/z plot", "outpainting mk2", "poor man's outpainting", "sd upscale"
SCRIPTS = {"txt2img": [XYZ], "img2img": [XYZ, MK2, POOR, SDU]}  # as /sdapi/v1/scripts lists them (lower case)
MAX_SD_UPSCALE = 8.0
DIRECTIONS = ("left", "right", "up", "down")

# A1111's X/Y/Z axis options in its order (scripts/xyz_grid.py); "t"/"i": on the txt2img/img2img tab only. Each
# tab's script_args index into its own list.
_AXES = (("Nothing", ""), ("Seed", ""), ("Var. seed", ""), ("Var. strength", ""), ("Steps", ""),
         ("Hires steps", "t"), ("CFG Scale", ""), ("Image CFG Scale", "i"), ("Prompt S/R", ""), ("Prompt order", ""),
         ("Sampler", "t"), ("Hires sampler", "t"), ("Sampler", "i"), ("Checkpoint name", ""),
         ("Negative Guidance minimum sigma", ""), ("Sigma Churn", ""), ("Sigma min", ""), ("Sigma max", ""),
         ("Sigma noise", ""), ("Schedule type", ""), ("Schedule min sigma", ""), ("Schedule max sigma", ""),
         ("Schedule rho", ""), ("Eta", ""), ("Clip skip", ""), ("Denoising", ""), ("Initial noise multiplier", ""),
         ("Extra noise", ""), ("Hires upscaler", "t"), ("Cond. Image Mask Weight", "i"), ("VAE", ""), ("Styles", ""),
         ("UniPC Order", ""), ("Face restore", ""), ("Token merging ratio", ""), ("Token merging ratio high-res", ""),
         ("Always discard next-to-last sigma", ""), ("SGM noise multiplier", ""), ("Refiner checkpoint", ""),
         ("Refiner switch at", ""), ("RNG source", ""))
AXIS_OPTIONS = {mode: [label for label, only in _AXES if only in ("", mode[0])] for mode in ("txt2img", "img2img")}
# The axes sdengine plots: A1111's label -> xyz.py's field (None: Nothing)
AXIS_FIELDS = {"Nothing": None, "Seed": "seed", "Var. seed": "subseed", "Var. strength": "subseed_strength",
               "Steps": "steps", "CFG Scale": "cfg_scale", "Prompt S/R": "prompt_sr", "Sampler": "sampler",
               "Checkpoint name": "checkpoint", "Schedule type": "schedule", "Clip skip": "clip_skip",
               "Denoising": "strength"}
CHOICE_AXES = ("Sampler", "Checkpoint name", "Schedule type")  # A1111 takes their values from the dropdown list


def _arg(args: list[Any], i: int, default: Any) -> Any:
    return args[i] if i < len(args) and args[i] is not None else default


@dataclass
class XYZPlan:
    axes: list[xyz.Axis | None]
    labels: list[str]  # A1111's axis labels, x y z
    texts: list[str]  # the values as sent, for the grid's infotext
    cells: list[xyz.Cell]
    lone_images: bool  # include_lone_images: the cells after the grid
    legend: bool = True  # draw_legend
    margin: int = 0  # margin_size: pixels between cells and sub-grids
    sub_grids: bool = False  # include_sub_grids: each z value's grid after the grid


@dataclass
class OutpaintPlan:
    script: str
    pixels: int
    mask_blur: int
    directions: tuple[str, ...]
    fill: str  # outpaint.extend's
    inpainting_fill: int  # the masked content, as img2img's inpainting_fill
    warnings: list[str] = field(default_factory=list)

    def extend(self, image: Image.Image, seed: int) -> tuple[Image.Image, Image.Image]:
        from ..outpaint import extend

        amounts = {d: self.pixels if d in self.directions else 0 for d in DIRECTIONS}
        return extend(image, fill=self.fill, mask_blur=self.mask_blur, seed=seed, **amounts)


@dataclass(frozen=True)
class SDUpscalePlan:
    overlap: int
    upscaler: str  # a name as /sdapi/v1/upscalers lists it
    scale: float


def sd_upscale_plan(args: list[Any]) -> SDUpscalePlan:
    """"sd upscale"'s script_args: [info, overlap, upscaler_index, scale_factor] (A1111's ui order, defaults 64, 0,
    2.0); the index is into /sdapi/v1/upscalers' list (None, Lanczos, Nearest, then the folder's models), as A1111's
    is into its own; a name is taken too."""
    from .. import upscalers
    from ..sd_upscale import PLAIN_UPSCALERS

    overlap, index, scale = _arg(args, 1, 64), _arg(args, 2, 0), _arg(args, 3, 2.0)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= 256:
        raise BadInput(f"{SDU}: script_args[1] (tile overlap) must be an integer from 0 to 256, got {overlap!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SD_UPSCALE:
        raise BadInput(f"{SDU}: script_args[3] (scale factor) must be a number in (0, {MAX_SD_UPSCALE:g}], got "
                       f"{scale!r}")
    names = [*PLAIN_UPSCALERS, *upscalers.list_upscalers()]
    if isinstance(index, str) and index in names:
        name = index
    elif not isinstance(index, bool) and isinstance(index, int) and 0 <= index < len(names):
        name = names[index]
    else:
        raise BadInput(f"{SDU}: script_args[2] (upscaler) must be an index into /sdapi/v1/upscalers (0 to "
                       f"{len(names) - 1}) or a name there, got {index!r}")
    return SDUpscalePlan(overlap, name, float(scale))


def run_sd_upscale(job: Job, gen: GenJob, pipe: Any, req: Request) -> list[Image.Image]:
    """The upscaled image of each batch count: its tiles' img2img steps reported as the job's progress."""
    from .. import runtime
    from ..sd_upscale import sd_upscale

    def callback(step: int, total: int, x: Any, denoised: Any) -> None:
        job.step, job.steps = step + 1, total
        job.preview, job.preview_step = denoised[:1], job.preview_step + 1
        job.check()

    plan = gen.upscale
    assert plan is not None and gen.init
    try:
        return sd_upscale(pipe, req, gen.init[0], plan.upscaler, plan.scale, plan.overlap, callback,
                          runtime.upscalers_dir())
    except ValueError as e:   # an upscaler file that does not load: the client's choice
        raise BadInput(f"{SDU}: {e}") from None


def script_name(body: dict[str, Any], mode: str) -> str | None:
    name = body.get("script_name")
    if name in (None, "", "None"):
        return None
    key = str(name).strip().lower()
    if key not in SCRIPTS[mode]:
        raise BadInput(f"script_name {name!r} is not supported in {mode}; the scripts here: "
                       f"{', '.join(SCRIPTS[mode])} (see /sdapi/v1/scripts)")
    return key


def outpaint_plan(name: str, args: list[Any], inpainting_fill: int) -> OutpaintPlan:
    """The two outpainting scripts' script_args -> what extend() takes. mk2: [info, pixels, mask_blur, direction,
    noise_q, color_variation]; poor man's: [pixels, mask_blur, inpainting_fill, direction]."""
    warnings = []
    if name == MK2:
        pixels, blur, directions = _arg(args, 1, 128), _arg(args, 2, 8), _arg(args, 3, list(DIRECTIONS))
        if _arg(args, 4, 1.0) != 1.0 or _arg(args, 5, 0.05) != 0.05:
            warnings.append("outpainting mk2: noise_q and color_variation ignored (the border is noise matched to "
                            "the image's spectrum and colours)")
        fill, content = "matched", 1  # the border's noise is the content: kept as it is ("original")
    else:
        pixels, blur, directions = _arg(args, 0, 128), _arg(args, 1, 4), _arg(args, 3, list(DIRECTIONS))
        fill, content = "edge", _arg(args, 2, inpainting_fill)
        if isinstance(content, bool) or not isinstance(content, int) or not 0 <= content <= 3:
            raise BadInput(f"script_args[2] (masked content) must be 0 to 3, got {content!r}")
    for what, value, hi in (("pixels", pixels, 256), ("mask_blur", blur, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            raise BadInput(f"{name}: {what} must be an integer from 0 to {hi}, got {value!r}")
    if pixels % 8:
        raise BadInput(f"{name}: pixels must be a multiple of 8, got {pixels}")
    if isinstance(directions, str):
        directions = [directions]
    if not isinstance(directions, list) or not directions or any(d not in DIRECTIONS for d in directions):
        raise BadInput(f"{name}: the direction must be a list of {', '.join(DIRECTIONS)}, got {directions!r}")
    return OutpaintPlan(name, pixels, blur, tuple(directions), fill, content, warnings)


def _axis(label: str, text: Any, dropdown: Any, csv_mode: bool, mode: str, base: Request,
          registry: ModelRegistry) -> xyz.Axis | None:
    if label not in AXIS_FIELDS:
        raise BadInput(f"X/Y/Z plot: the axis {label!r} is not supported here; supported: "
                       f"{', '.join(AXIS_FIELDS)}")
    name = AXIS_FIELDS[label]
    if name is None:
        return None
    if name == "strength" and mode == "txt2img":
        raise BadInput("X/Y/Z plot: the Denoising axis is for img2img here")
    if label in CHOICE_AXES and not csv_mode and isinstance(dropdown, list) and dropdown:
        values = [str(v).strip() for v in dropdown]
    else:
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"X/Y/Z plot: the {label} axis has no values")
        if label not in CHOICE_AXES:
            try:
                return xyz.parse_axis(f"{name}:{text}")
            except ValueError as e:
                raise BadInput(f"X/Y/Z plot: {e}") from None
        values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or len(values) > xyz.MAX_VALUES:
        raise BadInput(f"X/Y/Z plot: the {label} axis needs 1 to {xyz.MAX_VALUES} values")
    if name == "sampler":
        values = [resolve_sampler(v, None)[0] for v in values]
    elif name == "checkpoint":
        values = [registry.find(v).name for v in values]
    else:  # schedule: A1111's names or labels; Automatic: the sampler's
        keys = [v.lower() for v in values]
        if bad := [v for v, k in zip(values, keys) if k != "automatic" and k not in SCHEDULER_KEYS]:
            raise BadInput(f"X/Y/Z plot: unknown schedule type {bad[0]!r}")
        values = [AUTOMATIC_SCHEDULE.get(base.sampler, "normal") if k == "automatic" else SCHEDULER_KEYS[k]
                  for k in keys]
    return xyz.Axis(name, tuple(values))


def xyz_plan(args: list[Any], mode: str, base: Request, registry: ModelRegistry, max_cells: int,
             warnings: list[str]) -> XYZPlan:
    """A1111's X/Y/Z script_args: [x_type, x_values, x_values_dropdown, y_..., z_..., draw_legend,
    include_lone_images, include_sub_grids, no_fixed_seeds, margin_size, csv_mode, raw_mode]; the layout with
    vary_seeds_x/y/z after no_fixed_seeds is read too."""
    options = AXIS_OPTIONS[mode]
    vary = len(args) > 13 and isinstance(args[13], bool)  # vary_seeds_x where the older layout has margin_size
    tail = 16 if vary else 13
    csv_mode = bool(_arg(args, tail + 1, False))
    axes, labels, texts = [], [], []
    for n, axis in enumerate("xyz"):
        index = _arg(args, 3 * n, 1 if axis == "x" else 0)
        if isinstance(index, str):  # a label instead of an index: taken as the label
            index = options.index(index) if index in options else -1
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(options):
            raise BadInput(f"script_args[{3 * n}] ({axis}_type): an index into A1111's {mode} axis list "
                           f"(0 to {len(options) - 1}), got {index!r}")
        label = options[index]
        axes.append(_axis(label, _arg(args, 3 * n + 1, ""), _arg(args, 3 * n + 2, None), csv_mode, mode, base,
                          registry))
        labels.append(label)
        values = _arg(args, 3 * n + 2, None) if label in CHOICE_AXES and not csv_mode else None
        texts.append(", ".join(map(str, values)) if values else str(_arg(args, 3 * n + 1, "")))
    if _arg(args, 12, False):
        warnings.append("X/Y/Z plot: no_fixed_seeds ignored; every cell has the request's seed")
    if vary and any(_arg(args, i, False) for i in (13, 14, 15)):
        warnings.append("X/Y/Z plot: vary_seeds ignored")
    margin = _arg(args, tail, 0)
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 512:
        raise BadInput(f"script_args[{tail}] (margin_size) must be an integer from 0 to 512, got {margin!r}")
    legend = _arg(args, 9, True) is not False
    try:
        planned = xyz.cells(base, axes)
    except ValueError as e:
        raise BadInput(f"X/Y/Z plot: {e}") from None
    if len(planned) > max_cells:
        raise BadInput(f"X/Y/Z plot: {len(planned)} cells; at most {max_cells} on this server")
    width, height = base.hires.output_size(base.width, base.height) if base.hires else (base.width, base.height)
    grid_w, grid_h = xyz.grid_size(axes, width, height, legend, margin)
    if max(grid_w, grid_h) > xyz.MAX_GRID_SIDE:
        raise BadInput(f"X/Y/Z plot: the grid would be {grid_w}x{grid_h}; at most {xyz.MAX_GRID_SIDE} a side")
    return XYZPlan(axes, labels, texts, planned, bool(_arg(args, 10, False)), legend, margin,
                   bool(_arg(args, 11, False)))


def run_xyz(service: Service, job: Job, gen: GenJob) -> tuple[list[Image.Image], list[str]]:
    """Worker thread: every cell (checkpoint axis outermost), then the grid. (images, warnings): the grid first,
    then the cells in A1111's order when include_lone_images; a cell an interrupt left undone is black."""
    plan: XYZPlan = gen.script
    warnings: list[str] = []
    made: dict[tuple[int, int, int], Image.Image] = {}
    job.job_count = len(plan.cells) * gen.request.n_iter
    for c, cell in enumerate(plan.cells):
        if job.interrupt:
            break
        pipe, _ = service.worker_registry(job).ensure(cell.checkpoint or gen.model)
        images = service.images(job, gen, pipe, cell.request, warnings, offset=c * gen.request.n_iter)
        if images:
            made[cell.index] = images[0]
    if not made:
        return [], warnings
    first = next(iter(made.values()))
    for cell in plan.cells:
        made.setdefault(cell.index, Image.new("RGB", first.size))
    grid = xyz.draw_grid(made, plan.axes, plan.legend, plan.margin)
    order = sorted(made, key=lambda i: (i[2], i[1], i[0]))
    text = made[order[0]].info.get("parameters", "")
    extra = [("Script", "X/Y/Z plot")]
    for axis, label, values in zip("XYZ", plan.labels, plan.texts):
        if label != "Nothing":
            extra += [(f"{axis} Type", label), (f"{axis} Values", f'"{values}"' if "," in values else values)]
    grid.info["parameters"] = text + ", " + ", ".join(f"{k}: {v}" for k, v in extra) if text else ""
    subs = xyz.sub_grids(made, plan.axes, plan.legend, plan.margin) if plan.sub_grids else []
    for sub in subs:
        sub.info["parameters"] = grid.info["parameters"]
    return [grid, *subs, *([made[i] for i in order] if plan.lone_images else [])], warnings
