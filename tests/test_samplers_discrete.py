"""DDIM, PLMS, DDPM, UniPC and LCM against diffusers' schedulers (SD1.5's scheduler config, from_config)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sampler_harness import SHAPE, ToyUNet, diffusers_scheduler, max_rel_error, run_diffusers, run_ours

from sdengine.diffusion import samplers
from sdengine.diffusion.denoiser import Conditioning, Denoiser
from sdengine.diffusion.img2img_steps import skipped_steps
from sdengine.diffusion.samplers import BatchNoise, discrete, unipc
from sdengine.diffusion.schedule import NoiseSchedule

OURS = {**discrete.SAMPLERS, **unipc.SAMPLERS}
STEPS = [1, 2, 7, 20, 50]


def ours_with(name: str, steps: int, seed: int = 0, pred: str = "eps", sigmas: np.ndarray | None = None,
              init: torch.Tensor | None = None, **options) -> torch.Tensor:
    """run_ours with sampler options, a given sigma list, and img2img: `init` (the clean latent) noised to
    sigmas[0]. pred: the toy model's parameterization."""
    spec, ns = OURS[name], NoiseSchedule()
    sigmas = torch.from_numpy(spec.sigmas(ns, steps) if sigmas is None else sigmas)
    denoiser = Denoiser(ToyUNet(), ns, pred)
    model = lambda x, sigma: denoiser(x, sigma, Conditioning(torch.zeros(1)))  # noqa: E731
    noise = BatchNoise([torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])], SHAPE, "cpu")
    x = noise() * spec.initial_scale(float(sigmas[0])) if init is None else init + noise() * sigmas[0]
    return spec(model, x, sigmas, noise=noise, **options) / (1 + sigmas[-1] ** 2) ** 0.5


def diffusers_with(class_name: str, steps: int, seed: int = 0, prediction: str = "eps", strength: float | None = None,
                   init: torch.Tensor | None = None, step_kwargs: dict | None = None, lcm_strength: bool = False,
                   **overrides) -> torch.Tensor:
    """run_diffusers with step() keywords (DDIM's eta) and img2img as StableDiffusionImg2ImgPipeline runs it
    (timesteps[t_start * order:], set_begin_index, add_noise at timesteps[:1]); lcm_strength: as
    LatentConsistencyModelImg2ImgPipeline does (set_timesteps(steps, strength=strength), all of them)."""
    sched = diffusers_scheduler(class_name, prediction_type="epsilon" if prediction == "eps" else "v_prediction",
                                **overrides)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
    if strength is None:
        sched.set_timesteps(steps)
        timesteps, latents = sched.timesteps, noise * sched.init_noise_sigma
    else:
        if lcm_strength:
            sched.set_timesteps(steps, strength=strength)
            timesteps = sched.timesteps
        else:
            sched.set_timesteps(steps)
            t_start = skipped_steps(steps, strength)
            timesteps = sched.timesteps[t_start * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(init, noise, timesteps[:1])
    unet = ToyUNet()
    extra = {"generator": generators} if "generator" in sched.step.__code__.co_varnames else {}
    with torch.no_grad():
        for t in timesteps:
            out = unet(sched.scale_model_input(latents, t), t)
            latents = sched.step(out, t, latents, **extra, **(step_kwargs or {})).prev_sample
    return latents


def clean_latent() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(123)) * 0.8


# --- deterministic samplers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("unipc", "UniPCMultistepScheduler")])
def test_deterministic(name, cls, steps, prediction):
    ref = run_diffusers(cls, steps, prediction=prediction)
    assert max_rel_error(run_ours(name, steps, prediction=prediction), ref) < 1e-4


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 50])
def test_plms(steps, prediction):
    """PNDM combines raw model outputs, so a v model's PLMS needs the option prediction="v" to match."""
    ref = run_diffusers("PNDMScheduler", steps, prediction=prediction)
    assert max_rel_error(ours_with("plms", steps, pred=prediction, prediction=prediction), ref) < 1e-4


@pytest.mark.parametrize("name,cls,spacings", [
    ("ddim", "DDIMScheduler", ["leading", "trailing"]), ("plms", "PNDMScheduler", ["leading", "trailing"]),
    ("ddpm", "DDPMScheduler", ["leading", "linspace", "trailing"]),
    ("unipc", "UniPCMultistepScheduler", ["leading", "linspace", "trailing"])])
@pytest.mark.parametrize("steps", [10, 13])
def test_spacing(name, cls, spacings, steps):
    """DDIM and PNDM step to t - 1000 // steps rather than to the next listed timestep (diffusers#12633), which
    agrees with the list only for leading, and for trailing when steps divides 1000; ours follow the list."""
    for spacing in spacings:
        if name in ("ddim", "plms") and spacing == "trailing" and 1000 % steps:
            continue
        ref = run_diffusers(cls, steps, timestep_spacing=spacing)
        assert max_rel_error(run_ours(name, steps, spacing=spacing), ref) < 1e-4, spacing


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
def test_unipc_schedules(schedule, flag, prediction):
    """Not to 1e-4: diffusers feeds the UNet round(t) (karras) or int(t) (exponential) while stepping with the exact
    sigma; model(x, sigma) derives the exact t from sigma."""
    for steps in (1, 7, 20):
        ref = run_diffusers("UniPCMultistepScheduler", steps, prediction=prediction, **{flag: True})
        assert max_rel_error(run_ours("unipc", steps, prediction=prediction, schedule=schedule), ref) < 1e-3


def test_unipc_options():
    """Third order, bh1, disable_corrector, lower_order_final off. The last two make diffusers' final step NaN at
    sigma 0 (B(h) = h = -inf times 0; the order-2 terms divide by r = 0), where ours land on the x0 estimate, so
    they are checked with final sigma_min."""
    for steps, options, overrides in [(12, {"order": 3}, {"solver_order": 3}),
                                      (9, {"disable_corrector": [2, 5]}, {"disable_corrector": [2, 5]})]:
        ref = diffusers_with("UniPCMultistepScheduler", steps, **overrides)
        assert max_rel_error(ours_with("unipc", steps, **options), ref) < 1e-4, options
    ns = NoiseSchedule()
    sigmas = OURS["unipc"].sigmas(ns, 8)
    sigmas[-1] = ns.sigma_min
    for options, overrides in [({"variant": "bh1"}, {"solver_type": "bh1"}),
                               ({"lower_order_final": False}, {"lower_order_final": False})]:
        ref = diffusers_with("UniPCMultistepScheduler", 8, final_sigmas_type="sigma_min", **overrides)
        assert max_rel_error(ours_with("unipc", 8, sigmas=sigmas, **options), ref) < 1e-4, options
    assert not ours_with("unipc", 8, variant="bh1", lower_order_final=False).isnan().any()


# --- stochastic samplers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name,cls", [("ddpm", "DDPMScheduler"), ("lcm", "LCMScheduler")])
def test_stochastic(name, cls, steps, prediction):
    """Same per-image generators -> the same noise draws as diffusers' step(generator=...)."""
    ref = run_diffusers(cls, steps, prediction=prediction)
    assert max_rel_error(run_ours(name, steps, prediction=prediction), ref) < 1e-4


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_ddim_eta(steps):
    ref = diffusers_with("DDIMScheduler", steps, step_kwargs={"eta": 0.6})
    assert max_rel_error(ours_with("ddim", steps, eta=0.6), ref) < 1e-4
    with pytest.raises(ValueError):
        OURS["ddim"](lambda x, s: x, torch.zeros(SHAPE), torch.ones(3), eta=0.6)


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("lcm", {}), ("ddim", {"eta": 1.0})])
def test_seeds(name, options):
    a, b, c = (ours_with(name, 6, seed=seed, **options) for seed in (5, 5, 6))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


# --- timesteps and img2img ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("plms", "PNDMScheduler"), ("ddpm", "DDPMScheduler"),
                                      ("unipc", "UniPCMultistepScheduler"), ("lcm", "LCMScheduler")])
def test_timesteps(name, cls):
    """Our sigmas are the scheduler's: the distinct timesteps it evaluates, then the final sigma."""
    ns = NoiseSchedule()
    for steps in (1, 4, 7, 25):
        sched = diffusers_scheduler(cls)
        sched.set_timesteps(steps)
        t = sched.timesteps.numpy()
        t = t[np.sort(np.unique(t, return_index=True)[1])]
        sigmas = OURS[name].sigmas(ns, steps)
        np.testing.assert_allclose(sigmas[:-1], ns.t_to_sigma(t).astype(np.float32), rtol=1e-6)
        assert sigmas[-1] == (ns.sigmas[0] if OURS[name].final_sigma == "sigma_min" else 0)


@pytest.mark.parametrize("steps,strength", [(10, 0.5), (7, 0.3), (20, 0.75)])
@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"),
                                      ("unipc", "UniPCMultistepScheduler"), ("lcm", "LCMScheduler")])
def test_img2img_slicing(name, cls, steps, strength):
    """StableDiffusionImg2ImgPipeline's timesteps[t_start * order:] is our sigma list sliced at t_start."""
    init = clean_latent()
    ref = diffusers_with(cls, steps, strength=strength, init=init)
    sigmas = OURS[name].sigmas(NoiseSchedule(), steps)[skipped_steps(steps, strength):]
    assert max_rel_error(ours_with(name, steps, sigmas=sigmas, init=init), ref) < 1e-4


@pytest.mark.parametrize("steps,strength", [(10, 0.5), (10, 0.9), (7, 0.3), (4, 0.1), (20, 1.0)])
def test_plms_img2img_start(steps, strength):
    """PLMS img2img starts where diffusers does (its repeated timestep shifts the index by one). Its later steps
    differ: diffusers' restarted counter repeats the warm-up, which evaluates the third listed timestep on a
    sample still at the second's noise level; ours step through every timestep."""
    ns = NoiseSchedule()
    sched = diffusers_scheduler("PNDMScheduler")
    sched.set_timesteps(steps)
    t = sched.timesteps[skipped_steps(steps, strength):].numpy()
    sigmas = OURS["plms"].img2img_sigmas(ns, steps, strength)
    np.testing.assert_allclose(sigmas[:-1], ns.t_to_sigma(np.unique(t)[::-1]).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (8, 0.6)])
def test_lcm_strength_schedule(steps, strength):
    """lcm_timesteps(strength) is LatentConsistencyModelImg2ImgPipeline's schedule (set_timesteps(strength=...))."""
    ns, init = NoiseSchedule(), clean_latent()
    t = discrete.lcm_timesteps(ns, steps, strength=strength)
    sigmas = np.concatenate([ns.t_to_sigma(t), [0.0]]).astype(np.float32)
    ref = diffusers_with("LCMScheduler", steps, strength=strength, init=init, lcm_strength=True)
    assert max_rel_error(ours_with("lcm", steps, sigmas=sigmas, init=init), ref) < 1e-4
    with pytest.raises(ValueError):
        discrete.lcm_timesteps(ns, 30, strength=0.5)


def test_registry():
    for name in OURS:
        spec = samplers.get_sampler(OURS[name].display)
        assert spec is OURS[name] and spec.init == "vp"
    assert samplers.get_sampler("k_lcm").name == "lcm"
    callbacks = []
    ours_with("unipc", 5, callback=lambda i, n, x, d: callbacks.append((i, n)))
    assert callbacks == [(i, 5) for i in range(5)]
