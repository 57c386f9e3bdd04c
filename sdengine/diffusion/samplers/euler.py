"""Euler-family samplers over sigmas (k-diffusion's formulation; diffusers' Euler* / Heun schedulers)."""
from __future__ import annotations

import torch

from .base import DenoiseFn, SamplerSpec, StepCallback, to_d


@torch.no_grad()
def sample_euler(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """First-order steps along the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("euler", sample_euler, "Euler", ("k_euler",), diffusers_class="EulerDiscreteScheduler"),
}
