"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as A1111 runs it
(modules/sd_samplers_extra.py): Heun's ODE steps on a Karras schedule, and, from 20 steps on, a loop back up the
noise levels (sigma ~0.1 -> ~2) with fresh noise, re-solved with more Heun steps. No diffusers counterpart.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedule import spaced_sigmas
from .base import DenoiseFn, NoiseSource, SamplerSpec, StepCallback, to_d

RESTART_MIN, RESTART_MAX = 0.1, 2.0  # A1111's automatic restart interval, in sigma


def karras(steps: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    """`steps` Karras sigmas hi -> lo with 0 appended, on `like`'s device (float32, as k-diffusion builds them)."""
    sigmas = np.concatenate([spaced_sigmas(hi, lo, steps, "karras"), [0.0]])
    return torch.tensor(sigmas, dtype=torch.float32, device=like.device)


def restart_segments(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A1111's automatic plan: the (sigma_from, sigma_to) pairs Restart runs for `len(sigmas) - 1` steps.

    From 20 steps on, 9 (36+: steps // 4, twice) of the steps are taken from the main schedule, which becomes a
    Karras one between the given ends, and spent on restarts: from the sigma nearest 0.1 back up to the one
    nearest 2, down again along restart_steps + 1 Karras sigmas (restart_steps Heun steps, as A1111 counts)."""
    steps = len(sigmas) - 1
    restart_steps = restart_times = 0
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(), sigmas)
    segments = []
    restart_at = int((sigmas - RESTART_MIN).abs().argmin()) if restart_times else -1
    for i in range(len(sigmas) - 1):
        segments.append((sigmas[i], sigmas[i + 1]))
        if i + 1 == restart_at:
            top = int((sigmas - RESTART_MAX).abs().argmin())
            if top < restart_at:
                loop = karras(restart_steps + 1, sigmas[restart_at].item(), sigmas[top].item(), sigmas)[:-1]
                segments += list(zip(loop[:-1], loop[1:])) * restart_times
    return segments


@torch.no_grad()
def sample_restart(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                   callback: StepCallback | None = None, s_noise: float = 1.0) -> torch.Tensor:
    """Restart: Heun steps over restart_segments; where a segment starts above the last one's end, the forward
    process is re-run to it, adding noise of variance sigma_from^2 - sigma_last^2. The callback counts Heun steps
    (more than len(sigmas) - 1 once restarts are planned)."""
    segments = restart_segments(sigmas)
    last = None
    for i, (sigma, sigma_to) in enumerate(segments):
        if last is not None and last < sigma:
            x = x + noise() * (s_noise * (sigma ** 2 - last ** 2) ** 0.5)
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        dt = sigma_to - sigma
        if sigma_to == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + to_d(x_2, sigma_to, model(x_2, sigma_to))) / 2 * dt
        last = sigma_to
        if callback is not None:
            callback(i, len(segments), x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "restart": SamplerSpec("restart", sample_restart, "Restart", ("restart",), stochastic=True),
}
