"""The generation service behind the routes: models by name, requests checked against the serve caps, and the
job runner (n_iter batches, progress, previews, interrupt/skip/cancel).

Clients name models; paths stay on the server. Every check that can fail on the client's input runs when the
request arrives (BadInput -> 422), so the queue only holds jobs that can run.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import __version__
from ..diffusion.samplers import SAMPLERS, get_sampler
from ..diffusion.schedule import SCHEDULE_LABELS
from ..generate_cli import list_models
from ..hires import HiresFix, hires_pass
from ..img2img_steps import a1111_img2img_steps
from ..pipeline import Pipeline, Request, image_to_tensor, mask_to_tensor
from ..prompts import Style, apply_styles
from . import inpaint
from .images import BadInput, decode_image, encode_png, prepare_mask, resize_image
from .jobs import Job, JobQueue, StopSampling

# A1111's "automatic" scheduler: what each sampler's options name (sd_samplers_kdiffusion), else the plain one.
AUTOMATIC_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential"}
# A1111 scheduler names and labels -> ours. A1111's "uniform" spaces timesteps evenly, as our "normal" does.
SCHEDULER_NAMES = {"karras": "karras", "exponential": "exponential", "normal": "normal", "uniform": "normal"}
MAX_SEED = 2 ** 64 - 64
MAX_CLIP_SKIP = 12


class ModelLoadError(RuntimeError):
    """A listed model that failed to load: the server's problem, not the request's (HTTP 500)."""


@dataclass(frozen=True)
class Limits:
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_batch: int = 8  # caps batch_size, and n_iter too
    max_prompt_chars: int = 4000
    queue_size: int = 16
    max_body_bytes: int = 64 << 20

    @property
    def max_image_pixels(self) -> int:
        """Init images may be larger than the output (they are resized), within reason."""
        return 16 * self.max_width * self.max_height


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the file or folder name: all a client ever sees
    path: Path

    @property
    def stem(self) -> str:
        return Path(self.name).stem if self.path.is_file() else self.name


class ModelRegistry:
    """The models a client may choose (the models folder, plus the --model file) and the one loaded now."""

    def __init__(self, folder: Path | None, pinned: Path | None, device: torch.device, dtype: torch.dtype,
                 compile: bool = False):
        self.folder, self.pinned, self.device, self.dtype = folder, pinned, device, dtype
        self.compile = compile  # compile each loaded model's UNet (sdengine serve --compile)
        self.default_name: str | None = None  # sd_model_checkpoint
        self.current: ModelEntry | None = None
        self.pipeline: Pipeline | None = None
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}

    def entries(self) -> list[ModelEntry]:
        found = [ModelEntry(p.name, p) for p in list_models(self.folder)] if self.folder else []
        if self.pinned is not None and all(e.path.resolve() != self.pinned.resolve() for e in found):
            found.insert(0, ModelEntry(self.pinned.name, self.pinned))
        return found

    def find(self, name: object) -> ModelEntry:
        """By file name, stem or A1111 title ("name.safetensors [hash]"); never by path."""
        if not isinstance(name, str) or not name.strip():
            raise BadInput("a model is chosen by a non-empty name (see /sdapi/v1/sd-models)")
        key = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", name.strip())
        if "/" in key or "\\" in key or key.startswith(".") or ":" in key:
            raise BadInput("models are chosen by name (see /sdapi/v1/sd-models); paths are not accepted")
        entries = self.entries()
        for e in entries:
            if key in (e.name, e.stem):
                return e
        raise BadInput(f"no model named {name!r}; available: {', '.join(e.name for e in entries) or 'none'}")

    def sha256(self, entry: ModelEntry, compute: bool = False) -> str | None:
        """Cached by size and mtime; computed only when a model loads (as A1111 does), since files are GBs."""
        if not entry.path.is_file():
            return None
        st = entry.path.stat()
        key = (st.st_size, st.st_mtime_ns)
        cached = self._hashes.get(entry.path)
        if cached and cached[0] == key:
            return cached[1]
        if not compute:
            return None
        h = hashlib.sha256()
        with open(entry.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self._hashes[entry.path] = (key, h.hexdigest())
        return h.hexdigest()

    def describe(self, entry: ModelEntry) -> dict[str, Any]:
        sha = self.sha256(entry)
        short = sha[:10] if sha else None
        return {"title": f"{entry.name} [{short}]" if short else entry.name, "model_name": entry.stem,
                "hash": short, "sha256": sha, "filename": entry.name, "config": None}

    def ensure(self, name: str | None) -> tuple[Pipeline, ModelEntry]:
        """The pipeline for `name` (None: the default), loading it if needed. Worker thread only."""
        if name is None and self.default_name is None:
            raise BadInput("no model is loaded; choose one with sd_model_checkpoint (see /sdapi/v1/sd-models)")
        entry = self.find(name if name is not None else self.default_name)
        if self.current is not None and self.pipeline is not None and self.current.path == entry.path:
            return self.pipeline, entry
        # Drop the old model first: two checkpoints need not fit in memory together.
        self.pipeline = self.current = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        from ..weights import load

        try:
            model = load(entry.path, device=self.device, dtype=self.dtype)
            sha = self.sha256(entry, compute=True)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported as the model's
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(f"model {entry.name} could not be loaded: {first}") from None
        if self.compile:
            from ..compile import compile_unet

            compile_unet(model)
        pipe = Pipeline(model)
        pipe._model_hash = sha[:10] if sha else None  # already read the file once; don't read it again
        self.pipeline, self.current = pipe, entry
        return pipe, entry


@dataclass
class GenSpec:
    """A validated generation request: what the worker runs and what the response reports."""

    mode: str
    prompt: str  # as sent
    negative_prompt: str
    styled_prompt: str  # with styles applied: what is generated
    styled_negative: str
    styles: list[str]
    sampler: str  # CLI name
    schedule: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    n_iter: int
    seed: int
    subseed: int
    subseed_strength: float
    clip_skip: int
    seed_resize_from: tuple[int, int] | None = None  # (width, height)
    tiling: bool = False
    hires: HiresFix | None = None  # txt2img's enable_hr: the second pass
    strength: float = 1.0
    denoising_strength: float | None = None
    denoise_steps: int | None = None  # img2img: A1111's step count (a1111_img2img_steps)
    init: list[Image.Image] | None = None  # already resized to width x height
    mask: Image.Image | None = None
    masked: inpaint.MaskedPlan | None = None  # a masked request's crop, fill and paste-back (server/inpaint.py)
    model: str | None = None  # entry name; None: the default
    persist: dict[str, Any] = field(default_factory=dict)  # settings kept after the job (restore_afterwards=False)
    send_images: bool = True
    warnings: list[str] = field(default_factory=list)

    def request(self, n: int) -> Request:
        """Batch n of n_iter: seeds (variation seeds, if any) continue from the previous batch, as A1111's do."""
        first = self.seed + (0 if self.subseed_strength else n * self.batch_size)
        return Request(self.styled_prompt, self.styled_negative, self.steps, self.sampler, self.schedule, None,
                       self.cfg_scale, first, self.width, self.height, self.batch_size,
                       self.clip_skip, self.strength, self.subseed + n * self.batch_size, self.subseed_strength,
                       self.seed_resize_from, self.tiling, self.denoise_steps)


def _get(body: dict, key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _int(body: dict, key: str, default: int, lo: int, hi: int, why: str = "") -> int:
    value = _get(body, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadInput(f"{key} must be an integer from {lo} to {hi}{why}, got {value!r}")
    return value


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str, str]:
    """A1111 sampler (display name, alias, or old-style "DPM++ 2M Karras") + scheduler -> (sampler, schedule)."""
    name = (name or "Euler").strip()
    from_name = None
    try:
        spec = get_sampler(name)
    except ValueError:
        spec = None
        for suffix in ("karras", "exponential"):  # before A1111 1.9 the schedule was part of the name
            if name.lower().endswith(" " + suffix):
                try:
                    spec, from_name = get_sampler(name[: -len(suffix) - 1]), suffix
                except ValueError:
                    pass
        if spec is None:
            raise BadInput(f"unknown sampler {name!r}; valid: "
                           + ", ".join(s.display for s in SAMPLERS.values())) from None
    key = (scheduler or "automatic").strip().lower()
    if key == "automatic":
        return spec.name, from_name or AUTOMATIC_SCHEDULE.get(spec.name, "normal")
    if key not in SCHEDULER_NAMES:
        raise BadInput(f"unknown scheduler {scheduler!r}; valid: automatic, {', '.join(SCHEDULER_NAMES)}")
    return spec.name, SCHEDULER_NAMES[key]


class Service:
    """Everything the routes share: caps, models, settings, styles and the queue with its runner."""

    def __init__(self, registry: ModelRegistry, limits: Limits, styles: dict[str, Style], threads: int | None = None):
        self.registry, self.limits, self.styles, self.threads = registry, limits, styles, threads
        # A1111's defaults; a preview is a full VAE decode, hence one every 10 steps at most
        self.settings: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "live_previews_enable": True,
                                         "show_progress_every_n_steps": 10}
        self.queue = JobQueue(self.run, max_waiting=limits.queue_size)
        self._preview_lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(2)  # bounds the memory that image uploads can take at once
        self._preview_cache: tuple[str, int, str | None] = ("", -1, None)

    # --- requests -> specs (request threads) -------------------------------------------------------------

    def build_spec(self, body: dict[str, Any], mode: str) -> GenSpec:
        lim = self.limits
        warnings: list[str] = []
        prompt, negative = _get(body, "prompt", ""), _get(body, "negative_prompt", "")
        for key, text in (("prompt", prompt), ("negative_prompt", negative)):
            if len(text) > lim.max_prompt_chars:
                raise BadInput(f"{key} has {len(text)} characters; at most {lim.max_prompt_chars} are accepted")
        styles = list(_get(body, "styles", []))
        try:
            styled_prompt, styled_negative = apply_styles(prompt, negative, styles, self.styles)
        except ValueError as e:
            raise BadInput(str(e)) from None
        width = _int(body, "width", 512, 8, lim.max_width)
        height = _int(body, "height", 512, 8, lim.max_height)
        for key, value in (("width", width), ("height", height)):
            if value % 8:
                raise BadInput(f"{key} must be a multiple of 8, got {value}")
        steps = _int(body, "steps", 50, 1, lim.max_steps)
        batch_size = _int(body, "batch_size", 1, 1, lim.max_batch)
        n_iter = _int(body, "n_iter", 1, 1, lim.max_batch, " (capped like batch_size)")
        cfg_scale = _get(body, "cfg_scale", 7.0)
        if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or not 0 <= cfg_scale <= 100:
            raise BadInput(f"cfg_scale must be a number from 0 to 100, got {cfg_scale!r}")
        seed = _int(body, "seed", -1, -1, MAX_SEED)
        seed = random.randrange(4294967294) if seed == -1 else seed
        subseed = _int(body, "subseed", -1, -1, MAX_SEED)
        subseed = random.randrange(4294967294) if subseed == -1 else subseed
        for name, value in (("seed", seed), ("subseed", subseed)):
            if value + batch_size * n_iter > MAX_SEED:
                raise BadInput(f"{name} {value} + {batch_size * n_iter} images runs past the largest seed {MAX_SEED}")
        subseed_strength = _get(body, "subseed_strength", 0)
        if not isinstance(subseed_strength, (int, float)) or not 0 <= subseed_strength <= 1:
            raise BadInput(f"subseed_strength must be a number from 0 to 1, got {subseed_strength!r}")
        resize_w = _int(body, "seed_resize_from_w", -1, -1, lim.max_width)
        resize_h = _int(body, "seed_resize_from_h", -1, -1, lim.max_height)
        seed_resize_from = (resize_w, resize_h) if resize_w > 0 and resize_h > 0 else None  # A1111: both or none
        sampler, schedule = resolve_sampler(_get(body, "sampler_name", None) or _get(body, "sampler_index", None),
                                            _get(body, "scheduler", None))

        clip_skip, model, persist = self.settings["CLIP_stop_at_last_layers"], None, {}
        overrides = _get(body, "override_settings", {})
        keep = _get(body, "override_settings_restore_afterwards", True) is False
        for key, value in overrides.items():
            if key == "CLIP_stop_at_last_layers":
                clip_skip = self.check_clip_skip(value)
            elif key == "sd_model_checkpoint":
                model = self.registry.find(value).name
            else:
                warnings.append(f"override_settings.{key} ignored")
                continue
            if keep:
                persist[key] = clip_skip if key == "CLIP_stop_at_last_layers" else model
        if _get(body, "script_name", None):
            raise BadInput(f"scripts are not supported (script_name {body['script_name']!r})")
        for key, note in (("restore_faces", "face restoration"), ("save_images", "saving on the server")):
            if _get(body, key, False):
                warnings.append(f"{key}: {note} is not supported; ignored")
        if _get(body, "alwayson_scripts", {}):
            warnings.append("alwayson_scripts ignored: " + ", ".join(map(str, body["alwayson_scripts"])))

        spec = GenSpec(mode, prompt, negative, styled_prompt, styled_negative, styles, sampler, schedule, steps,
                       float(cfg_scale), width, height, batch_size, n_iter, seed, subseed, float(subseed_strength),
                       clip_skip, seed_resize_from, bool(_get(body, "tiling", False)),
                       denoising_strength=_get(body, "denoising_strength", None), model=model, persist=persist,
                       send_images=bool(_get(body, "send_images", True)), warnings=warnings)
        if mode == "img2img":
            if _get(body, "enable_hr", False):
                warnings.append("enable_hr: hires fix is a txt2img option; ignored")
            self._img2img(body, spec)
        elif _get(body, "enable_hr", False):
            self._hires(body, spec)
        try:
            spec.request(0)  # anything the engine itself refuses, refused now
        except ValueError as e:
            raise BadInput(str(e)) from None
        return spec

    def _img2img(self, body: dict[str, Any], spec: GenSpec) -> None:
        sources = _get(body, "init_images", [])
        if not isinstance(sources, list) or not sources:
            raise BadInput("init_images must be a list of one or more base64 images")
        if len(sources) > spec.batch_size and len(sources) > 1:
            raise BadInput(f"{len(sources)} init_images for batch_size {spec.batch_size}: send 1 or at most "
                           "batch_size images")
        mode = _int(body, "resize_mode", 0, 0, 3)
        if mode == 3:
            spec.warnings.append("resize_mode 3 (latent upscale) is done in pixel space, as resize_mode 0")
        max_pixels = self.limits.max_image_pixels
        masked = _get(body, "mask", None) is not None
        with self._decoding:  # one full-size image alive at a time, two requests decoding at a time
            originals = [decode_image(s, f"init_images[{i}]", max_pixels).convert("RGB") for i, s in enumerate(sources)]
            if not masked:  # the originals are needed only for a masked request's paste-back
                originals = [resize_image(im, spec.width, spec.height, mode) for im in originals]
        if len(sources) > 1:  # A1111: several init images make the batch, one per image
            spec.batch_size = len(sources)
        strength = _get(body, "denoising_strength", 0.75)
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise BadInput(f"denoising_strength must be in (0, 1] for img2img, got {strength!r}")
        spec.strength = spec.denoising_strength = float(strength)
        spec.denoise_steps = a1111_img2img_steps(spec.steps, spec.strength, spec.sampler)[1]
        if not masked:
            spec.init = originals
            return
        blur = _get(body, "mask_blur", None)
        blur_x = _int(body, "mask_blur_x", 4, 0, 64) if blur is None else _int(body, "mask_blur", 4, 0, 64)
        blur_y = _int(body, "mask_blur_y", 4, 0, 64) if blur is None else blur_x
        invert = _int(body, "inpainting_mask_invert", 0, 0, 1) == 1
        with self._decoding:
            mask = prepare_mask(decode_image(body["mask"], "mask", max_pixels), invert, blur_x, blur_y)
        spec.init, spec.mask, spec.masked = inpaint.plan(
            originals, mask, spec.width, spec.height, mode, bool(_get(body, "inpaint_full_res", True)),
            _int(body, "inpaint_full_res_padding", 0, 0, 4096), _int(body, "inpainting_fill", 0, 0, 3),
            max(blur_x, blur_y), invert, spec.warnings, bool(_get(body, "mask_round", True)))

    def _hires(self, body: dict[str, Any], spec: GenSpec) -> None:
        """enable_hr: the second pass's settings, its size checked against the caps now."""
        lim = self.limits
        scale = _get(body, "hr_scale", 2.0)
        strength = _get(body, "denoising_strength", 0.75)  # A1111's txt2img default
        for key, value in (("hr_scale", scale), ("denoising_strength", strength)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInput(f"{key} must be a number, got {value!r}")
        sampler = schedule = None
        hr_sampler, hr_scheduler = _get(body, "hr_sampler_name", None), _get(body, "hr_scheduler", None)
        if hr_sampler in ("", "Use same sampler"):
            hr_sampler = None
        if hr_scheduler in ("", "Use same scheduler"):
            hr_scheduler = None
        if hr_sampler is not None or hr_scheduler is not None:
            sampler, schedule = resolve_sampler(hr_sampler or SAMPLERS[spec.sampler].display, hr_scheduler)
        hr_prompt, hr_negative = _get(body, "hr_prompt", ""), _get(body, "hr_negative_prompt", "")
        for key, text in (("hr_prompt", hr_prompt), ("hr_negative_prompt", hr_negative)):
            if len(text) > lim.max_prompt_chars:
                raise BadInput(f"{key} has {len(text)} characters; at most {lim.max_prompt_chars} are accepted")
        if hr_prompt or hr_negative:  # A1111: an empty one is the first pass's; styles apply to both
            hr_prompt, hr_negative = apply_styles(hr_prompt or spec.prompt, hr_negative or spec.negative_prompt,
                                                  spec.styles, self.styles)
        if _get(body, "hr_checkpoint_name", None) not in (None, "", "Use same checkpoint"):
            spec.warnings.append("hr_checkpoint_name ignored: the second pass uses the first pass's model")
        try:
            hires = HiresFix(float(scale), _int(body, "hr_resize_x", 0, 0, lim.max_width),
                             _int(body, "hr_resize_y", 0, 0, lim.max_height), _get(body, "hr_upscaler", None),
                             _int(body, "hr_second_pass_steps", 0, 0, lim.max_steps), float(strength), sampler,
                             schedule, hr_prompt or None, hr_negative or None)
        except ValueError as e:
            raise BadInput(str(e)) from None
        width, height = hires.output_size(spec.width, spec.height)
        if width > lim.max_width or height > lim.max_height:
            raise BadInput(f"the hires fix makes {width}x{height} images; at most {lim.max_width}x{lim.max_height} "
                           "are allowed")
        if width < 8 or height < 8:
            raise BadInput(f"the hires fix would make {width}x{height} images")
        spec.hires, spec.denoising_strength = hires, hires.denoising_strength

    def check_clip_skip(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLIP_SKIP:
            raise BadInput(f"CLIP_stop_at_last_layers must be an integer from 1 to {MAX_CLIP_SKIP}, got {value!r}")
        return value

    # --- the worker thread ---------------------------------------------------------------------------------

    def run(self, job: Job) -> dict[str, Any]:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread: set it here
        if job.mode == "load":
            self.registry.ensure(job.spec)
            self.registry.default_name = self.registry.current.name
            return {}
        spec: GenSpec = job.spec
        pipe, entry = self.registry.ensure(spec.model)
        if "sd_model_checkpoint" in spec.persist:
            self.registry.default_name = entry.name
        if "CLIP_stop_at_last_layers" in spec.persist:
            self.settings["CLIP_stop_at_last_layers"] = spec.clip_skip
        job.job_count, job.job_timestamp = spec.n_iter, datetime.now().strftime("%Y%m%d%H%M%S")
        init = torch.cat([image_to_tensor(img, spec.width, spec.height) for img in spec.init]) if spec.init else None
        mask = mask_to_tensor(spec.mask, spec.width, spec.height) if spec.mask is not None else None
        latent_mask = None
        if spec.masked is not None and spec.mask is not None:
            latent_mask = spec.masked.latent_mask(spec.mask, pipe.model.config.vae.downscale)
        images: list[str] = []
        infotexts: list[str] = []
        latest: list[torch.Tensor] = []  # the current batch's last denoised estimate

        def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            job.step, job.steps = step + 1, total
            latest[:] = [denoised]
            # a reference, not a copy: no device sync per step (samplers never write into `denoised`)
            job.preview, job.preview_step = denoised[:1], job.preview_step + 1
            job.check()

        for n in range(spec.n_iter):
            if job.cancel:
                raise StopSampling("cancel")
            if job.interrupt:  # between batches: return the batches done so far
                break
            job.skip, job.job_no, job.step, job.steps = False, n, 0, 0
            req = spec.request(n)
            latest.clear()
            try:
                latents = pipe.sample(req, init=init, mask=mask, callback=callback, latent_mask=latent_mask,
                                      masked_latents=spec.masked.latent_fill if spec.masked else "original")
                if spec.hires is not None:
                    latest.clear()
                    latents, _ = hires_pass(pipe, req, latents, spec.hires, callback)
            except StopSampling as stop:  # interrupt/skip keep the last estimate, as A1111 does
                if stop.kind == "cancel" or not latest:
                    raise
                latents = latest[0]
            extra = spec.masked.extra if spec.masked else spec.hires.infotext(req) if spec.hires else None
            for i, image in enumerate(pipe.to_images(latents, req, extra)):
                if spec.masked is not None:
                    image = spec.masked.finish(image, i)
                infotexts.append(image.info["parameters"])
                if spec.send_images:
                    images.append(encode_png(image, image.info["parameters"]))
        return {"images": images, "info": json.dumps(self.info(spec, entry, pipe, infotexts, job))}

    def info(self, spec: GenSpec, entry: ModelEntry, pipe: Pipeline, infotexts: list[str], job: Job) -> dict:
        count = spec.batch_size * spec.n_iter
        sha = self.registry.sha256(entry)
        inpainting_unet = pipe.model.config.unet.in_channels == 9
        resize_from = spec.seed_resize_from or (-1, -1)
        requests = [spec.request(n) for n in range(spec.n_iter)]  # their seeds follow A1111's rules (Request)
        hires_fields = {k: v for k, v in spec.hires.infotext(requests[0]).items()
                        if v is not None and k != "Denoising strength"} if spec.hires else {}
        return {
            "prompt": spec.prompt, "all_prompts": [spec.styled_prompt] * count,
            "negative_prompt": spec.negative_prompt, "all_negative_prompts": [spec.styled_negative] * count,
            "seed": spec.seed, "all_seeds": [s for req in requests for s in req.seeds],
            "subseed": spec.subseed, "all_subseeds": [s for req in requests for s in req.subseeds],
            "subseed_strength": spec.subseed_strength, "width": spec.width, "height": spec.height,
            "sampler_name": SAMPLERS[spec.sampler].display, "scheduler": spec.schedule, "cfg_scale": spec.cfg_scale,
            "steps": spec.steps, "batch_size": spec.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": entry.stem, "sd_model_hash": sha[:10] if sha else None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": resize_from[0],
            "seed_resize_from_h": resize_from[1],
            "denoising_strength": spec.denoising_strength,
            "extra_generation_params": {"Schedule type": SCHEDULE_LABELS[spec.schedule], **hires_fields},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": spec.styles,
            "job_timestamp": job.job_timestamp, "clip_skip": spec.clip_skip,
            "is_using_inpainting_conditioning": inpainting_unet and spec.mode == "img2img",
            "version": f"sdengine {__version__}",
            # ours: whether sampling was stopped early, what was ignored, and the job's id for /api/v1/jobs
            "interrupted": job.interrupt, "warnings": spec.warnings, "job_id": job.id,
        }

    # --- progress (request threads) ------------------------------------------------------------------------

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        job = self.queue.running
        if job is None or job.mode == "load":
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "current_task": None, "state": {
                        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                        "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                        "sampling_steps": 0}, "queued": self.queue.waiting()}
        progress = job.progress
        elapsed = time.time() - (job.started or time.time())
        image = None
        if not skip_current_image and self.settings["live_previews_enable"] and \
                self.settings["show_progress_every_n_steps"] > 0:
            image = self.preview(job)
        label = f"Batch {job.job_no + 1} out of {job.job_count}" if job.job_count > 1 else f"scripts_{job.mode}"
        return {"progress": progress, "eta_relative": elapsed / progress - elapsed if progress > 0 else 0.0,
                "current_image": image, "textinfo": f"Sampling step {job.step}/{job.steps}" if job.steps else None,
                "current_task": job.id, "queued": self.queue.waiting(), "state": {
                    "skipped": job.skip, "interrupted": job.interrupt, "stopping_generation": False, "job": label,
                    "job_count": job.job_count, "job_timestamp": job.job_timestamp, "job_no": job.job_no,
                    "sampling_step": job.step, "sampling_steps": job.steps, "job_id": job.id}}

    def preview(self, job: Job) -> str | None:
        """The running job's latest denoised estimate through the VAE, as base64 PNG. A new one at most every
        show_progress_every_n_steps steps however many clients poll, one decode at a time: polling cannot pile
        up work (on a CPU a full-size decode costs more than a few UNet steps)."""
        with self._preview_lock:
            latent, step, pipe = job.preview, job.preview_step, self.registry.pipeline
            if latent is None or pipe is None:
                return None
            cached_id, cached_step, cached = self._preview_cache
            if cached_id == job.id and 0 <= step - cached_step < self.settings["show_progress_every_n_steps"]:
                return cached
            vae, scale = pipe.model.vae, pipe.model.config.vae.scaling_factor
            with torch.no_grad():  # not Pipeline.decode: its fp16 fallback changes the VAE's dtype in place
                dtype = next(vae.parameters()).dtype
                pixels = vae.decode((latent / scale).to(pipe.model.device, dtype)).float().nan_to_num()
            arr = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            png = encode_png(Image.fromarray(arr))
            self._preview_cache = (job.id, step, png)
            return png
