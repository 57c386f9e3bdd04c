"""Between latents and pixels as generation does it: the VAE whole or in tiles (vae_tiling.py), the tiny
autoencoder (nn/taesd.py) when asked, and a half-precision decode that overflows redone in fp32.

When to tile (`tiled`): as the request says (vae_tiling True/False), else automatically when the untiled pass's
working memory (memory_estimate.py) would exceed AUTO_TILE_BYTES or the memory available now. The fixed bound keeps
the choice, and so the pixels, the same on every machine for ordinary sizes (an SD1.5 decode: 1024² untiled in
either precision, 1536² tiled in fp32, 2048² tiled in both); the available memory only decides where the untiled
pass could not run at all. Seamless images (nn/seamless.py) are never tiled: each tile would wrap around on itself.
"""
from __future__ import annotations

import copy

import torch

from .memory_estimate import available_bytes
from .model import StableDiffusion
from .nn.taesd import TinyAutoencoder
from .vae_tiling import DEFAULT_TILE, decode_tiled, encode_tiled, should_tile, wraps_around

AUTO_TILE_BYTES = 6 << 30


def tiled(model: StableDiffusion, height: int, width: int, batch: int, setting: bool | None,
          encode: bool = False) -> bool:
    """Whether the VAE pass for `batch` images of height x width runs in tiles (see the module's docstring)."""
    if setting is not None:
        return setting
    if max(height, width) <= DEFAULT_TILE or wraps_around(model.vae):  # cheap answers before reading the memory
        return False
    budget = min(AUTO_TILE_BYTES, available_bytes(model.device) or AUTO_TILE_BYTES)
    return should_tile(model.vae, height, width, next(model.vae.parameters()).dtype, budget=budget,
                       batch=1 if encode else batch, encode=encode)


@torch.no_grad()
def decode(model: StableDiffusion, latents: torch.Tensor, tiles: bool = False,
           tiny: TinyAutoencoder | None = None) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1], unclamped and unchecked for NaN (the caller says what it decoded).
    With `tiny`, the tiny autoencoder decodes instead of the VAE. A half-precision decode that overflows is redone
    in fp32 by a copy of the VAE: the shared model is never changed (the server decodes previews from another
    thread)."""
    if tiny is not None:
        dtype = next(tiny.parameters()).dtype
        return tiny.decode(latents.to(model.device, dtype)).float()
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    z = latents.to(model.device) / model.config.vae.scaling_factor

    def run(v: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (decode_tiled(v, x) if tiles else v.decode(x)).float()

    pixels = run(vae, z.to(dtype))
    if dtype != torch.float32 and not torch.isfinite(pixels).all():  # fp32 is checked once, by the caller
        pixels = run(copy.deepcopy(vae).float(), z.float())
    return pixels


@torch.no_grad()
def encode(model: StableDiffusion, pixels: torch.Tensor, generators: list[torch.Generator],
           tiles: bool = False) -> torch.Tensor:
    """Pixels in [-1, 1] (1 or b images) -> scaled latents, one posterior sample per image from its generator."""
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    out = []
    for i, g in enumerate(generators):
        img = pixels[i if pixels.shape[0] > 1 else 0][None].to(model.device, dtype)
        posterior = encode_tiled(vae, img) if tiles else vae.encode(img)
        out.append(posterior.sample(g).float())
    return torch.cat(out) * model.config.vae.scaling_factor
