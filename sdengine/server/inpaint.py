"""AUTOMATIC1111's masked img2img, the work around the sampler: "Only masked" crops, the masked-content fills and
the paste-back of the untouched pixels.

What A1111 API clients rely on (its defaults: inpaint_full_res true, inpainting_fill 0, mask_blur 4):
- Inpaint area "Only masked" (inpaint_full_res): the mask's bounding box, grown by inpaint_full_res_padding and
  then to the generation's aspect ratio, is cut from the original image and generated at width x height; the
  result is scaled back into that box, and the returned image has the original image's size.
- "Whole picture": the image is resized to width x height as plain img2img does.
- Either way the original pixels are pasted back over the result where the mask is 0, blended across the blurred
  edge (in "Whole picture" the blend is twice as steep, so mask values >= 0.5 are fully repainted, as A1111 does).
- Masked content (inpainting_fill): 0 "fill" paints the hole with the colours around it before encoding,
  1 "original" keeps it, 2 "latent noise" and 3 "latent nothing" replace it in latent space (fill first, as A1111).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .images import resize_image

FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
LATENT_FILLS = {2: "noise", 3: "zeros"}  # what Pipeline.sample(masked_latents=...) puts in the hole


@dataclass
class MaskedPlan:
    """What the job needs after sampling: per init image, its overlay and (Only masked) where it goes back."""
    overlays: list[Image.Image]  # RGBA at the output size: the original, transparent where it is repainted
    paste_to: list[tuple[int, int, int, int] | None]  # (x, y, w, h) of the crop in the original, or None
    latent_fill: str = "original"  # for Pipeline.sample: "original", "noise" or "zeros"
    round_mask: bool = True  # A1111's mask_round: the latent mask is 0/1, else it keeps the blurred edge
    extra: dict[str, Any] = field(default_factory=dict)  # infotext additions ("Mask blur", "Inpaint area", ...)

    def finish(self, image: Image.Image, index: int) -> Image.Image:
        """The generated image `index` of the batch, scaled into its box and with the original pasted back."""
        overlay = self.overlays[index % len(self.overlays)]
        box = self.paste_to[index % len(self.paste_to)]
        if box is None:
            base = image.convert("RGBA")
        else:
            x, y, w, h = box
            base = Image.new("RGBA", overlay.size)
            base.paste(resize_image(image, w, h, 1).convert("RGBA"), (x, y))
        base.alpha_composite(overlay)
        out = base.convert("RGB")
        out.info.update(image.info)
        return out

    def latent_mask(self, mask: Image.Image, downscale: int) -> torch.Tensor:
        """The work mask at latent resolution as A1111 makes it: a bicubic resize, rounded when mask_round."""
        small = mask.convert("L").resize((mask.width // downscale, mask.height // downscale), Image.BICUBIC)
        arr = np.asarray(small, dtype=np.float32) / 255.0
        return torch.from_numpy(np.round(arr) if self.round_mask else arr)[None, None]


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels grown by `padding` inside the image, or None
    for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown evenly to `size`, shifted back inside [0, limit), cut at the edges if it cannot fit."""
    lo -= (size - (hi - lo)) // 2
    hi = lo + size
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, min(hi - lo, limit)
    return lo, hi


def fit_aspect(region: tuple[int, int, int, int], width: int, height: int, image_w: int,
               image_h: int) -> tuple[int, int, int, int]:
    """Grow the region's short side until it has the generation's aspect ratio, so the crop is not stretched."""
    x1, y1, x2, y2 = region
    if (x2 - x1) * height > (y2 - y1) * width:  # wider than width:height: more rows
        y1, y2 = _grow(y1, y2, round((x2 - x1) * height / width), image_h)
    else:
        x1, x2 = _grow(x1, x2, round((y2 - y1) * width / height), image_w)
    return x1, y1, x2, y2


FILL_WORK_SIZE = 128  # the fill is estimated at most this many pixels across, then scaled up: it is smooth


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """inpainting_fill 0: the hole painted with the colours around it. Normalized blurs (the known pixels'
    blurred colour over their blurred weight) from wide to narrow, each sharper estimate laid over the wider one
    where enough known pixels are near, so the fill shades from the global average to the nearest edge."""
    known = 1.0 - np.asarray(mask.convert("L"), np.float32)[..., None] / 255.0
    pixels = np.asarray(image.convert("RGB"), np.float32)
    if known.max() <= 0:  # nothing known: nothing to borrow from
        return image.convert("RGB")
    scale = min(1.0, FILL_WORK_SIZE / max(image.size))
    small = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    colour_small, known_small = _resize(pixels * known, small), _resize(known, small)
    estimate = np.broadcast_to(colour_small.sum((0, 1)) / known_small.sum(), colour_small.shape).copy()
    for radius in (32.0, 8.0, 2.0, 0.5):
        colour, weight = _blur(colour_small, radius), _blur(known_small, radius)
        confident = np.clip(weight * 4, 0, 1)  # a quarter of the neighbourhood known: trust it fully
        estimate = estimate * (1 - confident) + colour / np.maximum(weight, 1e-6) * confident
    out = pixels * known + _resize(estimate, image.size) * (1 - known)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An HxWxC float array resized to size (w, h), channel by channel (PIL's 32-bit float mode)."""
    if values.shape[1::-1] == size:
        return values
    method = Image.BOX if size[0] < values.shape[1] else Image.BILINEAR
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(values[..., c])).resize(size, method))
                     for c in range(values.shape[-1])], axis=-1)


def _blur(values: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur (sigma = radius) of an HxWxC float array with zeros beyond the edges, as two matrix
    products; the weights sum to 1 away from the edges, so a blurred 0/1 mask is the known fraction nearby."""
    def kernel(n: int) -> np.ndarray:
        d = np.arange(n, dtype=np.float32)
        return np.exp(-0.5 * ((d[:, None] - d[None, :]) / radius) ** 2) / (radius * np.sqrt(2 * np.pi))
    rows, cols = kernel(values.shape[0]), kernel(values.shape[1])
    return np.einsum("ij,jkc,lk->ilc", rows, values, cols, optimize=True)


def _overlay(image: Image.Image, repaint: Image.Image) -> Image.Image:
    """The image, transparent by `repaint` (L: 255 = fully repainted)."""
    overlay = image.convert("RGBA")
    overlay.putalpha(ImageOps.invert(repaint.convert("L")))
    return overlay


def plan(originals: list[Image.Image], mask: Image.Image, width: int, height: int, resize_mode: int,
         only_masked: bool, padding: int, fill: int, blur: int, inverted: bool, warnings: list[str],
         round_mask: bool = True) -> tuple[list[Image.Image], Image.Image | None, MaskedPlan | None]:
    """(init images at width x height, mask at width x height, plan) for a masked img2img request.

    `mask` is the request's mask already greyscale, inverted and blurred (images.prepare_mask without resizing).
    A blank mask in Only masked mode leaves nothing to inpaint: plain img2img of the whole picture, as A1111."""
    extra: dict[str, Any] = {"Mask blur": blur} if blur > 0 else {}
    if inverted:
        extra["Mask mode"] = "Inpaint not masked"
    if only_masked:
        inits, overlays, boxes = [], [], []
        crop_mask = None
        resized: dict[tuple[int, int], Image.Image] = {mask.size: mask}  # the mask at each init image's size
        for image in originals:
            if image.size not in resized:
                resized[image.size] = mask.resize(image.size, Image.LANCZOS)
            full_mask = resized[image.size]
            region = crop_region(full_mask, padding)
            if region is None:
                warnings.append("the mask is blank: nothing to inpaint in 'Only masked' mode, so the whole picture "
                                "was img2img'd")
                return [resize_image(im, width, height, resize_mode) for im in originals], None, None
            x1, y1, x2, y2 = fit_aspect(region, width, height, image.width, image.height)
            crop_mask = resize_image(full_mask.crop((x1, y1, x2, y2)), width, height, 2)
            inits.append(resize_image(image.crop((x1, y1, x2, y2)), width, height, 2))
            overlays.append(_overlay(image, full_mask))
            boxes.append((x1, y1, x2 - x1, y2 - y1))
        extra.update({"Inpaint area": "Only masked", "Masked area padding": padding})
        work_mask = crop_mask  # every image's crop is cut by the same mask: the last one stands for all
    else:
        inits = [resize_image(im, width, height, resize_mode) for im in originals]
        work_mask = resize_image(mask, width, height, resize_mode)
        steep = Image.fromarray(np.clip(np.asarray(work_mask, np.float32) * 2, 0, 255).astype(np.uint8))
        overlays, boxes = [_overlay(im, steep) for im in inits], [None]
    if fill != 1:
        inits = [fill_masked(im, work_mask) for im in inits]
    extra["Masked content"] = FILLS[fill]
    return inits, work_mask, MaskedPlan(overlays, boxes, LATENT_FILLS.get(fill, "original"), round_mask, extra)
