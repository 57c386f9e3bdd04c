"""A1111's upscaling routes: /sdapi/v1/upscalers, /latent-upscale-modes, /extra-single-image and
/extra-batch-images (the Extras tab's upscale: by a factor or to a size, a second upscaler blended in). The engine's
side is sdengine/upscalers; model upscalers are files in the server's upscalers folder, chosen by name.

An upscale runs on the worker thread like a generation (a model upscaler takes the device, and one job at a time
keeps memory bounded); its output size is checked against the server's pixel cap before it is queued.
"""
from __future__ import annotations

import asyncio
import html
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ConfigDict

from .. import upscalers
from ..hires import LATENT_UPSCALERS
from .bodies import BodyInThread
from .errors import BadInput
from .images import decode_image, encode_png
from .jobs import Job
from .service import Service

# Upscalers that need no model, listed first as A1111 lists them (its scale: 4)
PLAIN = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
ARCHITECTURES = {"RRDBConfig": "ESRGAN", "CompactConfig": "SRVGGNetCompact", "SwinIRConfig": "SwinIR"}
MAX_SCALE = 8.0


class ExtrasBody(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    resize_mode: int | None = 0  # 0: by upscaling_resize, 1: to upscaling_resize_w x _h
    show_extras_results: bool | None = True
    gfpgan_visibility: float | None = 0
    codeformer_visibility: float | None = 0
    codeformer_weight: float | None = 0
    upscaling_resize: float | None = 2
    upscaling_resize_w: int | None = 512
    upscaling_resize_h: int | None = 512
    upscaling_crop: bool | None = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float | None = 0
    upscale_first: bool | None = False


class SingleBody(ExtrasBody):
    image: str = ""


class BatchBody(ExtrasBody):
    imageList: list[dict[str, Any]] | None = None  # noqa: N815 - A1111's field name: [{"data": b64, "name": ...}]


class UpscalerList:
    """The folder's upscalers with their scales, read once per file (by mtime and size): a listing reads headers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scales: dict[Path, tuple[tuple[int, int], int | None, str]] = {}

    def entries(self) -> list[dict[str, Any]]:
        out = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
               for name in PLAIN]
        for name in upscalers.list_upscalers():
            path = upscalers.resolve_upscaler(name)
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            with self._lock:
                cached = self._scales.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    config = upscalers.inspect_upscaler(path)
                    cached = (stamp, config.scale, ARCHITECTURES.get(type(config).__name__, "ESRGAN"))
                except upscalers.UpscalerError:  # listed, but a request naming it gets the error
                    cached = (stamp, None, "unknown")
                with self._lock:
                    self._scales[path] = cached
            out.append({"name": name, "model_name": cached[2], "model_path": None, "model_url": None,
                        "scale": cached[1]})
        return out


def _choice(name: str | None, key: str) -> str:
    """An upscaler name: a plain one or a file in the folder (checked now, a 422 before queueing)."""
    name = name or "None"
    if name in PLAIN:
        return name
    try:
        upscalers.resolve_upscaler(name)
    except upscalers.UpscalerError as e:
        raise BadInput(f"{key}: {e}; or one of {', '.join(PLAIN)}") from None
    return name


class Plan:
    """One extras request checked: how each image is upscaled."""

    def __init__(self, body: ExtrasBody, max_pixels: int):
        self.max_pixels = max_pixels
        self.mode = body.resize_mode or 0
        if self.mode not in (0, 1):
            raise BadInput(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x h), "
                           f"got {self.mode}")
        self.scale = float(body.upscaling_resize if body.upscaling_resize is not None else 2)
        if not 1.0 <= self.scale <= MAX_SCALE:
            raise BadInput(f"upscaling_resize must be from 1 to {MAX_SCALE:g}, got {self.scale:g}")
        self.size = (body.upscaling_resize_w or 512, body.upscaling_resize_h or 512)
        if self.mode == 1 and not all(8 <= v <= 16384 for v in self.size):
            raise BadInput("upscaling_resize_w and _h must be from 8 to 16384")
        self.crop = body.upscaling_crop is not False
        self.first = _choice(body.upscaler_1, "upscaler_1")
        self.second = _choice(body.upscaler_2, "upscaler_2")
        self.visibility = float(body.extras_upscaler_2_visibility or 0)
        if not 0.0 <= self.visibility <= 1.0:
            raise BadInput("extras_upscaler_2_visibility must be from 0 to 1")

    def factor(self, image: Image.Image) -> float:
        if self.mode == 0:
            return self.scale
        return max(self.size[0] / image.width, self.size[1] / image.height)

    def check(self, image: Image.Image, what: str) -> None:
        w, h = upscalers.target_size(image.width, image.height, self.factor(image))
        if w * h > self.max_pixels:
            raise BadInput(f"{what}: upscaling {image.width}x{image.height} makes {w}x{h}; at most {self.max_pixels} "
                           "pixels on this server")

    def _one(self, image: Image.Image, name: str, factor: float, device: Any, dtype: Any) -> Image.Image:
        if name == "None":
            return image
        size = upscalers.target_size(image.width, image.height, factor)
        if name in PLAIN:
            return image.resize(size, PLAIN[name])
        up = upscalers.load_by_name(name, device=device, dtype=dtype)
        return upscalers.upscale_image(image, up, factor)

    def run(self, image: Image.Image, device: Any, dtype: Any) -> Image.Image:
        """Worker thread: upscaler_1, upscaler_2 blended in by its visibility, then the crop to size (mode 1)."""
        image = image.convert("RGB")
        factor = self.factor(image)
        out = self._one(image, self.first, factor, device, dtype)
        if self.second != "None" and self.visibility > 0:
            other = self._one(image, self.second, factor, device, dtype)
            if other.size != out.size:
                other = other.resize(out.size, Image.Resampling.LANCZOS)
            out = Image.blend(out, other, self.visibility)
        if self.mode == 1 and self.crop and out.size != self.size:
            w, h = self.size
            left, top = (out.width - w) // 2, (out.height - h) // 2
            out = out.crop((left, top, left + w, top + h))
        return out

    def info(self, image: Image.Image) -> str:
        """A1111's html_info: the postprocessing parameters."""
        parts = [f"Postprocess upscale by: {self.factor(image):g}" if self.mode == 0 else
                 f"Postprocess upscale to: {self.size[0]}x{self.size[1]}", f"Postprocess upscaler: {self.first}"]
        if self.second != "None" and self.visibility > 0:
            parts += [f"Postprocess upscaler 2: {self.second}", f"Postprocess upscaler 2 visibility: "
                      f"{self.visibility:g}"]
        return "<p>" + html.escape(", ".join(parts)) + "</p>"


async def upscale(service: Service, plan: Plan, images: list[Image.Image]) -> list[Image.Image]:
    def work(job: Job) -> list[Image.Image]:
        registry = service.worker_registry(job)  # the device of the worker that runs it
        try:
            return [plan.run(im, registry.device, registry.dtype) for im in images]
        except upscalers.UpscalerError as e:  # a file that does not load: the request's, a 422
            raise BadInput(str(e)) from None

    job = service.queue.submit(Job("extras", work, ephemeral=True))
    return await asyncio.wrap_future(job.future)


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", route_class=BodyInThread)
    listing = UpscalerList()
    max_pixels = service.limits.max_image_pixels

    @api.get("/upscalers")
    def list_upscalers() -> list[dict[str, Any]]:
        return listing.entries()

    @api.get("/latent-upscale-modes")
    def latent_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @api.post("/extra-single-image")
    async def single(body: SingleBody) -> dict[str, Any]:
        plan = Plan(body, max_pixels)

        def read() -> Image.Image:
            image = decode_image(body.image, "image", max_pixels)
            plan.check(image, "image")
            return image

        image = await run_in_threadpool(read)
        out = (await upscale(service, plan, [image]))[0]
        return {"html_info": plan.info(image), "image": await run_in_threadpool(encode_png, out)}

    @api.post("/extra-batch-images")
    async def batch(body: BatchBody) -> dict[str, Any]:
        plan = Plan(body, max_pixels)
        items = body.imageList or []
        if not items or len(items) > service.limits.max_batch:
            raise BadInput(f"imageList: 1 to {service.limits.max_batch} images ({{\"data\": base64, \"name\": ...}})")

        def read() -> list[Image.Image]:
            out = []
            for i, item in enumerate(items):
                image = decode_image(item.get("data") if isinstance(item, dict) else None, f"imageList[{i}].data",
                                     max_pixels)
                plan.check(image, f"imageList[{i}]")
                out.append(image)
            return out

        images = await run_in_threadpool(read)
        outs = await upscale(service, plan, images)
        encoded = await run_in_threadpool(lambda: [encode_png(im) for im in outs])
        return {"html_info": plan.info(images[0]), "images": encoded}

    return api
