"""Tiled VAE decode and encode: big images in bounded memory.

The decoder's working memory grows with the pixels (an SD1.5 decode at 2048x2048 needs tens of GB), so large images
are decoded in overlapping square tiles, one image at a time, and the overlaps are cross-faded with linear ramps so
no seam shows. This is diffusers' AutoencoderKL tiling (`enable_tiling()`: tiled_decode, tiled_encode, blend_v,
blend_h) reproduced exactly, tile for tile (tests/test_vae_tiling.py checks it to 1e-4 in fp32), with two changes
that do not change the result:

- memory: only the previous row of decoded tiles is kept (diffusers keeps every tile until the end), each finished
  tile is written straight into the output, and a batch is decoded one image at a time (the decoder is per-image, so
  the working memory is one tile's, whatever the batch);
- sizes: tile starts are in latent pixels and the overlap is a whole number of latent pixels, so the output always
  has the untiled size (diffusers rounds the pixel and latent overlaps separately, and for some tile/overlap pairs
  its output is the wrong size); where diffusers' rounding is consistent (512 px with 0.25, and most settings) the
  tiles are the same.

Each tile runs its GroupNorms on its own statistics, so a tiled decode is not the untiled one: colours can drift a
little between distant tiles, and the blending hides the borders (A1111's Tiled VAE extension instead estimates the
GroupNorm statistics over the whole image; not done here). Defaults: tiles of 512 px (64 latents at f=8) with a
quarter overlap (128 px cross-fades), diffusers' defaults for SD1.x/2.x; diffusers uses 1024 px for SDXL's VAE
(pass tile=1024 to match it: same quality, twice the memory).

Seamless mode (nn/seamless.py, circular padding) is refused: each tile would wrap around on itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import VAEConfig
from .memory_estimate import DEFAULT_VAE_TILE, vae_decode_bytes, vae_encode_bytes
from .nn.vae import AutoencoderKL, DiagonalGaussian

DEFAULT_TILE = DEFAULT_VAE_TILE  # pixels per tile side (diffusers' sample_size for SD1.x/2.x)
DEFAULT_OVERLAP = 0.25  # fraction of a tile shared with its neighbour (diffusers' tile_overlap_factor)


def tile_geometry(downscale: int, tile: int, overlap: float) -> tuple[int, int]:
    """(tile side, stride) in latent pixels for a tile of `tile` image pixels; checks the arguments."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < downscale or tile % downscale:
        raise ValueError(f"VAE tile size must be a positive multiple of {downscale} pixels, got {tile!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"VAE tile overlap must be a fraction in [0, 1), got {overlap!r}")
    side = tile // downscale
    stride = int(side * (1 - overlap))  # diffusers' rounding (overlap_size in tiled_decode)
    if stride < 1:
        raise ValueError(f"VAE tile overlap {overlap} leaves no stride on a {tile}-pixel tile")
    return side, stride


def wraps_around(vae: nn.Module) -> bool:
    """Whether the VAE is in seamless mode (nn/seamless.py: circular padding), where it must not be tiled."""
    return any(isinstance(m, nn.Conv2d) and m.padding_mode == "circular" for m in vae.modules())


def _check_not_circular(vae: nn.Module) -> None:
    if wraps_around(vae):
        raise ValueError("tiled VAE decode/encode cannot wrap around: seamless tiling needs the untiled VAE")


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows (dim 2) or columns (dim 3) of `b`, in place, from the last ones of `a`:
    diffusers' blend_v / blend_h, vectorised. The ramp is computed in float64 and the mix in at least fp32 (what
    diffusers' Python-float scalars do), so fp32 results are the same and half-precision tiles lose nothing more."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return
    ramp = torch.arange(e, dtype=torch.float64) / e
    shape = [1, 1, 1, 1]
    shape[dim] = e
    compute = torch.promote_types(b.dtype, torch.float32)
    up = ramp.to(b.device, compute).view(shape)
    down = (1 - ramp).to(b.device, compute).view(shape)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e).to(compute) * down + head.to(compute) * up)


def _tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, in_scale: int, out_scale: int, side: int,
           stride: int, out_size: tuple[int, int]) -> torch.Tensor:
    """Run `run` over overlapping tiles of x (one image) and blend the results as diffusers does.

    Tiles start every `stride` units and are `side` units wide, where an input unit is `in_scale` pixels of x and an
    output unit `out_scale` pixels of the result (decode: 1 -> f, encode: f -> 1). Tiles are visited row by row; a
    tile is first cross-faded with the (already blended) tile above, then with the one to its left, then its
    top-left stride x stride units go to the output. Only the previous row is kept."""
    h_units, w_units = out_size  # the result's size in units; tiles starting at or beyond it would add nothing
    blend = (side - stride) * out_scale
    keep = stride * out_scale
    out: torch.Tensor | None = None
    above: list[torch.Tensor] = []
    for top in range(0, h_units, stride):
        row: list[torch.Tensor] = []
        for j, left in enumerate(range(0, w_units, stride)):
            piece = x[:, :, top * in_scale:(top + side) * in_scale, left * in_scale:(left + side) * in_scale]
            y = run(piece)
            if above:
                _blend(above[j], y, blend, 2)
            if row:
                _blend(row[-1], y, blend, 3)
            row.append(y)
            if out is None:
                out = y.new_empty(y.shape[0], y.shape[1], h_units * out_scale, w_units * out_scale)
            done = y[:, :, :keep, :keep]
            oy, ox = top * out_scale, left * out_scale
            out[:, :, oy:oy + done.shape[2], ox:ox + done.shape[3]] = done
        above = row
    assert out is not None  # out_size is at least 1x1
    return out


def _per_image(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    # one image at a time bounds the working memory whatever the batch (every layer of the VAE is per-image)
    outs = [fn(batch[i:i + 1]) for i in range(batch.shape[0])]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: float = DEFAULT_OVERLAP) -> torch.Tensor:
    """vae.decode(z) in overlapping tiles of `tile` pixels: unscaled latents (b, 4, h, w) -> pixels (b, 3, h*f, w*f)
    in the decoder's dtype. Working memory: one tile of one image, plus the output and one row of tiles."""
    if z.ndim != 4 or z.shape[1] != vae.config.embed_dim or min(z.shape[2:]) < 1:
        raise ValueError(f"decode_tiled wants latents (batch, {vae.config.embed_dim}, h, w), got {tuple(z.shape)}")
    _check_not_circular(vae)
    f = vae.config.downscale
    side, stride = tile_geometry(f, tile, overlap)
    size = (z.shape[2], z.shape[3])
    if max(size) <= side:  # one tile: the untiled pass (diffusers' decode() does the same)
        return vae.decode(z)
    return _per_image(lambda one: _tiled(vae.decode, one, 1, f, side, stride, size), z)


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, x: torch.Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: float = DEFAULT_OVERLAP) -> DiagonalGaussian:
    """vae.encode(x) in overlapping tiles of `tile` pixels: pixels (b, 3, H, W) in [-1, 1] -> the posterior over
    latents (b, 4, H//f, W//f), the posterior's moments blended across tiles (diffusers' tiled_encode), so callers
    sample it with their own generator as they do vae.encode's."""
    f = vae.config.downscale
    if x.ndim != 4 or x.shape[1] != vae.config.in_channels or min(x.shape[2:]) < f:
        raise ValueError(f"encode_tiled wants images (batch, {vae.config.in_channels}, H, W) of at least {f}x{f} "
                         f"pixels, got {tuple(x.shape)}")
    _check_not_circular(vae)
    side, stride = tile_geometry(f, tile, overlap)
    if max(x.shape[2:]) <= tile:  # one tile: the untiled pass (diffusers' encode() does the same)
        return vae.encode(x)

    def moments(piece: torch.Tensor) -> torch.Tensor:
        return vae.quant_conv(vae.encoder(piece))

    size = (x.shape[2] // f, x.shape[3] // f)  # the encoder floors odd sizes at each downsample, as untiled
    return DiagonalGaussian(_per_image(lambda one: _tiled(moments, one, f, 1, side, stride, size), x))


def _config(vae: VAEConfig | AutoencoderKL) -> VAEConfig:
    if isinstance(vae, VAEConfig):
        return vae
    if isinstance(getattr(vae, "config", None), VAEConfig):
        return vae.config
    raise ValueError(f"should_tile wants a VAEConfig or sdengine's AutoencoderKL, got {type(vae).__name__}")


def should_tile(vae: VAEConfig | AutoencoderKL, height: int, width: int, dtype: torch.dtype, *, budget: int,
                batch: int = 1, encode: bool = False, tile: int = DEFAULT_TILE) -> bool:
    """Whether to tile the VAE for images of height x width pixels: the rule is "the untiled pass would not fit".

    True when the image is larger than one tile on some side AND memory_estimate's working-memory estimate of the
    untiled decode of `batch` images (encode=True: the encode of one image, as the pipeline encodes one at a time)
    in `dtype` exceeds `budget` bytes. An image within one tile is never tiled: tiling would change nothing. The
    caller picks the budget (e.g. memory_estimate.available_bytes(device), or a fixed cap)."""
    cfg = _config(vae)
    for name, value in (("height", height), ("width", width), ("batch", batch), ("budget", budget)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"should_tile: {name} must be a positive integer, got {value!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"should_tile: dtype must be a floating-point type, got {dtype}")
    tile_geometry(cfg.downscale, tile, 0.0)
    if max(height, width) <= tile:
        return False
    element = torch.finfo(dtype).bits // 8
    need = (vae_encode_bytes(cfg, height, width, 1, element) if encode
            else vae_decode_bytes(cfg, height, width, batch, element))
    return need > budget
