"""DeepCache (Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"): the UNet's deep
features change little from one sampling step to the next, so a full UNet call every `interval` steps stores what
the up-path holds at a shallow skip branch, and the steps between run only the shallow input blocks down to that
branch and the output blocks from it up, on the stored deep features.

Branches count the original UNet's flat input blocks: branch b caches at depth k = b + 1 (the first input block is
the stem convolution), so a partial call runs input_blocks[0..k] and the last k + 1 output blocks. Branch 0 is
DeepCache's shallowest (SD1.x: the stem and the first res+attention block, and the two full-resolution output
blocks that consume their skips), the setting of the paper's headline numbers.

Which step is under way is told from outside (`step`, advanced by the sampler's per-step callback through
CFGDenoiser's step listeners): every evaluation of a full step (both of Heun's) is a full call and refreshes the
cache, so second-order samplers stay consistent within a step; an input of another shape than the cached one
(a batch without guidance's unconditional half) is also a full call, never a wrong reuse.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.unet import UNetModel


class DeepCacheUNet(nn.Module):
    """A UNetModel with DeepCache: call it as the UNet (x, timesteps, context, y=None, control=None).

    interval: a full call every `interval` steps (steps i with i % interval == 0; 1: every call is the plain UNet,
    bit for bit). branch: the skip branch at which the deep features are cached (0 = shallowest, fastest).
    start: steps before caching begins, all full (the early steps, where the image's layout forms and the deep
    features change fastest; ComfyUI's DeepCache start_step, the A1111 extension's cache_enable_step); from
    `start` on, steps start, start + interval, ... are full.
    full_steps: instead of the uniform interval, exactly these steps are full (DeepCache's non-uniform schedule
    chooses them denser where features change fastest)."""

    def __init__(self, unet: UNetModel, interval: int = 3, branch: int = 0, full_steps: frozenset[int] | None = None,
                 start: int = 0):
        super().__init__()
        if not isinstance(unet, UNetModel):
            raise TypeError(f"DeepCache wraps sdengine's UNetModel, not {type(unet).__name__}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"DeepCache interval must be an integer >= 1, got {interval!r}")
        branches = len(unet.input_blocks) - 1  # the deepest input block's skip is the last cacheable branch
        if not isinstance(branch, int) or not 0 <= branch < branches:
            raise ValueError(f"DeepCache branch must be in 0..{branches - 1} for this UNet, got {branch!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"DeepCache start must be a step >= 0, got {start!r}")
        self.unet = unet
        self.start = start
        self.interval, self.branch, self.depth = interval, branch, branch + 1
        self.full_steps = full_steps
        self.step = 0
        self.full_calls = 0
        self.partial_calls = 0
        self._cache: torch.Tensor | None = None  # the input (h | skip) of the first output block a partial call runs
        self._key: tuple | None = None

    def set_step(self, step: int) -> None:
        """The sampling step under way (a CFGDenoiser step listener)."""
        self.step = step

    def is_full_step(self, step: int) -> bool:
        if self.full_steps is not None:
            return step in self.full_steps
        return step < self.start or (step - self.start) % self.interval == 0

    def reset(self) -> None:
        self._cache, self._key, self.step = None, None, 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if self.interval == 1 and self.full_steps is None:
            return self.unet(x, timesteps, context, y, control)
        if self.is_full_step(self.step) or self._cache is None or self._key != key:
            return self._full(x, timesteps, context, y, control, key)
        return self._partial(x, timesteps, context, y, control)

    def _full(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
              control: list[torch.Tensor] | None, key: tuple) -> torch.Tensor:
        """The plain UNet call, keeping the input of the output block where partial calls re-enter."""
        target = self.unet.output_blocks[len(self.unet.output_blocks) - 1 - self.depth]
        stored: list[torch.Tensor] = []
        handle = target.register_forward_pre_hook(lambda _m, args: stored.append(args[0]))
        try:
            out = self.unet(x, timesteps, context, y, control)
        finally:
            handle.remove()
        self._cache, self._key = stored[-1], key
        self.full_calls += 1
        return out

    def _partial(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                 control: list[torch.Tensor] | None) -> torch.Tensor:
        """UNetModel.forward restricted to the shallow blocks, the cached deep features in place of the rest."""
        unet, k = self.unet, self.depth
        if control is not None and len(control) != len(unet.input_blocks) + 1:
            raise ValueError(f"control holds {len(control)} residuals; this UNet takes {len(unet.input_blocks) + 1}")
        emb = unet.embed(x, timesteps, y)
        context = context.to(x.dtype)
        skips = []
        h = x
        for block in unet.input_blocks[:k + 1]:
            h = unet._run(block, h, emb, context)
            skips.append(h)
        if control is not None:  # the shallow skips' residuals; the deep ones acted in the cached features
            skips = [s + c.to(s.dtype) for s, c in zip(skips, control)]
        assert self._cache is not None
        deep = self._cache[:, :self._cache.shape[1] - skips[-1].shape[1]]
        h = deep
        for block in unet.output_blocks[len(unet.output_blocks) - 1 - k:]:
            skip = skips.pop()
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = unet._run(block, torch.cat([h, skip], dim=1), emb, context, size)
        self.partial_calls += 1
        return unet.out(h)


def nonuniform_steps(total: int, interval: int, center: int | None = None, power: float = 1.4) -> frozenset[int]:
    """DeepCache's non-uniform schedule: about total / interval full steps, densest around step `center` (default
    total // 4, where the paper finds the features change fastest) and sparser away from it; step 0 is always full.
    Positions are center + sign(u) |u|^power for u evenly spaced, so power 1 is uniform spacing."""
    if total < 1 or interval < 1 or power < 1:
        raise ValueError(f"nonuniform_steps needs total >= 1, interval >= 1, power >= 1; got {total}, {interval}, "
                         f"{power}")
    center = total // 4 if center is None else center
    if not 0 <= center < total:
        raise ValueError(f"center must be a step in 0..{total - 1}, got {center}")
    n = -(-total // interval)
    lo, hi = -(center ** (1 / power)), (total - 1 - center) ** (1 / power)
    knots = torch.linspace(lo, hi, n, dtype=torch.float64)
    steps = (center + knots.sign() * knots.abs() ** power).round().long().tolist()
    return frozenset([0, *steps])


def deepcache(unet: UNetModel, interval: int = 3, branch: int = 0, start: int = 0) -> DeepCacheUNet:
    """`unet` with DeepCache (uniform interval): use it where the UNet is called, advance `.step` every step."""
    return DeepCacheUNet(unet, interval, branch, start=start)
