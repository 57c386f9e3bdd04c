"""The noise schedule of Stable Diffusion and its forward process.

SD was trained with 1000 discrete steps and "scaled linear" betas (0.00085 -> 0.012). Samplers here work in the
variance-exploding view of the same process (k-diffusion's): x = x0 + sigma * eps with
sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t); the UNet sees x / sqrt(1 + sigma^2), the
variance-preserving latent it was trained on. Array dtypes and interpolation follow diffusers' schedulers, so
timesteps and sigmas agree with them to the last bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Spacing = Literal["leading", "linspace", "trailing"]
ScheduleType = Literal["normal", "karras", "exponential"]
SPACINGS = ("leading", "linspace", "trailing")
SCHEDULES = ("normal", "karras", "exponential")
SCHEDULE_LABELS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential"}  # A1111's labels
# A1111's scheduler names -> ours. Its "uniform" spaces timesteps evenly, as our "normal" does.
A1111_SCHEDULERS = {"uniform": "normal", "normal": "normal", "karras": "karras", "exponential": "exponential"}


def spaced_sigmas(hi: float, lo: float, steps: int, schedule_type: ScheduleType) -> np.ndarray:
    """`steps` sigmas from hi down to lo: karras (Karras et al. 2022, eq. 5, rho = 7) or exponential (even in
    log sigma), as diffusers' use_karras_sigmas / use_exponential_sigmas space them."""
    if schedule_type == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if schedule_type == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    raise ValueError(f"unknown schedule {schedule_type!r}; valid: {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    steps_offset: int = 1  # SD's "leading" spacing starts at t=1, not 0
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)
    sigmas: np.ndarray = field(init=False, repr=False, compare=False)  # per training step, ascending
    log_sigmas: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", np.log(sigmas))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # --- timesteps and sigmas for a sampling run -------------------------------------------------------------

    def timesteps(self, steps: int, spacing: Spacing = "leading") -> np.ndarray:
        """Descending (float32) training timesteps for `steps` sampling steps, spaced as diffusers spaces them."""
        n = self.num_train_timesteps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ratio = n // steps
            if ratio == 0:
                raise ValueError(f"leading spacing allows at most {n} steps, got {steps}")
            return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + self.steps_offset
        if spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.float32) - 1
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")

    def multistep_timesteps(self, steps: int, spacing: Spacing) -> np.ndarray:
        """The timesteps of diffusers' multistep solvers (DPMSolverMultistep, UniPC): linspace and leading space
        steps + 1 points and drop the last (t = 0); trailing is the usual spacing."""
        n = self.num_train_timesteps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            if n // (steps + 1) == 0:
                raise ValueError(f"leading spacing allows at most {n - 1} steps, got {steps}")
            return (np.arange(steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + self.steps_offset
        return self.timesteps(steps, spacing).astype(np.float64)

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (possibly fractional) timesteps, interpolating linearly between training steps."""
        return np.interp(t, np.arange(len(self.sigmas)), self.sigmas)

    def sigma_to_t(self, sigma: np.ndarray | float) -> np.ndarray:
        """Continuous timestep of a sigma, interpolating in log-sigma (the inverse that samplers need)."""
        sigma = np.asarray(sigma, dtype=np.float64)
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - self.log_sigmas[:, None]
        low = np.cumsum(dists.reshape(len(self.log_sigmas), -1) >= 0, axis=0).argmax(axis=0)
        low = low.clip(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = np.clip((lo - log_sigma.reshape(-1)) / (lo - hi), 0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)

    def sigma_to_t_torch(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma_to_t for a tensor of sigmas, on the tensor's device (the denoiser's hot path)."""
        log_sigmas = torch.as_tensor(self.log_sigmas, dtype=torch.float32, device=sigma.device)
        log_sigma = sigma.float().clamp(min=1e-10).log()
        dists = log_sigma - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def sampling_sigmas(self, steps: int, schedule: ScheduleType = "normal", spacing: Spacing = "linspace",
                        final: Literal["zero", "sigma_min"] = "zero") -> tuple[np.ndarray, np.ndarray]:
        """(sigmas with the final one appended, float32; timesteps, one per step) for a sampling run.

        normal: sigma at the spaced timesteps; karras (Karras et al. 2022, rho=7) and exponential: spaced in
        sigma^(1/7) / log sigma between the ends of the normal schedule, as diffusers' use_karras_sigmas does.
        """
        t = self.timesteps(steps, spacing)
        sigmas = self.t_to_sigma(t)
        if schedule in ("karras", "exponential"):
            sigmas = spaced_sigmas(sigmas[0].item(), sigmas[-1].item(), steps, schedule)
            t = self.sigma_to_t(sigmas)
        elif schedule != "normal":
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        last = self.sigma_min if final == "sigma_min" else 0.0
        return np.concatenate([sigmas, [last]]).astype(np.float32), np.asarray(t, dtype=np.float32)

    # --- the forward process -----------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, for integer timesteps t (b,)."""
        abar = self.alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * noise

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(abar) noise - sqrt(1 - abar) x_0 (Salimans & Ho 2022)."""
        abar = self.alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return abar.sqrt().view(shape) * noise - (1 - abar).sqrt().view(shape) * x0


SD_SCHEDULE = NoiseSchedule()
