"""The denoiser stack: the UNet as a denoiser D(x, sigma, cond) -> x0 estimate, then classifier-free guidance,
each written once. What conditions the UNet is one value, `Conditioning`, passed through whole.

Samplers see only a callable `model(x, sigma) -> denoised` over x = x0 + sigma * eps (the variance-exploding
view); the parameterization (eps or v) and the scaling to the UNet's variance-preserving input live here.
Wrappers that change the model's input or output (inpainting's known-region blend, later adapters) wrap the
guided callable the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .schedule import NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


@dataclass(frozen=True)
class Conditioning:
    """Everything that conditions one UNet call besides x and t, for a batch.

    context: cross-attention states (b, 77k, width). y: the "vector" conditioning of class-conditional and SDXL
    UNets (None for SD1/SD2). concat: extra input channels (inpainting UNets: mask and masked-image latents)."""

    context: torch.Tensor
    y: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def with_concat(self, concat: torch.Tensor | None) -> Conditioning:
        return Conditioning(self.context, self.y, concat)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batch several conditionings along the batch axis (one UNet call for guidance's halves)."""
        def join(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError("conditionings to batch together must carry the same parts")
            return torch.cat(values)  # type: ignore[arg-type]

        return Conditioning(join([p.context for p in parts]), join([p.y for p in parts]),
                            join([p.concat for p in parts]))


class Denoiser:
    """Wraps a UNet trained on VP latents with eps or v targets."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction: Literal["eps", "v"] = "eps"):
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0 estimate. sigma: (b,) or scalar."""
        # Sigmas live on the CPU (schedules are numpy); move them to x, which may be on a GPU.
        sigma = sigma.to(x.device, torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        s = append_dims(sigma, x.ndim)
        c_in = 1.0 / (s ** 2 + 1.0) ** 0.5
        t = self.schedule.sigma_to_t_torch(sigma)
        unet_in = x * c_in
        if cond.concat is not None:
            unet_in = torch.cat([unet_in, cond.concat.to(x.dtype)], dim=1)
        dtype = next(self.unet.parameters()).dtype
        extra = {} if cond.y is None else {"y": cond.y.to(dtype)}  # SD1/SD2 UNets take no vector
        out = self.unet(unet_in.to(dtype), t.to(x.device), cond.context.to(dtype), **extra).to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        # v = alpha * eps - sigma_vp * x0, rewritten for VE x: x0 = x / (s^2 + 1) - v * s / sqrt(s^2 + 1)
        return x / (s ** 2 + 1.0) - out * s * c_in


@dataclass(frozen=True)
class ScheduledConditioning:
    """Prompt editing: conditionings each in force up to a sampling step (counted from 0), as A1111's
    reconstruct_cond_batch picks them. Built by the pipeline from prompt_schedule.schedule."""

    entries: tuple[tuple[int, Conditioning], ...]

    def at(self, step: int) -> tuple[int, Conditioning]:
        for index, (end, cond) in enumerate(self.entries):
            if step <= end:
                return index, cond
        return len(self.entries) - 1, self.entries[-1][1]

    def with_concat(self, concat: torch.Tensor | None) -> ScheduledConditioning:
        return ScheduledConditioning(tuple((end, c.with_concat(concat)) for end, c in self.entries))


AnyConditioning = Conditioning | ScheduledConditioning


class CFGDenoiser:
    """Classifier-free guidance: uncond + scale * (cond - uncond), both halves in one batched UNet call.

    With prompt editing (ScheduledConditioning) the halves follow `step`, the sampling step under way, which the
    pipeline advances from the sampler's per-step callback: every evaluation of a step (Heun's second one too)
    sees that step's prompt."""

    def __init__(self, denoiser: Denoiser, cond: AnyConditioning, uncond: AnyConditioning | None, scale: float):
        self.denoiser = denoiser
        self.cond, self.uncond, self.scale = cond, uncond, scale
        self.step = 0
        self._both: dict[tuple[int, int], Conditioning] = {}

    @property
    def scheduled(self) -> bool:
        return isinstance(self.cond, ScheduledConditioning) or isinstance(self.uncond, ScheduledConditioning)

    def _at(self, c: AnyConditioning) -> tuple[int, Conditioning]:
        return c.at(self.step) if isinstance(c, ScheduledConditioning) else (0, c)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        ci, cond = self._at(self.cond)
        if self.uncond is None or self.scale == 1.0:  # guidance off: one pass suffices
            return self.denoiser(x, sigma, cond)
        ui, uncond = self._at(self.uncond)
        both = self._both.get((ci, ui))
        if both is None:
            both = self._both[(ci, ui)] = Conditioning.cat([uncond, cond])
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        uncond_out, cond_out = out.chunk(2)
        return uncond_out + self.scale * (cond_out - uncond_out)
