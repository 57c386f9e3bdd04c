"""Samplers against diffusers' schedulers (SD1.5's scheduler config, from_config), on a toy model."""
from __future__ import annotations

import pytest
from sampler_harness import max_rel_error, run_diffusers, run_ours


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_euler(steps, prediction):
    ref = run_diffusers("EulerDiscreteScheduler", steps, prediction=prediction)
    assert max_rel_error(run_ours("euler", steps, prediction=prediction), ref) < 1e-4


@pytest.mark.parametrize("schedule,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
def test_euler_schedules(schedule, flag):
    ref = run_diffusers("EulerDiscreteScheduler", 12, **{flag: True})
    assert max_rel_error(run_ours("euler", 12, schedule=schedule), ref) < 1e-4


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_euler_spacing(spacing):
    ref = run_diffusers("EulerDiscreteScheduler", 10, timestep_spacing=spacing)
    assert max_rel_error(run_ours("euler", 10, spacing=spacing), ref) < 1e-4
