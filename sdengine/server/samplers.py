"""A1111's sampler and scheduler names read into ours (the HTTP API's `sampler_name`/`scheduler`, the X/Y/Z plot's
sampler and schedule axes), and its clip-skip setting checked: one place for both the body reader and the scripts."""
from __future__ import annotations

from ..diffusion.samplers import SAMPLERS, get_sampler
from ..diffusion.schedule import A1111_SCHEDULERS, SCHEDULE_LABELS
from ..request import MAX_AESTHETIC, MAX_CLIP_SKIP
from .errors import BadInput

# A1111's "automatic" scheduler: what each sampler's options name (sd_samplers_kdiffusion), else the plain one.
AUTOMATIC_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential",
                      "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2s_a": "karras", "restart": "karras",
                      "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential"}
# A scheduler by A1111's name ("sgm_uniform") or label ("SGM Uniform"), any case -> ours
SCHEDULER_KEYS = {**A1111_SCHEDULERS, **{label.lower(): A1111_SCHEDULERS[name]
                                         for name, label in SCHEDULE_LABELS.items() if name in A1111_SCHEDULERS}}


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str, str]:
    """A1111 sampler (display name, alias, or old-style "DPM++ 2M Karras") + scheduler -> (sampler, schedule)."""
    name = (name or "Euler").strip()
    from_name = None
    try:
        spec = get_sampler(name)
    except ValueError:
        spec = None
        for suffix in ("karras", "exponential"):  # before A1111 1.9 the schedule was part of the name
            if name.lower().endswith(" " + suffix):
                try:
                    spec, from_name = get_sampler(name[: -len(suffix) - 1]), suffix
                except ValueError:
                    pass
        if spec is None:
            raise BadInput(f"unknown sampler {name!r}; valid: "
                           + ", ".join(s.display for s in SAMPLERS.values())) from None
    key = (scheduler or "automatic").strip().lower()
    if key == "automatic":
        return spec.name, from_name or AUTOMATIC_SCHEDULE.get(spec.name, "normal")
    if key not in SCHEDULER_KEYS:
        raise BadInput(f"unknown scheduler {scheduler!r}; valid: automatic, {', '.join(A1111_SCHEDULERS)} (or "
                       f"their labels: {', '.join(SCHEDULE_LABELS.values())})")
    return spec.name, SCHEDULER_KEYS[key]


def check_token_merging(value: object) -> float:
    """A1111's token_merging_ratio option: 0 (off) up to, not including, 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise BadInput(f"token_merging_ratio must be a number from 0 (off) up to 1 (not included), got {value!r}")
    return float(value)


# A1111's options for the refiner's aesthetic-score conditioning -> Request fields
AESTHETIC_OPTIONS = {"sdxl_refiner_high_aesthetic_score": "aesthetic_score",
                     "sdxl_refiner_low_aesthetic_score": "negative_aesthetic_score"}


def check_aesthetic_score(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_AESTHETIC:
        raise BadInput(f"{key} must be a number from 0 to {MAX_AESTHETIC:g}, got {value!r}")
    return float(value)


def check_clip_skip(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLIP_SKIP:
        raise BadInput(f"CLIP_stop_at_last_layers must be an integer from 1 to {MAX_CLIP_SKIP}, got {value!r}")
    return value
