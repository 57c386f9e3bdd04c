"""`sdengine train lcm`: latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1),
as diffusers' train_lcm_distill_sd_wds.py (a whole LCM UNet) and train_lcm_distill_lora_sd_wds.py (an LCM-LoRA) do.

One step, for a batch of latents z0 with captions c:
  - a start timestep t_n from the 50-step skipping schedule (k = 1000 // 50 = 20; t_n = 19, 39, ..., 999; drawn
    uniformly, or towards the noisy end with timestep_shift as `train unet` draws its timesteps) and
    x_n = q_sample(z0, t_n, noise);
  - the student's consistency estimate f(x_n, t_n) = c_skip(t_n) x_n + c_out(t_n) x0_student(x_n, t_n);
  - the frozen teacher with classifier-free guidance at scale g (fixed, or drawn per item from a range; the
    A1111 scale, so diffusers' w is g - 1) gives x0 and eps, and one DDIM step to t_{n-1} = t_n - k;
  - the target network's estimate at (x_{n-1}, t_{n-1}) under no_grad: an EMA of the student (ema_decay > 0) or the
    student itself (ema_decay = 0, the LCM-LoRA recipe);
  - the pseudo-Huber loss sqrt((f_student - f_target)^2 + c^2) - c, c = 0.001, averaged over all elements.
c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2), sd = 0.5: diffusers' discrete boundary
condition (timestep_scaling 10), which the `lcm` sampler applies when generating.

There is no guidance embedding (the UNet has no timestep_cond input, as in the LCM-LoRA recipe), so a model
distilled at one guidance scale is used with CFG 1. Leaves model.safetensors (the whole model, the target network's
weights when an EMA is kept) or, with lora_rank, lora.safetensors in kohya's layout (stages/lora.py's LoraNetwork).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ...diffusion.schedule import SD_SCHEDULE, NoiseSchedule
from ...model import StableDiffusion
from ..data import Source
from ..draws import BatchDraws, Draw
from .lora import BASE_VERSIONS, LoraNetwork, unet_layers, write_lora
from .unet import UNetStage

MODEL_RESULT = "model.safetensors"
LORA_RESULT = "lora.safetensors"


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0,
                      sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function at integer timesteps t (diffusers'
    scalings_for_boundary_conditions): f = x at t = 0, the model's x0 from t ~ 1 on."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def skipping_timesteps(num_train_timesteps: int, solver_steps: int) -> torch.Tensor:
    """The DDIM solver's timesteps, ascending: k - 1, 2k - 1, ..., k = num_train_timesteps // solver_steps
    (diffusers' DDIMSolver; lcm_timesteps in samplers/discrete.py samples from the same list)."""
    if not 1 <= solver_steps <= num_train_timesteps:
        raise ValueError(f"the solver's steps must be 1 to {num_train_timesteps} (got {solver_steps})")
    k = num_train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * k - 1


class LCMStage(UNetStage):
    """UNetStage's data (latents, captions never dropped: the teacher's guidance needs the caption) with the
    consistency distillation loss; trains the UNet (with a target copy) or a LoRA on the frozen model."""

    SAMPLING = {"steps": 4, "sampler": "lcm", "cfg_scale": 1.0}  # as the result is meant to be used

    name = "lcm"

    def __init__(self, model: StableDiffusion, source: Source | None, *, guidance: tuple[float, float] = (5.0, 5.0),
                 ema_decay: float = 0.95, solver_steps: int = 50, huber_c: float = 0.001,
                 timestep_scaling: float = 10.0, timestep_shift: float = 1.0, lora_rank: int = 0,
                 lora_alpha: float | None = None, seed: int = 0,
                 init_name: str = "", schedule: NoiseSchedule = SD_SCHEDULE,
                 sample_prompts: list[str] | None = None):
        lo, hi = guidance
        if not 1.0 <= lo <= hi:
            raise ValueError(f"the guidance scale must be >= 1 and a range low:high with low <= high (got {lo}:{hi})")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1) (got {ema_decay})")
        if huber_c <= 0:
            raise ValueError(f"--huber-c must be positive (got {huber_c})")
        if lora_rank and ema_decay > 0:
            raise ValueError("an LCM-LoRA's target network is the student itself (LCM-LoRA recipe): "
                             "pass --ema-decay 0 with --lora-rank")
        super().__init__(model, source, seed=seed, caption_dropout=0.0, snr_gamma=0.0, schedule=schedule,
                         sample_prompts=sample_prompts, timestep_shift=timestep_shift)
        self.guidance, self.ema_decay, self.huber_c, self.timestep_scaling = (lo, hi), ema_decay, huber_c, \
            timestep_scaling
        self.solver_t = skipping_timesteps(schedule.num_train_timesteps, solver_steps)
        self.k = schedule.num_train_timesteps // solver_steps
        self.init_name, self.lora_rank = init_name, lora_rank
        self.trained_steps: int | None = None  # set by the command before export (ss_steps)
        model.requires_grad_(False)
        model.text_encoder.eval()
        self.lora: LoraNetwork | None = None
        self.target: nn.Module | None = None
        if lora_rank:
            # the teacher is the same UNet with the LoRA switched off: no second copy
            self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
            self.lora = LoraNetwork(unet_layers(model, lora_rank, self.lora_alpha))
            self.lora.attach()
            self.teacher = model.unet
            model.unet.eval()
        else:
            self.teacher = copy.deepcopy(model.unet).requires_grad_(False).eval()
            model.unet.requires_grad_(True)
            if ema_decay > 0:  # a trainer module (so checkpoints keep it), with no parameter the optimizer sees
                self.target = copy.deepcopy(model.unet).requires_grad_(False)
        self._target_step: int | None = None  # the step whose student weights the target last moved towards
        self._uncond: torch.Tensor | None = None

    def _draws(self, latent: tuple[int, ...], rows: int = 0) -> BatchDraws:
        """UNetStage's draws and the guidance scale's: added last, so the others are the numbers they were."""
        draws = super()._draws(latent, rows)
        return BatchDraws(self.seed, {**draws.fields, "w": Draw("rand")})

    def trainable(self) -> dict[str, nn.Module]:
        if self.lora is not None:
            return {"unet_lora": self.lora}
        return {"unet": self.model.unet, **({"target": self.target} if self.target is not None else {})}

    @torch.no_grad()
    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        """UNetStage's (z0, context, t, noise) and each item's guidance scale."""
        z0, cond, t, noise = super().batch(step, indices, device, items)
        lo, hi = self.guidance
        w = lo + (hi - lo) * self.draws(step, indices, device)["w"]
        return z0, cond, t, noise, w

    def _uncond_context(self, device: torch.device) -> torch.Tensor:
        if self._uncond is None or self._uncond.device != device:
            text = self.model.text_encoder.to(device)
            ids = self.model.tokenizer([""], max_length=self.model.config.text.max_positions).to(device)
            with torch.no_grad():
                self._uncond = text(ids)[0].float()
        return self._uncond

    @torch.no_grad()
    def _update_target(self, step: int) -> None:
        """Move the target towards the student once per optimizer step, before its loss: the student then holds
        the weights of the steps before, and a resumed run makes the same update as an uninterrupted one."""
        if self.target is None or step == 0 or self._target_step == step:
            return
        self._target_step = step
        torch._foreach_lerp_(list(self.target.parameters()), list(self.model.unet.parameters()), 1 - self.ema_decay)

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's x0 and eps estimates at x = sqrt(abar) x0 + sqrt(1 - abar) eps, from an eps or v output."""
        a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
        out = out.float()
        if self.model.config.prediction == "eps":
            return (x - s * out) / a, out
        return a * x - s * out, a * out + s * x

    def loss(self, batch, step: int):
        z0, cond, t, noise, w = batch
        device = z0.device
        self.model.to(device)  # the frozen parts (and the teacher, the target) are not the trainer's to move
        self.teacher.to(device)
        self._update_target(step)
        abar = self.schedule.alphas_cumprod.to(device)
        solver_t = self.solver_t.to(device)
        index = (t * len(solver_t) // self.schedule.num_train_timesteps).clamp(0, len(solver_t) - 1)
        start = solver_t[index]
        prev = (start - self.k).clamp(min=0)  # index 0 steps to t = 0 (diffusers: alphas_cumprod[0])
        x_n = self.schedule.q_sample(z0, start, noise)
        c_skip, c_out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(start, self.timestep_scaling))
        x0, _ = self._x0_eps(self.model.unet(x_n, start, cond), x_n, abar[start])
        estimate = c_skip * x_n + c_out * x0
        with torch.no_grad():
            if self.lora is not None:
                self.lora.set_multiplier(0.0)
            try:
                uncond = self._uncond_context(device).expand(len(z0), -1, -1).to(cond.dtype)
                out = self.teacher(torch.cat([x_n, x_n]), torch.cat([start, start]), torch.cat([cond, uncond]))
            finally:
                if self.lora is not None:
                    self.lora.set_multiplier(1.0)
            x0_t, eps_t = self._x0_eps(out, torch.cat([x_n, x_n]), abar[start].repeat(2))
            g = w.view(-1, 1, 1, 1)
            x0_c, x0_u = x0_t.chunk(2)
            eps_c, eps_u = eps_t.chunk(2)
            x0_g, eps_g = x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)
            a_prev = abar[prev].view(-1, 1, 1, 1)
            x_prev = a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g  # the DDIM step (eta 0) to t_{n-1}
            target_net = self.target if self.target is not None else self.model.unet
            was = target_net.training
            target_net.eval()
            x0_prev, _ = self._x0_eps(target_net(x_prev, prev, cond), x_prev, abar[prev])
            target_net.train(was)
            c_skip_p, c_out_p = (c.view(-1, 1, 1, 1) for c in boundary_scalings(prev, self.timestep_scaling))
            target = c_skip_p * x_prev + c_out_p * x0_prev
        diff = estimate.float() - target.float()
        loss = ((diff.pow(2) + self.huber_c ** 2).sqrt() - self.huber_c).mean()
        return loss, {"mse": diff.pow(2).mean().item()}

    def metadata(self) -> dict[str, str]:
        """kohya's `ss_*` entries of the LCM-LoRA file, and how it was distilled."""
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.lora_rank),
                "ss_network_alpha": str(self.lora_alpha), "ss_network_train_unet_only": "True",
                "ss_base_model_version": BASE_VERSIONS.get(self.model.config.family, "sd_v1"),
                "ss_v2": str(self.model.config.family == "SD2"), "ss_sd_model_name": self.init_name,
                "ss_seed": str(self.seed),
                "sdengine_lcm": json.dumps({"guidance": list(self.guidance), "solver_steps": len(self.solver_t),
                                            "huber_c": self.huber_c, "sampler": "lcm", "cfg_scale": 1.0})}
        if self.trained_steps is not None:
            meta["ss_steps"] = str(self.trained_steps)
        if self.source is not None:
            meta["ss_resolution"] = str((self.source.size, self.source.size))
        return meta

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        from ...weights import save

        if self.lora is not None:
            write_lora(self.lora.kohya_state(), out / LORA_RESULT, self.metadata())
            return
        if self.target is not None:  # the EMA is the consistency model the distillation converges to
            self.model.unet.load_state_dict(self.target.state_dict())
        save(self.model, out / MODEL_RESULT, dtype=torch.float16, force=True)

