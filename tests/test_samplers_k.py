"""Euler a, Heun, LMS, DPM++ 2M / 2M SDE / SDE against diffusers' schedulers (SD1.5's config), on the toy model.

Stochastic samplers get the same per-image generators as diffusers' pipeline and must draw from them in the
same order. DPM++ SDE's diffusers scheduler draws from torchsde's BrownianTree, so its step is checked with that
noise sampler replaced by Brownian increments built from the generators as ours builds them.
"""
from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from sampler_harness import SD15_SCHEDULER_CONFIG, SHAPE, ToyUNet, max_rel_error, run_diffusers, run_ours

from sdengine.diffusion.denoiser import Conditioning, Denoiser
from sdengine.diffusion.samplers import BatchNoise, get_sampler, multistep
from sdengine.diffusion.schedule import NoiseSchedule

EXACT = 1e-5  # measured <= 3e-6: float32 rounding only
# DPMSolverMultistepScheduler feeds the UNet rounded timesteps under karras (ours are continuous, as
# k-diffusion's and A1111's); measured <= 3.5e-4, and 1e-6 with the rounding taken out (test_dpm_karras_exact).
DPM_KARRAS = 1e-3
SDE = {"algorithm_type": "sde-dpmsolver++"}
PREDICTIONS = ["eps", "v"]
STEPS = [1, 2, 7, 20]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The toy tensors are tiny: a second intra-op thread only adds synchronization (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def needs(class_name: str) -> None:
    if class_name == "LMSDiscreteScheduler":  # diffusers' LMS integrates its coefficients with scipy
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")


def toy_model(prediction: str = "eps"):
    denoiser = Denoiser(ToyUNet(), NoiseSchedule(), prediction)
    return lambda x, sigma: denoiser(x, sigma, Conditioning(torch.zeros(1)))


def seeded(seed: int, shape=SHAPE) -> BatchNoise:
    return BatchNoise([torch.Generator().manual_seed(seed + i) for i in range(shape[0])], shape, "cpu")


# --- a diffusers loop with hooks: continuous UNet timesteps, Brownian noise from the generators -------------


def dpmsolver_sde_class():
    """diffusers' DPMSolverSDEScheduler without torchsde: only its BrownianTree uses torchsde, and tests replace
    that noise sampler, so a stand-in module is enough to import the scheduler's own code."""
    try:
        import diffusers
        import torchsde  # noqa: F401
        return diffusers.DPMSolverSDEScheduler
    except ImportError:
        pass
    sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        return importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde").DPMSolverSDEScheduler
    finally:
        del sys.modules["torchsde"]


class BrownianIncrements:
    """diffusers' noise_sampler(sigma, sigma_next) for DPMSolverSDEScheduler: per step it asks for the increment
    over [sigma_mid, sigma], then over [sigma_next, sigma], of one Brownian motion, normalized. Built from two
    draws of the pipeline's generators, as sample_dpmpp_sde does."""

    def __init__(self, noise: BatchNoise):
        self.noise, self.first = noise, None

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = (self.noise(), self.noise(), sigma_next)
            return self.first[0]
        z1, z2, sigma_mid = self.first
        self.first = None
        d1, d2 = sigma - sigma_mid, sigma_mid - sigma_next
        return (d1.sqrt() * z1 + d2.sqrt() * z2) / (d1 + d2).sqrt()


def run_diffusers_hooked(class_name: str, steps: int, seed: int = 0, prediction: str = "eps",
                         continuous_t: bool = False, **overrides) -> torch.Tensor:
    """run_diffusers' loop; continuous_t: the UNet gets the exact timestep of the scheduler's sigma instead of
    the scheduler's (rounded) timestep. DPMSolverSDEScheduler gets BrownianIncrements as its noise sampler."""
    import diffusers

    cls = dpmsolver_sde_class() if class_name == "DPMSolverSDEScheduler" else getattr(diffusers, class_name)
    sched = cls.from_config({**SD15_SCHEDULER_CONFIG, **overrides,
                             "prediction_type": "epsilon" if prediction == "eps" else "v_prediction"})
    sched.set_timesteps(steps)
    unet = ToyUNet()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    noise = BatchNoise(generators, SHAPE, "cpu")
    latents = noise() * sched.init_noise_sigma
    if class_name == "DPMSolverSDEScheduler":
        sched.noise_sampler = BrownianIncrements(noise)
    log_sigmas = np.log(((1 - sched.alphas_cumprod) / sched.alphas_cumprod).numpy() ** 0.5)
    extra = {"generator": generators} if "generator" in sched.step.__code__.co_varnames else {}
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            t_unet = t
            if continuous_t:  # one model call per step here: step i is at sigmas[i]
                t_unet = torch.tensor(sched._sigma_to_t(np.array(float(sched.sigmas[i])), log_sigmas))
            out = unet(sched.scale_model_input(latents, t), t_unet)
            latents = sched.step(out, t, latents, **extra).prev_sample
    return latents


# --- deterministic: Heun, LMS, DPM++ 2M ------------------------------------------------------------------------

DETERMINISTIC = [("heun", "HeunDiscreteScheduler"), ("lms", "LMSDiscreteScheduler"),
                 ("dpmpp_2m", "DPMSolverMultistepScheduler")]


@pytest.mark.parametrize("schedule", ["normal", "karras"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name,class_name", DETERMINISTIC)
def test_deterministic(name, class_name, prediction, steps, schedule):
    needs(class_name)
    karras = schedule == "karras"
    ref = run_diffusers(class_name, steps, prediction=prediction, use_karras_sigmas=karras)
    tol = DPM_KARRAS if karras and name == "dpmpp_2m" else EXACT
    assert max_rel_error(run_ours(name, steps, prediction=prediction, schedule=schedule), ref) < tol


@pytest.mark.parametrize("name,overrides", [("dpmpp_2m", {}), ("dpmpp_2m_sde", SDE)])
@pytest.mark.parametrize("schedule,flag", [("karras", "use_karras_sigmas"),
                                           ("exponential", "use_exponential_sigmas")])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpm_karras_exact(name, overrides, schedule, flag, prediction):
    """With the UNet's timestep left unrounded, DPMSolverMultistep's karras / exponential match to rounding."""
    ref = run_diffusers_hooked("DPMSolverMultistepScheduler", 12, prediction=prediction, continuous_t=True,
                               **overrides, **{flag: True})
    assert max_rel_error(run_ours(name, 12, prediction=prediction, schedule=schedule), ref) < EXACT


SPACED = [("heun", "HeunDiscreteScheduler", {}), ("lms", "LMSDiscreteScheduler", {}),
          ("dpmpp_2m", "DPMSolverMultistepScheduler", {}), ("euler_a", "EulerAncestralDiscreteScheduler", {}),
          ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", SDE), ("dpmpp_sde", "DPMSolverSDEScheduler", {})]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name,class_name,overrides", SPACED)
def test_spacing(name, class_name, overrides, spacing):
    needs(class_name)
    ref = run_diffusers_hooked(class_name, 10, timestep_spacing=spacing, **overrides)
    assert max_rel_error(run_ours(name, 10, spacing=spacing), ref) < EXACT


# --- stochastic: Euler a, DPM++ 2M SDE, DPM++ SDE ----------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_a(steps, prediction):
    ref = run_diffusers("EulerAncestralDiscreteScheduler", steps, seed=3, prediction=prediction)
    assert max_rel_error(run_ours("euler_a", steps, seed=3, prediction=prediction), ref) < EXACT


@pytest.mark.parametrize("schedule", ["normal", "karras"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2m_sde(steps, prediction, schedule):
    karras = schedule == "karras"
    ref = run_diffusers("DPMSolverMultistepScheduler", steps, seed=5, prediction=prediction,
                        use_karras_sigmas=karras, **SDE)
    ours = run_ours("dpmpp_2m_sde", steps, seed=5, prediction=prediction, schedule=schedule)
    assert max_rel_error(ours, ref) < (DPM_KARRAS if karras else EXACT)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2m_sde_heun(prediction):
    """The solver_type="heun" variant of the second-order correction."""
    ref = run_diffusers("DPMSolverMultistepScheduler", 10, seed=5, prediction=prediction, solver_type="heun", **SDE)
    spec = get_sampler("dpmpp_2m_sde")
    sigmas = torch.from_numpy(spec.sigmas(NoiseSchedule(), 10))
    noise = seeded(5)
    x = noise() * spec.initial_scale(float(sigmas[0]))
    ours = spec(toy_model(prediction), x, sigmas, noise=noise, solver_type="heun")
    assert max_rel_error(ours, ref) < EXACT


@pytest.mark.parametrize("schedule", ["normal", "karras"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_sde_step(steps, prediction, schedule):
    """diffusers' DPMSolverSDEScheduler step for step, given the same Brownian increments."""
    ref = run_diffusers_hooked("DPMSolverSDEScheduler", steps, seed=7, prediction=prediction,
                               use_karras_sigmas=schedule == "karras")
    ours = run_ours("dpmpp_sde", steps, seed=7, prediction=prediction, schedule=schedule)
    assert max_rel_error(ours, ref) < EXACT


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "dpmpp_sde"])
def test_stochastic_seeds(name):
    """Same seed: the same image, bit for bit; another seed for the per-step noise alone: another image."""
    spec = get_sampler(name)
    sigmas = torch.from_numpy(spec.sigmas(NoiseSchedule(), 8, "karras"))
    x = seeded(0)() * sigmas[0]
    model = toy_model()
    a, b, c = (spec(model, x, sigmas, noise=seeded(s)) for s in (10, 10, 11))
    assert torch.equal(a, b)
    assert max_rel_error(a, c) > 1e-2
    assert torch.equal(run_ours(name, 8, seed=4), run_ours(name, 8, seed=4))
    assert max_rel_error(run_ours(name, 8, seed=4), run_ours(name, 8, seed=5)) > 1e-2


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_sde_eta0_is_the_ode(prediction):
    """eta = 0: DPM-Solver++(2S), deterministic, draws no noise, and converges (2nd order) to DPM++ 2M's ODE."""
    def no_noise():
        raise AssertionError("eta = 0 drew noise")

    model = toy_model(prediction)
    ns = NoiseSchedule()
    x = seeded(0)() * ns.sigma_max
    ode = multistep.sample_dpmpp_2m(model, x, torch.from_numpy(ns.sampling_sigmas(200, "karras")[0]))
    errs = []
    for steps in (10, 30):
        sigmas = torch.from_numpy(ns.sampling_sigmas(steps, "karras")[0])
        errs.append(max_rel_error(multistep.sample_dpmpp_sde(model, x, sigmas, noise=no_noise, eta=0), ode))
    assert errs[1] < 2e-2 and errs[1] < errs[0] / 4, errs


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_sde_law(prediction):
    """eta = 1 solves the same reverse SDE as DPM++ 2M SDE: over a batch, its samples' spread agrees with a
    finer DPM++ 2M SDE run's (a wrong noise scale or correlation moves it by far more)."""
    shape = (16, *SHAPE[1:])
    model = toy_model(prediction)
    ns = NoiseSchedule()
    x = seeded(0, shape)() * ns.sigma_max
    ours = multistep.sample_dpmpp_sde(model, x, torch.from_numpy(ns.sampling_sigmas(12, "karras")[0]),
                                      noise=seeded(100, shape))
    ref = multistep.sample_dpmpp_2m_sde(model, x, torch.from_numpy(ns.sampling_sigmas(40, "karras")[0]),
                                        noise=seeded(200, shape))
    assert torch.isfinite(ours).all()
    assert abs(ours.std().item() / ref.std().item() - 1) < 0.08
    assert abs(ours.abs().mean().item() / ref.abs().mean().item() - 1) < 0.08


# --- registry ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,display,alias,class_name", [
    ("euler_a", "Euler a", "k_euler_a", "EulerAncestralDiscreteScheduler"),
    ("heun", "Heun", "k_heun", "HeunDiscreteScheduler"),
    ("lms", "LMS", "k_lms", "LMSDiscreteScheduler"),
    ("dpmpp_2m", "DPM++ 2M", "k_dpmpp_2m", "DPMSolverMultistepScheduler"),
    ("dpmpp_2m_sde", "DPM++ 2M SDE", "k_dpmpp_2m_sde", "DPMSolverMultistepScheduler"),
    ("dpmpp_sde", "DPM++ SDE", "k_dpmpp_sde", "DPMSolverSDEScheduler"),
])
def test_registry(name, display, alias, class_name):
    spec = get_sampler(name)
    assert spec.name == name and get_sampler(display) is spec and get_sampler(alias) is spec
    assert spec.diffusers_class == class_name
    assert spec.diffusers_options == (SDE if name == "dpmpp_2m_sde" else {})
    assert spec.stochastic == (name in ("euler_a", "dpmpp_2m_sde", "dpmpp_sde"))


@pytest.mark.parametrize("name", ["euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde"])
def test_callback(name):
    spec = get_sampler(name)
    sigmas = torch.from_numpy(spec.sigmas(NoiseSchedule(), 5))
    seen = []
    x = seeded(0)() * sigmas[0]
    out = spec(toy_model(), x, sigmas, noise=seeded(1), callback=lambda i, n, xi, d: seen.append((i, n, xi)))
    assert [(i, n) for i, n, _ in seen] == [(i, 5) for i in range(5)]
    assert torch.equal(seen[-1][2], out)
