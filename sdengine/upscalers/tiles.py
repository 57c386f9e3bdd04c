"""Running an upscaler over an image in overlapping tiles, so that any image size fits any device's memory.

Tiles form a grid (the same column starts in every row); where two overlap, their outputs are cross-faded. The
fade spans the middle half of the overlap and gives the outer quarter on each side no weight: a tile's border
pixels, which saw zero padding instead of the neighbouring image, never reach the result. So a net whose receptive
field reaches less than overlap/4 input pixels gives exactly its untiled output; deeper nets (ESRGAN's reaches far)
get seams blended away rather than cut.
"""
from __future__ import annotations

import torch
from torch import nn


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering 0..size, neighbours overlapping by at least `overlap`."""
    if tile <= 0 or size <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, fade: int, before: bool, after: bool) -> torch.Tensor:
    """Weights along one axis of a tile's output: 1, fading to 0 over the `fade` output pixels at each side that
    has a neighbouring tile (linear over the middle half of it, 0 in the outer quarter)."""
    w = torch.ones(length)
    if fade <= 0:
        return w
    d = torch.arange(length, dtype=torch.float32) + 0.5  # distance of each pixel centre from the start
    ramp = lambda dist: ((dist - fade / 4) / (fade / 2)).clamp(0, 1)  # noqa: E731
    if before:
        w = torch.minimum(w, ramp(d))
    if after:
        w = torch.minimum(w, ramp(length - d))
    return w


@torch.no_grad()
def upscale_tensor(net: nn.Module, image: torch.Tensor, scale: int, tile: int = 192, overlap: int = 16,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(b, c, h, w) in [0, 1] -> (b, c', h*scale, w*scale) float32 on the CPU. tile: the tile's side in input pixels
    (0: the whole image at once); overlap: input pixels shared by neighbouring tiles. Each tile goes to the net's
    device in `dtype` (default: the net's own); the result is assembled on the CPU so device memory holds one tile."""
    param = next(net.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    if not 0 <= overlap or (tile > 0 and overlap >= tile):
        raise ValueError(f"tile overlap must be at least 0 and below the tile size ({tile}), got {overlap}")
    b, _, h, w = image.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(h, tile) if tile > 0 else h, min(w, tile) if tile > 0 else w
    out = weight = None
    for y in ys:
        wy = _ramp(th * scale, overlap * scale, y > 0, y + th < h)
        for x in xs:
            piece = net(image[..., y:y + th, x:x + tw].to(device, dtype)).float().cpu()
            if piece.shape[-2:] != (th * scale, tw * scale):
                raise RuntimeError(f"the upscaler made a {tuple(piece.shape[-2:])} tile from {(th, tw)}, not x{scale}")
            if len(ys) == len(xs) == 1:
                return piece
            if out is None:
                out = torch.zeros(b, piece.shape[1], h * scale, w * scale)
                weight = torch.zeros(1, 1, h * scale, w * scale)
            wt = wy[:, None] * _ramp(tw * scale, overlap * scale, x > 0, x + tw < w)[None, :]
            region = (..., slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[region] += piece * wt
            weight[region] += wt
    assert out is not None and weight is not None
    return out / weight
