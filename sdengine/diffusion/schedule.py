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
ScheduleType = Literal["normal", "karras", "exponential", "sgm_uniform", "simple", "beta", "polyexponential",
                       "align_your_steps"]
SPACINGS = ("leading", "linspace", "trailing")
# Schedules A1111 defines from the model's sigmas alone (modules/sd_schedulers.py); spacing does not apply to them.
SIGMA_SCHEDULES = ("sgm_uniform", "simple", "beta", "polyexponential", "align_your_steps")
SCHEDULES = ("normal", "karras", "exponential", *SIGMA_SCHEDULES)
SCHEDULE_LABELS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential",  # A1111's labels
                   "sgm_uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta",
                   "polyexponential": "Polyexponential", "align_your_steps": "Align Your Steps"}
# A1111's scheduler names -> ours. Its "uniform" spaces timesteps evenly, as our "normal" does.
A1111_SCHEDULERS = {"uniform": "normal", "normal": "normal", "karras": "karras", "exponential": "exponential",
                    **{name: name for name in SIGMA_SCHEDULES}}
# A1111's defaults: the Beta schedule's shape (options beta_dist_alpha/beta), Polyexponential's rho.
BETA_ALPHA, BETA_BETA = 0.6, 0.6
POLYEXPONENTIAL_RHO = 1.0
# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step sigmas, as A1111 ships them.
AYS_SIGMAS = {"sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
              "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)}


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


def polyexponential_sigmas(hi: float, lo: float, steps: int, rho: float = POLYEXPONENTIAL_RHO) -> np.ndarray:
    """`steps` sigmas from hi to lo along a polynomial ramp^rho in log sigma (k-diffusion's
    get_sigmas_polyexponential); rho = 1 is the exponential schedule, rho > 1 lingers at high noise."""
    ramp = np.linspace(1, 0, steps) ** rho
    return np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo))


def loglinear_interp(sigmas: tuple[float, ...], steps: int) -> np.ndarray:
    """A descending table resampled to `steps` values, linearly in log sigma over an even grid (A1111's
    Align Your Steps for step counts other than the table's)."""
    xs = np.linspace(0, 1, len(sigmas))
    ys = np.log(np.asarray(sigmas[::-1], dtype=np.float64))
    return np.exp(np.interp(np.linspace(0, 1, steps), xs, ys))[::-1].copy()


def align_your_steps_sigmas(steps: int, table: str = "sd1") -> np.ndarray:
    """Align Your Steps: the published table for the model family, used as is at its own length."""
    sigmas = AYS_SIGMAS[table]
    return np.asarray(sigmas, dtype=np.float64) if steps == len(sigmas) else loglinear_interp(sigmas, steps)


def betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), on the
    side of the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges fast. The engine needs no scipy."""
    x = np.asarray(x, dtype=np.float64)
    flip = x > (a + 1) / (a + b + 2)
    xx, aa, bb = np.where(flip, 1 - x, x), np.where(flip, b, a), np.where(flip, a, b)
    with np.errstate(divide="ignore"):
        log_front = (aa * np.log(xx) + bb * np.log1p(-xx) - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b)
                     - np.log(aa))
    tiny = 1e-300
    c, d = np.ones_like(xx), 1 - (aa + bb) * xx / (aa + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    f = d.copy()
    for m in range(1, 300):
        for num in (m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m)),
                    -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            f = f * c * d
        if np.all(np.abs(c * d - 1) < 1e-15):
            break
    ix = np.exp(log_front) * f
    ix = np.where(xx <= 0, 0.0, ix)
    return np.where(flip, 1 - ix, ix)


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The Beta(a, b) distribution's quantile function (scipy.stats.beta.ppf), by bisection on betainc:
    monotone, so 64 halvings reach float64's resolution without a starting guess."""
    q = np.asarray(q, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(64):
        mid = (lo + hi) / 2
        below = betainc(a, b, mid) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))


def beta_sigmas(hi: float, lo: float, steps: int, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> np.ndarray:
    """A1111's Beta schedule ("Beta Sampling is All You Need", Lee et al. 2024): sigma linear in the Beta(alpha,
    beta) quantiles of an even grid, so alpha = beta < 1 spends more steps at both ends of [lo, hi]."""
    return lo + beta_ppf(1 - np.linspace(0, 1, steps), alpha, beta) * (hi - lo)


@dataclass(frozen=True)
class NoiseSchedule:
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    steps_offset: int = 1  # SD's "leading" spacing starts at t=1, not 0
    ays_table: Literal["sd1", "sdxl"] = "sd1"  # Align Your Steps' table: A1111 takes SDXL's for SDXL models
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

    def t_to_sigma_log(self, t: np.ndarray) -> np.ndarray:
        """Sigma at fractional timesteps, interpolating log sigma (k-diffusion's DiscreteSchedule.t_to_sigma,
        which A1111's SGM Uniform uses)."""
        return np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas))

    def schedule_sigmas(self, steps: int, schedule: ScheduleType) -> np.ndarray:
        """`steps` descending sigmas (no final one) of A1111's schedules defined by the model's sigmas alone
        (SIGMA_SCHEDULES, modules/sd_schedulers.py), between this schedule's sigma_max and sigma_min."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        hi, lo = self.sigma_max, self.sigma_min
        if schedule == "sgm_uniform":  # even in t over [t(sigma_max), t(sigma_min)), the end left out
            return self.t_to_sigma_log(np.linspace(len(self.sigmas) - 1, 0, steps + 1)[:-1])
        if schedule == "simple":  # every (1000 / steps)-th training sigma from the top, truncated indices
            stride = len(self.sigmas) / steps
            return self.sigmas[[len(self.sigmas) - 1 - int(i * stride) for i in range(steps)]].astype(np.float64)
        if schedule == "beta":
            return beta_sigmas(hi, lo, steps)
        if schedule == "polyexponential":
            return polyexponential_sigmas(hi, lo, steps)
        if schedule == "align_your_steps":
            return align_your_steps_sigmas(steps, self.ays_table)
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")

    def sampling_sigmas(self, steps: int, schedule: ScheduleType = "normal", spacing: Spacing = "linspace",
                        final: Literal["zero", "sigma_min"] = "zero") -> tuple[np.ndarray, np.ndarray]:
        """(sigmas with the final one appended, float32; timesteps, one per step) for a sampling run.

        normal: sigma at the spaced timesteps; karras (Karras et al. 2022, rho=7) and exponential: spaced in
        sigma^(1/7) / log sigma between the ends of the normal schedule, as diffusers' use_karras_sigmas does;
        SIGMA_SCHEDULES: A1111's (schedule_sigmas), whatever the spacing.
        """
        t = self.timesteps(steps, spacing)
        sigmas = self.t_to_sigma(t)
        if schedule in ("karras", "exponential"):
            sigmas = spaced_sigmas(sigmas[0].item(), sigmas[-1].item(), steps, schedule)
            t = self.sigma_to_t(sigmas)
        elif schedule in SIGMA_SCHEDULES:
            sigmas = self.schedule_sigmas(steps, schedule)
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
SDXL_SCHEDULE = NoiseSchedule(ays_table="sdxl")  # the same betas; only Align Your Steps' table differs
