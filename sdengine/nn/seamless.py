"""Seamless tiling (A1111's "Tiling"): every padded convolution pads circularly, so the image wraps around and
its left edge continues its right one, its top its bottom. Switched on for one generation and back off after.

Circular padding makes each network equivariant to rolls of its input by whole latent pixels (rolls by a multiple
of the total stride where convolutions downsample), which is what makes the output tile.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def circular_padding(modules: list[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Within the block, the padded Conv2d layers of `modules` pad circularly (as A1111 patches them); their
    previous padding modes come back however the block ends."""
    convs = [m for module in modules for m in module.modules()
             if isinstance(m, nn.Conv2d) and any(p > 0 for p in _padding(m))] if enabled else []
    before = [c.padding_mode for c in convs]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convs, before):
            conv.padding_mode = mode


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    # "same"/"valid" string paddings: nn.Conv2d keeps the resolved amounts for the non-zeros padding modes
    return tuple(conv._reversed_padding_repeated_twice)
