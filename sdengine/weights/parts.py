"""Partial-model files: one network of Stable Diffusion in a safetensors file of its own, and models made of them.

A part file holds a VAE, a text encoder (with its tokenizer when that is not CLIP's) or a UNet under the original
single-file keys (`first_stage_model.*`, `cond_stage_model.*`, `model.diffusion_model.*`), and its config in one
metadata entry (metadata.PART_METADATA), so a part never depends on detection rules. `sdengine train vae` and
`train text` write them; `train unet --vae/--text`, `train vae --init` and `load(..., vae=)` read them.

Also read: part files from before this scheme (the `sdengine_vae_config` / `sdengine_text_config` entries), and as
a VAE any standalone SD VAE (vae-ft-mse and the like, original or diffusers naming, or a diffusers AutoencoderKL
folder) or a whole checkpoint's VAE. A VAE read from shapes alone has no scaling factor of its own
(`Part.recorded` is False): the model it joins keeps its own.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig, from_fields
from ..model import StableDiffusion
from ..nn.clip import build_text_encoder
from ..nn.unet import UNetModel
from ..nn.vae import AutoencoderKL
from ..tokenizer import CLIPTokenizer
from .detect import check_keys
from .io import CheckpointError, atomic_path, read_tensors, write_safetensors
from .keys import TEXT, UNET, VAE
from .metadata import CONFIG_METADATA, PART_METADATA, tokenizer_from_metadata, tokenizer_metadata
from .single import standalone_vae

Kind = Literal["vae", "text", "unet"]
PREFIXES: dict[str, str] = {"vae": VAE, "text": TEXT, "unet": UNET}
CONFIGS: dict[str, type] = {"vae": VAEConfig, "text": TextConfig, "unet": UNetConfig}
NAMES = {"vae": "a VAE", "text": "a text encoder", "unet": "a UNet"}
LEGACY_METADATA = {"sdengine_vae_config": "vae", "sdengine_text_config": "text"}  # part files before PART_METADATA

NetConfig = VAEConfig | TextConfig | UNetConfig


@dataclass
class Part:
    kind: Kind
    config: NetConfig
    tensors: dict[str, torch.Tensor]  # original keys, prefix included
    tokenizer: CLIPTokenizer | None = None  # a text encoder's vocabulary
    recorded: bool = True  # the config was in the file (False: found from shapes, no scaling factor of its own)
    source: str = ""  # the file, for messages

    def module(self) -> nn.Module:
        """The network with these weights (strictly loaded), in eval mode and frozen."""
        builders = {"vae": AutoencoderKL, "text": build_text_encoder, "unet": UNetModel}
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            net = builders[self.kind](self.config)
        prefix = PREFIXES[self.kind]
        sd = {k[len(prefix):]: v for k, v in self.tensors.items()}
        check_keys(net, sd, self.source or NAMES[self.kind])
        net.load_state_dict(sd, strict=True, assign=True)
        return net.float().eval().requires_grad_(False)


def write_part(path: str | Path, kind: Kind, module: nn.Module, config: NetConfig,
               tokenizer: CLIPTokenizer | None = None) -> Path:
    """Write one network as a part file, atomically (an existing file is replaced)."""
    path = Path(path)
    if not isinstance(config, CONFIGS[kind]):
        raise TypeError(f"{kind} part needs a {CONFIGS[kind].__name__}, got {type(config).__name__}")
    metadata = {PART_METADATA: json.dumps({"kind": kind, "config": dataclasses.asdict(config)}), "format": "pt",
                **(tokenizer_metadata(tokenizer) if tokenizer is not None else {})}
    tensors = {PREFIXES[kind] + k: v for k, v in module.state_dict().items()}
    with atomic_path(path, force=True) as tmp:
        write_safetensors(tensors, tmp, metadata=metadata)
    return path


def read_part(path: str | Path, kind: Kind | None = None) -> Part:
    """A part file (kind: the one expected; a VAE may also be any standalone VAE file or folder, see read_vae)."""
    path = Path(path)
    if kind == "vae":
        return read_vae(path)
    return part_from_tensors(*read_tensors(path), str(path), kind)


def part_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str,
                      kind: Kind | None = None) -> Part:
    """The part in a file's tensors and metadata; a VAE without part metadata is read as any VAE file is."""
    found, fields = _recorded(metadata, source)
    if found is None:
        if kind in (None, "vae"):
            return _vae_from_shapes(tensors, metadata, source)
        raise CheckpointError(f"{source}: not {NAMES[kind]} file written by sdengine (no {PART_METADATA} metadata)")
    if kind is not None and found != kind:
        raise CheckpointError(f"{source}: holds {NAMES[found]}, not {NAMES[kind]}")
    try:
        config = from_fields(CONFIGS[found], fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid {found} config in its metadata ({e})") from None
    prefix = PREFIXES[found]
    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    tokenizer = None
    if found == "text":  # its own vocabulary, else CLIP's
        tokenizer = (tokenizer_from_metadata(metadata, config.pad_with_eos, source)
                     or CLIPTokenizer.default(pad_with_eos=config.pad_with_eos))
    return Part(found, config, tensors, tokenizer, recorded=True, source=source)


def _recorded(metadata: dict[str, str], source: str) -> tuple[Kind | None, dict]:
    """(kind, config fields) a file's metadata records for its part; (None, {}) when it records none."""
    try:
        if PART_METADATA in metadata:
            spec = json.loads(metadata[PART_METADATA])
            if spec.get("kind") not in PREFIXES or not isinstance(spec.get("config"), dict):
                raise ValueError(f"expected a kind of {', '.join(PREFIXES)} and a config")
            return spec["kind"], spec["config"]
        for key, kind in LEGACY_METADATA.items():
            if key in metadata:
                return kind, json.loads(metadata[key])  # type: ignore[return-value]
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: invalid part metadata ({e})") from None
    return None, {}


def read_vae(path: str | Path) -> Part:
    """A VAE from any file that holds one: a part file (written by `train vae`), a standalone SD VAE in original or
    diffusers naming, a diffusers AutoencoderKL folder, or a whole checkpoint (its VAE)."""
    path = Path(path)
    if path.is_dir():
        from .diffusers_folder import read_vae_folder

        tensors, config = read_vae_folder(path)
        return Part("vae", config, standalone_vae(tensors)[0], recorded=True, source=str(path))
    return part_from_tensors(*read_tensors(path), str(path), "vae")


def _vae_from_shapes(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Part:
    try:
        sd, config = standalone_vae(tensors)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{source}: not a VAE file ({e})") from None
    if CONFIG_METADATA in metadata:  # a whole sdengine model: its recorded VAE config (groups, scaling factor)
        try:
            return Part("vae", ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA])).vae, sd, source=source)
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{source}: invalid {CONFIG_METADATA} metadata ({e})") from None
    return Part("vae", config, sd, recorded=False, source=source)


def check_vae_fits(vae: VAEConfig, model: ModelConfig, source: str) -> None:
    """A VAE must make the latents the model's UNet was trained on: as many channels, at the same downscale."""
    if vae.embed_dim != model.unet.out_channels or vae.downscale != model.vae.downscale:
        raise ValueError(f"{source}: this VAE makes latents of {vae.embed_dim} channels at 1/{vae.downscale} of the "
                         f"image size, the model's UNet works on {model.unet.out_channels} channels at "
                         f"1/{model.vae.downscale} (its own VAE's)")


# --- models made of parts -------------------------------------------------------------------------------------------

def assemble(unet: UNetConfig, vae: Part, text: Part, prediction: Literal["eps", "v"] = "eps",
             sample_size: int | None = None) -> StableDiffusion:
    """A model from a VAE part, a text encoder part and a fresh UNet of the given config (reading the text
    encoder's width); sample_size, the training image size, is recorded so generation defaults to it."""
    unet = dataclasses.replace(unet, context_dim=text.config.width)
    cfg = ModelConfig(unet=unet, vae=vae.config, text=text.config, prediction=prediction, sample_size=sample_size)
    model = StableDiffusion(cfg, text.tokenizer).init_weights()
    model.first_stage_model.load_state_dict(vae.module().state_dict())
    model.cond_stage_model.load_state_dict(text.module().state_dict())
    return model


def replace_text_encoder(model: StableDiffusion, text: Part) -> StableDiffusion:
    """Put a text encoder part (and its tokenizer) into model in place of its own, as for fine-tuning a model's UNet
    on a newly pretrained encoder: the UNet reads the encoder's hidden states, so the widths must agree."""
    if text.config.width != model.config.unet.context_dim:
        raise ValueError(f"{text.source}: the text encoder is {text.config.width} wide, but the model's UNet reads "
                         f"{model.config.unet.context_dim}-wide text features")
    dtype = next(model.cond_stage_model.parameters()).dtype
    model.cond_stage_model = text.module().to(dtype)
    model.tokenizer = text.tokenizer
    model.config = dataclasses.replace(model.config, text=text.config)
    return model


__all__ = ["Part", "write_part", "read_part", "read_vae", "check_vae_fits", "assemble", "replace_text_encoder"]
