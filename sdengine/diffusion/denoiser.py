"""The denoiser stack: the UNet as a denoiser D(x, sigma, cond) -> x0 estimate, then classifier-free guidance,
each written once. What conditions the UNet is one value, `Conditioning`, passed through whole.

Samplers see only a callable `model(x, sigma) -> denoised` over x = x0 + sigma * eps (the variance-exploding
view); the parameterization (eps or v) and the scaling to the UNet's variance-preserving input live here.
Wrappers that change the model's input or output (inpainting's known-region blend, later adapters) wrap the
guided callable the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from .schedule import NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


ALL_STEPS = (0, 2 ** 62)


@dataclass(frozen=True)
class Control:
    """One ControlNet unit as the denoiser applies it (built by the pipeline from a ControlUnit, sdengine/control.py).

    net: a ControlNet (nn/controlnet.py); hint: the control image (1, c, H, W) in [0, 1] for every row it acts on
    (none: (0, c, H, W));
    scales: one multiplier per residual (the unit's weight, or the soft-injection ramp); steps: [first, stop) of the
    sampling steps it acts on; rows: which rows of the batch it acts on (None: all; guidance's unconditional half
    gets none in "ControlNet is more important" mode). pool: the residuals averaged over space (global pooling: the
    shuffle ControlNet). adapter: net gives T2I-Adapter features (UNetModel's `adapter`), not residuals."""

    net: nn.Module
    hint: torch.Tensor
    scales: tuple[float, ...]
    steps: tuple[int, int] = ALL_STEPS
    rows: tuple[bool, ...] | None = None
    pool: bool = False
    adapter: bool = False

    def active(self, step: int) -> bool:
        return self.steps[0] <= step < self.steps[1]

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
                  ) -> list[torch.Tensor]:
        """The unit's scaled residuals for the batch (zeros in the rows it does not act on)."""
        if self.rows is None or all(self.rows):
            index = None
        else:
            index = torch.tensor([i for i, r in enumerate(self.rows) if r], device=x.device)
            x, t, context = x[index], t[index], context[index]
            y = None if y is None else y[index]
        extra = {} if y is None else {"y": y}
        hint = self.hint[:1].to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)  # one image for the batch
        out = [r * s for r, s in zip(self.net(x, hint, t, context, **extra), self.scales)]
        if self.pool:
            out = [r.mean(dim=(2, 3), keepdim=True) for r in out]
        if index is None:
            return out
        full = []
        for r in out:
            whole = r.new_zeros((len(self.rows),) + r.shape[1:])  # type: ignore[arg-type]
            whole[index] = r
            full.append(whole)
        return full


@dataclass(frozen=True)
class ImageTokens:
    """One IP-Adapter's image prompt as the denoiser applies it (built by sdengine/ip_adapter.py): its tokens
    (b, m, width) for every row of the batch (guidance's unconditional half: those of a zero image), the adapter
    (nn/ip_adapter.py's IPAdapter, which patches the UNet's cross-attention for one call) and its scale."""

    adapter: nn.Module
    tokens: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Conditioning:
    """Everything that conditions one UNet call besides x and t, for a batch.

    context: cross-attention states (b, 77k, width). y: the "vector" conditioning of class-conditional and SDXL
    UNets (None for SD1/SD2). concat: extra input channels (inpainting UNets: mask and masked-image latents).
    controls: ControlNet units, their residuals computed at every evaluation from x, t, context, y and the hint.
    image_tokens: IP-Adapters' image prompts (decoupled cross-attention beside the context)."""

    context: torch.Tensor
    y: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    controls: tuple[Control, ...] = ()
    image_tokens: tuple[ImageTokens, ...] = ()

    def with_concat(self, concat: torch.Tensor | None) -> Conditioning:
        return replace(self, concat=concat)

    def with_controls(self, controls: tuple[Control, ...]) -> Conditioning:
        return replace(self, controls=controls)

    def with_image_tokens(self, image_tokens: tuple[ImageTokens, ...]) -> Conditioning:
        return replace(self, image_tokens=image_tokens)

    def at_step(self, step: int) -> tuple[tuple[int, ...], Conditioning]:
        """(which controls act at sampling step `step`, this conditioning with only those)."""
        active = tuple(i for i, c in enumerate(self.controls) if c.active(step))
        if len(active) == len(self.controls):
            return active, self
        return active, replace(self, controls=tuple(self.controls[i] for i in active))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batch several conditionings along the batch axis (one UNet call for guidance's halves)."""
        def join(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError("conditionings to batch together must carry the same parts")
            return torch.cat(values)  # type: ignore[arg-type]

        if len({len(p.controls) for p in parts}) != 1:
            raise ValueError("conditionings to batch together must carry the same controls")
        controls = []
        for units in zip(*(p.controls for p in parts)):
            first = units[0]
            if any(u.net is not first.net or u.scales != first.scales or u.steps != first.steps for u in units):
                raise ValueError("conditionings to batch together must carry the same controls")
            rows = tuple(r for u, p in zip(units, parts) for r in (u.rows or (True,) * p.context.shape[0]))
            hint = max((u.hint for u in units), key=len)  # rows without the control hold none
            controls.append(replace(first, hint=hint, rows=rows))
        images = []
        for prompts in zip(*(p.image_tokens for p in parts), strict=True):
            if any(i.adapter is not prompts[0].adapter or i.scale != prompts[0].scale for i in prompts):
                raise ValueError("conditionings to batch together must carry the same image prompts")
            images.append(replace(prompts[0], tokens=torch.cat([i.tokens for i in prompts])))
        return Conditioning(join([p.context for p in parts]), join([p.y for p in parts]),
                            join([p.concat for p in parts]), tuple(controls), tuple(images))


class Denoiser:
    """Wraps a UNet trained on VP latents with eps or v targets."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction: Literal["eps", "v"] = "eps"):
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0 estimate. sigma: (b,) or scalar."""
        # Sigmas live on the CPU (schedules are numpy): the timesteps are computed there and both copied to x's
        # device without waiting (a blocking copy to a GPU waits for all the work queued before it)
        sigma = sigma.to(torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        async_copy = x.device.type == "cuda"
        t = self.schedule.sigma_to_t_torch(sigma).to(x.device, non_blocking=async_copy)
        sigma = sigma.to(x.device, non_blocking=async_copy)
        s = append_dims(sigma, x.ndim)
        c_in = 1.0 / (s ** 2 + 1.0) ** 0.5
        unet_in = x * c_in
        dtype = next(self.unet.parameters()).dtype
        extra = {} if cond.y is None else {"y": cond.y.to(dtype)}  # SD1/SD2 UNets take no vector
        context = cond.context.to(dtype)
        if cond.controls:  # ControlNets see the latents without an inpainting UNet's extra channels
            for unit in cond.controls:
                res = unit.residuals(unet_in.to(dtype), t, context, extra.get("y"))
                key = "adapter" if unit.adapter else "control"
                extra[key] = [a + b for a, b in zip(extra[key], res)] if key in extra else res
        if cond.concat is not None:
            unet_in = torch.cat([unet_in, cond.concat.to(x.dtype)], dim=1)
        with contextlib.ExitStack() as patched:  # IP-Adapters' image tokens, for this call only
            for image in cond.image_tokens:
                patched.enter_context(image.adapter.attached(self.unet, image.tokens.to(x.device, dtype), image.scale))
            out = self.unet(unet_in.to(dtype), t, context, **extra).to(x.dtype)
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

    def with_controls(self, controls: tuple[Control, ...]) -> ScheduledConditioning:
        return ScheduledConditioning(tuple((end, c.with_controls(controls)) for end, c in self.entries))

    def with_image_tokens(self, image_tokens: tuple[ImageTokens, ...]) -> ScheduledConditioning:
        return ScheduledConditioning(tuple((end, c.with_image_tokens(image_tokens)) for end, c in self.entries))


AnyConditioning = Conditioning | ScheduledConditioning


class CFGDenoiser:
    """Classifier-free guidance: uncond + scale * (cond - uncond), both halves in one batched UNet call.

    With prompt editing (ScheduledConditioning) the halves follow `step`, the sampling step under way, which the
    pipeline advances from the sampler's per-step callback: every evaluation of a step (Heun's second one too)
    sees that step's prompt. ControlNet units with a guidance start/end follow it the same way.

    guidance_until: CFG skipping (opt-in; None = guided at every step, the default): from this step on, the
    conditional half alone is run, one UNet batch half instead of two. Counted in steps, not sigmas: the cost
    saved is known up front whatever the schedule, and all evaluations of one step (a second-order sampler's)
    see the same model, where a sigma threshold could split a step between guided and unguided evaluations.
    step_listeners: called with the new step whenever `step` changes (DeepCache's cache follows the steps)."""

    def __init__(self, denoiser: Denoiser, cond: AnyConditioning, uncond: AnyConditioning | None, scale: float,
                 guidance_until: int | None = None):
        if guidance_until is not None and (not isinstance(guidance_until, int) or guidance_until < 0):
            raise ValueError(f"guidance_until must be a step >= 0 or None, got {guidance_until!r}")
        self.denoiser = denoiser
        self.cond, self.uncond, self.scale = cond, uncond, scale
        self.guidance_until = guidance_until
        self.step_listeners: list[Callable[[int], None]] = []
        self._step = 0
        self._both: dict[tuple, Conditioning] = {}

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        self._step = step
        for listener in self.step_listeners:
            listener(step)

    @property
    def scheduled(self) -> bool:
        """Whether anything changes with the step: a prompt schedule, a control acting on some steps only, CFG
        skipping, or a step listener."""
        if self.guidance_until is not None or self.step_listeners:
            return True
        if isinstance(self.cond, ScheduledConditioning) or isinstance(self.uncond, ScheduledConditioning):
            return True
        return any(c.steps != ALL_STEPS for c in self.cond.controls)

    def guided_at(self, step: int) -> bool:
        """Whether step `step` runs guidance (both halves)."""
        if self.uncond is None or self.scale == 1.0:
            return False
        return self.guidance_until is None or step < self.guidance_until

    def _at(self, c: AnyConditioning) -> tuple[tuple, Conditioning]:
        index, cond = c.at(self.step) if isinstance(c, ScheduledConditioning) else (0, c)
        active, cond = cond.at_step(self.step)
        return (index, active), cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        ci, cond = self._at(self.cond)
        if not self.guided_at(self.step):  # guidance off (or skipped at this step): one pass suffices
            return self.denoiser(x, sigma, cond)
        assert self.uncond is not None
        ui, uncond = self._at(self.uncond)
        both = self._both.get((ci, ui))
        if both is None:
            both = self._both[(ci, ui)] = Conditioning.cat([uncond, cond])
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        uncond_out, cond_out = out.chunk(2)
        return uncond_out + self.scale * (cond_out - uncond_out)
