"""T2I-Adapter files: TencentARC's single files (the original `Adapter`, `Adapter_light` and the SDXL layout, keys as
nn/t2i_adapter.py names them; an `adapter.` prefix is accepted) and diffusers `T2IAdapter` folders (config.json +
diffusion_pytorch_model.safetensors/.bin, diffusers' names mapped by `adapter_pairs`). The layout is read from
tensor shapes and key sets, never file names.

A T2I-Adapter is used through a ControlNet unit (control.py's ControlUnit: same CLI, Python and HTTP fields, kept
in the same folder as A1111's extension does); control.py dispatches on the file's content. Its features are
computed once per generation from the control image and added inside the UNet's way down at the unit's weight, on
the unit's share of the steps, to both halves of guidance (diffusers' StableDiffusionAdapterPipeline) unless the
unit's mode says otherwise.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import UNetConfig
    from .control import ControlUnit
    from .nn.t2i_adapter import AdapterConfig, T2IAdapter

PREFIX = "adapter."
# A1111's extension's soft injection for T2I-Adapters ("prompt" and "control" modes): the deepest feature at full
# weight
SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)
DIFFUSERS_KINDS = {"full_adapter": "full", "full_adapter_xl": "full_xl", "light_adapter": "light"}


class AdapterError(ValueError):
    """A T2I-Adapter file that cannot be used; one line that says why (control.py reports it as a ControlError)."""


def _rename_all(sd: dict[str, torch.Tensor], pairs: list[tuple[str, str]], reverse: bool, what: str
                ) -> dict[str, torch.Tensor]:
    from .weights.keys import _check_unmapped, _rename

    renamed = {k: _rename(k, pairs, reverse) for k in sd}
    _check_unmapped([k for k, new in renamed.items() if new is None], what)
    return {new: sd[k] for k, new in renamed.items() if new is not None}


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items()}
    return sd


def is_adapter(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict (original or diffusers names) holds a T2I-Adapter."""
    keys = set(_strip(sd))
    known = {"body.0.block1.weight", "body.0.in_conv.weight", "body.0.resnets.0.block1.weight", "style_embedding"}
    return bool(known & keys) and \
        not any(k.startswith(("input_blocks.", "control_model.", "input_hint_block.")) for k in keys)


def _indices(keys: set[str], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)})


def _unshuffle(cin: int, channels: int | None) -> tuple[int, int]:
    """(image channels, unshuffle factor) of a first convolution reading `cin` unshuffled channels: 3 (RGB) or 1
    (sketch, grey) times a power of 4."""
    for c in (channels,) if channels else (3, 1):
        f = math.isqrt(cin // c) if cin % c == 0 else 0
        if f >= 1 and f * f * c == cin and f & (f - 1) == 0:
            return c, f
    raise AdapterError(f"not a T2I-Adapter layout this engine knows (a first convolution reading {cin} channels)")


def detect_adapter(sd: dict[str, torch.Tensor], latent_factor: int = 8) -> AdapterConfig:
    """The layout of an original-keyed T2I-Adapter. An unshuffle factor twice the VAE's (`latent_factor`) is the
    SDXL layout (A1111's extension: 16 for SD's VAE); residual blocks per level: 2, as every published full adapter
    (diffusers' conversion script asserts it too)."""
    from .nn.t2i_adapter import AdapterConfig

    keys = set(sd)
    if "style_embedding" in keys:
        raise AdapterError("TencentARC's style adapter (CLIP image tokens added to the prompt, not features): not "
                           "supported; use an IP-Adapter for image prompts")
    if "conv_in.weight" in keys:
        if any(k.endswith((".skep.weight", ".down_opt.op.weight")) for k in keys):
            raise AdapterError("an adapter with skip convolutions or strided-convolution downsampling (sk=False or "
                               "use_conv=True): not a layout TencentARC published; not supported")
        if sd["body.0.block2.weight"].shape[-1] != 1:
            raise AdapterError("an adapter with 3x3 residual kernels (ksize=3): not supported")
        bodies = _indices(keys, "body.")
        if len(bodies) % 2 or bodies != list(range(len(bodies))):
            raise AdapterError(f"not a T2I-Adapter layout this engine knows ({len(bodies)} residual blocks)")
        widths, width = [], sd["conv_in.weight"].shape[0]
        for level in range(len(bodies) // 2):
            if f"body.{2 * level}.in_conv.weight" in keys:
                width = sd[f"body.{2 * level}.in_conv.weight"].shape[0]
            widths.append(width)
        channels, f = _unshuffle(sd["conv_in.weight"].shape[1], None)
        kind = "full_xl" if f == 2 * latent_factor else "full"
        return AdapterConfig(kind, channels, tuple(widths), 2, f)
    if "body.0.in_conv.weight" in keys:
        levels = _indices(keys, "body.")
        blocks = _indices(keys, "body.0.body.")
        widths = tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in levels)
        channels, f = _unshuffle(sd["body.0.in_conv.weight"].shape[1], None)
        return AdapterConfig("light", channels, widths, len(blocks), f)
    raise AdapterError("not a T2I-Adapter: expected 'conv_in.*' and 'body.N.block1.*' (TencentARC's adapter) or "
                       "'body.N.in_conv.*' (the light adapter)")


def adapter_pairs(cfg: AdapterConfig) -> list[tuple[str, str]]:
    """(original, diffusers) prefixes: diffusers groups a level's residual blocks under body.{level}.resnets.{r}
    (the original numbers them body.{level * n + r}), the width change as the level's in_conv."""
    pairs = []
    n = cfg.num_res_blocks
    for level in range(len(cfg.channels)):
        if cfg.kind == "light":
            pairs += [(f"body.{level}.in_conv.", f"adapter.body.{level}.in_conv."),
                      (f"body.{level}.out_conv.", f"adapter.body.{level}.out_conv.")]
            pairs += [(f"body.{level}.body.{r}.", f"adapter.body.{level}.resnets.{r}.") for r in range(n)]
            continue
        pairs.append((f"body.{level * n}.in_conv.", f"adapter.body.{level}.in_conv."))
        pairs += [(f"body.{level * n + r}.block", f"adapter.body.{level}.resnets.{r}.block") for r in range(n)]
    if cfg.kind != "light":
        pairs.append(("conv_in.", "adapter.conv_in."))
    return pairs


def config_from_diffusers(c: dict[str, Any]) -> AdapterConfig:
    from .nn.t2i_adapter import AdapterConfig

    kind = DIFFUSERS_KINDS.get(c.get("adapter_type", "full_adapter"))
    if kind is None:
        raise AdapterError(f"unknown T2I-Adapter type {c.get('adapter_type')!r}; known: {', '.join(DIFFUSERS_KINDS)}")
    channels = tuple(c.get("channels") or (320, 640, 1280, 1280))
    if kind == "light":  # diffusers' light adapter repeats its last width at one more level
        channels = (*channels, channels[-1])
    return AdapterConfig(kind, c.get("in_channels", 3), channels, c.get("num_res_blocks", 4 if kind == "light" else 2),
                         c.get("downscale_factor", 16 if kind == "full_xl" else 8))


def config_to_diffusers(cfg: AdapterConfig) -> dict[str, Any]:
    channels = list(cfg.channels[:-1] if cfg.kind == "light" else cfg.channels)
    kind = {v: k for k, v in DIFFUSERS_KINDS.items()}[cfg.kind]
    return {"_class_name": "T2IAdapter", "adapter_type": kind, "in_channels": cfg.in_channels, "channels": channels,
            "num_res_blocks": cfg.num_res_blocks, "downscale_factor": cfg.unshuffle}


def is_adapter_folder(path: Path) -> bool:
    config = path / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == "T2IAdapter"
    except (OSError, ValueError, AttributeError):
        return False


def read_adapter(path: str | Path, latent_factor: int = 8, tensors: dict[str, torch.Tensor] | None = None
                 ) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """(original-keyed state dict, config) of a T2I-Adapter file or diffusers folder; `tensors`: the file's, when
    already read."""
    from .weights.io import CheckpointError, diffusers_weights, read_tensors

    path = Path(path)
    try:
        if path.is_dir():
            cfg = config_from_diffusers(json.loads((path / "config.json").read_text()))
            found = diffusers_weights(path)
            if found is None:
                raise AdapterError(f"{path}: no diffusion_pytorch_model.safetensors (or .bin) beside config.json")
            sd, _ = read_tensors(found)
            return _rename_all(sd, adapter_pairs(cfg), reverse=True, what=f"{path}: diffusers T2I-Adapter"), cfg
        if tensors is None:
            tensors, _ = read_tensors(path)
    except (CheckpointError, KeyError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    sd = _strip(tensors)
    if "body.0.resnets.0.block1.weight" in sd or "body.0.resnets.0.block1.weight" in {k[8:] for k in tensors}:
        raise AdapterError(f"{path}: diffusers-named T2I-Adapter weights without their config.json: put the file in "
                           "a folder as diffusion_pytorch_model.safetensors beside its config.json")
    try:
        return sd, detect_adapter(sd, latent_factor)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None


def unet_points(unet: UNetConfig) -> list[tuple[int, int]]:
    """(channels, downscale from the latents) where the UNet takes each adapter feature, the middle block's last."""
    import torch

    from .nn.unet import Downsample, Encoder

    enc = Encoder(unet)
    with torch.device("meta"):
        blocks = enc.input_blocks()
    scales, ds = [], 1
    for block in blocks:
        ds *= 2 if isinstance(block[0], Downsample) else 1
        scales.append(ds)
    return [(enc.skip_channels[i], scales[i]) for i in enc.adapter_points] + [(enc.channels, enc.ds)]


def check_fits(cfg: AdapterConfig, unet: UNetConfig, latent_factor: int, source: str) -> None:
    """An adapter's features must have the widths and sizes of the UNet's levels (an SD1 adapter's first feature is
    at the latent size, SDXL's at half of it)."""
    ours = [(c, s / latent_factor) for c, s in zip(cfg.channels, cfg.feature_scales())]
    points = unet_points(unet)
    theirs = [(c, float(s)) for c, s in points[:len(ours)]]
    if len(ours) not in (len(points) - 1, len(points)) or ours != theirs:
        made_for = "SDXL" if cfg.kind == "full_xl" else "SD1.x/SD2.x"
        family = "SDXL" if unet.adm_in_channels else "SD1.x/SD2.x"
        takes = _shapes([(c, float(s)) for c, s in points])
        raise AdapterError(f"{source}: a T2I-Adapter for {made_for} (features {_shapes(ours)}); the model is {family} "
                           f"(its levels take {takes}): use an adapter made for it")


def _shapes(pairs: list[tuple[int, float]]) -> str:
    return ", ".join(f"{c}@1/{s:g}" for c, s in pairs)


def load_adapter(path: str | Path, unet: UNetConfig, latent_factor: int = 8, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, tensors: dict[str, torch.Tensor] | None = None) -> T2IAdapter:
    """A T2I-Adapter for a model whose UNet is `unet` and whose VAE downscales by `latent_factor`, frozen."""
    import torch

    from .nn.t2i_adapter import T2IAdapter
    from .weights.detect import load_frozen

    sd, cfg = read_adapter(path, latent_factor, tensors)
    check_fits(cfg, unet, latent_factor, str(path))
    with torch.device("meta"):
        net = T2IAdapter(cfg)
    return load_frozen(net, sd, str(path), AdapterError, device, dtype)


def save_adapter(net: T2IAdapter, path: str | Path, layout: str = "original") -> None:
    """Write a T2I-Adapter: "original", one .safetensors file under TencentARC's keys; "diffusers", a T2IAdapter
    folder."""
    from .weights.io import write_safetensors

    path = Path(path)
    sd = net.state_dict()
    if layout == "original":
        write_safetensors(sd, path)
        return
    if layout != "diffusers":
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_diffusers(net.config), indent=2))
    write_safetensors(_rename_all(sd, adapter_pairs(net.config), reverse=False, what="original"),
                      path / "diffusion_pytorch_model.safetensors")


def scales(unit: ControlUnit, n: int) -> tuple[float, ...]:
    """Each feature's multiplier: the unit's weight, times A1111's soft-injection ramp in "prompt"/"control" mode."""
    if unit.mode == "balanced":
        return (float(unit.weight),) * n
    ramp = SOFT_SCALES[-n:] if n <= len(SOFT_SCALES) else (SOFT_SCALES[0],) * (n - len(SOFT_SCALES)) + SOFT_SCALES
    return tuple(unit.weight * s for s in ramp)


def features(net: T2IAdapter, hint: torch.Tensor) -> list[torch.Tensor]:
    """The adapter's features for a control image (1, 3, H, W) in [0, 1]; a one-channel adapter reads the first
    channel (A1111's extension; a greyscale image's value). A size the unshuffle factor does not divide (SDXL's 16
    at a multiple of 8) is padded at the right and bottom edges: the features then have the sizes of the UNet's
    levels, which round up as the adapter's pooling does."""
    import torch
    import torch.nn.functional as F

    param = next(net.parameters())
    f = net.config.unshuffle
    hint = hint[:, :net.config.in_channels].to(param.device, param.dtype)
    pad_w, pad_h = -hint.shape[-1] % f, -hint.shape[-2] % f
    if pad_w or pad_h:
        hint = F.pad(hint, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.no_grad():
        return net(hint)
