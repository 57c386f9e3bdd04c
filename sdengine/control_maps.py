"""Control maps: the preprocessors A1111's ControlNet extension runs without a downloaded model (its module names
and threshold defaults), and fitting a map to the output size. control.py builds units and hints on these; its
ControlError is defined here so that both raise the same one-line error.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

# Preprocessors (A1111's module names) -> (threshold A default, threshold B default); None: the module takes none.
PREPROCESSORS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None), "canny": (100.0, 200.0), "invert": (None, None), "threshold": (127.0, None),
    "scribble_xdog": (32.0, None), "tile_resample": (1.0, None), "inpaint": (None, None), "shuffle": (0.0, None),
}
ALIASES = {"scribble": "scribble_xdog", "tile": "tile_resample", "xdog": "scribble_xdog"}


class ControlError(ValueError):
    """A ControlNet file or unit that cannot be used; one line that says why."""


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:  # a dependency; an install without it still generates without these preprocessors
        raise ControlError("this preprocessor needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def preprocess(image: Image.Image, module: str, threshold_a: float | None = None,
               threshold_b: float | None = None) -> Image.Image:
    """The control map a preprocessor makes from an RGB image, at the image's size (A1111's module names)."""
    module = ALIASES.get(module, module)
    a_default, b_default = PREPROCESSORS[module]
    a = a_default if threshold_a is None else threshold_a
    b = b_default if threshold_b is None else threshold_b
    rgb = np.asarray(image.convert("RGB"))
    if module in ("none", "inpaint"):  # inpaint: the mask is applied to the hint (hint_tensor)
        return image.convert("RGB")
    if module == "invert":  # white-background line art -> the black-background maps ControlNets are trained on
        return Image.fromarray(255 - rgb)
    if module == "canny":
        edges = _cv2().Canny(rgb, int(a), int(b))  # type: ignore[arg-type]
        return Image.fromarray(np.stack([edges] * 3, axis=-1))
    if module == "threshold":  # bright pixels white, the rest black (on the luminance)
        grey = np.asarray(image.convert("L"))
        return Image.fromarray(np.stack([np.where(grey > a, 255, 0).astype(np.uint8)] * 3, axis=-1))
    if module == "scribble_xdog":  # difference of Gaussians, thresholded: scribble-like strokes from any image
        cv2 = _cv2()
        fine = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), 0.5)
        coarse = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), 5.0)
        darker = np.clip(np.min(coarse - fine, axis=2), 0, 255)  # how much darker than its surround, every channel
        lines = (2 * darker > a).astype(np.uint8) * 255
        return Image.fromarray(np.stack([lines] * 3, axis=-1))
    if module == "shuffle":  # A1111's content shuffle; threshold A: the seed of its random flow field
        return _content_shuffle(image.convert("RGB"), int(a))
    if module == "tile_resample":  # the tile ControlNet's input: the image blurred by downsampling by `a`
        if a <= 1.0:
            return image.convert("RGB")
        w, h = max(1, round(image.width / a)), max(1, round(image.height / a))
        return image.convert("RGB").resize((w, h), Image.Resampling.BOX)
    raise AssertionError(module)


def _content_shuffle(image: Image.Image, seed: int) -> Image.Image:
    """The shuffle ControlNet's input: the image warped by a smooth random flow field (A1111's ContentShuffleDetector:
    each pixel read from a place given by two bicubically upsampled uniform noise grids). Its grid spacing, 256 pixels
    at A1111's fixed 512-pixel processing resolution, is scaled to the image's short side."""
    cv2 = _cv2()
    rng = np.random.RandomState(seed % 2 ** 32)
    h, w = image.height, image.width
    f = max(1, round(256 * min(h, w) / 512))

    def noise() -> np.ndarray:  # annotator/util.py make_noise_disk, one channel
        grid = rng.uniform(0, 1, size=(h // f + 2, w // f + 2))
        field = cv2.resize(grid, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        field = field - field.min()
        return field / max(field.max(), 1e-12)

    x = noise() * float(w - 1)
    y = noise() * float(h - 1)
    flow = np.stack([x, y], axis=2).astype(np.float32)
    return Image.fromarray(cv2.remap(np.asarray(image), flow, None, cv2.INTER_LINEAR))


def fit(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """The control map at the output size. just resize: stretched; crop and resize: scaled to cover, centre
    cropped; resize and fill: scaled to fit, centred on black (no control there). Lanczos, as diffusers' control
    image processor resizes."""
    lanczos = Image.Resampling.LANCZOS
    if image.size == (width, height):
        return image
    if mode == "just resize":
        return image.resize((width, height), lanczos)
    cover = mode == "crop and resize"
    pick = max if cover else min
    scale = pick(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    scaled = image.resize((w, h), lanczos)
    if cover:
        left, top = (w - width) // 2, (h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - w) // 2, (height - h) // 2))
    return canvas
