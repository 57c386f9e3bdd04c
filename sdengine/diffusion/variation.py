"""Variation seeds, as AUTOMATIC1111 makes them (subseed, subseed_strength, seed_resize_from_w/h).

An image's starting noise is its seed's noise spherically interpolated towards a second seed's noise by the
variation strength: strength 0 is the seed's image, 1 the variation seed's, and values between walk from one to the
other through images that stay close to both. "Seed resize from" keeps the composition a seed had at another size:
the seed's noise is drawn at that size and pasted, centred, into noise of the new size.

The numbers are A1111's: each noise comes from a CPU generator seeded with the (sub)seed, and the interpolation is
its slerp, which normalizes along dim 1 of a per-image (C, H, W) tensor, i.e. per channel and column.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .samplers import BatchNoise


@dataclass(frozen=True)
class Variation:
    subseeds: list[int]  # one per image of the batch
    strength: float  # 0: the seed's noise; 1: the variation seed's
    resize_from: tuple[int, int] | None = None  # (height, width) of the latent the seed's noise was drawn at


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two per-image (C, H, W) noises, normalized along dim 1 (A1111's slerp)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: the angle is too small to divide by (A1111 blends linearly here)
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _paste_centred(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`src` (C, h, w) over the middle of `dst` (C, H, W), cropped where it is larger."""
    dx, dy = (dst.shape[2] - src.shape[2]) // 2, (dst.shape[1] - src.shape[1]) // 2
    w = src.shape[2] if dx >= 0 else src.shape[2] + 2 * dx
    h = src.shape[1] if dy >= 0 else src.shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    dst[:, ty:ty + h, tx:tx + w] = src[:, sy:sy + h, sx:sx + w]
    return dst


def initial_noise(source: BatchNoise, seeds: list[int], variation: Variation) -> torch.Tensor:
    """The batch's first noise with the variation applied. Image i's own generator is drawn from exactly as for
    plain noise, so the sampler's later (ancestral) noise is the same as without a variation."""
    shape = tuple(source.shape[1:])
    seed_shape = (shape[0], *variation.resize_from) if variation.resize_from else shape
    images = []
    for i, (seed, generator) in enumerate(zip(seeds, source.generators)):
        if seed_shape != shape:
            noise = _randn(seed, seed_shape)
        else:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if variation.strength != 0:
            noise = slerp(variation.strength, noise, _randn(variation.subseeds[i], seed_shape))
        if seed_shape != shape:
            noise = _paste_centred(torch.randn(shape, generator=generator, dtype=torch.float32), noise)
        images.append(noise)
    return torch.stack(images).to(source.device, source.dtype)
