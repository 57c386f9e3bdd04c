"""Generation parameters in PNG text, in AUTOMATIC1111's "parameters" layout (written and parsed).

    <prompt, may span lines>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ..., ...

Tools that read A1111 images (civitai, ComfyUI importers, A1111's PNG Info) read these.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

# A1111's key order; keys not listed go after these, before Version.
KEY_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
             "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
             "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
             "Init image hash", "RNG", "Tiling")
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _format_number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def format_parameters(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """The infotext: prompt, then the negative prompt line (if any), then `Key: value` pairs in A1111's order."""
    known = [k for k in KEY_ORDER if params.get(k) is not None]
    extra = [k for k in params if k not in KEY_ORDER and k != "Version" and params[k] is not None]
    keys = known + extra + (["Version"] if params.get("Version") is not None else [])
    line = ", ".join(f"{k}: {_quote(_format_number(params[k]))}" for k in keys)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Infotext -> {"Prompt", "Negative prompt", and each parameter}; numbers become int/float, a WxH value
    (Size) gives Size-1/Size-2 too, and an old-style sampler name ("DPM++ 2M Karras") is split into Sampler +
    Schedule type."""
    lines = text.strip().split("\n")
    params: dict[str, Any] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        for key, value in _PARAM.findall(lines.pop()):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    value = value[1:-1]
            params[key.strip()] = _to_number(value)
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        line = line.strip()  # as A1111 does: "a, b, \n" (a trailing ", " is common) reads as "a, b,"
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines), **params}
    for key, value in params.items():  # every WxH value, as A1111 does ("Size", "Hires resize", "Seed resize from")
        if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value):
            w, h = value.split("x")
            out[f"{key}-1"], out[f"{key}-2"] = int(w), int(h)
    sampler = out.get("Sampler")
    if isinstance(sampler, str) and "Schedule type" not in out:
        for schedule in ("Karras", "Exponential"):
            if sampler.endswith(" " + schedule):
                out["Sampler"], out["Schedule type"] = sampler[: -len(schedule) - 1], schedule
    return out


def _to_number(value: str) -> Any:
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    # the exponent may follow an integer mantissa: str(1e-05) is "1e-05"
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?", value):
        return float(value)
    return value


def png_info(parameters: str) -> PngImagePlugin.PngInfo:
    """A PNG text chunk "parameters": tEXt when Latin-1 can hold it, else iTXt (UTF-8), as A1111 writes."""
    info = PngImagePlugin.PngInfo()
    try:
        parameters.encode("latin-1")
        info.add_text("parameters", parameters)
    except UnicodeEncodeError:
        info.add_itxt("parameters", parameters)
    return info


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
UNICODE_PREFIX = b"UNICODE\x00"  # EXIF's character-code header; A1111 (piexif) writes UTF-16 big-endian after it


def exif_with_parameters(parameters: str) -> bytes:
    """EXIF holding the parameters as A1111 writes them into JPEG and WebP files (piexif's UserComment, UNDEFINED
    type, "UNICODE" header, UTF-16BE): a minimal big-endian TIFF block, IFD0 pointing to an Exif IFD with that one
    tag. Built by hand: Pillow would store a bytes value as BYTE, which A1111's reader (piexif) cannot decode."""
    comment = UNICODE_PREFIX + parameters.encode("utf-16-be")
    exif_ifd = 8 + 2 + 12 + 4  # after the TIFF header and IFD0 (one entry)
    data = exif_ifd + 2 + 12 + 4  # after the Exif IFD (one entry)
    return (b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8)
            + struct.pack(">HHHII", 1, EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)
            + struct.pack(">HHHII", 1, USER_COMMENT, 7, len(comment), data) + struct.pack(">I", 0) + comment)


def save_image(image: Image.Image, path: str | Path, parameters: str, force: bool = False, quality: int = 90) -> None:
    """Write atomically (weights.io.atomic_path: temp file, fsync, rename): a failed write (a full disk) leaves no
    partial file and any existing file as it was; an existing file is replaced only with `force`. The format
    follows the suffix (.jpg/.jpeg, .webp; anything else a PNG); the parameters go where A1111 puts them (PNG text,
    else EXIF)."""
    from .weights.io import atomic_path

    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower(), "PNG")  # any other name is written as a PNG, as before
    with atomic_path(path, force=force) as tmp:
        if fmt == "PNG":
            image.save(tmp, format="PNG", pnginfo=png_info(parameters))
        else:
            image.convert("RGB").save(tmp, format=fmt, quality=quality, exif=exif_with_parameters(parameters))


def save_png(image: Image.Image, path: str | Path, parameters: str, force: bool = False) -> None:
    """save_image for a PNG (what most callers write)."""
    save_image(image, path, parameters, force)


def read_parameters(path: str | Path) -> str | None:
    """The "parameters" text of a PNG, or the EXIF UserComment of a JPEG/WebP (A1111's places), or None."""
    with Image.open(path) as img:
        img.load()
        text = img.info.get("parameters") or (img.text.get("parameters") if hasattr(img, "text") else None)
        if text:
            return text
        comment = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and len(comment) > 8:
        head, body = comment[:8], comment[8:]
        if head == UNICODE_PREFIX:
            return body.decode("utf-16-be", errors="replace")
        return body.decode("utf-8" if head.startswith(b"ASCII") else "latin-1", errors="replace").rstrip("\x00")
    return comment if isinstance(comment, str) and comment else None
