"""Outpainting: the canvas extended on any side, the new border filled so the model has something to start from,
and a mask over it (reaching a little into the image and blurred, so the seam is repainted too); the pipeline then
inpaints it, as A1111's "Poor man's outpainting" and "Outpainting mk2" scripts do.

Fills: `matched` (mk2's idea: noise whose spectrum and colour histogram follow the image's, so the model sees
the image's texture and palette), `edge` (the edge pixels stretched outwards), `mirror` (the image reflected),
`noise` (plain noise of the image's mean and spread). All are drawn from the seed, so a seed repeats.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

FILLS = ("matched", "edge", "mirror", "noise")
MAX_EXTEND = 4096


def _noise(rng: np.random.Generator, shape: tuple[int, ...], image: np.ndarray) -> np.ndarray:
    mean = image.reshape(-1, 3).mean(0)
    std = image.reshape(-1, 3).std(0) + 1.0
    return rng.normal(mean, std, shape)


def _matched(rng: np.random.Generator, canvas: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Noise shaped in frequency by the known image's amplitude spectrum (the hole first filled with the mean), its
    values then replaced, rank for rank, by the known pixels' colours sorted by brightness: the border gets the
    image's texture scale and only colours the image has (matching each channel alone would invent colours)."""
    filled = np.where(known[..., None], canvas, canvas[known].mean(0))
    spectrum = np.abs(np.fft.fft2(filled.mean(-1)))
    shaped = np.real(np.fft.ifft2(spectrum * np.exp(2j * np.pi * rng.random(spectrum.shape))))
    hole = ~known
    colours = canvas[known]
    colours = colours[np.argsort(colours.mean(-1), kind="stable")]
    order = np.argsort(shaped[hole], kind="stable")
    picks = np.linspace(0, len(colours) - 1, len(order)).round().astype(int)
    values = np.empty((len(order), 3))
    values[order] = colours[picks]
    out = canvas.copy()
    out[hole] = values
    return out


def extend(image: Image.Image, left: int = 0, right: int = 0, up: int = 0, down: int = 0, fill: str = "matched",
           overlap: int = 8, mask_blur: int = 8, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """(the extended canvas, its mask: white = repaint). Each amount must be a multiple of 8 (latents are 1/8 of
    the pixels); the image's own size is rounded down to one."""
    amounts = {"left": left, "right": right, "up": up, "down": down}
    for name, value in amounts.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXTEND or value % 8:
            raise ValueError(f"outpaint {name} must be a multiple of 8 from 0 to {MAX_EXTEND}, got {value!r}")
    if not any(amounts.values()):
        raise ValueError("outpaint by 0 on every side changes nothing: give --left/--right/--up/--down")
    if fill not in FILLS:
        raise ValueError(f"unknown outpaint fill {fill!r}; valid: {', '.join(FILLS)}")
    if not (0 <= overlap <= 256 and 0 <= mask_blur <= 256):
        raise ValueError("overlap and mask blur must be from 0 to 256 pixels")
    w, h = image.width // 8 * 8, image.height // 8 * 8
    if w < 8 or h < 8:
        raise ValueError(f"the image is {image.width}x{image.height}; at least 8x8 is needed")
    src = np.asarray(image.convert("RGB").crop((0, 0, w, h)), dtype=np.float64)
    pad = ((up, down), (left, right), (0, 0))
    rng = np.random.default_rng(seed)
    if fill == "edge":
        canvas = np.pad(src, pad, mode="edge")
    elif fill == "mirror":
        canvas = np.pad(src, pad, mode="symmetric")
    else:
        canvas = np.pad(src, pad, mode="constant")
        known = np.pad(np.ones((h, w), bool), pad[:2], mode="constant")
        if fill == "noise":
            canvas[~known] = _noise(rng, canvas[~known].shape, src)
        else:
            canvas = _matched(rng, canvas, known)
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    top, bottom = up + (overlap if up else 0), up + h - (overlap if down else 0)
    start, stop = left + (overlap if left else 0), left + w - (overlap if right else 0)
    mask[top:bottom, start:stop] = 0
    mask_image = Image.fromarray(mask)
    if mask_blur:
        mask_image = mask_image.filter(ImageFilter.GaussianBlur(mask_blur))
        # the new border itself stays fully repainted; only the seam inside the image is soft
        keep_new = Image.fromarray(np.where(np.pad(np.ones((h, w), bool), pad[:2]), 0, 255).astype(np.uint8))
        mask_image = Image.fromarray(np.maximum(np.asarray(mask_image), np.asarray(keep_new)))
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8)), mask_image
