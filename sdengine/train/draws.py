"""The random numbers of a training batch: posterior samples, noise, timesteps, caption dropout, cache rows.

Every number a batch position needs is a function of (seed, step, position) alone, so any split of a step's batch
over processes (torchrun) and accumulation steps, and any resume, sees the same ones. Positions are drawn in blocks
of DRAW_BLOCK, each block from its own generator on the training device: a batch of thousands costs a few
generator calls instead of one per item (~45 ms of host time per 1,024 items), and a block drawn for one slice of
a step serves the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .data import item_seed

DRAW_BLOCK = 64  # batch positions per generator
_SALT = 3  # keeps these streams apart from the data's (sources seed their items with item_seed(seed, ...) too)


@dataclass(frozen=True)
class Draw:
    """One random value per batch position: uniform in [0, 1) (rand), standard normal (randn) or an integer in
    [0, high) (randint), of `shape`."""
    kind: Literal["rand", "randn", "randint"]
    shape: tuple[int, ...] = ()
    high: int = 0


class BatchDraws:
    """draws(step, indices, device) -> {name: tensor (len(indices), *shape)} for the fields given, drawn in their
    order within each block: a field added last leaves the others' numbers as they were."""

    def __init__(self, seed: int, fields: dict[str, Draw]):
        self.seed, self.fields = seed, fields
        self._blocks: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}  # this step's blocks only

    def _block(self, step: int, block: int, device: torch.device) -> dict[str, torch.Tensor]:
        key = (step, block, str(device))
        if key not in self._blocks:
            self._blocks = {k: v for k, v in self._blocks.items() if k[0] == step}
            g = torch.Generator(device=device).manual_seed(item_seed(self.seed + _SALT, step * 1_000_003 + block))
            out = {}
            for name, d in self.fields.items():
                shape = (DRAW_BLOCK, *d.shape)
                if d.kind == "randint":
                    out[name] = torch.randint(0, d.high, shape, generator=g, device=device)
                else:
                    out[name] = getattr(torch, d.kind)(shape, generator=g, device=device)
            self._blocks[key] = out
        return self._blocks[key]

    def __call__(self, step: int, indices: range, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        blocks = [self._block(step, b, device)
                  for b in range(indices.start // DRAW_BLOCK, (indices.stop - 1) // DRAW_BLOCK + 1)]
        lo = indices.start % DRAW_BLOCK
        return {name: torch.cat([blk[name] for blk in blocks])[lo: lo + len(indices)] for name in self.fields}

    def clear(self) -> None:
        self._blocks.clear()
