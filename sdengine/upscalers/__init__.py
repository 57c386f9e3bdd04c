"""Model upscalers (ESRGAN, Real-ESRGAN and its compact net, SwinIR), in sdengine's own code: files found by name in
the upscalers folder, the architecture detected from keys and shapes (detect.py), run in overlapping tiles (tiles.py),
and an image brought to any scale the way AUTOMATIC1111 does (the model as many times as it takes, then Lanczos).

Files: .safetensors, or .pth/.pt/.ckpt pickles read through weights.io.read_tensors (a pickle that would run code is
refused), BasicSR's {"params_ema": ...}/{"params": ...} wrappers included.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..images import images_to_tensor, tensor_to_images
from .detect import Config, UpscalerFormatError, detect
from .nets import CompactConfig, RRDBConfig, RRDBNet, SRVGGNetCompact
from .swinir import SwinIR, SwinIRConfig
from .tiles import upscale_tensor

__all__ = ["SUFFIXES", "Upscaler", "UpscalerError", "UpscalerFormatError", "build", "inspect_upscaler",
           "list_upscalers", "load_by_name", "load_upscaler", "resolve_upscaler", "target_size", "upscale_image",
           "upscale_tensor"]

SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")
DEFAULT_TILE, DEFAULT_OVERLAP = 192, 16  # input pixels; A1111's ESRGAN tile default is 192
MAX_PASSES = 3  # A1111 applies the model at most 3 times to reach a scale


class UpscalerError(ValueError):
    """An upscaler that cannot be found or loaded; the message is one line."""


@dataclass(frozen=True)
class Upscaler:
    """A loaded upscaler: its name (the file's stem, as A1111 lists it), the net and its integer scale."""

    name: str
    path: Path
    net: nn.Module
    config: Config

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def architecture(self) -> str:
        return {RRDBConfig: "ESRGAN", CompactConfig: "SRVGGNetCompact", SwinIRConfig: "SwinIR"}[type(self.config)]

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype


def build(config: Config) -> nn.Module:
    """A fresh net of a config (random weights)."""
    nets: dict[type, type[nn.Module]] = {RRDBConfig: RRDBNet, CompactConfig: SRVGGNetCompact, SwinIRConfig: SwinIR}
    return nets[type(config)](config)


# --- the folder -----------------------------------------------------------------------------------------------------

def _folder(folder: Path | None) -> Path:
    from ..runtime import upscalers_dir

    return Path(folder) if folder is not None else upscalers_dir()


def list_upscalers(folder: Path | None = None) -> list[str]:
    """The names (file stems) of the upscaler files in the folder, sorted."""
    folder = _folder(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def valid_name(name: str) -> bool:
    """A name, not a path: no separators, no leading dot (clients name files in the folder, never elsewhere)."""
    return bool(name) and not re.search(r"[/\\\x00]", name) and not name.startswith(".")


def resolve_upscaler(name: str, folder: Path | None = None) -> Path:
    """The file of the upscaler called `name` (its stem, or its full file name) in the folder; never a path."""
    folder = _folder(folder)
    if not valid_name(name):
        raise UpscalerError(f"upscaler names are file names in {folder}, not paths: {name!r}")
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in SUFFIXES and name in (p.stem, p.name):
                return p
    known = ", ".join(list_upscalers(folder)[:20]) or "none"
    raise UpscalerError(f"no upscaler {name!r} in {folder} (found: {known}; $SDENGINE_UPSCALERS or "
                        "$SDENGINE_HOME/upscalers set the folder)")


# --- loading --------------------------------------------------------------------------------------------------------

def load_upscaler(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                  ) -> Upscaler:
    """A file -> its upscaler, strictly loaded (a missing, unexpected or misshapen tensor names its key)."""
    from ..weights.io import CheckpointError, read_tensors

    path = Path(path)
    try:
        tensors, _ = read_tensors(path)
    except CheckpointError as e:
        raise UpscalerError(str(e)) from None
    try:
        config, sd = detect(tensors)
    except UpscalerFormatError as e:
        raise UpscalerError(f"{path}: {e}") from None
    net = build(config)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UpscalerError(f"{path}: a broken {type(net).__name__} ({detail})") from None
    if isinstance(config, SwinIRConfig) and dtype == torch.float16:
        dtype = torch.float32  # its attention logits and 0..255 JPEG range overflow fp16 (spandrel refuses it too)
    net.eval().requires_grad_(False).to(device, dtype)
    return Upscaler(path.stem, path, net, config)


def inspect_upscaler(path: str | Path) -> Config:
    """A file's detected config (architecture, scale: `.scale`) without building the net; for listings such as the
    HTTP API's /sdapi/v1/upscalers. Raises UpscalerError as load_upscaler does."""
    from ..weights.io import CheckpointError, read_tensors

    try:
        return detect(read_tensors(path)[0])[0]
    except (CheckpointError, UpscalerFormatError) as e:
        raise UpscalerError(str(e) if isinstance(e, CheckpointError) else f"{path}: {e}") from None


@lru_cache(maxsize=2)
def _cached(path: Path, stamp: tuple[int, int], device: str, dtype: torch.dtype) -> Upscaler:
    return load_upscaler(path, device, dtype)


def load_by_name(name: str, folder: Path | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Upscaler:
    """The upscaler called `name` in the folder; the last two loaded are kept (a changed file is read again)."""
    path = resolve_upscaler(name, folder)
    st = path.stat()
    return _cached(path, (st.st_mtime_ns, st.st_size), str(torch.device(device)), dtype)


# --- images ---------------------------------------------------------------------------------------------------------

def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's size for an upscale by `scale` (modules/upscaler.py): each side rounded down to a multiple of 8."""
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


def upscale_image(image: Image.Image, upscaler: Upscaler, scale: float | None = None, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """An RGB image upscaled by `scale` (default: the model's) as A1111's Upscaler.upscale does: to
    `target_size`, the model applied until the image covers it (at most 3 times; a scale of 1 still runs it once,
    for restoration models), then a Lanczos resize to the exact size."""
    image = image.convert("RGB")
    scale = upscaler.scale if scale is None else scale
    size = target_size(image.width, image.height, scale)
    for i in range(MAX_PASSES):
        if image.width >= size[0] and image.height >= size[1] and (i > 0 or scale != 1):
            break
        pixels = images_to_tensor([image]).add(1).div(2)  # [0, 1]
        up = upscale_tensor(upscaler.net, pixels, upscaler.scale, tile, overlap)
        image = tensor_to_images(up)[0]
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    return image
