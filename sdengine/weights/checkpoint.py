"""Load any supported checkpoint into a StableDiffusion, and write one back in either layout.

Everything funnels through one original-keyed state dict: single files are normalized (single.py), diffusers
folders renamed through the table (keys.py); the model is then built from a detected config and loaded strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from ..config import ModelConfig
from ..model import StableDiffusion
from ..tokenizer import CLIPTokenizer
from . import diffusers_folder
from .detect import UnknownArchitecture, detect
from .io import CheckpointError, atomic_path, read_tensors, write_pickle, write_safetensors
from .keys import TEXT, UNET, VAE
from .single import normalize, standalone_vae

CONFIG_METADATA = "sdengine_config"  # our safetensors metadata: what shapes cannot tell (heads, eps/v)
TOKENIZER_METADATA = "sdengine_tokenizer"  # a model's own (non-CLIP) vocabulary, so one file is the whole model
CLIP_VOCAB_SIZE = 49408
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_checkpoint(
    path: str | Path, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], ModelConfig, CLIPTokenizer | None]:
    """A single file or diffusers folder -> (original-keyed tensors, config, tokenizer or None for the default)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if not diffusers_folder.is_diffusers_folder(path):
            raise CheckpointError(f"{path} is a folder but not a diffusers model (no model_index.json or unet/)")
        return diffusers_folder.read_folder(path)
    raw, metadata = read_tensors(path)
    sd = normalize(raw, use_ema=use_ema)
    if CONFIG_METADATA in metadata:
        try:
            fields = json.loads(metadata[CONFIG_METADATA])
            if not isinstance(fields, dict):  # from_dict would fail on it with an AttributeError
                raise TypeError(f"a JSON {type(fields).__name__}, not an object")
            cfg = ModelConfig.from_dict(fields)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: invalid {CONFIG_METADATA} metadata ({e})") from None
        tokenizer = _tokenizer_from_metadata(metadata, cfg, path)
        return sd, cfg, tokenizer
    else:
        try:
            cfg = detect(sd)
        except UnknownArchitecture as e:  # name the file, as the other load errors do
            raise UnknownArchitecture(f"{path}: {e}") from None
        except (KeyError, IndexError) as e:  # detect() reads the keys and shapes SD's layout implies; a damaged file
            what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else f"a tensor of unexpected rank ({e})"
            raise UnknownArchitecture(f"{path}: not a Stable Diffusion checkpoint: {what}") from None
    return sd, cfg, None


def _tokenizer_from_metadata(metadata: dict[str, str], cfg: ModelConfig, path: Path) -> CLIPTokenizer | None:
    if TOKENIZER_METADATA not in metadata:
        return None
    try:
        spec = json.loads(metadata[TOKENIZER_METADATA])
        return CLIPTokenizer(spec["vocab"], spec["merges"], pad_with_eos=cfg.text.pad_with_eos)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid {TOKENIZER_METADATA} metadata ({e})") from None


def tokenizer_metadata(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """Metadata entry carrying a custom vocabulary (the standard CLIP one ships with the package)."""
    if len(tokenizer.vocab) == CLIP_VOCAB_SIZE:
        return {}
    merges = [" ".join(m) for m in tokenizer.merges]
    return {TOKENIZER_METADATA: json.dumps({"vocab": tokenizer.vocab, "merges": merges})}


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with a readable error: name missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise UnknownArchitecture(f"{source}: unknown architecture; " + "; ".join(problems))


def build(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: CLIPTokenizer | None = None,
          device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
          source: str = "checkpoint") -> StableDiffusion:
    """Build the model for `cfg` and load `sd` strictly; dtype None keeps the file's dtypes."""
    tokenizer = tokenizer or CLIPTokenizer.default(pad_with_eos=cfg.text.pad_with_eos)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = StableDiffusion(cfg, tokenizer)
    check_keys(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def probe_v_prediction(model: StableDiffusion) -> bool:
    """Does this SD2-layout UNet predict v? Decided from the weights, not from a file name.

    At t=999 the input is almost pure noise: an eps-model's output stays close to its input, while a
    v-model's output (v = alpha*eps - sigma*x0, sigma ~ 1) is pulled strongly negative against a constant input.
    """
    unet = model.unet
    unet_dtype = next(unet.parameters()).dtype
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=model.device)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=model.device)
    out = unet(x.to(unet_dtype), torch.tensor([999.0], device=model.device), context.to(unet_dtype)).float()
    return (out - x[:, : out.shape[1]]).mean().item() < -1.0


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
         vae: str | Path | None = None, prediction: Literal["eps", "v"] | None = None,
         use_ema: bool = False, config: ModelConfig | None = None) -> StableDiffusion:
    """Load a single-file checkpoint or diffusers folder.

    vae: a standalone VAE file that replaces the checkpoint's. config: the architecture, for files whose
    head split or prediction type the detection rules would get wrong (the shapes are still checked).
    """
    path = Path(path)
    sd, cfg, tokenizer = read_checkpoint(path, use_ema=use_ema)
    cfg = config or cfg
    if vae is not None:
        vae_sd, vae_cfg = standalone_vae(read_tensors(vae)[0])
        sd = {k: v for k, v in sd.items() if not k.startswith(VAE)} | vae_sd
        cfg = ModelConfig(unet=cfg.unet, vae=vae_cfg, text=cfg.text, prediction=cfg.prediction)
    if prediction is not None:
        cfg = ModelConfig(unet=cfg.unet, vae=cfg.vae, text=cfg.text, prediction=prediction)
    model = build(sd, cfg, tokenizer, device=device, dtype=dtype, source=str(path))
    if prediction is None and config is None and not path.is_dir() and cfg.family == "sd2":
        if probe_v_prediction(model):
            model.config = ModelConfig(unet=cfg.unet, vae=cfg.vae, text=cfg.text, prediction="v")
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
        from dataclasses import replace
        return replace(model.config, text=replace(text, layers=text.layers + 1, skip_last_layers=1))
    return model.config


def save(model: StableDiffusion, dst: str | Path, to: Literal["single", "diffusers"] = "single",
         dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write the model as a single file (.safetensors, or .ckpt by suffix) or a diffusers folder, atomically."""
    dst = Path(dst)
    if to == "diffusers":
        sd = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in model.state_dict().items()}
        with atomic_path(dst, force=force, is_dir=True) as tmp:
            diffusers_folder.write_folder(sd, model.config, model.tokenizer, tmp)
        return dst
    sd = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in single_file_tensors(model).items()}
    with atomic_path(dst, force=force) as tmp:
        if dst.suffix in (".ckpt", ".pt", ".pth"):
            write_pickle(sd, tmp)
        else:
            metadata = {CONFIG_METADATA: single_file_config(model).to_json(), "format": "pt",
                        **tokenizer_metadata(model.tokenizer)}
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
