"""The generation request: every field that decides an image, declared once and validated once.

The CLI, the Python API and the HTTP API each map their own names onto these fields (a table per interface) and
build a Request with keywords; a bad value fails here, before any model loads. A Request is frozen: derived
requests (the hires fix's second pass, batch n of n_iter) are made with `dataclasses.replace`, which validates
again. Inputs that are not parameters (init image, mask, callbacks) are arguments of `Pipeline.run`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from .accel import Accelerations
from .control import ControlError, ControlUnit, check_units
from .diffusion.img2img_steps import a1111_img2img_steps
from .diffusion.samplers import SamplerSpec, get_sampler
from .diffusion.schedule import SCHEDULE_LABELS, SCHEDULES, SPACINGS
from .diffusion.variation import Variation
from .hires import HiresFix
from .ip_adapter import ImagePrompt, IPAdapterError, check_prompts

MAX_SIDE = 8192
MAX_BATCH = 64
MAX_SEED = 2 ** 64 - 64  # image i of a batch uses seed + i: leave room for a batch
MAX_CLIP_SKIP = 12  # A1111's range; a text encoder with fewer layers refuses more when it runs
MAX_CFG = 100.0  # beyond this guidance only overflows (a scale of 1e308 gives NaN-black images)
MAX_AESTHETIC = 10.0  # the aesthetic scores the refiner was trained on are 0..10 (A1111's slider range)
AESTHETIC_SCORES = (6.0, 2.5)  # the refiner's defaults for the prompt and the negative prompt (diffusers', A1111's)


# How messages name the fields whose names say less than A1111's labels do
FIELD_NAMES = {"subseed": "variation seed", "subseed_strength": "variation strength", "n_iter": "batch count",
               "refiner_switch_at": "refiner switch point"}


class FieldError(ValueError):
    """A bad value for one Request field. Interfaces name the field as their users know it (`--batch`,
    `batch_size`) with `for_label`."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{FIELD_NAMES.get(field, field.replace('_', ' '))} {problem}")
        self.field, self.problem = field, problem

    def for_label(self, label: str) -> str:
        return f"{label} {self.problem}"


def random_seed() -> int:
    """A seed for -1, drawn as A1111 draws it."""
    return random.randrange(4294967294)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_size(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0 or value % 8 or value > MAX_SIDE:
        raise FieldError(name, f"must be a positive multiple of 8 up to {MAX_SIDE}, got {value!r}")


def _check_text(name: str, value: str) -> None:
    """Text must be encodable as UTF-8 (the PNG's parameters are): a lone surrogate (JSON's "\\ud800", or invalid
    UTF-8 in a command-line argument, which Python decodes to U+DC80..U+DCFF) is refused before any work."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(name, f"is not valid text: a lone surrogate U+{ord(value[e.start]):04X} at character "
                               f"{e.start} (invalid UTF-8?)") from None


@dataclass(frozen=True, kw_only=True)
class Request:
    """Everything that decides an image (A1111's generation parameters). Keyword-only and frozen.

    width/height None: the model's training size, or the init image's size rounded down to x8 (resolved by
    `Pipeline.run` with `sized`). seed/subseed -1: drawn at random once, here, and reported. Image i of a batch
    uses seed + i; batch n of n_iter continues the seeds (`iteration`)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "euler"  # CLI name, A1111 display name or alias
    schedule: str = "normal"
    spacing: str | None = None  # None: what diffusers' scheduler of this sampler uses for SD1.5
    cfg_scale: float = 7.5
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1  # batch count: batches run one after another, seeds continuing
    clip_skip: int = 1
    strength: float = 1.0  # img2img / inpaint: the share of the schedule that is run
    denoise_steps: int | None = None  # img2img: run exactly the schedule's last n steps; None: int(steps * strength)
    subseed: int = -1  # variation seed (A1111's): image i's noise is slerped towards subseed + i's
    subseed_strength: float = 0.0  # 0: no variation; 1: the variation seed's image
    seed_resize_from: tuple[int, int] | None = None  # (width, height) whose noise the seed keeps, centred
    tiling: bool = False  # seamless: every padded convolution wraps around (A1111's Tiling)
    vae_tiling: bool | None = None  # the VAE in overlapping tiles; None: when the image is large (decoding.py)
    hires: HiresFix | None = None  # txt2img: a second, larger img2img pass (sdengine/hires.py)
    # SDXL's size/crop conditioning (diffusers' original_size, crops_coords_top_left, target_size), (width, height)
    # and (left, top) here as the CLI and A1111 write sizes; None: the generated size, as A1111 and diffusers pass
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    refiner: str | None = None  # SDXL refiner model (A1111's refiner_checkpoint): a path or a models-folder name
    refiner_switch_at: float = 0.8  # the share of the schedule the base model runs before the refiner takes over
    # the SDXL refiner's aesthetic-score conditioning of the prompt and of the negative prompt (diffusers'
    # aesthetic_score / negative_aesthetic_score, A1111's sdxl_refiner_high/low_aesthetic_score options)
    aesthetic_score: float = AESTHETIC_SCORES[0]
    negative_aesthetic_score: float = AESTHETIC_SCORES[1]
    # ControlNet units (control.py): frozen specs, model by name or path and the control image, read when sampling
    controls: tuple[ControlUnit, ...] = ()
    # IP-Adapter image prompts (ip_adapter.py): frozen specs, adapter by name or path, reference image(s), scale
    image_prompts: tuple[ImagePrompt, ...] = ()
    # opt-in accelerations (sdengine/accel): DeepCache's interval (0: off) and branch, the token merging ratio
    # (0: off), the last steps run without guidance (0: off)
    deepcache: int = 0
    deepcache_branch: int = 0
    tome: float = 0.0
    cfg_skip: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise FieldError(name, f"must be text, got {getattr(self, name)!r}")
            _check_text(name, getattr(self, name))
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                _check_size(name, getattr(self, name))
        if not _is_int(self.steps) or self.steps < 1:
            raise FieldError("steps", f"must be a positive integer, got {self.steps!r}")
        if not (_is_number(self.cfg_scale) and abs(self.cfg_scale) <= MAX_CFG):
            raise FieldError("cfg_scale", f"must be a finite number from -{MAX_CFG:g} to {MAX_CFG:g}, got "
                             f"{self.cfg_scale!r}")
        for name in ("batch_size", "n_iter"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_BATCH:
                raise FieldError(name, f"must be an integer from 1 to {MAX_BATCH}, got {value!r}")
        if not _is_int(self.clip_skip) or not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise FieldError("clip_skip", f"must be >= 1 and <= {MAX_CLIP_SKIP}, got {self.clip_skip!r}")
        if not (_is_number(self.strength) and 0.0 < self.strength <= 1.0):
            raise FieldError("strength", f"must be in (0, 1], got {self.strength!r}")
        n = self.denoise_steps
        if n is not None and not (_is_int(n) and 1 <= n <= self.steps):
            raise FieldError("denoise_steps", f"must be an integer from 1 to steps ({self.steps}), got {n!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; valid: {', '.join(SPACINGS)}")
        if not isinstance(self.sampler, str):
            raise FieldError("sampler", f"must be a sampler's name, got {self.sampler!r}")
        object.__setattr__(self, "sampler", get_sampler(self.sampler).name)  # one spelling from here on
        images = self.batch_size * self.n_iter
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            if value == -1:
                object.__setattr__(self, name, value := random_seed())  # frozen: resolved once, at creation
            if not _is_int(value) or not 0 <= value <= MAX_SEED - images:
                raise FieldError(name, f"must be -1 or in [0, {MAX_SEED - images}] (this request makes {images} "
                                 f"images from it), got {value!r}")
        if not (_is_number(self.subseed_strength) and 0.0 <= self.subseed_strength <= 1.0):
            raise FieldError("subseed_strength", f"must be in [0, 1], got {self.subseed_strength!r}")
        if self.seed_resize_from is not None:
            pair = tuple(self.seed_resize_from)
            if len(pair) != 2 or not all(_is_int(v) and 0 < v <= MAX_SIDE for v in pair):
                raise FieldError("seed_resize_from", f"must be two sizes from 1 to {MAX_SIDE}, got {pair!r}")
            object.__setattr__(self, "seed_resize_from", pair)
        if not isinstance(self.tiling, bool):
            raise FieldError("tiling", f"must be true or false, got {self.tiling!r}")
        if self.vae_tiling is not None and not isinstance(self.vae_tiling, bool):
            raise FieldError("vae_tiling", f"must be true, false or null (automatic), got {self.vae_tiling!r}")
        if self.vae_tiling and self.tiling:
            raise FieldError("vae_tiling", "cannot be combined with seamless tiling: each VAE tile would wrap around "
                                           "on itself")
        for name in ("original_size", "crop", "target_size"):
            value = getattr(self, name)
            if value is not None:
                pair = tuple(value) if isinstance(value, tuple | list) else (value,)
                low = 0 if name == "crop" else 1
                if len(pair) != 2 or not all(_is_int(v) and low <= v <= MAX_SIDE for v in pair):
                    raise FieldError(name, f"must be two integers from {low} to {MAX_SIDE}, got {value!r}")
                object.__setattr__(self, name, pair)
        if self.refiner is not None and (not isinstance(self.refiner, str) or not self.refiner.strip()):
            raise FieldError("refiner", f"must be a model's name or path, got {self.refiner!r}")
        if not (_is_number(self.refiner_switch_at) and 0.0 < self.refiner_switch_at < 1.0):
            raise FieldError("refiner_switch_at", f"must lie in (0, 1), got {self.refiner_switch_at!r}")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not (_is_number(getattr(self, name)) and 0.0 <= getattr(self, name) <= MAX_AESTHETIC):
                raise FieldError(name, f"must be a number from 0 to {MAX_AESTHETIC:g}, got {getattr(self, name)!r}")
        try:
            object.__setattr__(self, "controls", check_units(self.controls))
        except ControlError as e:
            raise FieldError("controls", f"are not valid: {e}") from None
        try:
            object.__setattr__(self, "image_prompts", check_prompts(self.image_prompts))
        except IPAdapterError as e:
            raise FieldError("image_prompts", f"are not valid: {e}") from None
        try:
            _ = self.accelerations  # validated here, before any model loads
        except ValueError as e:
            raise FieldError("accelerations", f"are not valid: {e}") from None
        if self.hires is not None and not isinstance(self.hires, HiresFix):
            raise FieldError("hires", f"must be a HiresFix, got {type(self.hires).__name__}")
        if self.hires is not None and self.width is not None and self.height is not None:
            self.second_pass()  # a size the second pass cannot make is refused now, not after the first pass

    # --- derived values -----------------------------------------------------------------------------------------

    @property
    def sampler_spec(self) -> SamplerSpec:
        return get_sampler(self.sampler)

    @property
    def accelerations(self) -> Accelerations:
        return Accelerations(deepcache=self.deepcache, deepcache_branch=self.deepcache_branch, tome=self.tome,
                             cfg_skip=self.cfg_skip)

    @property
    def seeds(self) -> list[int]:
        """One seed per image. A1111: with a variation every image keeps the seed and the variation seed counts up."""
        return [self.seed + (0 if self.subseed_strength else i) for i in range(self.batch_size)]

    @property
    def subseeds(self) -> list[int]:
        return [self.subseed + i for i in range(self.batch_size)]

    @property
    def image_ids(self) -> list[int]:
        """What tells a batch's images apart: the variation seeds when there is a variation, else the seeds."""
        return self.subseeds if self.subseed_strength else self.seeds

    @property
    def run_strength(self) -> float:
        """The share of the schedule an img2img runs: `strength`, or with denoise_steps the strength whose
        int(steps * strength) is exactly that many steps (the samplers cut their tails by diffusers' rule)."""
        if self.denoise_steps is None:
            return self.strength
        return min((self.denoise_steps + 0.5) / self.steps, 1.0)

    def sized(self, width: int, height: int) -> Request:
        """This request with its unset width/height filled in."""
        if self.width is not None and self.height is not None:
            return self
        return replace(self, width=self.width if self.width is not None else width,
                       height=self.height if self.height is not None else height)

    def iteration(self, n: int) -> Request:
        """Batch n of n_iter, as one batch: seeds (variation seeds, if any) continue from the batches before it."""
        if not 0 <= n < self.n_iter:
            raise ValueError(f"batch {n} of a request with {self.n_iter} batches")
        return replace(self, n_iter=1, seed=self.seed + (0 if self.subseed_strength else n * self.batch_size),
                       subseed=self.subseed + n * self.batch_size)

    def a1111_img2img(self) -> Request:
        """This img2img request with A1111's step count (one more than diffusers' with k-diffusion samplers)."""
        return replace(self, denoise_steps=a1111_img2img_steps(self.steps, self.strength, self.sampler)[1])

    def second_pass(self, downscale: int = 8) -> Request:
        """The hires fix's img2img request, with A1111's step count: the hires steps (one fewer with DDIM/PLMS/
        UniPC), the last of a schedule of int(steps / strength) (a1111_img2img_steps, its fixed branch)."""
        hr = self.hires
        if hr is None or self.width is None or self.height is None:
            raise ValueError("a second pass needs a sized request with a hires fix")
        width, height = hr.output_size(self.width, self.height, downscale)
        if width < 8 or height < 8:
            raise ValueError(f"the hires fix would make {width}x{height} images")
        sampler = hr.sampler or self.sampler
        total, run = a1111_img2img_steps(hr.steps or self.steps, hr.denoising_strength, get_sampler(sampler).name,
                                         fixed=True)
        return replace(self, prompt=self.prompt if hr.prompt is None else hr.prompt,
                       negative_prompt=self.negative_prompt if hr.negative_prompt is None else hr.negative_prompt,
                       steps=total, sampler=sampler, schedule=hr.schedule or self.schedule, width=width,
                       height=height, strength=hr.denoising_strength, denoise_steps=run, hires=None)

    def variation(self, downscale: int) -> Variation | None:
        """The variation seeds for a model whose latents are `downscale` times smaller, or None if there are none."""
        if self.subseed_strength == 0 and self.seed_resize_from is None:
            return None
        resize = None
        if self.seed_resize_from is not None:
            w, h = self.seed_resize_from
            resize = (max(1, h // downscale), max(1, w // downscale))
        return Variation(self.subseeds, self.subseed_strength, resize)

    def infotext_fields(self, index: int) -> dict[str, Any]:
        """Image `index`'s A1111 parameters (the prompts and the model's fields are added by the pipeline)."""
        assert self.width is not None and self.height is not None
        fields: dict[str, Any] = {
            "Steps": self.steps, "Sampler": self.sampler_spec.display,
            "Schedule type": SCHEDULE_LABELS[self.schedule] if self.schedule != "normal" else None,
            "CFG scale": self.cfg_scale, "Seed": self.seeds[index], "Size": f"{self.width}x{self.height}",
            "Variation seed": self.subseeds[index] if self.subseed_strength else None,
            "Variation seed strength": self.subseed_strength or None,
            "Seed resize from": "{}x{}".format(*self.seed_resize_from) if self.seed_resize_from else None,
            "Denoising strength": self.strength if self.strength < 1.0 else None,
            "Clip skip": self.clip_skip if self.clip_skip > 1 else None,
            "Tiling": "True" if self.tiling else None,
            "Refiner": self.refiner, "Refiner switch at": self.refiner_switch_at if self.refiner else None,
            "Aesthetic score": None if self.aesthetic_score == AESTHETIC_SCORES[0] else self.aesthetic_score,
            "Negative aesthetic score": (None if self.negative_aesthetic_score == AESTHETIC_SCORES[1]
                                         else self.negative_aesthetic_score),
        }
        if self.hires is not None:
            fields.update(self.hires.infotext(self))
        return {**fields, **self.accelerations.infotext_fields()}


# A1111 parameters-text key -> Request field (the inverse of infotext_fields, for `generate --from-png`)
INFOTEXT_FIELDS: dict[str, str] = {
    "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler",
    "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width", "Size-2": "height", "Clip skip": "clip_skip",
    "Variation seed": "subseed", "Variation seed strength": "subseed_strength", "Refiner": "refiner",
    "Refiner switch at": "refiner_switch_at", "DeepCache interval": "deepcache", "DeepCache branch": "deepcache_branch",
    "Token merging ratio": "tome", "CFG skip last steps": "cfg_skip", "Aesthetic score": "aesthetic_score",
    "Negative aesthetic score": "negative_aesthetic_score",
}
INFOTEXT_HIRES: dict[str, str] = {"Hires upscale": "scale", "Hires steps": "steps", "Hires upscaler": "upscaler",
                                  "Hires sampler": "sampler", "Hires prompt": "prompt",
                                  "Hires negative prompt": "negative_prompt"}


def fields_from_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Request keywords from a parsed parameters text (metadata.parse_parameters): what A1111's "Send to txt2img"
    reads back. Keys sdengine does not set (Model hash, VAE, ...) are left out."""
    fields = {field: params[key] for key, field in INFOTEXT_FIELDS.items() if key in params}
    labels = {label: name for name, label in SCHEDULE_LABELS.items()}
    if params.get("Schedule type") in labels:
        fields["schedule"] = labels[params["Schedule type"]]
    if params.get("Tiling") in ("True", True):
        fields["tiling"] = True
    if isinstance(params.get("Seed resize from"), str) and "x" in params["Seed resize from"]:
        w, h = params["Seed resize from"].split("x", 1)
        fields["seed_resize_from"] = (int(w), int(h))
    hires = {field: params[key] for key, field in INFOTEXT_HIRES.items() if key in params}
    if isinstance(params.get("Hires resize"), str) and "x" in params["Hires resize"]:
        w, h = params["Hires resize"].split("x", 1)
        hires["resize_x"], hires["resize_y"] = int(w), int(h)
    if hires:
        if "Hires schedule type" in params and params["Hires schedule type"] in labels:
            hires["schedule"] = labels[params["Hires schedule type"]]
        if "Denoising strength" in params:
            hires["denoising_strength"] = params["Denoising strength"]
        fields["hires"] = HiresFix(**hires)
    elif "Denoising strength" in params:
        fields["strength"] = params["Denoising strength"]
    return fields


__all__ = ["Request", "FieldError", "ControlUnit", "ImagePrompt", "random_seed", "MAX_SIDE", "MAX_SEED",
           "MAX_CLIP_SKIP"]
