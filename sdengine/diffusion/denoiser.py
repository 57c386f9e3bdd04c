"""The UNet as a denoiser D(x, sigma) -> x0 estimate, and classifier-free guidance, each written once.

Samplers see only a callable `model(x, sigma) -> denoised` over x = x0 + sigma * eps (the variance-exploding
view); the parameterization (eps or v) and the scaling to the UNet's variance-preserving input live here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from .schedule import NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


class Denoiser:
    """Wraps a UNet trained on VP latents with eps or v targets."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction: Literal["eps", "v"] = "eps"):
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 concat: torch.Tensor | None = None) -> torch.Tensor:
        """x0 estimate. sigma: (b,) or scalar; concat: extra input channels (inpainting UNets' mask + image)."""
        # Sigmas live on the CPU (schedules are numpy); move them to x, which may be on a GPU.
        sigma = sigma.to(x.device, torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        s = append_dims(sigma, x.ndim)
        c_in = 1.0 / (s ** 2 + 1.0) ** 0.5
        t = self.schedule.sigma_to_t_torch(sigma)
        unet_in = x * c_in
        if concat is not None:
            unet_in = torch.cat([unet_in, concat], dim=1)
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(unet_in.to(dtype), t.to(x.device), context.to(dtype)).to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        # v = alpha * eps - sigma_vp * x0, rewritten for VE x: x0 = x / (s^2 + 1) - v * s / sqrt(s^2 + 1)
        return x / (s ** 2 + 1.0) - out * s * c_in


class CFGDenoiser:
    """Classifier-free guidance: uncond + scale * (cond - uncond), both halves in one batched UNet call."""

    def __init__(self, denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
                 concat: torch.Tensor | None = None):
        self.denoiser = denoiser
        self.cond, self.uncond, self.scale, self.concat = cond, uncond, scale, concat

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        if self.uncond is None or self.scale == 1.0:  # guidance off: one pass suffices
            return self.denoiser(x, sigma, self.cond, self.concat)
        concat = None if self.concat is None else torch.cat([self.concat, self.concat])
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.uncond, self.cond]), concat)
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)
