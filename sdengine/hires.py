"""Hires fix (AUTOMATIC1111's txt2img "Hires. fix"): generate at the size the model knows, upscale, then run an
img2img pass at the larger size that adds detail without the repeated subjects a direct large generation gets.

Follows A1111's sample_hr_pass: the target size from the scale or a resize (cropped to its aspect ratio), the
upscale in latent space (the "Latent ..." upscalers) or on the decoded image ("Lanczos", "Nearest", "None", or a
model upscaler such as ESRGAN named by its file in the upscalers folder: sdengine/upscalers), and
a second pass that runs exactly the hires steps (A1111 stretches the schedule to steps / denoising strength and
runs its tail), with its noise drawn again from the same seeds and variation seeds at the new size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from .diffusion.samplers import get_sampler
from .diffusion.schedule import SCHEDULE_LABELS, SCHEDULES
from .images import images_to_tensor, tensor_to_images

if TYPE_CHECKING:
    from .request import Request

# A1111's latent upscale modes (shared.latent_upscale_modes): name -> (interpolation, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
# Image upscalers that need no model. A1111's "None" upscales nothing itself and leaves the resize to Lanczos.
PIXEL_UPSCALERS: dict[str, Image.Resampling] = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS,
                                                "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode
MAX_SCALE = 8.0


@dataclass(frozen=True)
class HiresFix:
    """The second pass. resize_x/resize_y (0: unset) override scale; with both set and another aspect ratio the
    upscaled image is cropped to them. steps 0: as many as the first pass. sampler/schedule/prompt/negative
    None: the first pass's. upscaler None: "Latent", left out of the infotext as A1111 does."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str | None = None
    steps: int = 0
    denoising_strength: float = 0.7
    sampler: str | None = None
    schedule: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and 1 <= self.scale <= MAX_SCALE):
            raise ValueError(f"hires scale must be a number from 1 to {MAX_SCALE:g}, got {self.scale!r}")
        for name in ("resize_x", "resize_y", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"hires {name.replace('_', ' ')} must be a whole number >= 0, got {value!r}")
            if name != "steps" and value % 8:
                raise ValueError(f"hires {name.replace('_', ' ')} must be a multiple of 8, got {value}")
        if self.upscaler is not None and self.upscaler not in UPSCALERS:
            check_model_upscaler(self.upscaler)
        if not 0 < self.denoising_strength <= 1:
            raise ValueError(f"hires denoising strength must be in (0, 1], got {self.denoising_strength}")
        if self.sampler is not None:
            get_sampler(self.sampler)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown hires schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")

    def target(self, width: int, height: int, downscale: int = 8) -> tuple[int, int, int, int]:
        """(upscale_to_w, upscale_to_h, crop_x, crop_y) for a first pass of width x height: the size the image is
        upscaled to and the latent pixels then cropped off across each axis, as A1111 computes them. The sizes
        are rounded down to multiples of 8, which changes nothing for an 8x VAE (its latents floor them anyway)
        and keeps every size a multiple of 8 for smaller ones."""
        rx, ry = self.resize_x, self.resize_y
        if rx == 0 and ry == 0:
            to_w, to_h = int(width * self.scale), int(height * self.scale)
        elif ry == 0:
            to_w, to_h = rx, rx * height // width
        elif rx == 0:
            to_w, to_h = ry * width // height, ry
        elif width / height < rx / ry:  # keep the first pass's aspect ratio, covering the requested size
            to_w, to_h = rx, rx * height // width
        else:
            to_w, to_h = ry * width // height, ry
        to_w, to_h = to_w // 8 * 8, to_h // 8 * 8
        if rx == 0 or ry == 0:
            return to_w, to_h, 0, 0
        return to_w, to_h, (to_w - rx) // downscale, (to_h - ry) // downscale

    def output_size(self, width: int, height: int, downscale: int = 8) -> tuple[int, int]:
        """The final image's (width, height): the target in whole latent pixels, less the crop."""
        to_w, to_h, crop_x, crop_y = self.target(width, height, downscale)
        return (to_w // downscale - crop_x) * downscale, (to_h // downscale - crop_y) * downscale

    @property
    def in_latent_space(self) -> bool:
        """Whether the upscaler works on the latents (else on the decoded image)."""
        return (self.upscaler or DEFAULT_UPSCALER) in LATENT_UPSCALERS

    def infotext(self, first: Request) -> dict[str, Any]:
        """The fields A1111 writes for a hires fix (the image's Size stays the first pass's)."""
        resized = self.resize_x or self.resize_y
        sampler = get_sampler(self.sampler).display if self.sampler else None
        return {
            "Denoising strength": self.denoising_strength,
            "Hires sampler": sampler if sampler != first.sampler_spec.display else None,
            "Hires schedule type": SCHEDULE_LABELS[self.schedule] if self.schedule not in (None, first.schedule)
            else None,
            "Hires prompt": self.prompt if self.prompt not in (None, first.prompt) else None,
            "Hires negative prompt": self.negative_prompt
            if self.negative_prompt not in (None, first.negative_prompt) else None,
            "Hires upscale": None if resized else self.scale,
            "Hires resize": f"{self.resize_x}x{self.resize_y}" if resized else None,
            "Hires steps": self.steps or None,
            "Hires upscaler": self.upscaler,
        }


def upscale_latents(latents: torch.Tensor, hr: HiresFix, width: int, height: int, downscale: int) -> torch.Tensor:
    """A first pass of width x height upscaled in latent space to the target and cropped (the "Latent" upscalers)."""
    to_w, to_h, crop_x, crop_y = hr.target(width, height, downscale)
    mode, antialias = LATENT_UPSCALERS[hr.upscaler or DEFAULT_UPSCALER]
    up = F.interpolate(latents.float(), size=(to_h // downscale, to_w // downscale), mode=mode, antialias=antialias)
    return up[..., crop_y // 2: up.shape[2] - (crop_y + 1) // 2, crop_x // 2: up.shape[3] - (crop_x + 1) // 2]


def check_model_upscaler(name: object) -> None:
    """A name that is no built-in upscaler must be a model's file in the upscalers folder (runtime.upscalers_dir(),
    the one folder the CLI, the server and the pipeline share): checked when the request is made, so a typo or a
    missing model is refused before the first pass runs (the second pass loads it from the same folder)."""
    from .upscalers import UpscalerError, resolve_upscaler

    if not isinstance(name, str):
        raise ValueError(f"unknown hires upscaler {name!r}; valid: {', '.join(UPSCALERS)}")
    try:
        resolve_upscaler(name)
    except UpscalerError as e:
        raise ValueError(f"unknown hires upscaler {name!r}; valid: {', '.join(UPSCALERS)}, or a model upscaler: "
                         f"{e}") from None


def upscale_pixels(pixels: torch.Tensor, hr: HiresFix, width: int, height: int, downscale: int) -> torch.Tensor:
    """A decoded first pass (pixels in [0, 1]) upscaled on the image and cropped: pixels in [-1, 1] for the
    second pass to encode. A1111 turns the first pass into 8-bit images (truncating) and resizes those; a model
    upscaler (from the upscalers folder) runs on the pixels' device, then Lanczos fits the exact size, as A1111's
    images.resize_image does."""
    to_w, to_h, crop_x, crop_y = hr.target(width, height, downscale)
    f = downscale
    box = (crop_x // 2 * f, crop_y // 2 * f, to_w - (crop_x + 1) // 2 * f, to_h - (crop_y + 1) // 2 * f)
    name = hr.upscaler or DEFAULT_UPSCALER
    images = tensor_to_images(pixels, rounding=False)
    if name in PIXEL_UPSCALERS:
        images = [image.resize((to_w, to_h), PIXEL_UPSCALERS[name]) for image in images]
    else:
        images = [_model_upscale(image, name, to_w, to_h, pixels) for image in images]
    return images_to_tensor([image.crop(box) for image in images])


def _model_upscale(image: Image.Image, name: str, width: int, height: int, pixels: torch.Tensor) -> Image.Image:
    from .upscalers import UpscalerError, load_by_name, upscale_image

    scale = max(width / image.width, height / image.height)
    if scale > 1:  # A1111 calls the upscaler only to enlarge
        dtype = pixels.dtype if pixels.is_floating_point() and pixels.device.type != "cpu" else torch.float32
        try:
            upscaler = load_by_name(name, None, pixels.device, dtype)
        except UpscalerError as e:
            raise ValueError(f"hires upscaler: {e}") from None
        image = upscale_image(image, upscaler, scale)
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
