"""AUTOMATIC1111-compatible routes under /sdapi/v1: the same request fields, defaults and response shapes.

Every field A1111 accepts is accepted (unknown extra fields too); the ones we do not implement are ignored and
named in info["warnings"]. Fields are optional and null means the default, as clients often send nulls.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import A1111_SCHEDULERS, SCHEDULE_LABELS
from ..metadata import parse_parameters
from .bodies import BodyInThread
from .errors import BadInput, json_safe
from .images import decode_image
from .jobs import Job
from .samplers import AESTHETIC_OPTIONS, AUTOMATIC_SCHEDULE, check_aesthetic_score, check_clip_skip, check_token_merging
from .scripts import AXIS_OPTIONS, MK2, POOR, SCRIPTS, XYZ
from .service import Service

TASK_ID = re.compile(r"^[A-Za-z0-9_\-()]{1,64}$")


class Txt2ImgBody(BaseModel):
    # Unknown fields are accepted (clients send A1111's newer ones) but never echoed; NaN/Infinity (and 1e400,
    # which JSON parsing makes infinite) in a number field are a 422 naming the field.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    infotext: str | None = None


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] | None = None
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False
    denoising_strength: float | None = 0.75


class PNGInfoBody(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    image: str


# Options a client may set: none of them names a path, a folder or anything outside the server's models.
SETTABLE = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "live_previews_enable",
            "show_progress_every_n_steps", "samples_format", "token_merging_ratio", *AESTHETIC_OPTIONS)


# Fields that take any JSON: echoed shortened (json_safe), as a client may put anything of any size there.
FREE_FORM = ("override_settings", "comments", "script_args", "alwayson_scripts")


def echo(body: BaseModel) -> dict[str, Any]:
    """The request as A1111 echoes it in "parameters": the known fields only (unknown extras are dropped, as
    A1111's own models drop them), init images and mask left out unless asked for, made JSON-safe."""
    params = body.model_dump(exclude=set(body.model_extra or ()))
    if "init_images" in params and not params.get("include_init_images"):
        params["init_images"], params["mask"] = None, None
    return {k: json_safe(v, 200 if k in FREE_FORM else None) for k, v in params.items()}


async def submit(service: Service, mode: str, data: dict[str, Any], ephemeral: bool = False,
                 echo: dict[str, Any] | None = None) -> Job:
    """Read the body (in a worker thread: image decoding is CPU work) and queue the job."""
    gen = await run_in_threadpool(service.read, data, mode)
    job = Job(mode, gen, ephemeral=ephemeral, echo=echo)
    task_id = data.get("force_task_id")
    if task_id and TASK_ID.match(task_id) and service.queue.get(task_id) is None:
        job.id = task_id
    return service.queue.submit(job)


async def generate(service: Service, mode: str, body: Txt2ImgBody) -> JSONResponse:
    job = await submit(service, mode, body.model_dump(), ephemeral=True)
    result = await asyncio.wrap_future(job.future)  # failures reach the app's handlers (server/errors.py)
    return JSONResponse({"images": result["images"], "parameters": echo(body), "info": result["info"]})


def _arg(label: str | None, value: Any, choices: list[str] | None = None, **limits: Any) -> dict[str, Any]:
    return {"label": label, "value": value, "minimum": limits.get("minimum"), "maximum": limits.get("maximum"),
            "step": limits.get("step"), "choices": choices}


def script_args_info(name: str, mode: str) -> list[dict[str, Any]]:
    """A1111's /sdapi/v1/script-info args of a script (A1111 1.10's ui() order): what script_args carries. The
    X/Y/Z axis types are indices into `choices` (every A1111 axis; those sdengine cannot plot are a 422)."""
    if name == XYZ:
        axes = []
        for axis, default in zip("XYZ", (1, 0, 0)):
            axes += [_arg(f"{axis} type", default, AXIS_OPTIONS[mode]), _arg(f"{axis} values", ""),
                     _arg(f"{axis} values", [])]
        return [*axes, _arg("Draw legend", True), _arg("Include Sub Images", False),
                _arg("Include Sub Grids", False), _arg("Keep -1 for seeds", False), _arg("Vary seeds for X", False),
                _arg("Vary seeds for Y", False), _arg("Vary seeds for Z", False),
                _arg("Grid margins (px)", 0, minimum=0, maximum=500, step=2),
                _arg("Use text inputs instead of dropdowns", False)]
    directions = ["left", "right", "up", "down"]
    if name == MK2:
        return [_arg(None, None), _arg("Pixels to expand", 128, minimum=8, maximum=256, step=8),
                _arg("Mask blur", 8, minimum=0, maximum=64, step=1),
                _arg("Outpainting direction", directions, directions),
                _arg("Fall-off exponent (lower=higher detail)", 1.0, minimum=0.0, maximum=4.0, step=0.01),
                _arg("Color variation", 0.05, minimum=0.0, maximum=1.0, step=0.01)]
    if name == POOR:
        return [_arg("Pixels to expand", 128, minimum=8, maximum=256, step=8),
                _arg("Mask blur", 4, minimum=0, maximum=64, step=1),
                _arg("Masked content", 1, ["fill", "original", "latent noise", "latent nothing"]),
                _arg("Outpainting direction", directions, directions)]
    return []


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", route_class=BodyInThread)

    @api.post("/txt2img")
    async def txt2img(body: Txt2ImgBody) -> JSONResponse:
        return await generate(service, "txt2img", body)

    @api.post("/img2img")
    async def img2img(body: Img2ImgBody) -> JSONResponse:
        return await generate(service, "img2img", body)

    @api.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.display, "aliases": [*s.aliases, s.name],
                 "options": {"scheduler": AUTOMATIC_SCHEDULE[s.name]} if s.name in AUTOMATIC_SCHEDULE else {}}
                for s in SAMPLERS.values()]

    @api.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": name, "label": SCHEDULE_LABELS.get(name, name.capitalize()), "aliases": None,
                 "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False}
                for name in ("automatic", *A1111_SCHEDULERS)]

    @api.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [service.registry.describe(e) for e in service.registry.entries()]

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        return None  # the folder is read on every listing: nothing is cached to refresh

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:  # A1111's Lora extension: name, alias, path (the server's), metadata
        return service.loras()

    @api.post("/refresh-loras")
    def refresh_loras() -> None:
        service.registry.loras.refresh()  # the folder is listed again when next asked; files are read when used
        return None

    @api.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        return service.embeddings()

    @api.post("/refresh-embeddings")
    async def refresh_embeddings() -> None:
        # queued, as A1111 takes its queue lock: the loaded model's embeddings never change under a running job
        job = service.queue.submit(Job("refresh", None, ephemeral=True))
        await asyncio.wrap_future(job.future)
        return None

    @api.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, str]]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in service.styles.values()]

    @api.get("/scripts")
    def scripts() -> dict[str, list[str]]:  # clients ask at start which scripts exist (webuiapi does)
        return {mode: list(names) for mode, names in SCRIPTS.items()}

    @api.get("/script-info")
    def script_info() -> list[dict[str, Any]]:  # each script's script_args, in order, as A1111 describes them
        return [{"name": name, "is_alwayson": False, "is_img2img": mode == "img2img",
                 "args": script_args_info(name, mode)} for mode, names in SCRIPTS.items() for name in names]

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        reg = service.registry
        # the selected checkpoint, as A1111 reports it: the one the next job runs (a job's override_settings that
        # restore afterwards, or another device's worker, may have loaded another since)
        name = reg.default_name or (reg.current.name if reg.current else None)
        title, sha = None, None
        if name is not None:
            try:
                described = reg.describe(reg.find(name))
                title, sha = described["title"], described["sha256"]
            except BadInput:  # the file went away since
                title = name
        # ours: the loaded model's training size, the web page's default width and height (the shipped model: 64),
        # and its UNet context width, which the page matches against each LoRA's sdengine_context_dim
        config = reg.pipeline.model.config if reg.pipeline is not None else None
        size, context = (config.image_size, config.unet.context_dim) if config is not None else (None, None)
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": sha, "sd_vae": "Automatic",
                "samples_format": "png", "eta_noise_seed_delta": 0, "sdengine_image_size": size,
                "sdengine_context_dim": context, **service.settings}

    @api.post("/options")
    async def set_options(body: dict[str, Any]) -> Any:
        changes: dict[str, Any] = {}
        for key, value in body.items():  # everything checked before anything changes
            if key not in SETTABLE:
                names_a_path = re.search(r"dir|path|folder|file", key, re.IGNORECASE)
                why = "paths and folders are never settable" if names_a_path else f"settable: {', '.join(SETTABLE)}"
                raise BadInput(f"option {key!r} cannot be set through the API ({why})")
            if key == "sd_model_checkpoint":
                changes[key] = service.registry.find(value).name
            elif key == "CLIP_stop_at_last_layers":
                changes[key] = check_clip_skip(value)
            elif key == "sd_vae" and value not in ("Automatic", "None"):
                raise BadInput("sd_vae: only 'Automatic' or 'None' (the checkpoint's own VAE)")
            elif key == "samples_format" and value != "png":
                raise BadInput("samples_format: only 'png'")
            elif key == "live_previews_enable" and not isinstance(value, bool):
                raise BadInput("live_previews_enable must be true or false")
            elif key == "show_progress_every_n_steps" and (isinstance(value, bool) or not isinstance(value, int)
                                                            or not -1 <= value <= 10000):
                raise BadInput("show_progress_every_n_steps must be an integer from -1 to 10000 (-1, 0: no live "
                               "preview)")
            elif key == "token_merging_ratio":
                changes[key] = check_token_merging(value)
            elif key in AESTHETIC_OPTIONS:
                changes[key] = check_aesthetic_score(key, value)
            if key in ("live_previews_enable", "show_progress_every_n_steps"):  # read by Service.progress/preview
                changes[key] = value
        if "sd_model_checkpoint" in changes:  # queued like a job: it waits for the jobs before it
            job = service.queue.submit(Job("load", changes.pop("sd_model_checkpoint")))
            await asyncio.wrap_future(job.future)
        service.settings.update({k: v for k, v in changes.items() if k in service.settings})
        return None

    @api.get("/progress")
    def progress(skip_current_image: bool = Query(False)) -> dict[str, Any]:
        return service.progress(skip_current_image)

    @api.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        job = service.queue.interrupt()
        return {"interrupted": job.id if job else None}

    @api.post("/skip")
    def skip() -> dict[str, Any]:
        job = service.queue.skip()
        return {"skipped": job.id if job else None}

    @api.post("/png-info")
    def png_info(body: PNGInfoBody) -> Any:
        image = decode_image(body.image, "image", service.limits.max_image_pixels)
        items = {k: v for k, v in (image.info or {}).items() if isinstance(v, (str, int, float))}
        text = items.pop("parameters", None) or ""
        return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}

    return api
