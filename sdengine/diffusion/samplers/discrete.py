"""Samplers of the discrete-timestep (DDPM-family) schedulers: DDIM, PLMS, DDPM and LCM.

Each is written over the variance-exploding x = x0 + sigma * eps with `model(x, sigma) -> denoised`, as the
k-diffusion samplers are; the VP latent diffusers' schedulers hold is x / sqrt(1 + sigma^2). In these terms DDIM
(eta = 0) is an Euler step, DDPM and DDIM with eta > 0 are ancestral steps, and PLMS is a linear multistep method
on eps. The SamplerSpec subclasses below produce the timesteps diffusers' DDIMScheduler, PNDMScheduler
(skip_prk_steps), DDPMScheduler and LCMScheduler use with SD1.5's scheduler config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..img2img_steps import skipped_steps
from ..schedule import SD_SCHEDULE, SIGMA_SCHEDULES, NoiseSchedule, ScheduleType, Spacing, spaced_sigmas
from .base import DenoiseFn, NoiseSource, SamplerSpec, StepCallback, to_d

# --- timesteps ------------------------------------------------------------------------------------------------


def discrete_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing) -> np.ndarray:
    """Integer training timesteps (descending) as DDIM/PNDM/DDPM space them: as NoiseSchedule.timesteps, except
    that "linspace" is rounded to whole steps."""
    if spacing == "linspace":
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return np.linspace(0, schedule.num_train_timesteps - 1, steps).round()[::-1].copy()
    return schedule.timesteps(steps, spacing).astype(np.float64)


def respace(sigmas: np.ndarray, schedule_type: ScheduleType) -> np.ndarray:
    """Sigmas (descending, no final one) respaced between their ends; "normal" returns them unchanged."""
    if schedule_type == "normal":
        return sigmas
    return spaced_sigmas(float(sigmas[0]), float(sigmas[-1]), len(sigmas), schedule_type)


@dataclass(frozen=True)
class DiscreteSpec(SamplerSpec):
    """A sampler whose diffusers scheduler steps between whole training timesteps (DDIM, PNDM, DDPM)."""

    def sigmas(self, schedule: NoiseSchedule, steps: int, schedule_type: ScheduleType = "normal",
               spacing: Spacing | None = None) -> np.ndarray:
        if schedule_type in SIGMA_SCHEDULES:
            sigmas = schedule.schedule_sigmas(steps, schedule_type)
        else:
            sigmas = respace(schedule.t_to_sigma(discrete_timesteps(schedule, steps, spacing or self.default_spacing)),
                             schedule_type)
        last = schedule.sigma_min if self.final_sigma == "sigma_min" else 0.0
        return np.concatenate([sigmas, [last]]).astype(np.float32)


@dataclass(frozen=True)
class DDIMSpec(DiscreteSpec):
    """DDIM: deterministic for eta = 0 (the default); with an `eta` option > 0 it draws noise and needs `noise`."""

    def __call__(self, model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 callback: StepCallback | None = None, noise: NoiseSource | None = None, **options) -> torch.Tensor:
        kwargs = {**self.options, **options}
        if kwargs.get("eta", 0.0) > 0:
            if noise is None:
                raise ValueError(f"sampler {self.name} with eta > 0 needs a noise source")
            kwargs["noise"] = noise
        return self.fn(model, x, sigmas, callback=callback, **kwargs)


@dataclass(frozen=True)
class PLMSSpec(DiscreteSpec):
    """PNDMScheduler(skip_prk_steps=True) lists its second timestep twice (the warm-up's corrector evaluation),
    so img2img's `timesteps[t_start:]` starts one of our sigmas later than slicing ours at t_start would."""

    def img2img_sigmas(self, schedule: NoiseSchedule, steps: int, strength: float,
                       schedule_type: ScheduleType = "normal", spacing: Spacing | None = None) -> np.ndarray:
        t_start = skipped_steps(steps, strength)
        # diffusers' list [T_n-1, T_n-2, T_n-2, T_n-3, ..., T_0]: index k >= 2 is our sigma k - 1
        return self.sigmas(schedule, steps, schedule_type, spacing)[t_start - 1 if t_start >= 2 else t_start:]


def lcm_timesteps(schedule: NoiseSchedule, steps: int, original_steps: int = 50, strength: float = 1.0) -> np.ndarray:
    """LCMScheduler.set_timesteps: `steps` timesteps evenly indexed from the distillation schedule's
    original_steps timesteps (k - 1, 2k - 1, ..., k = 1000 // original_steps), cut to `strength` for img2img."""
    n = schedule.num_train_timesteps
    if not 1 <= original_steps <= n:
        raise ValueError(f"original_inference_steps must be in 1..{n}, got {original_steps}")
    k = n // original_steps
    origin = (np.arange(1, int(original_steps * strength) + 1) * k - 1)[::-1]
    if steps < 1 or steps > original_steps or len(origin) // steps < 1:
        raise ValueError(f"LCM allows 1..{min(original_steps, len(origin))} steps "
                         f"(original_inference_steps {original_steps} x strength {strength}), got {steps}")
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)].astype(np.float64)


@dataclass(frozen=True)
class LCMSpec(SamplerSpec):
    """LCM's own timesteps (spacing does not apply). img2img needs no img2img_sigmas: LCMScheduler has order 1 and
    no repeated timestep, so slicing at t_start is what StableDiffusionImg2ImgPipeline runs. (diffusers'
    LatentConsistencyModelImg2ImgPipeline instead runs all steps over lcm_timesteps(..., strength).)"""

    original_steps: int = 50

    def sigmas(self, schedule: NoiseSchedule, steps: int, schedule_type: ScheduleType = "normal",
               spacing: Spacing | None = None) -> np.ndarray:
        if schedule_type in SIGMA_SCHEDULES:
            sigmas = schedule.schedule_sigmas(steps, schedule_type)
        else:
            sigmas = respace(schedule.t_to_sigma(lcm_timesteps(schedule, steps, self.original_steps)), schedule_type)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32)


# --- samplers -------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
                eta: float = 0.0, noise: NoiseSource | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16) in VE form: x_next = x0 + sigma_down * eps + sigma_up * z with
    sigma_up = eta * sigma_next / sigma * sqrt(sigma^2 - sigma_next^2) (their sigma_t(eta) / sqrt(alpha_next)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2). eta = 0 is the deterministic sampler (an Euler step), eta = 1
    the DDPM posterior."""
    if eta > 0 and noise is None:
        raise ValueError("ddim with eta > 0 needs a noise source")
    s = sigmas.tolist()
    n = len(s) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        sigma, sigma_next = s[i], s[i + 1]
        if sigma_next == 0:
            x = denoised
        elif eta == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_up = min(sigma_next, eta * sigma_next / sigma * math.sqrt(sigma ** 2 - sigma_next ** 2))
            sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
            x = denoised + (x - denoised) * (sigma_down / sigma) + noise() * sigma_up
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
                noise: NoiseSource) -> torch.Tensor:
    """Ancestral sampling from DDPM's posterior q(x_prev | x_t, x0) with the "fixed small" variance (Ho et al.
    2020, eq. 6-7): in VE form mean x0 + (sigma_next / sigma)^2 (x - x0), std sigma_next / sigma *
    sqrt(sigma^2 - sigma_next^2), i.e. DDIM with eta = 1 (Song et al. 2021, sec. 4.1)."""
    return sample_ddim(model, x, sigmas, callback=callback, eta=1.0, noise=noise)


# Adams-Bashforth coefficients for 1-4 past derivatives, newest first (PNDM's "linear multi-step", eq. 12).
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_plms(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
                prediction: Literal["eps", "v"] = "eps") -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eq. 12) as diffusers' PNDMScheduler
    runs it with skip_prk_steps: PNDM's transfer part is the DDIM step, so in VE form each step is an Euler step
    along an Adams-Bashforth combination of past eps. Its warm-up: the first step (if not the last) is a Heun step
    that evaluates the model again at sigmas[1] (diffusers' repeated second timestep); that second output is not
    kept in the history, so the next steps use the first step's output as their oldest term.

    prediction: what the combinations are formed of. diffusers combines the raw model outputs, so for a v model
    (prediction="v") it combines v = (eps - sigma x0) / sqrt(1 + sigma^2) and converts the result to eps at the
    current x and sigma; "eps" (the paper's method) is identical to diffusers for eps models.
    """
    def output(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        eps = to_d(x, sigma, denoised)
        return eps if prediction == "eps" else (eps - sigma * denoised) / (1 + sigma ** 2) ** 0.5

    def to_eps(u: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return u if prediction == "eps" else (u + sigma * x / (1 + sigma ** 2) ** 0.5) / (1 + sigma ** 2) ** 0.5

    n = len(sigmas) - 1
    us: list[torch.Tensor] = []  # past outputs, newest last
    for i in range(n):
        denoised = model(x, sigmas[i])
        u = output(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if i == 0 and n > 1:
            x_pred = x + to_eps(u, x, sigmas[0]) * dt
            u_pred = output(x_pred, sigmas[1], model(x_pred, sigmas[1]))
            x = x + to_eps((u + u_pred) / 2, x, sigmas[0]) * dt
            us = [u]
        else:
            us = (us + [u])[-4:]
            x = x + to_eps(sum(c * uk for c, uk in zip(_AB[len(us) - 1], reversed(us))), x, sigmas[i]) * dt
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
               noise: NoiseSource, schedule: NoiseSchedule | None = None, timestep_scaling: float = 10.0,
               sigma_data: float = 0.5) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1; Song et al. 2023, sec. 3).

    The consistency function f(x, t) = c_skip(t) x_t + c_out(t) x0_pred with c_skip = sd^2 / ((10 t)^2 + sd^2),
    c_out = 10 t / sqrt((10 t)^2 + sd^2) (diffusers' discrete boundary condition). x_t is the VP latent,
    x / sqrt(1 + sigma^2), and t the training timestep of sigma, recovered from the schedule; x0_pred is the
    model's output. Between steps the estimate is re-noised to the next sigma: x = f + sigma_next * z.
    """
    schedule = schedule or SD_SCHEDULE
    s = sigmas.tolist()
    n = len(s) - 1
    for i in range(n):
        x0 = model(x, sigmas[i])
        t = float(schedule.sigma_to_t(s[i])) * timestep_scaling
        c_skip = sigma_data ** 2 / (t ** 2 + sigma_data ** 2)
        c_out = t / math.sqrt(t ** 2 + sigma_data ** 2)
        denoised = x0 * c_out + x * (c_skip / math.sqrt(1 + s[i] ** 2))
        x = denoised if s[i + 1] == 0 else denoised + noise() * s[i + 1]
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": DDIMSpec("ddim", sample_ddim, "DDIM", default_spacing="leading", final_sigma="sigma_min", init="vp",
                     diffusers_class="DDIMScheduler"),
    "plms": PLMSSpec("plms", sample_plms, "PLMS", default_spacing="leading", final_sigma="sigma_min", init="vp",
                     diffusers_class="PNDMScheduler", uses_prediction=True),
    "ddpm": DiscreteSpec("ddpm", sample_ddpm, "DDPM", stochastic=True, default_spacing="leading", init="vp",
                         diffusers_class="DDPMScheduler"),
    "lcm": LCMSpec("lcm", sample_lcm, "LCM", ("k_lcm",), stochastic=True, default_spacing="leading", init="vp",
                   diffusers_class="LCMScheduler"),
}
