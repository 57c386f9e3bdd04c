"""Sampler parity harness: one of our samplers vs a diffusers scheduler driving the same toy model.

The toy "UNet" is a fixed nonlinear function of (latent, timestep) with real spatial structure, so every
difference in timesteps, sigmas, scalings or update rules shows in the result; it runs in microseconds.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from sdengine.diffusion.denoiser import Conditioning, Denoiser
from sdengine.diffusion.samplers import BatchNoise, get_sampler
from sdengine.diffusion.schedule import NoiseSchedule

# SD1.5's scheduler config, as published; diffusers' schedulers are built from it with from_config.
SD15_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                         "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SHAPE = (2, 4, 8, 8)


class ToyUNet(torch.nn.Module):
    """out = tanh(conv(x) + time features): smooth, t-dependent, spatially mixed. Same call as our UNet."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(4, generator=g) * 0.1)
        self.freq = torch.randn(4, generator=g)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        t = t.float().reshape(-1).expand(x.shape[0])
        time = torch.sin(t[:, None] / 1000.0 * 3.0 * self.freq[None])[:, :, None, None]
        return torch.tanh(self.conv(x) + time) * 1.5


def diffusers_scheduler(class_name: str, **overrides):
    import diffusers

    cls = getattr(diffusers, class_name)
    return cls.from_config({**SD15_SCHEDULER_CONFIG, **overrides})


def run_diffusers(class_name: str, steps: int, seed: int = 0, prediction: str = "eps", **overrides) -> torch.Tensor:
    """The diffusers pipeline loop (as StableDiffusionPipeline runs it) on the toy model."""
    sched = diffusers_scheduler(class_name, prediction_type="epsilon" if prediction == "eps" else "v_prediction",
                                **overrides)
    sched.set_timesteps(steps)
    unet = ToyUNet()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    latents = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators]) * sched.init_noise_sigma
    extra = {"generator": generators} if "generator" in sched.step.__code__.co_varnames else {}
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(latents, t), t)
            latents = sched.step(out, t, latents, **extra).prev_sample
    return latents


def run_ours(name: str, steps: int, seed: int = 0, prediction: str = "eps", schedule: str = "normal",
             spacing: str | None = None) -> torch.Tensor:
    spec = get_sampler(name)
    ns = NoiseSchedule()
    sigmas = torch.from_numpy(spec.sigmas(ns, steps, schedule, spacing))
    denoiser = Denoiser(ToyUNet(), ns, prediction)
    model = lambda x, sigma: denoiser(x, sigma, Conditioning(torch.zeros(1)))  # noqa: E731
    generators = [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    noise = BatchNoise(generators, SHAPE, "cpu")
    x = noise() * spec.initial_scale(float(sigmas[0]), spacing)
    x = spec(model, x, sigmas, noise=noise) if spec.stochastic else spec(model, x, sigmas)
    return x / (1 + sigmas[-1] ** 2) ** 0.5  # back to the VP latent diffusers holds


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@functools.cache
def _kdiffusion_modules() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1 torchsde "
                    "torchdiffeq trampoline)")
    for dep in ("torchsde", "torchdiffeq", "scipy", "tqdm"):
        pytest.importorskip(dep, reason=f"k-diffusion's sampling module imports {dep}")
    folder = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        loaded = {}
        for name in ("sampling", "external"):
            mod_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[f"k_diffusion.{name}"] = module
            mod_spec.loader.exec_module(module)
            setattr(package, name, module)
            loaded[name] = module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        sys.modules.pop("k_diffusion.external", None)
    return types.SimpleNamespace(**loaded)


def kdiffusion() -> types.SimpleNamespace:
    """k-diffusion's `sampling` and `external` modules (the test-only reference A1111 runs), loaded from the
    installed package without its __init__, which imports its training stack (torchvision, kornia, wandb, clip)."""
    return _kdiffusion_modules()


def kdiffusion_model(model):
    """Our model(x, sigma) called as k-diffusion calls models: sigma one per image."""
    return lambda x, sigma, **_: model(x, sigma[0])


def use_scheduler(ref, class_name: str, **extra):
    """Give a diffusers pipeline one of diffusers' schedulers on SD1.5's config (its own prediction type kept)."""
    import diffusers

    prediction = ref.scheduler.config.prediction_type
    ref.scheduler = getattr(diffusers, class_name).from_config(
        {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction, **extra})
