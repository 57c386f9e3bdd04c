"""Load any supported checkpoint into a StableDiffusion, and write one back in either layout.

Everything funnels through one original-keyed state dict: single files are normalized (single.py), diffusers
folders renamed through the table (keys.py); the model is then built from a detected config and loaded strictly.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from ..config import ModelConfig
from ..diffusion.schedule import SD_SCHEDULE
from ..model import StableDiffusion
from ..tokenizer import CLIPTokenizer
from .detect import UnknownArchitecture, check_keys, detect, known_model
from .diffusers_folder import is_diffusers_folder, read_folder, write_folder
from .io import CheckpointError, atomic_path, read_tensors, write_pickle, write_safetensors
from .keys import TEXT, UNET, VAE
from .metadata import CONFIG_METADATA, TOKENIZER_2_METADATA, tokenizer_from_metadata, tokenizer_metadata
from .parts import check_vae_fits, read_vae
from .single import normalize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_checkpoint(
    path: str | Path, use_ema: bool = False, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig, tuple[CLIPTokenizer | None, ...]]:
    """A single file or diffusers folder -> (original-keyed tensors, config, tokenizers: one per text encoder, in
    order, None for the default CLIP vocabulary). dtype: floating tensors cast to it as they are read (None: as
    stored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path} is a folder but not a diffusers model (no model_index.json or unet/)")
        return read_folder(path, dtype)
    raw, metadata = read_tensors(path, dtype)
    sd = normalize(raw, use_ema=use_ema)
    if CONFIG_METADATA in metadata:
        try:
            fields = json.loads(metadata[CONFIG_METADATA])
            if not isinstance(fields, dict):  # from_dict would fail on it with an AttributeError
                raise TypeError(f"a JSON {type(fields).__name__}, not an object")
            cfg = ModelConfig.from_dict(fields)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: invalid {CONFIG_METADATA} metadata ({e})") from None
        tokenizer = tokenizer_from_metadata(metadata, cfg.text.pad_with_eos, path)
        if cfg.text_2 is None:
            return sd, cfg, (tokenizer,)
        return sd, cfg, (tokenizer, tokenizer_from_metadata(metadata, cfg.text_2.pad_with_eos, path,
                                                            TOKENIZER_2_METADATA))
    if (known := known_model(sd)) is not None:  # the shipped model without its metadata
        return sd, known[0], (known[1],)
    try:
        cfg = detect(sd)
    except UnknownArchitecture as e:  # name the file, as the other load errors do
        raise UnknownArchitecture(f"{path}: {e}") from None
    except (KeyError, IndexError) as e:  # detect() reads the keys and shapes SD's layout implies; a damaged file
        what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else f"a tensor of unexpected rank ({e})"
        raise UnknownArchitecture(f"{path}: not a Stable Diffusion checkpoint: {what}") from None
    return sd, cfg, ()


# torch.nn.init's in-place initialisers: modules call them in their constructors
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Module constructors leave their parameters uninitialised. On the meta device the initialisers would do
    nothing useful, and their first call there imports torch._dynamo (torch's reference kernels run meta tensors):
    about as long as importing torch itself, paid by every `sdengine generate` before its first step.
    Not thread-safe: it swaps torch.nn.init's functions while a model is built (transformers' no_init_weights
    does the same)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokenizers: Sequence[CLIPTokenizer | None] = (),
          device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
          source: str = "checkpoint") -> StableDiffusion:
    """Build the model for `cfg` and load `sd` strictly; tokenizers: one per text encoder (missing or None: CLIP's
    vocabulary); dtype None keeps the file's dtypes."""
    tokenizer, tokenizer_2 = (*tokenizers, None, None)[:2]
    with torch.device("meta"), skipped_init():  # no random init of weights that are about to be replaced
        model = StableDiffusion(cfg, tokenizer, tokenizer_2)
    check_keys(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def probe_v_prediction(model: StableDiffusion) -> bool:
    """Does this SD2-layout UNet predict v? Decided from the weights, not from a file name.

    At the last training timestep (t=999) the input is almost pure noise: an eps-model's output stays close to its
    input, while a v-model's output (v = alpha*eps - sigma*x0, sigma ~ 1) is pulled strongly negative against a
    constant input.
    """
    unet = model.unet
    unet_dtype = next(unet.parameters()).dtype
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=model.device)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=model.device)
    t = torch.tensor([SD_SCHEDULE.num_train_timesteps - 1.0], device=model.device)
    out = unet(x.to(unet_dtype), t, context.to(unet_dtype)).float()
    return (out - x[:, : out.shape[1]]).mean().item() < -1.0


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
         vae: str | Path | None = None, prediction: Literal["eps", "v"] | None = None,
         use_ema: bool = False, config: ModelConfig | None = None) -> StableDiffusion:
    """Load a single-file checkpoint or diffusers folder.

    vae: a VAE that replaces the checkpoint's (any file or folder weights.parts.read_vae reads; its latents must
    fit the UNet). config: the architecture, for files whose
    head split or prediction type the detection rules would get wrong (the shapes are still checked).
    """
    path = Path(path)
    sd, cfg, tokenizers = read_checkpoint(path, use_ema=use_ema, dtype=dtype)
    cfg = config or cfg
    if vae is not None:
        part = read_vae(vae)
        # a VAE known only from its shapes is a drop-in for the model's latents (as SD's ft-MSE VAE is): its scale
        vae_cfg = part.config if part.recorded else replace(part.config, scaling_factor=cfg.vae.scaling_factor)
        check_vae_fits(vae_cfg, cfg, str(vae))
        sd = {k: v for k, v in sd.items() if not k.startswith(VAE)} | part.tensors
        cfg = replace(cfg, vae=vae_cfg)
    if prediction is not None:
        cfg = replace(cfg, prediction=prediction)
    model = build(sd, cfg, tokenizers, device=device, dtype=dtype, source=str(path))
    if prediction is None and config is None and not path.is_dir() and cfg.family == "sd2":
        if probe_v_prediction(model):
            model.config = replace(cfg, prediction="v")
    model.source = str(path)
    return model


def _identity_resblock(template: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP block whose weights are all zero: x + attn(0) + mlp(0) = x, an exact identity."""
    prefix = TEXT + "model.transformer.resblocks."
    src = f"{prefix}{index - 1}."
    return {f"{prefix}{index}." + k[len(src):]: torch.zeros_like(v) for k, v in template.items() if k.startswith(src)}


def single_file_tensors(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """The original single-file layout. An SD2 text tower read from diffusers (which drops the layer SD2 never
    reads) gets an identity block back in that place, so SD2's 'penultimate layer' rule holds for the file."""
    sd = model.state_dict()
    text = model.config.text
    if text.layout == "openclip" and text.skip_last_layers == 0:
        sd.update(_identity_resblock(sd, text.layers))
    return sd


def single_file_config(model: StableDiffusion) -> ModelConfig:
    text = model.config.text
    if text.layout == "openclip" and text.skip_last_layers == 0:
        return replace(model.config, text=replace(text, layers=text.layers + 1, skip_last_layers=1))
    return model.config


def save(model: StableDiffusion, dst: str | Path, to: Literal["single", "diffusers"] = "single",
         dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write the model as a single file (.safetensors, or .ckpt by suffix) or a diffusers folder, atomically."""
    dst = Path(dst)
    if to == "diffusers":
        sd = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in model.state_dict().items()}
        with atomic_path(dst, force=force, is_dir=True) as tmp:
            write_folder(sd, model.config, model.tokenizer, tmp, model.tokenizer_2)
        return dst
    sd = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in single_file_tensors(model).items()}
    with atomic_path(dst, force=force) as tmp:
        if dst.suffix in (".ckpt", ".pt", ".pth"):
            write_pickle(sd, tmp)
        else:
            metadata = {CONFIG_METADATA: single_file_config(model).to_json(), "format": "pt",
                        **tokenizer_metadata(model.tokenizer),
                        **(tokenizer_metadata(model.tokenizer_2, TOKENIZER_2_METADATA) if model.tokenizer_2 else {})}
            write_safetensors(sd, tmp, metadata=metadata)
    return dst


def convert(src: str | Path, dst: str | Path, to: Literal["single", "diffusers"], dtype: str | None = None,
            force: bool = False) -> Path:
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists (use --force to replace it)")
    model = load(src, dtype=None)  # keep the source's precision unless asked otherwise
    return save(model, dst, to=to, dtype=DTYPES[dtype] if dtype else None, force=force)


__all__ = ["load", "save", "convert", "read_checkpoint", "build", "CheckpointError", "UnknownArchitecture", "UNET"]
