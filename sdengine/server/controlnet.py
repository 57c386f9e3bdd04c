"""ControlNet through the HTTP API, as the sd-webui-controlnet extension shapes it: units in
`alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` of txt2img/img2img, and its /controlnet routes
(model_list, module_list, detect, version). The engine's side is sdengine/control.py.

IP-Adapter arrives as the extension sends it: a unit whose module is one of its `ip-adapter_clip_*` modules (or whose
model is an IP-Adapter file, which sits in the ControlNet folder as in A1111) becomes an image prompt
(sdengine/ip_adapter.py), the unit's weight its scale.

Clients name ControlNets as the extension lists them ("name" or "name [hash]"), found in the server's ControlNet
folder only: a unit's model is resolved here, in the request thread, to that folder's file, so a name can never
reach a path elsewhere (control.resolve_controlnet alone would take any existing path).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ConfigDict

from .. import control, ip_adapter
from .bodies import BodyInThread
from .errors import BadInput
from .images import decode_image, encode_png

# The extension's unit fields that change nothing here: (field, its neutral values)
IGNORED = {"pixel_perfect": (False, None), "processor_res": (-1, 512, 64, None), "low_vram": (False, None),
           "guess_mode": (False, None), "save_detected_map": (True, False, None), "hr_option": ("Both", None)}
NO_MODEL = (None, "", "None", "none")
API_VERSION = 2  # the extension's /controlnet/version
# The extension's IP-Adapter modules (its CLIP image encoders; the encoder here is chosen by the adapter's shapes)
IP_MODULES = ("ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith",
              "ip-adapter_clip_h", "ip-adapter_clip_g")


def folder_names(folder: Path | None) -> list[str]:
    """The folder's ControlNets as the extension lists them: "name [hash]" for files, the name for folders."""
    if folder is None:
        return []
    out = []
    for name in control.list_controlnets(folder):
        path = control.resolve_controlnet(name, folder)
        if path.is_dir() and ip_adapter.encoder_widths(path, load=False):  # an IP-Adapter's image encoder
            continue
        digest = control.short_hash(path)
        out.append(f"{name} [{digest}]" if digest else name)
    return out


def resolve(name: object, folder: Path | None, where: str) -> str:
    """A unit's model name -> the path of that ControlNet in the server's folder (BadInput otherwise)."""
    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"{where}.model must be a ControlNet's name (see /controlnet/model_list)")
    key = re.sub(r"\s*\[[0-9a-fA-F]{6,64}\]$", "", name.strip())
    if not key or re.search(r"[/\\:\x00]", key) or key.startswith("."):
        raise BadInput(f"{where}.model: ControlNets are chosen by name (see /controlnet/model_list); paths are not "
                       "accepted")
    if folder is None or key not in control.list_controlnets(folder):
        known = ", ".join(control.list_controlnets(folder)[:20]) if folder else ""
        raise BadInput(f"{where}.model: no ControlNet {name!r} on this server (available: {known or 'none'})")
    return str(control.resolve_controlnet(key, folder))


def _number(unit: dict, key: str, default: float | None, where: str) -> float | None:
    value = unit.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadInput(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def _threshold(unit: dict, key: str, where: str) -> float | None:
    value = _number(unit, key, None, where)
    return None if value is None or value == -1 else value  # -1: the preprocessor's default, as the extension


class UnitReader:
    """A body's ControlNet units -> ControlUnits, images decoded under the server's caps."""

    def __init__(self, folder: Path | None, max_pixels: int):
        self.folder, self.max_pixels = folder, max_pixels

    def image(self, value: Any, where: str) -> tuple[Image.Image | None, Image.Image | None]:
        """A unit's image field: base64, or {"image": ..., "mask": ...} (the extension's dict) -> (image, mask)."""
        if value is None or value == "":
            return None, None
        if isinstance(value, dict):
            image, _ = self.image(value.get("image"), f"{where}.image")
            mask = value.get("mask")
            return image, decode_image(mask, f"{where}.mask", self.max_pixels).convert("L") if mask else None
        if not isinstance(value, str):
            raise BadInput(f"{where} must be a base64 image or {{\"image\": ..., \"mask\": ...}}")
        return decode_image(value, where, self.max_pixels).convert("RGB"), None

    def units(self, scripts: dict[str, Any], fallback: Image.Image | None, warnings: list[str]
              ) -> tuple[control.ControlUnit, ...]:
        return self.read(scripts, fallback, warnings)[0]

    def read(self, scripts: dict[str, Any], fallback: Image.Image | None, warnings: list[str]
             ) -> tuple[tuple[control.ControlUnit, ...], tuple[ip_adapter.ImagePrompt, ...]]:
        """alwayson_scripts' "controlnet" entry (any case) -> (the enabled ControlNet units, the IP-Adapter units as
        image prompts). `fallback`: img2img's init image, the control image of a unit that sends none (as the
        extension does)."""
        key = next((k for k in scripts if str(k).lower() == "controlnet"), None)
        if key is None:
            return (), ()
        entry = scripts[key]
        args = entry.get("args") if isinstance(entry, dict) else entry
        if args is None:
            return (), ()
        if not isinstance(args, list):
            raise BadInput("alwayson_scripts.controlnet.args must be a list of ControlNet units")
        if len(args) > control.MAX_UNITS:
            raise BadInput(f"at most {control.MAX_UNITS} ControlNet units at once, got {len(args)}")
        out, prompts = [], []
        for i, unit in enumerate(args):
            where = f"alwayson_scripts.controlnet.args[{i}]"
            if not isinstance(unit, dict):
                raise BadInput(f"{where} must be an object (a ControlNet unit)")
            if unit.get("enabled", True) is False:
                continue
            if unit.get("model") in NO_MODEL:
                warnings.append(f"{where}: no model; the unit is skipped")
                continue
            for field, neutral in IGNORED.items():
                if unit.get(field) not in neutral:
                    warnings.append(f"{where}.{field} ignored")
            image, mask = self.image(unit.get("image", unit.get("input_image")), f"{where}.image")
            if unit.get("mask") or unit.get("mask_image"):
                mask = self.image(unit.get("mask") or unit.get("mask_image"), f"{where}.mask")[0].convert("L")
            if image is None:
                if fallback is None:
                    raise BadInput(f"{where}.image: a ControlNet unit needs a control image in txt2img")
                image = fallback
            model = resolve(unit.get("model"), self.folder, where)
            module = str(unit.get("module") or "none").strip().lower()
            if module.startswith("ip-adapter") or ip_adapter.is_adapter(Path(model)):
                prompts.append(self.image_prompt(unit, module, model, image, where, warnings))
                continue
            try:
                out.append(control.ControlUnit(
                    model, image,
                    weight=_number(unit, "weight", 1.0, where), start=_number(unit, "guidance_start", 0.0, where),
                    end=_number(unit, "guidance_end", 1.0, where),
                    mode=unit.get("control_mode") if unit.get("control_mode") is not None else "balanced",
                    preprocess=unit.get("module") or "none",
                    resize=unit.get("resize_mode") if unit.get("resize_mode") is not None else "crop and resize",
                    threshold_a=_threshold(unit, "threshold_a", where),
                    threshold_b=_threshold(unit, "threshold_b", where), mask=mask))
            except control.ControlError as e:
                raise BadInput(f"{where}: {e}") from None
        if len(prompts) > ip_adapter.MAX_ADAPTERS:
            raise BadInput(f"at most {ip_adapter.MAX_ADAPTERS} IP-Adapter units at once, got {len(prompts)}")
        return tuple(out), tuple(prompts)

    def image_prompt(self, unit: dict, module: str, model: str, image: Image.Image, where: str,
                     warnings: list[str]) -> ip_adapter.ImagePrompt:
        """An IP-Adapter unit: its model must be an IP-Adapter and its module one of IP_MODULES (or none)."""
        if module not in (*IP_MODULES, "none"):
            raise BadInput(f"{where}.module {module!r}: an IP-Adapter unit takes one of {', '.join(IP_MODULES)}"
                           + ("" if module.startswith("ip-adapter") else " (its model is an IP-Adapter)"))
        if ip_adapter.is_adapter(Path(model)) is False:
            raise BadInput(f"{where}.model: {Path(model).stem} is a ControlNet, not an IP-Adapter (module {module})")
        if (_number(unit, "guidance_start", 0.0, where), _number(unit, "guidance_end", 1.0, where)) != (0.0, 1.0):
            warnings.append(f"{where}: guidance start/end ignored for an IP-Adapter (it acts on every step)")
        try:
            return ip_adapter.ImagePrompt(model, image, scale=_number(unit, "weight", 1.0, where))
        except ip_adapter.IPAdapterError as e:
            raise BadInput(f"{where}: {e}") from None


class DetectBody(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    controlnet_module: str | None = "none"
    controlnet_input_images: list[str] | None = None
    controlnet_processor_res: int | None = 512
    controlnet_threshold_a: float | None = -1
    controlnet_threshold_b: float | None = -1


def router(folder: Path | None, max_pixels: int, max_images: int = 8) -> APIRouter:
    api = APIRouter(prefix="/controlnet", route_class=BodyInThread)

    @api.get("/version")
    def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @api.get("/model_list")
    def model_list() -> dict[str, Any]:
        return {"model_list": folder_names(folder)}

    @api.get("/module_list")
    def module_list() -> dict[str, Any]:
        return {"module_list": [*control.PREPROCESSORS, *IP_MODULES]}

    @api.post("/detect")
    async def detect(body: DetectBody) -> dict[str, Any]:
        module = (body.controlnet_module or "none").strip().lower()
        module = control.ALIASES.get(module, module)
        if module not in control.PREPROCESSORS:
            raise BadInput(f"unknown controlnet_module {body.controlnet_module!r}; valid: "
                           f"{', '.join(control.PREPROCESSORS)}")
        sources = body.controlnet_input_images or []
        if not sources or len(sources) > max_images:
            raise BadInput(f"controlnet_input_images: 1 to {max_images} base64 images")
        a = None if body.controlnet_threshold_a in (None, -1) else body.controlnet_threshold_a
        b = None if body.controlnet_threshold_b in (None, -1) else body.controlnet_threshold_b

        def work() -> list[str]:  # CPU work: off the event loop
            out = []
            for i, source in enumerate(sources):
                image = decode_image(source, f"controlnet_input_images[{i}]", max_pixels).convert("RGB")
                try:
                    out.append(encode_png(control.preprocess(image, module, a, b)))
                except control.ControlError as e:
                    raise BadInput(str(e)) from None
            return out

        return {"images": await run_in_threadpool(work), "info": "Success"}

    return api
