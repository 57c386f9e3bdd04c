"""IP-Adapter image prompts: what a request asks for (ImagePrompt), the files (found, detected and loaded here), the
CLIP image encoder each adapter reads its images with, and the image tokens the denoiser applies
(diffusion/denoiser.py's ImageTokens; the modules are nn/ip_adapter.py's).

Files: the published layout (h94/IP-Adapter: `ip-adapter_sd15.safetensors`/`.bin`, `image_proj.*` and
`ip_adapter.*` keys; a .bin holds the two as nested dicts and is read with weights_only). The variant is read from
shapes and key sets, never file names: plain (ImageProjModel), plus (Resampler), full face (MLP); SD1.x, SD2.x or
SDXL from the context width and the number of cross-attention layers. FaceID variants (which read InsightFace face
embeddings) are refused.

Image encoders: a transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors), or one file
in the transformers or OpenCLIP (`visual.*`) layout. Found, in order: the prompt's `encoder`, the pipeline's
(`--ip-adapter-encoder`), an `image_encoder` folder beside the adapter or in h94's layout (models/, sdxl_models/),
then the ipadapter folder; the first whose width fits the adapter is used. Classifier-free guidance's negative half
reads what diffusers' pipelines give it: the projection of a zero embedding (plain), of the encoder's states for a
zero (normalised) image (plus, full).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .diffusion.denoiser import ImageTokens
    from .nn.clip_vision import CLIPVisionModelWithProjection
    from .nn.ip_adapter import IPAdapter, IPAdapterConfig

MAX_ADAPTERS = 4
MAX_IMAGES = 16  # reference images per adapter
MAX_SCALE = 10.0
SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# the encoders the published adapters were trained with: (what the projection reads, its width) -> the file
ENCODERS = {("embeds", 1024): "ViT-H/14 (h94/IP-Adapter models/image_encoder/model.safetensors + config.json)",
            ("embeds", 1280): "ViT-bigG/14 (h94/IP-Adapter sdxl_models/image_encoder/model.safetensors + config.json)",
            ("hidden", 1280): "ViT-H/14 (h94/IP-Adapter models/image_encoder/model.safetensors + config.json)",
            ("hidden", 1664): "ViT-bigG/14 (h94/IP-Adapter sdxl_models/image_encoder/model.safetensors + config.json)"}


class IPAdapterError(ValueError):
    """An IP-Adapter, image encoder or image prompt that cannot be used; one line that says why."""


@dataclass(frozen=True)
class ImagePrompt:
    """One IP-Adapter of a request. model: a path or a name in the ipadapter folder; image: one reference image or
    several (PIL images or file paths; several: their tokens concatenated, as diffusers does with a list of images
    for one adapter); scale: the image attention's weight (0: no effect); encoder: the CLIP image encoder's path
    (None: found as the module docstring says)."""

    model: str
    image: Any
    scale: float = 1.0
    encoder: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str | Path) or not str(self.model).strip():
            raise IPAdapterError(f"an image prompt needs an IP-Adapter model (a path or a name), got {self.model!r}")
        object.__setattr__(self, "model", str(self.model))
        images = tuple(self.image) if isinstance(self.image, list | tuple) else (self.image,)
        if not images or not all(isinstance(i, Image.Image | str | Path) for i in images):
            raise IPAdapterError("an image prompt's image must be a PIL image or a file path (or a list of them), got "
                                 f"{self.image!r:.80}")
        if len(images) > MAX_IMAGES:
            raise IPAdapterError(f"at most {MAX_IMAGES} images per IP-Adapter, got {len(images)}")
        object.__setattr__(self, "image", images)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale) \
                or not 0.0 <= self.scale <= MAX_SCALE:
            raise IPAdapterError(f"IP-Adapter scale must be a number in [0, {MAX_SCALE:g}], got {self.scale!r}")
        if self.encoder is not None:
            object.__setattr__(self, "encoder", str(self.encoder))

    @property
    def images(self) -> tuple[Image.Image | str | Path, ...]:
        return self.image


def check_prompts(prompts: Any) -> tuple[ImagePrompt, ...]:
    """A request's `image_prompts` as a tuple of ImagePrompt (a list, or one, is accepted), at most MAX_ADAPTERS."""
    if prompts is None:
        return ()
    if isinstance(prompts, ImagePrompt):
        prompts = (prompts,)
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, ImagePrompt) for p in prompts):
        raise IPAdapterError("image_prompts must be a list of ImagePrompt")
    if len(prompts) > MAX_ADAPTERS:
        raise IPAdapterError(f"at most {MAX_ADAPTERS} IP-Adapters at once, got {len(prompts)}")
    return tuple(prompts)


# --- adapter files -------------------------------------------------------------------------------------------------

def detect_ip_adapter(sd: dict[str, torch.Tensor], source: str) -> IPAdapterConfig:
    """The variant and sizes of an IP-Adapter state dict in the published layout (`image_proj.*`, `ip_adapter.*`)."""
    from .nn.ip_adapter import HEAD_DIM, IPAdapterConfig

    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    attn = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    if not proj or not attn:
        if any(k.startswith(("encoder_hid_proj.", "image_projection_layers.")) for k in sd):
            raise IPAdapterError(f"{source}: an IP-Adapter in diffusers' in-memory naming; use the published file "
                                 "(image_proj.* and ip_adapter.* keys)")
        shown = ", ".join(sorted(sd)[:4])
        raise IPAdapterError(f"{source}: not an IP-Adapter: expected keys 'image_proj.*' and 'ip_adapter.*' "
                             f"(h94/IP-Adapter's files; found: {shown})")
    if "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.0.weight" in proj):
        raise IPAdapterError(f"{source}: a FaceID IP-Adapter (it reads InsightFace face embeddings): not supported")
    ids = sorted(int(k.split(".")[0]) for k in attn if k.endswith(".to_k_ip.weight"))
    if ids != list(range(1, 2 * len(ids), 2)) or len(attn) != 2 * len(ids):
        raise IPAdapterError(f"{source}: ip_adapter.* should number the cross-attention layers 1, 3, 5, ... each "
                             f"with to_k_ip and to_v_ip; found {sorted(attn)[:6]}")
    dims = tuple(attn[f"{i}.to_k_ip.weight"].shape[0] for i in ids)
    if "proj.weight" in proj and "norm.weight" in proj:
        cross = proj["norm.weight"].shape[0]
        return IPAdapterConfig("plain", proj["proj.weight"].shape[1], cross, dims,
                               tokens=proj["proj.weight"].shape[0] // cross)
    if "proj.3.weight" in proj:
        return IPAdapterConfig("full", proj["proj.0.weight"].shape[1], proj["proj.3.weight"].shape[0], dims)
    if "latents" in proj and "proj_in.weight" in proj:
        _, tokens, hidden = proj["latents"].shape
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        return IPAdapterConfig("plus", proj["proj_in.weight"].shape[1], proj["proj_out.weight"].shape[0], dims,
                               tokens=tokens, hidden_dim=hidden, depth=depth,
                               heads=proj["layers.0.0.to_q.weight"].shape[0] // HEAD_DIM,
                               ff_mult=proj["layers.0.1.1.weight"].shape[0] // hidden)
    raise IPAdapterError(f"{source}: an IP-Adapter projection this engine does not know (keys: "
                         f"{', '.join(sorted(proj)[:5])})")


def family(cross_dim: int, layers: int) -> str:
    return {(768, 16): "SD1.x", (1024, 16): "SD2.x", (2048, 70): "SDXL"}.get(
        (cross_dim, layers), f"a UNet with {layers} cross-attention layers of context width {cross_dim}")


def read_ip_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], IPAdapterConfig]:
    from .weights.io import CheckpointError, read_tensors

    path = Path(path)
    try:
        tensors, _ = read_tensors(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise IPAdapterError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    return tensors, detect_ip_adapter(tensors, str(path))


def adapter_config(path: str | Path) -> IPAdapterConfig:
    """An IP-Adapter file's variant and sizes: from a .safetensors header's shapes alone (no tensor read), else
    read_ip_adapter's."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        import torch
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - a safe_open handle
        except (SafetensorError, OSError) as e:
            raise IPAdapterError(f"{path}: corrupt .safetensors file ({e})") from None
        return detect_ip_adapter({k: torch.empty(v, device="meta") for k, v in shapes.items()}, str(path))
    return read_ip_adapter(path)[1]


def load_ip_adapter(path: str | Path, unet: nn.Module, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> IPAdapter:
    """An IP-Adapter for the UNet `unet` (it must be made for its family), on `device` in `dtype`, frozen."""
    import torch

    from .nn.ip_adapter import IPAdapter, cross_attentions
    from .weights.detect import load_frozen

    sd, cfg = read_ip_adapter(path)
    layers = cross_attentions(unet)
    ours = tuple(layer.to_k.out_features for layer in layers)
    context = layers[0].to_k.in_features if layers else 0
    if cfg.cross_dim != context or cfg.attn_dims != ours:
        raise IPAdapterError(f"{path}: an IP-Adapter for {family(cfg.cross_dim, len(cfg.attn_dims))}; the model is "
                             f"{family(context, len(ours))}: use an IP-Adapter made for it")
    with torch.device("meta"):
        adapter = IPAdapter(cfg)
    return load_frozen(adapter, sd, f"{path} ({cfg.kind} IP-Adapter)", IPAdapterError, device, dtype)


# --- image encoders ------------------------------------------------------------------------------------------------

def _encoder_files(path: Path) -> tuple[Path, dict]:
    """(the weights file, config.json's vision values or {}) of an encoder folder or file."""
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                                           "open_clip_pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise IPAdapterError(f"{path}: an image-encoder folder without model.safetensors (or pytorch_model.bin)")
        hints = {}
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            hints = config.get("vision_config", config)
        return weights, hints
    return path, {}


def read_image_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(transformers-keyed state dict, VisionConfig) of an image encoder folder or file."""
    from .nn.clip_vision import IGNORED, detect_vision, openclip_to_transformers
    from .weights.io import CheckpointError, read_tensors

    path = Path(path)
    if not path.exists():
        raise IPAdapterError(f"no image encoder at {path}")
    weights, hints = _encoder_files(path)
    try:
        tensors, _ = read_tensors(weights)
    except CheckpointError as e:
        raise IPAdapterError(str(e)) from None
    if any(k.startswith("visual.") for k in tensors):
        tensors = openclip_to_transformers({k: v for k, v in tensors.items() if k.startswith("visual.")})
    tensors = {k: v for k, v in tensors.items() if k.startswith(("vision_model.", "visual_projection."))
               and k not in IGNORED}
    if "visual_projection.weight" not in tensors or "vision_model.embeddings.patch_embedding.weight" not in tensors:
        raise IPAdapterError(f"{path}: not a CLIP image encoder with projection (expected 'vision_model.*' and "
                             "'visual_projection.weight', transformers' CLIPVisionModelWithProjection, or OpenCLIP's "
                             "'visual.*')")
    try:
        return tensors, detect_vision(tensors, hints)
    except (KeyError, ValueError) as e:
        raise IPAdapterError(f"{path}: {e}") from None


def load_image_encoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                       ) -> CLIPVisionModelWithProjection:
    import torch

    from .nn.clip_vision import CLIPVisionModelWithProjection
    from .weights.detect import load_frozen

    sd, cfg = read_image_encoder(path)
    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(cfg)
    return load_frozen(encoder, sd, str(path), IPAdapterError, device, dtype)


def encoder_widths(path: Path, load: bool = True) -> tuple[int, int] | None:
    """(width, projection width) of an image encoder, from config.json or a .safetensors header (a pickle is loaded
    only with `load`); None: not an image encoder (or not cheaply known)."""
    try:
        weights, hints = _encoder_files(path)
    except IPAdapterError:
        return None
    if hints.get("hidden_size") and hints.get("projection_dim"):
        return int(hints["hidden_size"]), int(hints["projection_dim"])
    if weights.suffix != ".safetensors":
        if not load:
            return None
        try:
            _, cfg = read_image_encoder(path)
        except (IPAdapterError, OSError):
            return None
        return cfg.width, cfg.projection_dim
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            keys = set(f.keys())  # noqa: SIM118 - a safe_open handle, not a dict
            for patch, proj, transpose in (("vision_model.embeddings.patch_embedding.weight",
                                            "visual_projection.weight", False),
                                           ("visual.conv1.weight", "visual.proj", True)):
                if patch in keys and proj in keys:
                    shape = f.get_slice(proj).get_shape()
                    return f.get_slice(patch).get_shape()[0], shape[1] if transpose else shape[0]
    except Exception:  # noqa: BLE001 - not a readable tensor file: not an encoder candidate
        return None
    return None


def fits(cfg: IPAdapterConfig, widths: tuple[int, int]) -> bool:
    return cfg.image_dim == (widths[0] if cfg.penultimate else widths[1])


def find_image_encoder(adapter: Path, cfg: IPAdapterConfig, given: str | None = None, folder: Path | None = None
                       ) -> Path:
    """The image encoder for the adapter at `adapter` (see the module docstring for the order looked in)."""
    from .runtime import ipadapter_dir

    need = ENCODERS.get(("hidden" if cfg.penultimate else "embeds", cfg.image_dim),
                        f"a CLIP image encoder whose {'width' if cfg.penultimate else 'projection'} is "
                        f"{cfg.image_dim}")
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            path = (folder or ipadapter_dir()) / given
        if not path.exists():
            raise IPAdapterError(f"no image encoder {given!r} (a path, or a name in {folder or ipadapter_dir()})")
        widths = encoder_widths(path)
        if widths is None:
            read_image_encoder(path)  # says why it is no encoder
        if widths is not None and not fits(cfg, widths):
            raise IPAdapterError(f"{path}: image encoder of width {widths[0]} (projection {widths[1]}); "
                                 f"{adapter.name} needs {need}")
        return path
    folder = folder or ipadapter_dir()
    root = adapter.parent
    candidates = [root / "image_encoder", root.parent / "models" / "image_encoder",
                  root.parent / "sdxl_models" / "image_encoder"]
    for place in (root, folder):  # the adapter's folder (A1111 keeps them with the ControlNets), the ipadapter one
        entries = sorted(place.iterdir()) if place.is_dir() else []
        candidates += [p / "image_encoder" for p in entries if p.is_dir()] + entries
    seen = set()
    for candidate in candidates:
        if candidate in seen or not candidate.exists() or candidate == adapter:
            continue
        seen.add(candidate)
        widths = encoder_widths(candidate, load=False)  # scanned by headers: no pickle is loaded to look
        if widths is not None and fits(cfg, widths):
            return candidate
    raise IPAdapterError(f"{adapter.name} needs its image encoder, {need}: put it beside the adapter as "
                         f"image_encoder/, in {folder}, or give it with --ip-adapter-encoder PATH")


def resolve_ip_adapter(name: str, folder: Path | None = None) -> Path:
    """A path, or a name in the ipadapter folder (with or without its suffix; A1111's "name [hash]" too)."""
    from .runtime import find_in_folder, ipadapter_dir

    path = Path(name).expanduser()
    if path.is_file():
        return path
    folder = folder or ipadapter_dir()
    found = find_in_folder(name, folder, lambda p: p.is_file() and p.suffix in SUFFIXES)
    if found is not None:
        return found
    known = ", ".join(list_ip_adapters(folder)[:10]) or "none"
    raise IPAdapterError(f"no IP-Adapter {name!r}: not a file, and not in {folder} (found: {known})")


def list_ip_adapters(folder: Path | None = None) -> list[str]:
    """The IP-Adapters in the ipadapter folder by stem (.safetensors whose keys are an IP-Adapter's; pickles)."""
    from .runtime import ipadapter_dir

    folder = folder or ipadapter_dir()
    if not folder.is_dir():
        return []
    return [p.stem for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in SUFFIXES and is_adapter(p) is not False]


def is_adapter(path: Path) -> bool | None:
    """Whether a file holds an IP-Adapter, from its .safetensors keys; None for a pickle (not loaded to look)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return any(k.startswith("ip_adapter.") for k in f.keys())  # noqa: SIM118 - a safe_open handle
    except Exception:  # noqa: BLE001 - unreadable: not an IP-Adapter
        return False


def short_hash(path: Path) -> str:
    """A1111's legacy 8-digit hash (as the ControlNet list shows beside a name)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, Image.DecompressionBombError) as e:
        raise IPAdapterError(f"image prompt {image}: not a readable image ({e.__class__.__name__})") from None


class IPAdapters:
    """The IP-Adapters and image encoders a pipeline has loaded, on the model's device and precision. `encoder`: the
    image encoder to use when a prompt names none (the CLI's --ip-adapter-encoder)."""

    def __init__(self, unet: nn.Module, device: torch.device, dtype: torch.dtype, keep: int = MAX_ADAPTERS,
                 keep_encoders: int = 2):
        self.unet, self.device, self.dtype, self.keep, self.keep_encoders = unet, device, dtype, keep, keep_encoders
        self.folder: Path | None = None
        self.encoder: str | None = None
        self._adapters: dict[tuple[str, str | None], tuple[IPAdapter, Path, str]] = {}
        self._encoders: dict[Path, CLIPVisionModelWithProjection] = {}

    def check(self, prompts: tuple[ImagePrompt, ...]) -> None:
        """Load every adapter and find its encoder before any work (a missing one is an error now)."""
        for prompt in prompts:
            self.get(prompt)

    def get(self, prompt: ImagePrompt) -> tuple[IPAdapter, Path, str]:
        """(the adapter, its image encoder's path, its label "name [hash]")."""
        key = (prompt.model, prompt.encoder or self.encoder)
        if key not in self._adapters:
            path = resolve_ip_adapter(prompt.model, self.folder)
            adapter = load_ip_adapter(path, self.unet, self.device, self.dtype)
            encoder = find_image_encoder(path, adapter.config, key[1], self.folder)
            while len(self._adapters) >= self.keep:
                self._adapters.pop(next(iter(self._adapters)))
            self._adapters[key] = (adapter, encoder, f"{path.stem} [{short_hash(path)}]")
        return self._adapters[key]

    def image_encoder(self, path: Path) -> CLIPVisionModelWithProjection:
        if path not in self._encoders:
            while len(self._encoders) >= self.keep_encoders:  # ViT-H is 0.6 B parameters, bigG 1.8 B
                self._encoders.pop(next(iter(self._encoders)))
            self._encoders[path] = load_image_encoder(path, self.device, self.dtype)
        return self._encoders[path]

    def features(self, prompt: ImagePrompt) -> tuple[IPAdapter, torch.Tensor, torch.Tensor]:
        """(adapter, tokens of the prompt's images (1, n x tokens, width), tokens for guidance's negative half)."""
        import torch

        from .nn.clip_vision import preprocess

        adapter, encoder_path, _ = self.get(prompt)
        encoder = self.image_encoder(encoder_path)
        size = encoder.config.image_size
        pixels = torch.cat([preprocess(_open(i), size) for i in prompt.images]).to(self.device, self.dtype)
        with torch.no_grad():
            if adapter.config.penultimate:
                positive = encoder(pixels, penultimate=True)
                negative = encoder(torch.zeros_like(pixels), penultimate=True)
            else:
                positive = encoder(pixels)
                negative = torch.zeros_like(positive)
            return adapter, adapter.project(positive), adapter.project(negative)

    def tokens(self, prompts: tuple[ImagePrompt, ...], batch: int
               ) -> tuple[tuple[ImageTokens, ...], tuple[ImageTokens, ...]]:
        """(the image tokens of the conditional half, of the unconditional half) for a batch of `batch` rows."""
        from .diffusion.denoiser import ImageTokens

        cond, uncond = [], []
        for prompt in prompts:
            if prompt.scale == 0:
                self.get(prompt)  # still checked; it changes nothing (as diffusers skips a zero scale)
                continue
            adapter, positive, negative = self.features(prompt)
            cond.append(ImageTokens(adapter, positive.float().expand(batch, -1, -1), float(prompt.scale)))
            uncond.append(ImageTokens(adapter, negative.float().expand(batch, -1, -1), float(prompt.scale)))
        return tuple(cond), tuple(uncond)

    def infotext_fields(self, prompts: tuple[ImagePrompt, ...]) -> dict[str, str]:
        fields = {}
        for i, prompt in enumerate(prompts):
            label = self.get(prompt)[2]
            images = f", Images: {len(prompt.images)}" if len(prompt.images) > 1 else ""
            fields[f"IP-Adapter {i}"] = f"Model: {label}, Scale: {prompt.scale:g}{images}"
        return fields
