"""What every sampler shares: its description in the registry, the noise source, and the step callback.

A sampler is a pure function `sample_x(model, x, sigmas, *, callback, noise, **options) -> x` in k-diffusion's
style: `model(x, sigma) -> denoised` over x = x0 + sigma * eps, `sigmas` descending with the final sigma
appended (0, or sigma_min for samplers that stop there). No hidden step counters; all state is local.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from ..img2img_steps import skipped_steps
from ..schedule import SIGMA_SCHEDULES, NoiseSchedule, ScheduleType, Spacing, spaced_sigmas

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, total_steps, x, denoised): progress bars and previews.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class NoiseSource(Protocol):
    def __call__(self) -> torch.Tensor: ...


class BatchNoise:
    """Fresh Gaussian noise shaped like the batch, image i drawn from its own CPU generator.

    Drawing on the CPU keeps a seed's image the same on every device; one generator per image keeps image i
    of a batch reproducible alone (seed + i), as diffusers does with a list of generators.
    """

    def __init__(self, generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        if len(generators) != shape[0]:
            raise ValueError("one generator per image")
        self.generators, self.shape, self.device, self.dtype = generators, shape, device, dtype

    def __call__(self) -> torch.Tensor:
        parts = [torch.randn((1, *self.shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(parts).to(self.device, self.dtype)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma = (x - denoised) / sigma (k-diffusion's to_d)."""
    return (x - denoised) / sigma


@dataclass(frozen=True)
class SamplerSpec:
    """One entry of the registry: the function and how to set it up as diffusers' matching scheduler does."""

    name: str  # CLI name: euler, euler_a, dpmpp_2m, ...
    fn: Callable[..., torch.Tensor]
    display: str  # AUTOMATIC1111's name: "Euler", "Euler a", "DPM++ 2M", ...
    aliases: tuple[str, ...] = ()  # A1111 aliases: "k_euler", ...
    stochastic: bool = False  # draws fresh noise while sampling
    default_spacing: Spacing = "linspace"  # the spacing diffusers' scheduler takes from SD1.5's config
    final_sigma: Literal["zero", "sigma_min"] = "zero"
    # Initial noise scale: "ve" x = sigma_max * noise (k-diffusion), "vp" x = sqrt(1 + sigma_max^2) * noise
    # (schedulers that start from a unit-variance latent). None: as diffusers' scheduler does for the spacing.
    init: Literal["ve", "vp"] | None = None
    diffusers_class: str = ""  # the scheduler it reproduces (tests, docs)
    diffusers_options: dict = field(default_factory=dict)  # its from_config overrides, e.g. algorithm_type
    options: dict = field(default_factory=dict)  # fixed keyword arguments for fn
    uses_prediction: bool = False  # fn takes the model's prediction type (PLMS combines raw outputs as diffusers)

    def sigmas(self, schedule: NoiseSchedule, steps: int, schedule_type: ScheduleType = "normal",
               spacing: Spacing | None = None) -> np.ndarray:
        """The sigma list (final sigma appended) for `steps` steps."""
        return schedule.sampling_sigmas(steps, schedule_type, spacing or self.default_spacing, self.final_sigma)[0]

    def img2img_sigmas(self, schedule: NoiseSchedule, steps: int, strength: float,
                       schedule_type: ScheduleType = "normal", spacing: Spacing | None = None) -> np.ndarray:
        """The tail of the schedule that img2img runs: diffusers skips steps - int(steps * strength) steps (scaled
        for samplers with more than one sigma per step, such as Heun's doubled ones)."""
        full = self.sigmas(schedule, steps, schedule_type, spacing)
        n = len(full) - 1
        skip = skipped_steps(steps, strength)
        per_step = n // steps if n >= steps else 1
        return full[min(skip * per_step, n - 1):]

    def initial_scale(self, sigma_max: float, spacing: Spacing | None = None) -> float:
        init = self.init
        if init is None:  # diffusers' Euler-type schedulers: VE for linspace/trailing, VP-like for leading
            init = "vp" if (spacing or self.default_spacing) == "leading" else "ve"
        return (sigma_max ** 2 + 1) ** 0.5 if init == "vp" else sigma_max

    def __call__(self, model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
                 noise: NoiseSource | None = None, **options) -> torch.Tensor:
        if self.stochastic and noise is None:
            raise ValueError(f"sampler {self.name} needs a noise source")
        kwargs = {**self.options, **options}
        if self.stochastic:
            kwargs["noise"] = noise
        return self.fn(model, x, sigmas, callback=callback, **kwargs)


@dataclass(frozen=True)
class MultistepSpec(SamplerSpec):
    """The sigmas of diffusers' multistep solvers (DPMSolverMultistep, UniPC): their own timestep spacing, and
    karras / exponential over the whole training range [sigma(t=0), sigma(t=999)] whatever the spacing."""

    def sigmas(self, schedule: NoiseSchedule, steps: int, schedule_type: ScheduleType = "normal",
               spacing: Spacing | None = None) -> np.ndarray:
        if schedule_type == "normal":
            sigmas = schedule.t_to_sigma(schedule.multistep_timesteps(steps, spacing or self.default_spacing))
        elif schedule_type in SIGMA_SCHEDULES:
            sigmas = schedule.schedule_sigmas(steps, schedule_type)
        else:
            sigmas = spaced_sigmas(schedule.sigma_max, schedule.sigma_min, steps, schedule_type)
        last = schedule.sigma_min if self.final_sigma == "sigma_min" else 0.0
        return np.concatenate([sigmas, [last]]).astype(np.float32)
