"""Checkpoint merging, the two recipes of AUTOMATIC1111's Checkpoint Merger (ComfyUI's ModelMerge nodes do the same):

    weighted sum     A·(1 − α) + B·α          (α = 0.5: the average of two fine-tunes, a "model soup")
    add difference   A + (B − C)·α            (moves A by what fine-tuning C into B taught: e.g. an inpainting
                                               UNet made from a custom model and the base it came from)

The arithmetic runs in fp32 whatever the files hold and the result takes A's precision unless told otherwise.
Parts not merged (`parts`) are A's unchanged; so are the tokenizer, the config and any buffers that are not
floating point. The models must share an architecture: a mismatch is an error naming the first tensor that
differs, never a silent partial merge.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model import StableDiffusion
from .checkpoint import load
from .keys import CONDITIONER, TEXT, UNET, VAE

# The single-file layout's top-level modules, by the names the CLI uses (text: SD1/SD2's encoder, SDXL's two).
PART_PREFIXES = {"unet": (UNET,), "vae": (VAE,), "text": (TEXT, CONDITIONER)}


def _parts_prefixes(parts: Iterable[str]) -> tuple[str, ...]:
    parts = list(parts)
    unknown = [p for p in parts if p not in PART_PREFIXES]
    if unknown or not parts:
        raise ValueError(f"parts to merge must be some of {', '.join(PART_PREFIXES)}; got {', '.join(parts) or 'none'}")
    return tuple(prefix for p in parts for prefix in PART_PREFIXES[p])


def _check_same_architecture(a: dict[str, torch.Tensor], other: dict[str, torch.Tensor], name: str) -> None:
    missing = sorted(set(a) ^ set(other))
    if missing:
        raise ValueError(f"{name} has another architecture than the primary model: tensor {missing[0]} is in one only")
    for key, tensor in a.items():
        if tensor.shape != other[key].shape:
            raise ValueError(f"{name} has another architecture than the primary model: {key} is "
                             f"{tuple(other[key].shape)} there, {tuple(tensor.shape)} in the primary")


def merge_models(primary: StableDiffusion, secondary: StableDiffusion, alpha: float,
                 tertiary: StableDiffusion | None = None, parts: Iterable[str] = tuple(PART_PREFIXES)) -> None:
    """Merge into `primary` in place: weighted sum with `secondary`, or add difference (secondary − tertiary)
    when `tertiary` is given. alpha: the secondary's share (weighted sum) or the difference's scale."""
    if not -1.0 <= alpha <= 2.0:  # extrapolating a little is a known trick; far beyond is a typo
        raise ValueError(f"alpha must lie in [-1, 2] (0: the primary, 1: the secondary), got {alpha}")
    prefixes = _parts_prefixes(parts)
    state = primary.state_dict()
    others = {"the secondary model": secondary.state_dict()}
    if tertiary is not None:
        others["the tertiary model"] = tertiary.state_dict()
    for name, other in others.items():
        _check_same_architecture(state, other, name)
    b = others["the secondary model"]
    c = others.get("the tertiary model")
    merged: dict[str, torch.Tensor] = {}
    for key, a_value in state.items():
        if not key.startswith(prefixes) or not a_value.is_floating_point():
            continue
        a32, b32 = a_value.float(), b[key].to(a_value.device, torch.float32)
        if c is None:
            out = torch.lerp(a32, b32, alpha)
        else:
            out = a32 + (b32 - c[key].to(a_value.device, torch.float32)) * alpha
        merged[key] = out.to(a_value.dtype)
    primary.load_state_dict(merged, strict=False)


def merge(primary: str | Path, secondary: str | Path, alpha: float = 0.5, tertiary: str | Path | None = None,
          parts: Iterable[str] = tuple(PART_PREFIXES)) -> StableDiffusion:
    """Load the checkpoints (any layout `load` reads) and return the primary with the merge applied."""
    models = [load(p, dtype=None) for p in (primary, secondary, tertiary) if p is not None]
    merge_models(models[0], models[1], alpha, models[2] if tertiary is not None else None, parts)
    return models[0]


__all__ = ["merge", "merge_models", "PART_PREFIXES"]
