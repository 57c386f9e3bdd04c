"""Euler-family samplers over sigmas (k-diffusion's formulation; diffusers' Euler* / Heun schedulers)."""
from __future__ import annotations

import torch

from .base import DenoiseFn, NoiseSource, SamplerSpec, StepCallback, to_d


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step sigma_from -> sigma_to into a deterministic step to sigma_down and fresh noise of scale
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 (eta = 1: the DDPM posterior's variance, Ho et al. 2020)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                              / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


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


@torch.no_grad()
def sample_euler_ancestral(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                           callback: StepCallback | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_{i+1} (Ho et al. 2020's
    ancestral sampling in k-diffusion's ODE form). One noise() draw per step before the last, as diffusers'
    EulerAncestralDiscreteScheduler draws from the pipeline's generators (its final draw is scaled by zero)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * (s_noise * sigma_up)
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn);
    the step to sigma = 0 is a plain Euler step, as the derivative there is undefined. Two model calls a step."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("euler", sample_euler, "Euler", ("k_euler",), diffusers_class="EulerDiscreteScheduler"),
    "euler_a": SamplerSpec("euler_a", sample_euler_ancestral, "Euler a", ("k_euler_a",), stochastic=True,
                           diffusers_class="EulerAncestralDiscreteScheduler"),
    "heun": SamplerSpec("heun", sample_heun, "Heun", ("k_heun",), diffusers_class="HeunDiscreteScheduler"),
}
