"""Second-order single-step samplers with a midpoint evaluation: DPM2, DPM2 a and DPM++ 2S a.

k-diffusion's formulation (sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral), as A1111 runs them:
x = x0 + sigma * eps, two model calls a step, the second at the step's midpoint in log sigma (the geometric mean of
its ends, the midpoint in lambda = -log sigma); the step to sigma = 0 is one Euler step, as the midpoint of
[sigma, 0] is undefined. DPM2 and DPM2 a reproduce diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler; DPM++ 2S a has no diffusers counterpart (its DPMSolverSinglestepScheduler is the
deterministic solver on its own timestep pairs).
"""
from __future__ import annotations

import torch

from .base import DenoiseFn, NoiseSource, SamplerSpec, StepCallback, to_d
from .euler import get_ancestral_step


def dpm2_step(model: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
              denoised: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver-2 step sigma -> sigma_to (Lu et al. 2022, "DPM-Solver", Algorithm 4 with r = 1/2, in
    Karras et al.'s ODE form): an Euler half step to the log-midpoint, then the full step with its derivative."""
    d = to_d(x, sigma, denoised)
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = (sigma * sigma_to).sqrt()
    x_mid = x + d * (sigma_mid - sigma)
    return x + to_d(x_mid, sigma_mid, model(x_mid, sigma_mid)) * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """DPM2: DPM-Solver-2 steps along the probability-flow ODE (k-diffusion's sample_dpm_2 without churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        x = dpm2_step(model, x, sigmas[i], sigmas[i + 1], denoised)
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                           callback: StepCallback | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    """DPM2 a: a DPM-Solver-2 step down to sigma_down, then fresh noise up to sigma_{i+1} (the ancestral split of
    Euler a). One noise() draw per step before the last, in diffusers' order."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = dpm2_step(model, x, sigmas[i], sigma_down, denoised)
        if sigma_down > 0 and eta:
            x = x + noise() * (s_noise * sigma_up)
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                              callback: StepCallback | None = None, eta: float = 1.0,
                              s_noise: float = 1.0) -> torch.Tensor:
    """DPM++ 2S a: a DPM-Solver++(2S) step (Lu et al. 2022, "DPM-Solver++", Algorithm 1, r = 1/2) down to
    sigma_down, then fresh noise up to sigma_{i+1}. The data-prediction update integrates the linear part exactly:
    x_to = (sigma_to / sigma) x - expm1(-h) D, h = log(sigma / sigma_to), with D the midpoint's prediction."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = (sigma / sigma_down).log()
            sigma_mid = (sigma * sigma_down).sqrt()
            x_mid = (sigma_mid / sigma) * x - torch.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - torch.expm1(-h) * model(x_mid, sigma_mid)
        if sigmas[i + 1] > 0 and eta:
            x = x + noise() * (s_noise * sigma_up)
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "dpm2": SamplerSpec("dpm2", sample_dpm_2, "DPM2", ("k_dpm_2",), diffusers_class="KDPM2DiscreteScheduler"),
    "dpm2_a": SamplerSpec("dpm2_a", sample_dpm_2_ancestral, "DPM2 a", ("k_dpm_2_a",), stochastic=True,
                          diffusers_class="KDPM2AncestralDiscreteScheduler"),
    "dpmpp_2s_a": SamplerSpec("dpmpp_2s_a", sample_dpmpp_2s_ancestral, "DPM++ 2S a", ("k_dpmpp_2s_a",),
                              stochastic=True),
}
