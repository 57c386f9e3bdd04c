"""ControlNet units: what a request asks for (ControlUnit), the files that hold ControlNets (found, detected and
loaded here), the control images (preprocessed by control_maps.py, fitted to the output) and the per-step settings
the denoiser applies (diffusion/denoiser.py's Control).

A unit names its model (a path, or a name in $SDENGINE_HOME/controlnet), its control image and A1111's settings:
weight, guidance start/end (the share of the steps it acts on), control mode, resize mode, preprocessor and its
thresholds. The Request holds units as frozen specs (no tensors): the same request then gives the same image at any
size (the hires fix's second pass re-fits the control image to its own size), and it is validated once, before
anything loads.

Files: lllyasviel's single files (`control_model.*` keys, .pth or .safetensors; the same keys without the prefix
too) and diffusers ControlNetModel folders (config.json + diffusion_pytorch_model.safetensors/.bin). The layout is
read from tensor shapes and key sets, never file names; a file that is no ControlNet, or one made for another
model family, is a one-line error that says what was expected. T2I-Adapters share the folder and the units (as
in A1111's extension): `load_control_model` tells them apart by content and t2i_adapter.py loads them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import control_lora
from .control_maps import ALIASES, PREPROCESSORS, ControlError, fit, preprocess

if TYPE_CHECKING:
    import torch

    from .config import UNetConfig
    from .diffusion.denoiser import Control
    from .nn.controlnet import ControlNet, ControlNetConfig
    from .nn.t2i_adapter import T2IAdapter

PREFIX = "control_model."
MAX_UNITS = 10
MAX_WEIGHT = 10.0
# The original's guess mode and A1111's soft injection: residual i of n scaled 0.825**(n-1-i)
SOFT_INJECTION_BASE = 0.825
# Control modes: sdengine's short name -> A1111's label. "prompt": the soft-injection ramp on both halves of
# guidance; "control": the ramp, and the residuals on the conditional half only (the original's and diffusers'
# guess mode).
MODES = {"balanced": "Balanced", "prompt": "My prompt is more important", "control": "ControlNet is more important"}
RESIZE_MODES = {"just resize": "Just Resize", "crop and resize": "Crop and Resize",
                "resize and fill": "Resize and Fill"}
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def _label_to_name(value: str | int, table: dict[str, str], what: str) -> str:
    """A setting by sdengine's name, A1111's label or A1111's API index (0, 1, 2 in the table's order)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(table):
        return list(table)[value]
    key = str(value).strip().lower()
    for name, label in table.items():
        if key in (name, label.lower()):
            return name
    raise ControlError(f"unknown {what} {value!r}; valid: {', '.join(table)} (or A1111's {', '.join(table.values())})")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit of a request (A1111's ControlNet unit). model: a path or a name in the controlnet folder;
    image: a PIL image or an image file's path (preprocessed by `preprocess`, then fitted to the output size by
    `resize`); weight: the conditioning scale; start/end: the share of the sampling steps it acts on (diffusers'
    control_guidance_start/end); mode: balanced | prompt | control (A1111's control mode); threshold_a/_b: the
    preprocessor's (None: its default, A1111's)."""

    model: str
    image: Image.Image | str | Path
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    preprocess: str = "none"
    resize: str = "just resize"
    threshold_a: float | None = None
    threshold_b: float | None = None
    # "inpaint" (control_v11p_sd15_inpaint): where to repaint (white), read as the image is; None: the inpainting
    # request's own mask
    mask: Image.Image | str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str | Path) or not str(self.model).strip():
            raise ControlError(f"a ControlNet unit needs a model (a path or a name), got {self.model!r}")
        object.__setattr__(self, "model", str(self.model))
        if not isinstance(self.image, Image.Image | str | Path):
            raise ControlError(f"a ControlNet unit's image must be a PIL image or a file path, got "
                               f"{type(self.image).__name__}")
        for name in ("weight", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ControlError(f"ControlNet {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.weight <= MAX_WEIGHT:
            raise ControlError(f"ControlNet weight must be in [0, {MAX_WEIGHT:g}], got {self.weight!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ControlError(f"ControlNet guidance start and end must satisfy 0 <= start < end <= 1, got "
                               f"{self.start!r} and {self.end!r}")
        object.__setattr__(self, "mode", _label_to_name(self.mode, MODES, "control mode"))
        object.__setattr__(self, "resize", _label_to_name(self.resize, RESIZE_MODES, "resize mode"))
        module = ALIASES.get(str(self.preprocess).strip().lower(), str(self.preprocess).strip().lower())
        if module not in PREPROCESSORS:
            raise ControlError(f"unknown preprocessor {self.preprocess!r}; valid: {', '.join(PREPROCESSORS)} (others "
                               "such as depth or openpose: give the already preprocessed image with 'none')")
        object.__setattr__(self, "preprocess", module)
        if self.mask is not None and not isinstance(self.mask, Image.Image | str | Path):
            raise ControlError(f"a ControlNet unit's mask must be a PIL image or a file path, got "
                               f"{type(self.mask).__name__}")
        for name, default in zip(("threshold_a", "threshold_b"), PREPROCESSORS[module]):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ControlError(f"ControlNet {name.replace('_', ' ')} must be a finite number, got {value!r}")

    def scales(self, residuals: int) -> tuple[float, ...]:
        """The multiplier of each residual (the middle block's last): the weight, or with soft injection ("prompt"
        and "control" modes) the weight times SOFT_INJECTION_BASE**(n-1-i), the deepest residual at full weight."""
        if self.mode == "balanced":
            return (float(self.weight),) * residuals
        return tuple(self.weight * SOFT_INJECTION_BASE ** (residuals - 1 - i) for i in range(residuals))

    def steps(self, total: int) -> tuple[int, int] | None:
        """[first, stop) of the `total` sampling steps the unit acts on, as diffusers' pipelines count them: step i
        acts unless i/total < start or (i+1)/total > end. None: no step."""
        active = [i for i in range(total) if not (i / total < self.start or (i + 1) / total > self.end)]
        return (active[0], active[-1] + 1) if active else None

    def infotext(self, model_label: str) -> str:
        """A1111's "ControlNet N" value for this unit."""
        fields: dict[str, Any] = {"Module": self.preprocess, "Model": model_label, "Weight": self.weight,
                                  "Resize Mode": RESIZE_MODES[self.resize],
                                  "Threshold A": self.threshold_a, "Threshold B": self.threshold_b,
                                  "Guidance Start": self.start, "Guidance End": self.end,
                                  "Control Mode": MODES[self.mode]}
        return ", ".join(f"{k}: {_number(v)}" for k, v in fields.items() if v is not None)


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def check_units(units: Any) -> tuple[ControlUnit, ...]:
    """A request's `controls` as a tuple of ControlUnit (a list is accepted), at most MAX_UNITS."""
    if units is None:
        return ()
    if isinstance(units, ControlUnit):
        units = (units,)
    if not isinstance(units, list | tuple) or not all(isinstance(u, ControlUnit) for u in units):
        raise ControlError("controls must be a list of ControlUnit")
    if len(units) > MAX_UNITS:
        raise ControlError(f"at most {MAX_UNITS} ControlNet units at once, got {len(units)}")
    return tuple(units)


# --- control images (the preprocessors themselves: control_maps.py) ----------------------------------------------

def _open(image: Image.Image | str | Path, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, Image.DecompressionBombError) as e:
        raise ControlError(f"{what} {image}: not a readable image ({e.__class__.__name__})") from None


def control_map(unit: ControlUnit) -> Image.Image:
    """The unit's preprocessed control map at its image's own size."""
    image = _open(unit.image, "control image")
    if image.mode in ("RGBA", "LA", "P"):  # transparent areas count as black: no control there
        rgba = image.convert("RGBA")
        base = Image.new("RGB", rgba.size)
        base.paste(rgba, mask=rgba.getchannel("A"))
        image = base
    return preprocess(image, unit.preprocess, unit.threshold_a, unit.threshold_b)


def hint_tensor(unit: ControlUnit, width: int, height: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hint the ControlNet reads: (1, 3, height, width) in [0, 1], RGB. "inpaint": the pixels to repaint set to
    -1 (the inpainting ControlNet's protocol, as A1111's extension and diffusers' example build it); mask: the
    request's (1, 1, height, width), 1 = repaint, used when the unit has none."""
    import torch

    pixels = np.asarray(fit(control_map(unit), width, height, unit.resize).convert("RGB"), dtype=np.float32)
    hint = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)[None].contiguous()
    if unit.preprocess != "inpaint":
        return hint
    if unit.mask is not None:
        grey = fit(_open(unit.mask, "control mask").convert("L"), width, height, unit.resize)
        mask = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
    if mask is None:
        raise ControlError("the inpaint preprocessor needs a mask: the unit's, or an inpainting request's")
    return torch.where(mask.to(hint.dtype) > 0.5, -1.0, hint)


# --- files ---------------------------------------------------------------------------------------------------------

def controlnet_pairs(cfg: ControlNetConfig) -> list[tuple[str, str]]:
    """(original, diffusers) prefixes of a ControlNet: the UNet's table for the copied half, and the hint encoder,
    zero convolutions and middle-block output."""
    from .nn.unet import Encoder
    from .weights.keys import unet_pairs

    pairs = [(o, d) for o, d in unet_pairs(cfg.unet) if not o.startswith(("output_blocks.", "out."))]
    stages = len(cfg.hint_block_channels) - 1
    pairs.append(("input_hint_block.0.", "controlnet_cond_embedding.conv_in."))
    pairs += [(f"input_hint_block.{2 + 2 * j}.", f"controlnet_cond_embedding.blocks.{j}.") for j in range(2 * stages)]
    pairs.append((f"input_hint_block.{2 + 4 * stages}.", "controlnet_cond_embedding.conv_out."))
    enc = Encoder(cfg.unet)
    enc.input_blocks()
    pairs += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(len(enc.skip_channels))]
    pairs.append(("middle_block_out.0.", "controlnet_mid_block."))
    return pairs


def _rename_all(sd: dict[str, torch.Tensor], pairs: list[tuple[str, str]], reverse: bool, what: str
                ) -> dict[str, torch.Tensor]:
    from .weights.keys import _check_unmapped, _rename

    out, unmapped = {}, []
    for key, value in sd.items():
        new = _rename(key, pairs, reverse)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    _check_unmapped(unmapped, what)
    return out


def config_from_diffusers(c: dict[str, Any]) -> ControlNetConfig:
    from .nn.controlnet import ControlNetConfig
    from .weights.diffusers_folder import unet_config_from_diffusers

    if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ControlError(f"a {c.get('_class_name')} folder, not a ControlNetModel")
    if c.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ControlError("unsupported ControlNet: BGR channel order is set")
    unet = unet_config_from_diffusers({**c, "out_channels": c.get("in_channels", 4)})
    widths = tuple(c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    return ControlNetConfig(unet=unet, hint_channels=c.get("conditioning_channels", 3), hint_block_channels=widths,
                            global_pool=bool(c.get("global_pool_conditions")))


def config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    from .weights.diffusers_folder import unet_config_to_diffusers

    c = unet_config_to_diffusers(cfg.unet)
    if len(set(c["layers_per_block"])) != 1:
        raise ValueError("diffusers' ControlNetModel holds one res block count for every level")
    c["layers_per_block"] = c["layers_per_block"][0]
    for key in ("up_block_types", "out_channels", "sample_size", "center_input_sample"):
        c.pop(key, None)
    return {**c, "_class_name": "ControlNetModel", "conditioning_channels": cfg.hint_channels,
            "conditioning_embedding_out_channels": list(cfg.hint_block_channels),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": cfg.global_pool}


def detect_controlnet(sd: dict[str, torch.Tensor], like: UNetConfig | None = None) -> ControlNetConfig:
    """The layout of an original-keyed ControlNet state dict (no prefix). Heads and GroupNorm groups are in no
    tensor's shape: a ControlNet copies its UNet, so they are taken from `like` (the model's UNet) when the widths
    agree, else the published families' rule."""
    import torch

    from .nn.controlnet import ControlNetConfig
    from .weights.detect import UnknownArchitecture, detect_unet
    from .weights.keys import UNET

    conv = sd["input_blocks.0.0.weight"]
    # detect_unet reads the UNet's out.2 for its output channels: a ControlNet has no output side, so lend it one
    view = {UNET + k: v for k, v in sd.items()} | {UNET + "out.2.weight": torch.empty(conv.shape[1], 0)}
    try:
        unet = detect_unet(view)
    except UnknownArchitecture as e:
        raise ControlError(f"not a ControlNet layout this engine knows ({e})") from None
    if like is not None and (like.model_channels, like.channel_mult) == (unet.model_channels, unet.channel_mult):
        unet = dataclasses.replace(unet, num_heads=like.num_heads, num_head_channels=like.num_head_channels,
                                   norm_groups=like.norm_groups)
    return ControlNetConfig(unet, *_hint_layout(sd))


def _hint_layout(sd: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint-encoder widths) of an original-keyed ControlNet."""
    hint = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    widths = [sd[f"input_hint_block.{hint[0]}.weight"].shape[0]]
    widths += [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hint[2:-1:2]]
    return sd[f"input_hint_block.{hint[0]}.weight"].shape[1], tuple(widths)


def _original_keys(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A single file's tensors under the original names without the `control_model.` prefix."""
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()
              if k.startswith(PREFIX) or k in control_lora.MARKERS}
    if any(k.startswith("controlnet_cond_embedding.") for k in sd):
        raise ControlError(f"{source}: diffusers-named ControlNet weights without their config.json: put the file in "
                           "a folder as diffusion_pytorch_model.safetensors beside its config.json")
    if "input_hint_block.0.weight" not in sd or "zero_convs.0.0.weight" not in sd:
        shown = ", ".join(sorted(sd)[:4])
        raise ControlError(f"{source}: not a ControlNet: expected keys '{PREFIX}input_hint_block.*' and "
                           f"'{PREFIX}zero_convs.*' (lllyasviel's files) or a diffusers ControlNetModel folder, or a "
                           f"T2I-Adapter ('conv_in.*' and 'body.*', or a diffusers T2IAdapter folder) (found: {shown})")
    return sd


def read_controlnet(path: str | Path, like: UNetConfig | None = None, tensors: dict[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, torch.Tensor], ControlNetConfig]:
    """(original-keyed state dict without prefix, config) of a ControlNet file or diffusers folder; `tensors`: the
    file's, when already read."""
    from .nn.controlnet import ControlNetConfig
    from .weights.io import CheckpointError, diffusers_weights, read_tensors

    path = Path(path)
    if not path.exists():
        raise ControlError(f"no ControlNet at {path}")
    try:
        if path.is_dir():
            config = path / "config.json"
            if not config.is_file():
                raise ControlError(f"{path}: a folder without config.json (a diffusers ControlNetModel folder "
                                   "holds config.json and diffusion_pytorch_model.safetensors)")
            cfg = config_from_diffusers(json.loads(config.read_text()))
            found = diffusers_weights(path)
            if found is None:
                raise ControlError(f"{path}: no diffusion_pytorch_model.safetensors (or .bin) beside config.json")
            tensors, _ = read_tensors(found)
            return _rename_all(tensors, controlnet_pairs(cfg), reverse=True, what=f"{path}: diffusers"), cfg
        if tensors is None:
            tensors, _ = read_tensors(path)
    except (CheckpointError, KeyError, json.JSONDecodeError) as e:
        raise ControlError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    sd = _original_keys(tensors, str(path))
    if control_lora.LORA in sd:  # too few full tensors to detect the copy from: it is the model's UNet's
        if like is None:
            raise ControlError(f"{path}: a Control-LoRA takes its layout from the model's UNet; load it with one")
        return sd, ControlNetConfig(like, *_hint_layout(sd))
    cfg = detect_controlnet(sd, like)
    return sd, dataclasses.replace(cfg, global_pool=global_pooling(path))


def global_pooling(path: Path) -> bool:
    """Whether a single file's ControlNet pools its residuals: lllyasviel's release ships a .yaml beside each file,
    `global_average_pooling: True` in the shuffle model's (control_v11e_sd15_shuffle.yaml); nothing in the weights
    says so. A file named like a shuffle model without that .yaml is warned about (A1111's extension goes by the
    name)."""
    import re
    import warnings

    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        return re.search(r"global_average_pooling:\s*true", yaml.read_text(errors="replace"), re.I) is not None
    if "shuffle" in path.stem.lower():
        warnings.warn(f"{path.name}: a shuffle ControlNet pools its residuals (global_average_pooling), which only "
                      f"its .yaml says; put {yaml.name} from its release beside it", stacklevel=2)
    return False


def family_of(unet: UNetConfig) -> str:
    if unet.adm_in_channels is not None:
        return "SDXL"
    return {768: "SD1.x", 1024: "SD2.x"}.get(unet.context_dim, f"a {unet.context_dim}-wide text encoder")


def check_fits(cfg: ControlNetConfig, unet: UNetConfig, source: str) -> None:
    """A ControlNet must be made for the model's family and layout: same text width, vector input and encoder."""
    from .nn.unet import Encoder

    c = cfg.unet
    if c.context_dim != unet.context_dim or (c.adm_in_channels is None) != (unet.adm_in_channels is None):
        raise ControlError(f"{source}: a ControlNet for {family_of(c)} (context width {c.context_dim}); the model is "
                           f"{family_of(unet)} (context width {unet.context_dim}): use a ControlNet made for it")
    mine, theirs = Encoder(c), Encoder(unet)
    mine.input_blocks()
    theirs.input_blocks()
    if mine.skip_channels != theirs.skip_channels or c.in_channels != unet.out_channels:
        raise ControlError(f"{source}: the ControlNet's residuals ({len(mine.skip_channels) + 1}, widths "
                           f"{mine.skip_channels}) do not fit the model's UNet ({len(theirs.skip_channels) + 1}, "
                           f"widths {theirs.skip_channels})")


def load_controlnet(path: str | Path, unet: UNetConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, tensors: dict[str, torch.Tensor] | None = None,
                    base: dict[str, torch.Tensor] | None = None) -> ControlNet:
    """A ControlNet for a model whose UNet is `unet`, on `device` in `dtype`, frozen for inference. base: the
    model's UNet weights (original names), which "diff" ControlNets and Control-LoRAs are stored relative to
    (control_lora.py)."""
    import torch

    from .nn.controlnet import ControlNet
    from .weights.detect import load_frozen

    sd, cfg = read_controlnet(path, unet, tensors)
    check_fits(cfg, unet, str(path))
    with torch.device("meta"):
        net = ControlNet(cfg)
    if control_lora.is_relative(sd):
        sd = control_lora.absolute(sd, {k: tuple(v.shape) for k, v in net.state_dict().items()}, base, str(path))
    return load_frozen(net, sd, str(path), ControlError, device, dtype)


def load_control_model(path: str | Path, unet: UNetConfig, latent_factor: int = 8,
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                       base: dict[str, torch.Tensor] | None = None) -> ControlNet | T2IAdapter:
    """A ControlNet or a T2I-Adapter (t2i_adapter.py), by the file's content: both live in the ControlNet folder
    and are used through the same units, as in A1111's extension. latent_factor: the model's VAE downscale; base:
    the model's UNet weights (for "diff" ControlNets and Control-LoRAs)."""
    from . import t2i_adapter
    from .weights.io import CheckpointError, read_tensors

    path = Path(path)
    tensors = None
    try:
        if path.is_dir() and t2i_adapter.is_adapter_folder(path):
            return t2i_adapter.load_adapter(path, unet, latent_factor, device, dtype)
        if path.is_file():
            try:
                tensors, _ = read_tensors(path)
            except CheckpointError as e:
                raise ControlError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
            if t2i_adapter.is_adapter(tensors):
                return t2i_adapter.load_adapter(path, unet, latent_factor, device, dtype, tensors)
    except t2i_adapter.AdapterError as e:
        raise ControlError(str(e)) from None
    return load_controlnet(path, unet, device, dtype, tensors, base)


def save_controlnet(net: ControlNet, path: str | Path, layout: str = "original") -> None:
    """Write a ControlNet: "original", one .safetensors file under lllyasviel's `control_model.` keys; "diffusers",
    a ControlNetModel folder."""
    from .weights.io import write_safetensors

    path = Path(path)
    sd = net.state_dict()
    if layout == "original":
        write_safetensors({PREFIX + k: v for k, v in sd.items()}, path)
        if net.config.global_pool:  # only a .yaml beside the file says so (global_pooling)
            path.with_suffix(".yaml").write_text("model:\n  params:\n    control_stage_config:\n      params:\n"
                                                 "        global_average_pooling: True\n")
        return
    if layout != "diffusers":
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_diffusers(net.config), indent=2))
    write_safetensors(_rename_all(sd, controlnet_pairs(net.config), reverse=False, what="original"),
                      path / "diffusion_pytorch_model.safetensors")


def resolve_controlnet(name: str, folder: Path | None = None) -> Path:
    """A path, or a name in the controlnet folder (with or without its suffix; a diffusers folder by its name)."""
    from .runtime import controlnet_dir, find_in_folder

    path = Path(name).expanduser()
    if path.exists():
        return path
    folder = folder or controlnet_dir()
    found = find_in_folder(name, folder, lambda p: p.suffix in SUFFIXES or p.is_dir())
    if found is not None:
        return found
    known = ", ".join(list_controlnets(folder)[:10]) or "none"
    raise ControlError(f"no ControlNet {name!r}: not a path, and not in {folder} (found: {known})")


def list_controlnets(folder: Path | None = None) -> list[str]:
    """The names of the ControlNets in the controlnet folder (files by stem, diffusers folders by name)."""
    from .runtime import controlnet_dir

    folder = folder or controlnet_dir()
    if not folder.is_dir():
        return []
    return [p.stem if p.is_file() else p.name for p in sorted(folder.iterdir())
            if (p.is_file() and p.suffix in SUFFIXES) or (p.is_dir() and (p / "config.json").is_file())]


def short_hash(path: Path) -> str | None:
    """The 8-digit hash A1111 shows beside a ControlNet's name ("control_v11p_sd15_canny [d14c016b]"): sha256 of the
    64 KiB at 1 MiB into the file (A1111's legacy model hash). None for folders."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class ControlNets:
    """The ControlNets a pipeline has loaded, by name, on the model's device and precision. `loader` (name ->
    ControlNet) replaces how they are found and loaded (a server's registry)."""

    def __init__(self, unet: UNetConfig, device: torch.device, dtype: torch.dtype, keep: int = 4,
                 latent_factor: int = 8, base: torch.nn.Module | None = None):
        self.unet, self.device, self.dtype, self.keep = unet, device, dtype, keep
        self.latent_factor = latent_factor  # the VAE's downscale (a T2I-Adapter's layout is read against it)
        self.base = base  # the model's UNet: "diff" ControlNets and Control-LoRAs are stored relative to it
        self.folder: Path | None = None
        self._loaded: dict[str, tuple[ControlNet | T2IAdapter, str]] = {}
        self._labels: dict[str, str] = {}  # kept after a net is let go: the infotext names it without a reload

    def check(self, units: tuple[ControlUnit, ...]) -> None:
        """Find every unit's model before any work (a missing one is an error now, not after sampling)."""
        for unit in units:
            if unit.model not in self._loaded:
                resolve_controlnet(unit.model, self.folder)

    def get(self, name: str) -> tuple[ControlNet | T2IAdapter, str]:
        """(the ControlNet or T2I-Adapter, its label for the infotext: "name [hash]")."""
        if name not in self._loaded:
            path = resolve_controlnet(name, self.folder)
            net = load_control_model(path, self.unet, self.latent_factor, self.device, self.dtype,
                                     None if self.base is None else self.base.state_dict())
            digest = short_hash(path)
            label = path.stem if path.is_file() else path.name
            while len(self._loaded) >= self.keep:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[name] = (net, f"{label} [{digest}]" if digest else label)
            self._labels[name] = self._loaded[name][1]
        return self._loaded[name]

    def controls(self, units: tuple[ControlUnit, ...], width: int, height: int, steps: int, batch: int,
                 guided: bool, mask: torch.Tensor | None = None) -> tuple[tuple[Control, ...], tuple[Control, ...]]:
        """(the controls of the conditional half, of the unconditional half) for a batch at this size and step
        count. In "control" mode the unconditional half gets no residuals (rows marked off)."""
        from . import t2i_adapter
        from .diffusion.denoiser import Control
        from .nn.t2i_adapter import AdapterFeatures, T2IAdapter

        cond, uncond = [], []
        for unit in units:
            net, _ = self.get(unit.model)
            active = unit.steps(steps)
            if active is None or unit.weight == 0:
                continue
            hint = hint_tensor(unit, width, height, mask)
            if isinstance(net, T2IAdapter):  # features once per pass: they depend on neither x nor t
                feats = AdapterFeatures(t2i_adapter.features(net, hint))
                control = Control(feats, hint, t2i_adapter.scales(unit, len(feats.features)), active, adapter=True)
                cond.append(control)
                if guided:
                    uncond.append(dataclasses.replace(control, hint=hint[:0], rows=(False,) * batch)
                                  if unit.mode == "control" else control)
                continue
            cfg = net.config
            if hint.shape[1] != cfg.hint_channels:
                raise ControlError(f"{unit.model}: takes {cfg.hint_channels}-channel control images")
            # global pooling (shuffle): averaged residuals on the conditional half only, as diffusers (which forces
            # guess mode for it) and A1111's extension apply them
            control = Control(net, hint, unit.scales(net.residuals), active, pool=cfg.global_pool)
            cond.append(control)
            if guided:
                uncond.append(dataclasses.replace(control, hint=hint[:0], rows=(False,) * batch)
                              if unit.mode == "control" or cfg.global_pool else control)
        return tuple(cond), tuple(uncond)

    def infotext_fields(self, units: tuple[ControlUnit, ...]) -> dict[str, str]:
        return {f"ControlNet {i}": unit.infotext(self._labels.get(unit.model) or self.get(unit.model)[1])
                for i, unit in enumerate(units)}
