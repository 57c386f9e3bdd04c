"""Images in and out of the HTTP API: base64 decoding with its safety checks, A1111's resize modes, PNG encoding.

Clients send images only as base64 (raw or a data URL): URLs are refused, never fetched (server-side request
forgery), and the pixel count is checked from the header before anything is decoded (decompression bombs).
"""
from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ..images import mask_to_grey
from ..metadata import png_info
from .errors import BadInput

# Formats whose decoders are plain pixel codecs: EPS (Ghostscript) and friends are refused.
SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


def decode_image(data: object, what: str, max_pixels: int) -> Image.Image:
    """A base64 string or data URL -> a loaded PIL image, or BadInput with a message naming `what`."""
    if not isinstance(data, str) or not data.strip():
        raise BadInput(f"{what} must be a non-empty base64 string")
    text = data.strip()
    if _URL.match(text):
        raise BadInput(f"{what} is a URL; images are never fetched, send the image itself as base64")
    if text.startswith("data:"):
        head, sep, body = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadInput(f"{what}: only base64 data URLs are accepted (data:image/png;base64,...)")
        text = body
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{what} is not valid base64") from None
    return open_image_bytes(raw, what, max_pixels)


def open_image_bytes(raw: bytes, what: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(raw), formats=SAFE_FORMATS)
    except Image.DecompressionBombError:
        raise BadInput(f"{what} is too large (more than {max_pixels} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise BadInput(f"{what} is not an image in a supported format ({', '.join(SAFE_FORMATS)})") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:  # from the header, before a single pixel is decoded
        raise BadInput(f"{what} is {w}x{h}: at most {max_pixels} pixels are accepted")
    try:
        img.load()  # first frame only for animations
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise BadInput(f"{what} is truncated or corrupt") from None
    return img


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 PNG (no data URL prefix, as A1111 returns), with the parameters text when given."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes: 0 just resize, 1 crop and resize (cover, centre crop), 2 resize and fill (fit, then
    stretch the edge rows/columns into the bands), 3 latent upscale (done here in pixel space, as 0)."""
    if image.size == (width, height):
        return image
    if mode in (0, 3):
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        cover_w = width if ratio > src_ratio else image.width * height // image.height
        cover_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((max(cover_w, 1), max(cover_h, 1)), Image.LANCZOS)
        out = Image.new(image.mode, (width, height))
        out.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
        return out
    if mode == 2:
        fit_w = width if ratio < src_ratio else image.width * height // image.height
        fit_h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((max(fit_w, 1), max(fit_h, 1)), Image.LANCZOS)
        out = Image.new(image.mode, (width, height))
        x0, y0 = (width - resized.width) // 2, (height - resized.height) // 2
        out.paste(resized, (x0, y0))
        if y0 > 0:  # bands above and below: the first and last rows stretched
            out.paste(resized.resize((width, y0), box=(0, 0, resized.width, 0)), (0, 0))
            out.paste(resized.resize((width, height - y0 - resized.height), box=(0, resized.height, resized.width,
                                                                                 resized.height)),
                      (0, y0 + resized.height))
        if x0 > 0:
            out.paste(resized.resize((x0, height), box=(0, 0, 0, resized.height)), (0, 0))
            out.paste(resized.resize((width - x0 - resized.width, height), box=(resized.width, 0, resized.width,
                                                                                resized.height)),
                      (x0 + resized.width, 0))
        return out
    raise BadInput(f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3, got {mode}")


def prepare_mask(mask: Image.Image, invert: bool, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's order: greyscale, invert, blur (then inpaint.plan crops or resizes it as it does the image)."""
    mask = mask_to_grey(mask)  # A1111's reading: a transparent mask's alpha, else its luminance
    if invert:
        mask = ImageOps.invert(mask)
    if blur_x > 0 or blur_y > 0:
        mask = mask.filter(ImageFilter.GaussianBlur((max(blur_x, 0), max(blur_y, 0))))
    return mask
