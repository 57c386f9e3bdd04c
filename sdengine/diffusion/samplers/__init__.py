"""The sampler registry: CLI name -> SamplerSpec. Each module contributes its own SAMPLERS dict."""
from __future__ import annotations

from . import discrete, euler, multistep, restart, singlestep, unipc
from .base import BatchNoise, DenoiseFn, NoiseSource, SamplerSpec, StepCallback, to_d

SAMPLERS: dict[str, SamplerSpec] = {**euler.SAMPLERS, **multistep.SAMPLERS, **singlestep.SAMPLERS, **restart.SAMPLERS,
                                    **discrete.SAMPLERS, **unipc.SAMPLERS}


def get_sampler(name: str) -> SamplerSpec:
    """Find a sampler by CLI name, A1111 display name or alias (case-insensitive)."""
    key = name.strip().lower()
    for spec in SAMPLERS.values():
        if key in (spec.name, spec.display.lower(), *(a.lower() for a in spec.aliases)):
            return spec
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


__all__ = ["SAMPLERS", "get_sampler", "SamplerSpec", "BatchNoise", "DenoiseFn", "NoiseSource", "StepCallback", "to_d"]
