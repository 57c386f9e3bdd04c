"""How many steps an img2img runs, by both rules in use: diffusers' (the Python API and the CLI) and
AUTOMATIC1111's `setup_img2img_steps` (the HTTP API's img2img and the hires pass, which run exactly A1111's number
of steps through `Request.denoise_steps`).

A1111 has two branches. The implicit one (plain img2img): a schedule of `steps`, t_enc = int(s * steps) with the
strength s capped at 0.999. The fixed one (the hires pass, or img2img with "fix steps" set): the user's steps are
run, from a schedule of int(steps / s), t_enc = steps - 1. Its k-diffusion samplers then run t_enc + 1 steps of
the schedule, its timestep samplers (DDIM, PLMS, UniPC, DDPM: sd_samplers_timesteps) t_enc. diffusers (and the
Python API) run int(steps * strength) of `steps`: one fewer than A1111's k-diffusion samplers.
"""
from __future__ import annotations

# A1111's samplers that walk DDPM timesteps (sd_samplers_timesteps); the others are k-diffusion's
TIMESTEP_SAMPLERS = frozenset({"ddim", "plms", "unipc", "ddpm"})


def skipped_steps(steps: int, strength: float) -> int:
    """diffusers' img2img t_start: how many leading steps of `steps` are skipped; int(steps * strength) are run."""
    return max(steps - min(int(steps * strength), steps), 0)


def a1111_img2img_steps(steps: int, strength: float, sampler: str, fixed: bool = False) -> tuple[int, int]:
    """(schedule length, steps run from its end) of A1111's img2img; fixed: the hires pass's branch."""
    s = min(strength, 0.999)
    total, t_enc = (int(steps / s), steps - 1) if fixed else (steps, int(s * steps))
    run = t_enc if sampler in TIMESTEP_SAMPLERS else t_enc + 1
    return total, max(1, min(run, total))


__all__ = ["skipped_steps", "a1111_img2img_steps", "TIMESTEP_SAMPLERS"]
