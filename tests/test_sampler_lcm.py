"""The `lcm` sampler (samplers/discrete.py: sample_lcm, LCMSpec) against diffusers' LCMScheduler to 1e-5: the
timesteps taken from original_inference_steps' skipping schedule, the c_skip/c_out boundary condition with
timestep_scaling 10, and the re-noising from the sampler's noise source (the same per-image generators)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sampler_harness import SHAPE, ToyUNet, diffusers_scheduler, max_rel_error, run_diffusers

from sdengine.diffusion.denoiser import Conditioning, Denoiser
from sdengine.diffusion.samplers import BatchNoise, get_sampler
from sdengine.diffusion.samplers.discrete import lcm_timesteps, sample_lcm
from sdengine.diffusion.schedule import NoiseSchedule


def ours(steps: int, prediction: str = "eps", original_steps: int = 50, timestep_scaling: float = 10.0,
         seed: int = 0) -> torch.Tensor:
    spec = dataclasses.replace(get_sampler("lcm"), original_steps=original_steps)
    ns = NoiseSchedule()
    sigmas = torch.from_numpy(spec.sigmas(ns, steps))
    denoiser = Denoiser(ToyUNet(), ns, prediction)
    noise = BatchNoise([torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])], SHAPE, "cpu")
    x = noise() * spec.initial_scale(float(sigmas[0]))
    return spec(lambda x, s: denoiser(x, s, Conditioning(torch.zeros(1))), x, sigmas, noise=noise,
                timestep_scaling=timestep_scaling)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_matches_lcm_scheduler(steps, prediction):
    ref = run_diffusers("LCMScheduler", steps, prediction=prediction)
    assert max_rel_error(ours(steps, prediction), ref) < 1e-5


@pytest.mark.parametrize("original_steps,steps", [(25, 4), (100, 6)])
def test_original_inference_steps(original_steps, steps):
    ref = run_diffusers("LCMScheduler", steps, original_inference_steps=original_steps)
    assert max_rel_error(ours(steps, original_steps=original_steps), ref) < 1e-5


def test_boundary_condition_is_applied():
    """With timestep_scaling 10 the boundary condition is ~1e-7 at LCM's timesteps (c_skip = 0.25 / (10 t)^2), so
    it is checked where it is not negligible: timestep_scaling 0.01 against diffusers with the same setting."""
    ref = run_diffusers("LCMScheduler", 4, timestep_scaling=0.01)
    assert max_rel_error(ours(4, timestep_scaling=0.01), ref) < 1e-5
    assert max_rel_error(ours(4), ref) > 1e-3  # the setting matters: the test can tell


def test_timesteps_and_errors():
    ns = NoiseSchedule()
    for steps in (1, 4, 7):
        sched = diffusers_scheduler("LCMScheduler")
        sched.set_timesteps(steps)
        np.testing.assert_array_equal(lcm_timesteps(ns, steps), sched.timesteps.numpy())
    assert lcm_timesteps(ns, 4).tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="LCM allows"):
        lcm_timesteps(ns, 51)
    with pytest.raises(ValueError, match="noise"):
        get_sampler("LCM")(lambda x, s: x, torch.zeros(SHAPE), torch.ones(3))
    assert get_sampler("LCM").name == get_sampler("k_lcm").name == "lcm"


def test_same_seed_same_image():
    a, b, c = ours(4, seed=3), ours(4, seed=3), ours(4, seed=4)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


def test_callback_sees_each_step():
    seen = []
    ns = NoiseSchedule()
    sigmas = torch.from_numpy(get_sampler("lcm").sigmas(ns, 3))
    noise = BatchNoise([torch.Generator().manual_seed(0)], (1, 4, 8, 8), "cpu")
    sample_lcm(lambda x, s: x * 0, noise() * 14.6, sigmas, noise=noise, callback=lambda i, n, x, d: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]
