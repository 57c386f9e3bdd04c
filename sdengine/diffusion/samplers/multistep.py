"""Multistep samplers (LMS, DPM-Solver++ 2M, 2M SDE and 3M SDE) and DPM-Solver++'s SDE sampler, over sigmas.

k-diffusion's formulation: x = x0 + sigma * eps, the half-log-SNR lambda = -log(sigma) as the DPM-Solver time
variable; each matches a diffusers scheduler built from SD1.5's scheduler config (see SAMPLERS).
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from .base import DenoiseFn, MultistepSpec, NoiseSource, SamplerSpec, StepCallback, to_d
from .euler import get_ancestral_step


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i .. sigma_{i-order+1}
    that is 1 at sigma_{i-j}: the weight of d_{i-j} in the linear multistep (Adams-Bashforth) step. The
    integrand is a polynomial, so it is integrated exactly (diffusers and k-diffusion use scipy's quad)."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    poly = P.polyfromroots(others) / np.prod([sigmas[i - j] - s for s in others]) if others else np.ones(1)
    antiderivative = P.polyint(poly)
    return float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative))


@torch.no_grad()
def sample_lms(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
               order: int = 4) -> torch.Tensor:
    """Linear multistep on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022's
    ODE; k-diffusion's LMS): up to `order` past derivatives, weighted by their interpolating polynomial's integral
    over the step (Adams-Bashforth on the uneven sigma grid). The order ramps up from 1 over the first steps."""
    s = sigmas.double().cpu().numpy()
    n = len(sigmas) - 1
    ds: list[torch.Tensor] = []
    for i in range(n):
        denoised = model(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(s, cur, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): exact integration of the linear part in
    lambda = -log(sigma), the data prediction extrapolated linearly in lambda from the last two evaluations.
    First order on the first step and on the final step to sigma = 0, where the update is x = D(x)
    (diffusers' lower_order_final with final_sigmas_type="zero")."""
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (sigmas[i] / sigmas[i + 1]).log()  # lambda_{i+1} - lambda_i
            denoised_d = denoised
            if old_denoised is not None:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                        callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Appendix: the second-order multistep solver of the
    diffusion SDE in data-prediction form; k-diffusion's dpmpp_2m_sde). eta = 1 is diffusers' sde-dpmsolver++;
    eta = 0 is the ODE. One noise() draw per step before the last, in diffusers' order."""
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (sigmas[i] / sigmas[i + 1]).log()
            eta_h = eta * h
            phi = -torch.expm1(-h - eta_h)  # 1 - exp(-2h) at eta = 1
            x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise() * (sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                        callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(3M) (k-diffusion's dpmpp_3m_sde, A1111's "DPM++ 3M SDE"): 2M SDE's exact linear part,
    the data prediction extrapolated quadratically in lambda from the last three evaluations (first and second
    order on the first two steps; the step to sigma = 0 is x = D(x)). The phi functions are those of the SDE,
    whose exponential decays at rate (1 + eta) h. One noise() draw per step before the last, as in 2M SDE.

    diffusers' DPMSolverMultistepScheduler(solver_order=3, sde-dpmsolver++) is not this solver: its second-order
    step is the midpoint form, it lowers the order near the end under 15 steps, and its third-order term has the
    opposite sign of the 1/2 in phi_3 (diffusers 0.42.1); docs/samplers.md gives the measured gap."""
    n = len(sigmas) - 1
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(n):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (sigmas[i] / sigmas[i + 1]).log()
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:  # divided differences of D in lambda, on the uneven grid of the last three steps
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise() * (sigmas[i + 1] * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise)
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
        if callback is not None:
            callback(i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
                     callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) with ancestral noise (Lu et al. 2022, "DPM-Solver++", Algorithm 1, r = 1/2; k-diffusion's
    dpmpp_sde, diffusers' DPMSolverSDEScheduler): an ancestral first-order half step to the midpoint in lambda,
    then the full step from the start using the midpoint's data prediction. Two model calls a step; the step to
    sigma = 0 is a plain Euler step. eta = 0 is the deterministic DPM-Solver++(2S).

    The two noises of a step are increments of one Brownian motion W(sigma), over [s_mid, s] and [s_next, s],
    built from two noise() draws: the joint law of diffusers' BrownianTree noise, not its bits (torchsde).
    """
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sigma_mid = (sigma * sigma_next).sqrt()  # midpoint in lambda = -log(sigma)
            z1, z2 = (noise(), noise()) if eta else (None, None)
            # Stage 1: ancestral DPM-Solver++(1) step sigma -> sigma_mid.
            sd, su = get_ancestral_step(sigma, sigma_mid, eta)
            x_2 = (sd / sigma) * x - torch.expm1((sd / sigma).log()) * denoised
            if eta:
                x_2 = x_2 + z1 * (su * s_noise)
            denoised_2 = model(x_2, sigma_mid)
            # Stage 2: sigma -> sigma_next with the midpoint's prediction (fac = 1 / (2r) = 1).
            sd, su = get_ancestral_step(sigma, sigma_next, eta)
            x = (sd / sigma) * x - torch.expm1((sd / sigma).log()) * denoised_2
            if eta:
                d1, d2 = sigma - sigma_mid, sigma_mid - sigma_next
                w = (d1.sqrt() * z1 + d2.sqrt() * z2) / (d1 + d2).sqrt()  # (W(s) - W(s_next)) / sqrt(s - s_next)
                x = x + w * (su * s_noise)
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "lms": SamplerSpec("lms", sample_lms, "LMS", ("k_lms",), diffusers_class="LMSDiscreteScheduler"),
    "dpmpp_2m": MultistepSpec("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", ("k_dpmpp_2m",), init="vp",
                              diffusers_class="DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": MultistepSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM++ 2M SDE", ("k_dpmpp_2m_sde",),
                                  stochastic=True, init="vp", diffusers_class="DPMSolverMultistepScheduler",
                                  diffusers_options={"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_heun": MultistepSpec("dpmpp_2m_sde_heun", sample_dpmpp_2m_sde, "DPM++ 2M SDE Heun",
                                       ("k_dpmpp_2m_sde_heun",), stochastic=True, init="vp",
                                       diffusers_class="DPMSolverMultistepScheduler",
                                       diffusers_options={"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
                                       options={"solver_type": "heun"}),
    "dpmpp_3m_sde": MultistepSpec("dpmpp_3m_sde", sample_dpmpp_3m_sde, "DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
                                  stochastic=True, init="vp"),
    "dpmpp_sde": SamplerSpec("dpmpp_sde", sample_dpmpp_sde, "DPM++ SDE", ("k_dpmpp_sde",), stochastic=True,
                             diffusers_class="DPMSolverSDEScheduler"),
}
