"""A1111 request bodies -> Request: one table for the fields that map one to one, a few rules for the rest, and
the serve caps on top of Request's own checks.

Every check that can fail on the client's input runs when the request arrives (BadInput -> 422), so the queue
only holds jobs that can run. Field names in messages are A1111's, as the client sent them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .. import runtime
from ..diffusion.samplers import SAMPLERS
from ..hires import HiresFix
from ..images import empty_mask_note
from ..memory_estimate import refusal
from ..networks import parse_tags, strip_tags
from ..prompts import Style, apply_styles
from ..request import FieldError, Request
from . import inpaint, scripts
from .controlnet import UnitReader
from .errors import BadInput
from .images import decode_image, prepare_mask, resize_image
from .registry import ModelRegistry
from .samplers import (
    AESTHETIC_OPTIONS,
    AUTOMATIC_SCHEDULE,
    check_aesthetic_score,
    check_clip_skip,
    check_token_merging,
    resolve_sampler,
)

# A1111 body field -> (Request field, A1111's default when the body leaves it out or sends null)
A1111_FIELDS: dict[str, tuple[str, Any]] = {
    "steps": ("steps", 50), "cfg_scale": ("cfg_scale", 7.0), "width": ("width", 512), "height": ("height", 512),
    "batch_size": ("batch_size", 1), "n_iter": ("n_iter", 1), "seed": ("seed", -1), "subseed": ("subseed", -1),
    "subseed_strength": ("subseed_strength", 0.0), "tiling": ("tiling", False),
}
# enable_hr's fields -> (HiresFix field, default)
A1111_HIRES_FIELDS: dict[str, tuple[str, Any]] = {
    "hr_scale": ("scale", 2.0), "hr_resize_x": ("resize_x", 0), "hr_resize_y": ("resize_y", 0),
    "hr_upscaler": ("upscaler", None), "hr_second_pass_steps": ("steps", 0),
    "denoising_strength": ("denoising_strength", 0.75),  # A1111's txt2img default
}
LABELS = {request_field: key for key, (request_field, _) in A1111_FIELDS.items()}
LABELS.update({"prompt": "prompt", "negative_prompt": "negative_prompt", "strength": "denoising_strength",
               "clip_skip": "CLIP_stop_at_last_layers", "seed_resize_from": "seed_resize_from_w/h"})


# Size caps when the server is not given any: twice the size the model runs at, and at least 1024 (SD1.5 1024, SDXL
# 2048, the shipped 64-pixel model 1024); the per-request memory estimate refuses what would not fit anyway.
DERIVED_CAP_MIN = 1024


@dataclass(frozen=True)
class Limits:
    max_width: int | None = None  # None: from the model that runs the request (caps_for)
    max_height: int | None = None
    max_steps: int = 150
    max_batch: int = 8  # caps batch_size, and n_iter too
    max_prompt_chars: int = 4000
    queue_size: int = 16
    max_body_bytes: int = 64 << 20
    max_body_keys: int = 100_000  # A1111 bodies have about 100; see app.Guard
    max_body_items: int = 1_000_000  # array items and members (',' bytes); see app.Guard

    @property
    def max_image_pixels(self) -> int:
        """Init images may be larger than the output (they are resized), within reason."""
        return 16 * (self.max_width or DERIVED_CAP_MIN) * (self.max_height or DERIVED_CAP_MIN)

    def caps_for(self, model_size: int) -> tuple[int, int]:
        """(max width, max height) for a model that runs at `model_size` pixels: the given caps, else derived."""
        derived = max(DERIVED_CAP_MIN, 2 * model_size)
        return self.max_width or derived, self.max_height or derived


@dataclass
class GenJob:
    """A validated generation: the Request and what the HTTP API adds around it (images in, styles, settings)."""

    mode: str  # "txt2img" | "img2img"
    request: Request  # styles applied: what is generated
    prompt: str  # as sent
    negative_prompt: str
    styles: list[str]
    init: list[Image.Image] | None = None  # already resized to width x height (or the originals when masked)
    mask: Image.Image | None = None
    masked: inpaint.MaskedPlan | None = None  # a masked request's crop, fill and paste-back (server/inpaint.py)
    model: str | None = None  # entry name; None: the default
    persist: dict[str, Any] = field(default_factory=dict)  # settings kept after the job (restore_afterwards=False)
    send_images: bool = True
    denoising_strength: float | None = None  # as A1111 reports it
    warnings: list[str] = field(default_factory=list)
    script: scripts.XYZPlan | None = None  # script_name "x/y/z plot": the cells run instead of the request
    upscale: scripts.SDUpscalePlan | None = None  # script_name "sd upscale": init[0] upscaled, then img2img tiles
    caps: tuple[int, int] = (DERIVED_CAP_MIN, DERIVED_CAP_MIN)  # the largest width x height for the job's model
    # the aesthetic-score options (Request fields) for a refiner run as the model itself (Service.for_model)
    aesthetic: dict[str, float] = field(default_factory=dict)


def _get(body: dict, key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _int(body: dict, key: str, default: int, lo: int, hi: int, why: str = "") -> int:
    value = _get(body, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadInput(f"{key} must be an integer from {lo} to {hi}{why}, got {value!r}")
    return value


def make_request(**fields: Any) -> Request:
    """Request(**fields), its complaints named as the client's fields."""
    try:
        return Request(**fields)
    except FieldError as e:
        raise BadInput(e.for_label(LABELS.get(e.field, e.field))) from None
    except ValueError as e:
        raise BadInput(str(e)) from None


class BodyReader:
    """Builds GenJobs from request bodies for a server's caps, models, styles and settings."""

    def __init__(self, limits: Limits, registry: ModelRegistry, styles: dict[str, Style],
                 settings: dict[str, Any]):
        self.limits, self.registry, self.styles, self.settings = limits, registry, styles, settings
        self.controlnet = UnitReader(registry.controlnet_dir, limits.max_image_pixels)
        self._decoding = threading.BoundedSemaphore(2)  # bounds the memory that image uploads can take at once

    def read(self, body: dict[str, Any], mode: str) -> GenJob:
        lim = self.limits
        warnings: list[str] = []
        prompt, negative = _get(body, "prompt", ""), _get(body, "negative_prompt", "")
        self._check_prompts((("prompt", prompt), ("negative_prompt", negative)))
        styles = list(_get(body, "styles", []))
        try:
            styled_prompt, styled_negative = apply_styles(prompt, negative, styles, self.styles)
        except ValueError as e:
            raise BadInput(str(e)) from None
        styled_prompt = self._tags(body, "prompt", styled_prompt)
        values = {request_field: _get(body, key, default) for key, (request_field, default) in A1111_FIELDS.items()}
        for key, hi in (("steps", lim.max_steps), ("batch_size", lim.max_batch), ("n_iter", lim.max_batch)):
            value = values[key]
            if isinstance(value, int) and not isinstance(value, bool) and value > hi:
                raise BadInput(f"{key} must be at most {hi} on this server, got {value}")
        values["sampler"], values["schedule"] = resolve_sampler(
            _get(body, "sampler_name", None) or _get(body, "sampler_index", None), _get(body, "scheduler", None))
        values["clip_skip"], model, persist = self.settings["CLIP_stop_at_last_layers"], None, {}
        values["tome"] = self.settings.get("token_merging_ratio", 0.0)
        # the refiner's aesthetic scores: they condition a refiner only (the one named here, or a refiner model)
        aesthetic = {field: self.settings[key] for key, field in AESTHETIC_OPTIONS.items()}
        overrides = _get(body, "override_settings", {})
        keep = _get(body, "override_settings_restore_afterwards", True) is False
        for key, value in overrides.items():
            if key == "CLIP_stop_at_last_layers":
                values["clip_skip"] = check_clip_skip(value)
            elif key == "sd_model_checkpoint":
                model = self.registry.find(value).name
            elif key == "token_merging_ratio":
                values["tome"] = check_token_merging(value)
            elif key in AESTHETIC_OPTIONS:
                aesthetic[AESTHETIC_OPTIONS[key]] = check_aesthetic_score(key, value)
            else:
                warnings.append(f"override_settings.{key} ignored")
                continue
            if keep:
                persist[key] = {"CLIP_stop_at_last_layers": values["clip_skip"], "sd_model_checkpoint": model,
                                "token_merging_ratio": values["tome"],
                                **{k: aesthetic[f] for k, f in AESTHETIC_OPTIONS.items()}}[key]
        caps = self.caps(model)
        for key, hi in (("width", caps[0]), ("height", caps[1])):
            value = values[key]
            if isinstance(value, int) and not isinstance(value, bool) and value > hi:
                why = "" if lim.max_width and lim.max_height else " for this model"
                raise BadInput(f"{key} must be at most {hi} on this server{why}, got {value}")
        resize_w = _int(body, "seed_resize_from_w", -1, -1, caps[0])
        resize_h = _int(body, "seed_resize_from_h", -1, -1, caps[1])
        values["seed_resize_from"] = (resize_w, resize_h) if resize_w > 0 and resize_h > 0 else None  # both or none
        refiner = _get(body, "refiner_checkpoint", None)
        if refiner not in (None, "", "None"):  # A1111 sends "None" for no refiner
            values["refiner"] = self.registry.find(refiner).name  # by name only, as models are chosen
            if mode == "img2img":
                raise BadInput("refiner_checkpoint: a refiner continues a txt2img schedule here; img2img with a "
                               "refiner is not supported")
            switch = _get(body, "refiner_switch_at", None)
            values["refiner_switch_at"] = 0.8 if switch is None else switch
            values.update(aesthetic)
        script = scripts.script_name(body, mode)
        script_args = _get(body, "script_args", [])
        if not isinstance(script_args, list):
            raise BadInput("script_args must be a list (the script's values, in A1111's order)")
        for key, note in (("restore_faces", "face restoration"), ("save_images", "saving on the server")):
            if _get(body, key, False):
                warnings.append(f"{key}: {note} is not supported; ignored")
        alwayson = _get(body, "alwayson_scripts", {})
        if not isinstance(alwayson, dict):
            raise BadInput("alwayson_scripts must be an object: {script name: {\"args\": [...]}}")
        if others := [str(k) for k in alwayson if str(k).lower() != "controlnet"]:
            warnings.append("alwayson_scripts ignored: " + ", ".join(others))
        job = GenJob(mode, make_request(prompt=styled_prompt, negative_prompt=styled_negative, **values), prompt,
                     negative, styles, model=model, persist=persist, send_images=bool(_get(body, "send_images", True)),
                     denoising_strength=_get(body, "denoising_strength", None), warnings=warnings,
                     aesthetic=aesthetic, caps=caps)
        if mode == "img2img":
            if _get(body, "enable_hr", False):
                warnings.append("enable_hr: hires fix is a txt2img option; ignored")
            outpaint = None
            if script in (scripts.MK2, scripts.POOR):
                outpaint = scripts.outpaint_plan(script, script_args, _int(body, "inpainting_fill", 0, 0, 3))
                warnings += outpaint.warnings
            if script == scripts.SDU:
                job.upscale = scripts.sd_upscale_plan(script_args)
            self._img2img(body, job, outpaint)
        elif _get(body, "enable_hr", False):
            self._hires(body, job)
        with self._decoding:
            units, prompts = self.controlnet.read(alwayson, job.init[0] if job.init else None, warnings)
        if units or prompts:  # IP-Adapter units arrive as image prompts (server/controlnet.py)
            job.request = make_request(**{**_fields(job.request), "controls": units, "image_prompts": prompts})
        if script == scripts.XYZ:
            job.script = scripts.xyz_plan(script_args, mode, job.request, self.registry, lim.max_batch ** 2, warnings)
        self._check_memory(job)
        return job

    def caps(self, model: str | None) -> tuple[int, int]:
        """The size caps for the model that will run a request (None: the default): the server's, else derived
        from the size it runs at (the loaded model's config, or what another model's file header says)."""
        lim, registry = self.limits, self.registry
        if lim.max_width and lim.max_height:
            return lim.max_width, lim.max_height
        name = model or registry.default_name
        if registry.pipeline is not None and name in (None, getattr(registry.current, "name", None)):
            return lim.caps_for(registry.pipeline.model.config.image_size)
        if name is None:
            return lim.caps_for(DERIVED_CAP_MIN // 2)
        return lim.caps_for(runtime.native_size(registry.find(name).path))

    def _check_memory(self, job: GenJob) -> None:
        """A job that would not fit in the memory available now is a 422 naming what would, not a server killed
        halfway (memory_estimate.py). Checked for the loaded model; another one's config is known once it loads."""
        pipe, req = self.registry.pipeline, job.request
        if pipe is None or job.model not in (None, getattr(self.registry.current, "name", None)):
            return
        width, height = req.hires.output_size(req.width, req.height) if req.hires else (req.width, req.height)
        if why := refusal(pipe.model.config, width, height, req.batch_size, pipe.model.dtype, pipe.model.device,
                          guidance=req.cfg_scale != 1, img2img=job.mode == "img2img",
                          previews=bool(self.settings["live_previews_enable"]), vae_tiling=req.vae_tiling):
            raise BadInput(why)

    def _check_prompts(self, prompts: tuple[tuple[str, str], ...]) -> None:
        for key, text in prompts:
            if not isinstance(text, str):
                raise BadInput(f"{key} must be text")
            if not text.isascii():  # hr_prompt too, which reaches a Request only after the first pass
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise BadInput(f"{key} is not valid text: a lone surrogate U+{ord(text[e.start]):04X} at "
                                   f"character {e.start}") from None
            if len(text) > self.limits.max_prompt_chars:
                raise BadInput(f"{key} has {len(text)} characters; at most {self.limits.max_prompt_chars} are "
                               "accepted")

    @staticmethod
    def _tags(body: dict[str, Any], key: str, prompt: str) -> str:
        """The prompt's <lora:...> tags checked now (a bad weight, too many LoRAs: 422 before queueing); with
        A1111's disable_extra_networks, taken out unapplied. Names are only looked up later, in the LoRA folder."""
        if _get(body, "disable_extra_networks", False):
            return strip_tags(prompt)
        try:
            parse_tags(prompt)
        except FieldError as e:
            raise BadInput(e.for_label(key)) from None
        return prompt

    def _img2img(self, body: dict[str, Any], job: GenJob, outpaint: scripts.OutpaintPlan | None = None) -> None:
        req = job.request
        sources = _get(body, "init_images", [])
        if not isinstance(sources, list) or not sources:
            raise BadInput("init_images must be a list of one or more base64 images")
        if len(sources) > req.batch_size and len(sources) > 1:
            raise BadInput(f"{len(sources)} init_images for batch_size {req.batch_size}: send 1 or at most "
                           "batch_size images")
        mode = _int(body, "resize_mode", 0, 0, 3)
        if mode == 3:
            job.warnings.append("resize_mode 3 (latent upscale) is done in pixel space, as resize_mode 0")
        max_pixels = self.limits.max_image_pixels
        masked = _get(body, "mask", None) is not None or outpaint is not None
        if job.upscale is not None and masked:
            raise BadInput(f"{scripts.SDU}: a mask does not go with it (it repaints the whole upscaled image)")
        with self._decoding:  # one full-size image alive at a time, two requests decoding at a time
            originals = [decode_image(s, f"init_images[{i}]", max_pixels).convert("RGB") for i, s in enumerate(sources)]
            # the originals are needed only for a masked request's paste-back, and for SD upscale (it enlarges them)
            if (not masked or outpaint is not None) and job.upscale is None:
                originals = [resize_image(im, req.width, req.height, mode) for im in originals]
        if job.upscale is not None:
            self._sd_upscale(job, originals)
            return
        if outpaint is not None:
            self._outpaint(body, job, outpaint, originals)
            return
        strength = _get(body, "denoising_strength", 0.75)
        batch = len(sources) if len(sources) > 1 else req.batch_size  # A1111: several init images make the batch
        job.request = make_request(**{**_fields(req), "batch_size": batch, "strength": strength}).a1111_img2img()
        job.denoising_strength = job.request.strength
        if not masked:
            job.init = originals
            return
        blur = _get(body, "mask_blur", None)
        blur_x = _int(body, "mask_blur_x", 4, 0, 64) if blur is None else _int(body, "mask_blur", 4, 0, 64)
        blur_y = _int(body, "mask_blur_y", 4, 0, 64) if blur is None else blur_x
        invert = _int(body, "inpainting_mask_invert", 0, 0, 1) == 1
        with self._decoding:
            mask = prepare_mask(decode_image(body["mask"], "mask", max_pixels), invert, blur_x, blur_y)
        if (note := empty_mask_note(mask)) is not None:
            job.warnings.append(note)
        job.init, job.mask, job.masked = inpaint.plan(
            originals, mask, req.width, req.height, mode, bool(_get(body, "inpaint_full_res", True)),
            _int(body, "inpaint_full_res_padding", 0, 0, 4096), _int(body, "inpainting_fill", 0, 0, 3),
            max(blur_x, blur_y), invert, job.warnings, bool(_get(body, "mask_round", True)))

    def _sd_upscale(self, job: GenJob, originals: list[Image.Image]) -> None:
        """A1111's SD upscale: the first init image (the others are not used, as there), upscaled, then cut into
        tiles of the request's width x height; every check before queueing."""
        from ..sd_upscale import check_plan, upscaled_size

        plan, req = job.upscale, job.request
        assert plan is not None
        if len(originals) > 1:
            job.warnings.append(f"{scripts.SDU}: only the first of {len(originals)} init_images is upscaled")
        width, height = upscaled_size(originals[0].width, originals[0].height, plan.upscaler, plan.scale)
        if width * height > self.limits.max_image_pixels:
            raise BadInput(f"{scripts.SDU}: the upscaled image would be {width}x{height}; at most "
                           f"{self.limits.max_image_pixels} pixels on this server")
        try:
            check_plan(width, height, req.width, req.height, plan.overlap, plan.upscaler)
        except ValueError as e:
            raise BadInput(str(e)) from None
        job.request = make_request(**{**_fields(req), "strength": job.denoising_strength or 0.75}).a1111_img2img()
        job.denoising_strength = job.request.strength
        job.init = originals[:1]

    def _outpaint(self, body: dict[str, Any], job: GenJob, plan: scripts.OutpaintPlan,
                  images: list[Image.Image]) -> None:
        """The outpainting scripts: each init image (at width x height) extended by outpaint.extend, then inpainted
        at the canvas's size (whole picture, as A1111's scripts do); the mask is extend's, already soft."""
        req = job.request
        try:
            extended = [plan.extend(image, req.seed) for image in images]
        except ValueError as e:
            raise BadInput(f"{plan.script}: {e}") from None
        width, height = extended[0][0].size
        if width > job.caps[0] or height > job.caps[1]:
            raise BadInput(f"{plan.script}: the extended image is {width}x{height}; at most {job.caps[0]}x"
                           f"{job.caps[1]} on this server (send a smaller width/height or fewer pixels)")
        strength = _get(body, "denoising_strength", 0.75)
        batch = len(images) if len(images) > 1 else req.batch_size
        job.request = make_request(**{**_fields(req), "width": width, "height": height, "batch_size": batch,
                                      "strength": strength}).a1111_img2img()
        job.denoising_strength = job.request.strength
        job.init, job.mask, job.masked = inpaint.plan(
            [canvas for canvas, _ in extended], extended[0][1], width, height, 0, False, 0, plan.inpainting_fill,
            plan.mask_blur, False, job.warnings, False)

    def _hires(self, body: dict[str, Any], job: GenJob) -> None:
        """enable_hr: the second pass's settings, its size checked against the caps now."""
        lim, req = self.limits, job.request
        values = {hires_field: _get(body, key, default) for key, (hires_field, default) in A1111_HIRES_FIELDS.items()}
        values["steps"] = _int(body, "hr_second_pass_steps", 0, 0, lim.max_steps)
        hr_sampler, hr_scheduler = _get(body, "hr_sampler_name", None), _get(body, "hr_scheduler", None)
        if hr_sampler in ("", "Use same sampler"):
            hr_sampler = None
        if hr_scheduler in ("", "Use same scheduler"):
            hr_scheduler = None
        if hr_sampler is not None or hr_scheduler is not None:
            values["sampler"], values["schedule"] = resolve_sampler(hr_sampler or SAMPLERS[req.sampler].display,
                                                                    hr_scheduler)
        hr_prompt, hr_negative = _get(body, "hr_prompt", ""), _get(body, "hr_negative_prompt", "")
        self._check_prompts((("hr_prompt", hr_prompt), ("hr_negative_prompt", hr_negative)))
        if hr_prompt or hr_negative:  # A1111: an empty one is the first pass's; styles apply to both
            values["prompt"], values["negative_prompt"] = apply_styles(
                hr_prompt or job.prompt, hr_negative or job.negative_prompt, job.styles, self.styles)
            values["prompt"] = self._tags(body, "hr_prompt", values["prompt"])
        if _get(body, "hr_checkpoint_name", None) not in (None, "", "Use same checkpoint"):
            job.warnings.append("hr_checkpoint_name ignored: the second pass uses the first pass's model")
        try:
            hires = HiresFix(**values)
        except (ValueError, TypeError) as e:
            raise BadInput(str(e)) from None
        width, height = hires.output_size(req.width, req.height)
        if width > job.caps[0] or height > job.caps[1]:
            raise BadInput(f"the hires fix makes {width}x{height} images; at most {job.caps[0]}x{job.caps[1]} "
                           "are allowed")
        job.request = make_request(**{**_fields(req), "hires": hires})
        job.denoising_strength = hires.denoising_strength


def _fields(req: Request) -> dict[str, Any]:
    """A Request's fields as keywords, to build a changed one (dataclasses.replace, with A1111's names on error)."""
    return {name: getattr(req, name) for name in req.__dataclass_fields__}


__all__ = ["BodyReader", "GenJob", "Limits", "resolve_sampler", "AUTOMATIC_SCHEDULE"]
