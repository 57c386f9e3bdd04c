"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), as diffusers' UniPCMultistepScheduler runs it by default: data prediction (UniPC with x0 model outputs),
the B(h) = e^h - 1 variant (bh2), order 2 with a first-order warm-up and a first-order final step.

Written over VE x = x0 + sigma * eps. With lambda = log(alpha / sigma_vp) = -log(sigma) and h = lambda_t - lambda_s,
the VP update x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m0 - alpha_t B(h) sum rho_k D_k divided by alpha_t
becomes x_t = (sigma_t / sigma_s) x_s - (e^-h - 1) m0 - B(h) sum rho_k D_k in VE terms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .base import DenoiseFn, MultistepSpec, SamplerSpec, StepCallback


def _coefficients(rks: Sequence[float], hh: float, variant: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(R, b, h phi_1(hh), B(h)) of UniPC's order conditions (Zhao et al. 2023, Algorithm 1-2 / eq. 9):
    R[i, k] = r_k^i, b_i = (i + 1)! phi_(i+2)(hh) / B(h) in diffusers' recursion."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for i in range(1, len(rks) + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.array(rows), np.array(b), h_phi_1, b_h


def _update(x: torch.Tensor, ms: list[torch.Tensor], s: list[float], src: int, dst: int, order: int, variant: str,
            m_dst: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step (m_dst None) or UniC correction (m_dst: the model output at dst) from sigma s[src] to s[dst].
    ms: x0 outputs, newest last, ms[-1] at s[src], ms[-1 - k] at s[src - k]."""
    m0 = ms[-1]
    if s[dst] == 0:  # lambda = inf: the first-order step lands on m0 (higher orders are undefined there)
        return m0
    lam = lambda k: -math.log(s[k])  # noqa: E731
    h = lam(dst) - lam(src)
    rks = [(lam(src - k) - lam(src)) / h for k in range(1, order)] + [1.0]
    d1s = [(ms[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    R, b, h_phi_1, b_h = _coefficients(rks, -h, variant)
    if m_dst is None:  # predictor UniP-p: rho from the order conditions of the p - 1 past differences
        rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    else:  # corrector UniC-p: one more condition, for the new output's difference
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
        d1s = d1s + [m_dst - m0]
    x_t = x * (s[dst] / s[src]) - m0 * h_phi_1
    if rhos:
        x_t = x_t - sum(r * d for r, d in zip(rhos, d1s)) * b_h
    return x_t


@torch.no_grad()
def sample_unipc(model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None = None,
                 order: int = 2, variant: Literal["bh1", "bh2"] = "bh2", lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = ()) -> torch.Tensor:
    """UniPC multistep: at each step the new model output first corrects the current x (UniC, reusing the output,
    no extra evaluation), then UniP predicts the next x. Orders ramp up from 1 (warm-up); with lower_order_final
    the last steps use no more than the steps left. disable_corrector: step indices whose result is not corrected."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: bh1, bh2")
    s = sigmas.tolist()
    n = len(s) - 1
    ms: list[torch.Tensor] = []
    x_last, this_order = None, 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        if x_last is not None and (i - 1) not in disable_corrector:
            x = _update(x_last, ms, s, i - 1, i, this_order, variant, m_dst=denoised)
        ms = (ms + [denoised])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        x_last = x
        x = _update(x, ms, s, i, i + 1, this_order, variant)
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "unipc": MultistepSpec("unipc", sample_unipc, "UniPC", default_spacing="linspace", init="vp",
                       diffusers_class="UniPCMultistepScheduler"),
}
