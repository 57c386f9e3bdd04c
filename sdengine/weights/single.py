"""Original single-file checkpoints: the key variants found in the wild, normalized to our in-memory names.

Variants handled: a `state_dict` wrapper (io.read_tensors), `model_ema.*` entries (dropped, or used as the
UNet with use_ema=True), text-encoder keys with or without `text_model.` (SD1's and SDXL's CLIP-L) and with
`position_ids`, VAE attention
stored as linears instead of 1x1 convs, schedule buffers and training losses (dropped), and standalone VAE
files in original or diffusers naming.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig, VAEConfig
from .detect import UnknownArchitecture, detect_vae
from .keys import CONDITIONER, IGNORED_KEYS, IGNORED_PREFIXES, TEXT, UNET, VAE, from_diffusers

CLIP_PREFIXES = (TEXT + "transformer.", CONDITIONER + "0.transformer.")  # SD1's and SDXL's CLIP-L


def normalize(sd: dict[str, torch.Tensor], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Original-keyed tensors as our modules name them; entries that are not network weights dropped."""
    if use_ema:
        sd = _take_ema(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(".position_ids"):
            continue
        # transformers < 4.20, and transformers 5's CLIPTextModel files (which diffusers' SDXL conversion script
        # copies under conditioner.embedders.0.transformer.), have no text_model level
        clip = next((c for c in CLIP_PREFIXES if key.startswith(c)), None)
        if clip is not None and not key.startswith(clip + "text_model."):
            key = clip + "text_model." + key[len(clip):]
        if key.startswith(VAE) and ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # attention projections saved as linears
        out[key] = value
    return out


def _take_ema(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the UNet weights by their EMA copies (`model_ema.diffusion_modelinput_blocks00weight`)."""
    ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
    if not ema:
        raise ValueError("use_ema was asked for, but the checkpoint holds no model_ema.* weights")
    out = dict(sd)
    for key in sd:
        if key.startswith(UNET):
            flat = key[len("model."):].replace(".", "")
            if flat not in ema:
                raise ValueError(f"the checkpoint's EMA weights lack {key}")
            out[key] = ema[flat]
    return out


def standalone_vae(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """A separate VAE file (original `encoder.*` / `first_stage_model.*` or diffusers naming) -> (VAE_-keyed,
    config)."""
    if any(k.startswith(VAE) for k in sd):
        sd = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):
        from .diffusers_folder import vae_config_from_tensors  # diffusers naming: map through the table
        cfg = vae_config_from_tensors(sd)
        sd = {k[len(VAE):]: v for k, v in from_diffusers({"vae": sd}, ModelConfig(vae=cfg)).items()}
    sd = {VAE + k: v for k, v in sd.items() if not k.startswith("loss.") and not k.startswith("model_ema.")}
    sd = normalize(sd)
    if VAE + "encoder.conv_in.weight" not in sd:
        raise UnknownArchitecture("not a VAE file: no encoder.conv_in.weight")
    return sd, detect_vae(sd)  # the strict load of the assembled model names any mismatch
