"""txt2img, img2img and inpainting: the generation loop, unrolled and readable in one place.

prompt -> context; seed -> noise; sampler over the denoiser -> latents; VAE -> pixels -> PIL images that carry
their A1111 "parameters" text. Random draws happen on the CPU, per image, in the same order as diffusers'
pipelines with a list of generators, so a seed gives the same image here, there and on any device.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__
from .diffusion.denoiser import CFGDenoiser, Denoiser
from .diffusion.samplers import SAMPLERS, BatchNoise, SamplerSpec, get_sampler
from .diffusion.schedule import SCHEDULE_LABELS, SCHEDULES, SD_SCHEDULE, SPACINGS, NoiseSchedule
from .diffusion.variation import Variation, initial_noise
from .hires import HiresFix, hires_pass, second_pass_request
from .metadata import format_parameters
from .model import StableDiffusion
from .nn.seamless import circular_padding
from .prompts import encode_prompts

MAX_SIDE = 8192
# callback(step, total_steps, latents (VE space), denoised x0 estimate)
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class Request:
    """Everything that decides an image; validated on creation so bad values fail before any work."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "euler"
    schedule: str = "normal"
    spacing: str | None = None  # None: what diffusers' scheduler of this sampler uses for SD1.5
    cfg_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    strength: float = 1.0  # img2img / inpaint: the share of the schedule that is run
    subseed: int = -1  # variation seed (A1111's): image i's noise is slerped towards subseed + i's
    subseed_strength: float = 0.0  # 0: no variation; 1: the variation seed's image
    seed_resize_from: tuple[int, int] | None = None  # (width, height) whose noise the seed keeps, centred
    tiling: bool = False  # seamless: the image tiles (A1111's Tiling: every padded convolution wraps around)
    denoise_steps: int | None = None  # img2img: run exactly the schedule's last n steps; None: int(steps * strength)
    seeds: list[int] = field(init=False, default_factory=list)
    subseeds: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 8 or v > MAX_SIDE:
                raise ValueError(f"{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {v}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg scale must be a finite number, got {self.cfg_scale}")
        if not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch size must be between 1 and 64, got {self.batch_size}")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be >= 1, got {self.clip_skip}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        n = self.denoise_steps
        if n is not None and not (isinstance(n, int) and 1 <= n <= self.steps):
            raise ValueError(f"denoise steps must be an integer from 1 to steps ({self.steps}), got {n}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; valid: {', '.join(SPACINGS)}")
        self.sampler_spec: SamplerSpec = get_sampler(self.sampler)
        if self.seed == -1:
            self.seed = random.randrange(2 ** 32)
        if not 0 <= self.seed < 2 ** 64 - 64:
            raise ValueError(f"seed must be -1 or in [0, 2^64), got {self.seed}")
        if self.subseed == -1:
            self.subseed = random.randrange(2 ** 32)
        if not 0 <= self.subseed < 2 ** 64 - 64:
            raise ValueError(f"variation seed must be -1 or in [0, 2^64), got {self.subseed}")
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise ValueError(f"variation strength must be in [0, 1], got {self.subseed_strength}")
        # A1111: with a variation, every image keeps the seed and the variation seed counts up instead
        self.seeds = [self.seed + (0 if self.subseed_strength else i) for i in range(self.batch_size)]
        self.subseeds = [self.subseed + i for i in range(self.batch_size)]
        if self.seed_resize_from is not None:
            w, h = self.seed_resize_from
            if not all(isinstance(v, int) and 0 < v <= MAX_SIDE for v in (w, h)):
                raise ValueError(f"seed resize from must be two sizes from 1 to {MAX_SIDE}, got {w}x{h}")

    @property
    def run_strength(self) -> float:
        """The share of the schedule an img2img runs: `strength`, or with denoise_steps the strength whose
        int(steps * strength) is exactly that many steps (the samplers cut their tails by diffusers' rule)."""
        if self.denoise_steps is None:
            return self.strength
        return min((self.denoise_steps + 0.5) / self.steps, 1.0)

    def variation(self, downscale: int) -> Variation | None:
        """The variation seeds for a model whose latents are `downscale` times smaller, or None if there are none."""
        if self.subseed_strength == 0 and self.seed_resize_from is None:
            return None
        resize = None
        if self.seed_resize_from is not None:
            w, h = self.seed_resize_from
            resize = (max(1, h // downscale), max(1, w // downscale))
        return Variation(self.subseeds, self.subseed_strength, resize)


def model_hash(path: str | Path | None) -> str | None:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (None for folders)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


class Pipeline:
    def __init__(self, model: StableDiffusion, schedule: NoiseSchedule = SD_SCHEDULE):
        self.model = model
        self.schedule = schedule
        self._model_hash: str | None | bool = False  # computed on first use

    # --- public API ---------------------------------------------------------------------------------------------

    def generate(self, prompt: str = "", negative_prompt: str = "", steps: int = 20, sampler: str = "euler",
                 schedule: str = "normal", cfg_scale: float = 7.5, seed: int = 0, width: int | None = None,
                 height: int | None = None, batch_size: int = 1, clip_skip: int = 1, spacing: str | None = None,
                 callback: Callback | None = None, subseed: int = -1, subseed_strength: float = 0.0,
                 seed_resize_from: tuple[int, int] | None = None, tiling: bool = False,
                 hires: HiresFix | None = None) -> list[Image.Image]:
        """txt2img. Image i uses seed + i; each image carries its parameters in image.info["parameters"].
        Width and height default to the model's training size (512 unless its file says otherwise).
        subseed/subseed_strength/seed_resize_from: A1111's variation seeds (see diffusion/variation.py); with a
        variation, image i keeps the seed and uses subseed + i. tiling: seamless images. hires: a second,
        larger img2img pass over the upscaled first one (sdengine/hires.py)."""
        size = self.model.config.image_size  # `is None`, not `or`: a width of 0 must be refused, not replaced
        width, height = size if width is None else width, size if height is None else height
        req = Request(prompt, negative_prompt, steps, sampler, schedule, spacing, cfg_scale, seed, width, height,
                      batch_size, clip_skip, subseed=subseed, subseed_strength=subseed_strength,
                      seed_resize_from=seed_resize_from, tiling=tiling)
        if hires is not None:  # fail on a too-large target before the first pass, not after it
            second_pass_request(req, hires, self.model.config.vae.downscale)
        latents = self.sample(req, callback=callback)
        if hires is None:
            return self.to_images(latents, req)
        latents, _ = hires_pass(self, req, latents, hires, callback)
        return self.to_images(latents, req, hires.infotext(req))

    def img2img(self, image: Image.Image, prompt: str = "", strength: float = 0.75, **kwargs) -> list[Image.Image]:
        """Start from `image` noised to the point `strength` of the way up the schedule (diffusers' convention:
        int(steps * strength) steps are run; `denoise_steps=n` runs exactly the last n, as A1111 counts them).
        At strength 1.0 the image is still there, under sigma_max's noise. Width/height default to the image's,
        rounded down to x8."""
        req = self._request(image, prompt, strength, kwargs)
        pixels = image_to_tensor(image, req.width, req.height)
        return self.to_images(self.sample(req, init=pixels, callback=kwargs.get("callback")), req)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str = "", strength: float = 1.0,
                **kwargs) -> list[Image.Image]:
        """Repaint where the mask is white. 9-channel inpainting UNets see mask and masked image; other UNets
        get the known region blended back at every step."""
        req = self._request(image, prompt, strength, kwargs)
        pixels = image_to_tensor(image, req.width, req.height)
        mask_t = mask_to_tensor(mask, req.width, req.height)
        return self.to_images(self.sample(req, init=pixels, mask=mask_t, callback=kwargs.get("callback")), req)

    # --- the loop ---------------------------------------------------------------------------------------------

    def tiling(self, req: Request) -> AbstractContextManager[None]:
        """The networks as `req` wants them: wrapping around for a seamless request, as loaded otherwise."""
        return circular_padding([self.model.unet, self.model.vae], req.tiling)

    @torch.no_grad()
    def sample(self, req: Request, init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               callback: Callback | None = None, masked_latents: str = "original",
               latent_mask: torch.Tensor | None = None, init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (b, 4, h/8, w/8), VP-scaled as the VAE expects after dividing by the scaling factor.

        masked_latents: what the encoded init image holds under the mask before noising: "original", "noise"
        (unit Gaussian noise: AUTOMATIC1111's "latent noise") or "zeros" ("latent nothing").
        latent_mask: (1, 1, h/8, w/8) in [0, 1], where the latents are repainted; default: `mask` resized nearest.
        A soft one blends the known region in gradually (AUTOMATIC1111 without mask_round).
        init_latents: (b, 4, h/8, w/8) scaled latents to start img2img from instead of encoding `init`."""
        with self.tiling(req):
            return self._sample(req, init, mask, callback, masked_latents, latent_mask, init_latents)

    def _sample(self, req: Request, init: torch.Tensor | None, mask: torch.Tensor | None, callback: Callback | None,
                masked_latents: str, latent_mask: torch.Tensor | None, init_latents: torch.Tensor | None
                ) -> torch.Tensor:
        if masked_latents not in ("original", "noise", "zeros"):
            raise ValueError(f"masked_latents must be original, noise or zeros, not {masked_latents!r}")
        model, device = self.model, self.model.device
        spec = req.sampler_spec
        f = model.config.vae.downscale
        shape = (req.batch_size, 4, req.height // f, req.width // f)
        if latent_mask is not None and latent_mask.shape[-2:] != shape[-2:]:
            raise ValueError(f"latent_mask must be {tuple(shape[-2:])}, got {tuple(latent_mask.shape[-2:])}")
        if init_latents is not None and tuple(init_latents.shape) != shape:
            raise ValueError(f"init_latents must be {shape}, got {tuple(init_latents.shape)}")
        generators = [torch.Generator().manual_seed(s) for s in req.seeds]
        noise_source = BatchNoise(generators, shape, device)

        prompts = [req.prompt] * req.batch_size
        negatives = [req.negative_prompt] * req.batch_size
        guided = req.cfg_scale != 1.0
        cond = encode_prompts(model, prompts, req.clip_skip)
        uncond = encode_prompts(model, negatives, req.clip_skip, min_chunks=cond.shape[1] // 77) if guided else None
        if uncond is not None and uncond.shape[1] > cond.shape[1]:  # a longer negative: pad the prompt
            cond = encode_prompts(model, prompts, req.clip_skip, min_chunks=uncond.shape[1] // 77)

        strength = req.run_strength
        if (init is not None or init_latents is not None) and strength < 1.0:
            sigmas = spec.img2img_sigmas(self.schedule, req.steps, strength, req.schedule, req.spacing)
        else:
            sigmas = spec.sigmas(self.schedule, req.steps, req.schedule, req.spacing)
        sigmas = torch.from_numpy(sigmas)
        inpainting_unet = model.config.unet.in_channels == 9
        image_latents = None
        if init_latents is not None:
            image_latents = init_latents.to(device, torch.float32)
        elif init is not None and (not inpainting_unet or strength < 1.0 or mask is None):
            image_latents = self.encode_image(init, generators)
        variation = req.variation(f)
        noise = noise_source() if variation is None else initial_noise(noise_source, req.seeds, variation)
        concat = None
        if mask is None:
            latent_mask = None
        else:
            if latent_mask is None:
                latent_mask = F.interpolate(mask.to(device), size=shape[-2:])
            latent_mask = latent_mask.to(device).expand(shape[0], 1, -1, -1)
            if image_latents is not None and masked_latents != "original":  # "noise": the seed's own noise, as A1111
                hole = torch.zeros_like(image_latents) if masked_latents == "zeros" else noise
                image_latents = image_latents * (1 - latent_mask) + hole * latent_mask
        # img2img keeps its image even at full strength (noised to sigma_max, as diffusers' img2img and A1111 do);
        # inpainting at full strength starts the hole from pure noise (diffusers' inpaint pipelines)
        if image_latents is not None and (strength < 1.0 or mask is None):
            x = image_latents + noise * sigmas[0]
        else:
            x = noise * spec.initial_scale(float(sigmas[0]), req.spacing)

        if mask is not None:
            if inpainting_unet:
                concat = torch.cat([latent_mask, self.encode_image(init * (mask < 0.5), generators)], dim=1)

        denoiser = Denoiser(model.unet, self.schedule, model.config.prediction)
        denoise: Callable = CFGDenoiser(denoiser, cond, uncond, req.cfg_scale, concat)
        if latent_mask is not None and not inpainting_unet:
            denoise = known_region_blend(denoise, latent_mask, image_latents, noise, sigmas[0])
        extra = {"prediction": model.config.prediction} if spec.uses_prediction else {}
        x = spec(denoise, x, sigmas, callback=callback, noise=noise_source, **extra)
        latents = x / (1 + sigmas[-1] ** 2) ** 0.5
        if latent_mask is not None and not inpainting_unet:  # the known region exactly as encoded
            latents = image_latents * (1 - latent_mask) + latents * latent_mask
        return latents

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] (1 or b images) -> scaled latents, one posterior sample per image from its generator."""
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        out = []
        for i, g in enumerate(generators):
            img = pixels[i if pixels.shape[0] > 1 else 0][None].to(self.model.device, dtype)
            out.append(vae.encode(img).sample(g).float())
        return torch.cat(out) * self.model.config.vae.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1]. A half-precision decode that overflows is redone in fp32."""
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        z = latents / self.model.config.vae.scaling_factor
        pixels = vae.decode(z.to(dtype)).float()
        if not torch.isfinite(pixels).all() and dtype != torch.float32:
            pixels = vae.float().decode(z.float())
            vae.to(dtype)
        return (pixels / 2 + 0.5).clamp(0, 1)

    def to_images(self, latents: torch.Tensor, req: Request, extra: dict[str, Any] | None = None
                  ) -> list[Image.Image]:
        """Decoded images, each with its infotext; `extra` adds infotext fields (before Version)."""
        with self.tiling(req):
            pixels = self.decode(latents)
        arrays = (pixels.cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        images = []
        for i, arr in enumerate(arrays):
            img = Image.fromarray(arr)
            img.info["parameters"] = self.infotext(req, i, extra)
            img.info["seed"] = req.seeds[i]
            images.append(img)
        return images

    def infotext(self, req: Request, index: int, extra: dict[str, Any] | None = None) -> str:
        """Image `index` of the batch's A1111 parameters line."""
        if self._model_hash is False:
            self._model_hash = model_hash(self.model.source)
        source = Path(self.model.source) if self.model.source else None
        params = {
            "Steps": req.steps, "Sampler": req.sampler_spec.display,
            "Schedule type": SCHEDULE_LABELS[req.schedule],
            "CFG scale": req.cfg_scale, "Seed": req.seeds[index], "Size": f"{req.width}x{req.height}",
            "Model hash": self._model_hash, "Model": source.stem if source else None,
            "Variation seed": req.subseeds[index] if req.subseed_strength else None,
            "Variation seed strength": req.subseed_strength or None,
            "Seed resize from": "{}x{}".format(*req.seed_resize_from) if req.seed_resize_from else None,
            "Denoising strength": req.strength if req.strength < 1.0 else None,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            "Tiling": "True" if req.tiling else None,
            **(extra or {}),
            "Version": f"sdengine {__version__}",
        }
        return format_parameters(req.prompt, req.negative_prompt, params)

    def _request(self, image: Image.Image, prompt: str, strength: float, kwargs: dict) -> Request:
        fields = {k: v for k, v in kwargs.items() if k != "callback"}
        fields.setdefault("width", image.width // 8 * 8)
        fields.setdefault("height", image.height // 8 * 8)
        return Request(prompt=prompt, strength=strength, **fields)


def known_region_blend(model: Callable, latent_mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor,
                       sigma_start: torch.Tensor) -> Callable:
    """Inpainting with an ordinary UNet: before every evaluation but the first, the known region (mask 0) is
    replaced by the image noised to the current sigma with the initial noise, as diffusers' inpaint pipeline
    does after each step. Sampler updates are elementwise, so blending the model's input is the same thing."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma.max() < sigma_start:
            x = (known + noise * sigma) * (1 - latent_mask) + x * latent_mask
        return model(x, sigma)

    return denoise


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, h, w) in [-1, 1], resized (Lanczos) when its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask -> (1, 1, h, w) of 0/1, white (>= 0.5) = repaint."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    arr = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]


__all__ = ["Pipeline", "Request", "SAMPLERS"]
