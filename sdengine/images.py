"""PIL images <-> tensors, written once: pixels are (b, 3, h, w) in [-1, 1] going into the VAE and [0, 1] coming
out of `Pipeline.decode`; masks are (1, 1, h, w) of 0/1 with white (>= 0.5) meaning repaint."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, h, w) in [-1, 1], resized (Lanczos) when its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return images_to_tensor([image])


def images_to_tensor(images: list[Image.Image] | list[np.ndarray], device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """Same-sized RGB images (PIL or uint8 HxWx3 arrays) -> (b, 3, h, w) float32 in [-1, 1] on `device`. The uint8
    values cross to the device (4x fewer bytes than floats) and are converted there."""
    arrays = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    return arrays.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def mask_to_grey(mask: Image.Image) -> Image.Image:
    """A mask as A1111 reads it (processing.create_binary_mask): an RGBA image with any transparency is its alpha
    channel, anything else its luminance (convert("L")). So a coloured mask counts by brightness: pure red is 76/255
    and repaints nothing, in A1111 as here (`empty_mask_note` says so rather than letting a run change nothing)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A")
    return mask.convert("L")


def empty_mask_note(mask: Image.Image) -> str | None:
    """A note when a (greyscale) mask repaints nothing: no pixel is at least half white."""
    if mask.convert("L").getextrema()[1] >= 128:
        return None
    return ("the mask repaints nothing: masks are read by brightness (white repaints), as A1111 reads them; a "
            "coloured mask counts by luminance (pure red is 30% grey): paint it white")


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask -> (1, 1, h, w) of 0/1, white (>= 0.5) = repaint (read by `mask_to_grey`)."""
    mask = mask_to_grey(mask)
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    arr = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]


def tensor_to_arrays(pixels: torch.Tensor, rounding: bool = True) -> np.ndarray:
    """(b, 3, h, w) in [0, 1] -> uint8 (b, h, w, 3). rounding=False truncates, as A1111 does before resizing."""
    scaled = pixels.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255
    return (scaled.round() if rounding else scaled).astype(np.uint8)


def tensor_to_images(pixels: torch.Tensor, rounding: bool = True) -> list[Image.Image]:
    """(b, 3, h, w) in [0, 1] -> PIL images."""
    return [Image.fromarray(a) for a in tensor_to_arrays(pixels, rounding)]


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images in rows as A1111 lays out a batch's grid: round(sqrt(n)) rows, filled left to right."""
    import math

    rows = max(1, min(len(images), round(math.sqrt(len(images)))))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
