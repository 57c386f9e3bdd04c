"""Where models come from and where they run: model lookup by name or path, device and dtype choice, and loading
for inference. The CLI, the server and the trainer all choose through here, so `--device auto` or a model name
means the same thing everywhere.

torch is imported inside the functions that need it: the CLI's parsers call into this module while building
`--help`, which must stay fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .home import sdengine_home

if TYPE_CHECKING:
    import torch

    from .model import StableDiffusion

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_SIZE = 512  # SD1.x/SD2.x-base's training size: what a model that records none is run at
SDXL_SIZE = 1024  # SDXL's (base and refiner)


class UnavailableError(ValueError):
    """A model, device or precision that was asked for and cannot be had here."""


# --- models -------------------------------------------------------------------------------------------------------

def models_dir() -> Path:
    return sdengine_home() / "models"


def loras_dir() -> Path:
    """Where LoRA files are looked up by name ($SDENGINE_LORAS, else $SDENGINE_HOME/loras)."""
    return Path(os.environ.get("SDENGINE_LORAS") or sdengine_home() / "loras")


def upscalers_dir() -> Path:
    """Where model upscalers (ESRGAN, RealESRGAN, ...) are looked up by name ($SDENGINE_UPSCALERS, else
    $SDENGINE_HOME/upscalers)."""
    return Path(os.environ.get("SDENGINE_UPSCALERS") or sdengine_home() / "upscalers")


def controlnet_dir() -> Path:
    """Where ControlNet models are looked up by name ($SDENGINE_CONTROLNET, else $SDENGINE_HOME/controlnet)."""
    return Path(os.environ.get("SDENGINE_CONTROLNET") or sdengine_home() / "controlnet")


def ipadapter_dir() -> Path:
    """Where IP-Adapters and their image encoders are looked up by name ($SDENGINE_IPADAPTER, else
    $SDENGINE_HOME/ipadapter)."""
    return Path(os.environ.get("SDENGINE_IPADAPTER") or sdengine_home() / "ipadapter")


def embeddings_dir() -> Path:
    """Where textual-inversion embeddings are found ($SDENGINE_EMBEDDINGS, else $SDENGINE_HOME/embeddings)."""
    return Path(os.environ.get("SDENGINE_EMBEDDINGS") or sdengine_home() / "embeddings")


def wildcards_dir() -> Path:
    """Where `__name__` wildcards are read from ($SDENGINE_WILDCARDS, else $SDENGINE_HOME/wildcards)."""
    return Path(os.environ.get("SDENGINE_WILDCARDS") or sdengine_home() / "wildcards")


def default_model() -> Path | None:
    """The model shipped with the package, when this install has one."""
    shipped = Path(__file__).parent / "models" / "default" / "model.safetensors"
    return shipped if shipped.exists() else None


def shipped_taesd(model: Path | None) -> Path | None:
    """The tiny autoencoder (TAESD) trained for the shipped model's latent space, when `model` is the shipped model
    and this install has both; None otherwise (it would decode any other model's latents to noise)."""
    shipped = default_model()
    if shipped is None or model is None or Path(model).resolve() != shipped.resolve():
        return None
    tiny = shipped.with_name("taesd.safetensors")
    return tiny if tiny.exists() else None


def find_in_folder(name: str, folder: Path, accept: Callable[[Path], bool]) -> Path | None:
    """The entry of `folder` called `name` (file name or stem; A1111's list titles "name [hash]" too) that `accept`
    takes; None if there is none. Add-on files (ControlNets, IP-Adapters) are chosen by name this way."""
    if name.endswith("]") and " [" in name:
        name = name[:name.rindex(" [")]
    for candidate in sorted(folder.iterdir()) if folder.is_dir() else []:
        if name in (candidate.name, candidate.stem) and accept(candidate):
            return candidate
    return None


def list_models(folder: Path | None = None) -> list[Path]:
    """Checkpoint files and diffusers folders directly in `folder` (default: the models folder), by name."""
    folder = folder or models_dir()
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if (p.is_file() and p.suffix in MODEL_SUFFIXES) or (p.is_dir() and (p / "model_index.json").exists())]


def resolve_model(name: str | Path | None) -> Path:
    """A path, or the name of a model in the models folder (with or without its suffix); None: the shipped one."""
    if name is None:
        shipped = default_model()
        if shipped is None:
            raise UnavailableError("no model given and no default model is installed; pass --model PATH or NAME "
                                   f"(models folder: {models_dir()})")
        return shipped
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in list_models():
        if str(name) in (candidate.name, candidate.stem):
            return candidate
    known = ", ".join(p.name for p in list_models()) or "none"
    raise UnavailableError(f"no model {str(name)!r}: not a path, and not in {models_dir()} (found: {known})")


def native_size(path: Path) -> int:
    """The image size a model records (models trained here do), else its family's (SDXL 1024, SD1/SD2 512), read
    from the header or a diffusers folder's config only: no tensor is read."""
    from .config import ModelConfig
    from .weights.checkpoint import CONFIG_METADATA
    from .weights.io import safetensors_header

    try:
        if path.is_dir():  # diffusers: the UNet's sample_size is in latents; SDXL folders carry text_encoder_2
            unet = json.loads((path / "unet" / "config.json").read_text())
            return int(unet["sample_size"]) * 8 if unet.get("sample_size") else DEFAULT_SIZE
        if not (path.is_file() and path.suffix == ".safetensors"):
            return DEFAULT_SIZE
        header = safetensors_header(path)
        meta = header.get("__metadata__") or {}
        if CONFIG_METADATA in meta:
            return ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA])).image_size
        # an SDXL single file (base or refiner): the vector conditioning and its embedders (Stability's layout)
        sdxl = any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in header)
        return SDXL_SIZE if sdxl else DEFAULT_SIZE
    except (KeyError, ValueError, TypeError, OSError, struct.error):
        return DEFAULT_SIZE  # no or unreadable config here: loading the model reports real problems


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (checkpoints are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(path: str | Path | None) -> str | None:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (None for folders)."""
    if path is None or not Path(path).is_file():
        return None
    return file_sha256(Path(path))[:10]


# --- devices and precisions ---------------------------------------------------------------------------------------

def mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA, else MPS, else the CPU; under torchrun a CUDA process takes its LOCAL_RANK's GPU."""
    import torch

    if name not in DEVICES:
        raise UnavailableError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("--device cuda: no CUDA device is available")
    elif name == "mps" and not mps_available():
        raise UnavailableError("--device mps: MPS is not available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16). Elsewhere PyTorch emulates bf16 on the
    CPU: measured on a 2-core Xeon with AVX512 but no BF16, a bf16 matmul took 3.3x as long as fp32 and the text
    stage ran at half the images/s; on a Zen4 with AVX512-BF16, bf16 matmuls run ~2.2x fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no way to tell without timing, and fp32 is never the slow one
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def dtype_of(precision: str) -> torch.dtype:
    """fp32 | bf16 | fp16 -> the torch dtype."""
    from .weights.checkpoint import DTYPES  # the names files and the CLI use for dtypes, defined once there

    if precision not in DTYPES:
        raise UnavailableError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for generation. auto: fp16 on GPUs (CUDA, MPS); on the CPU bf16 where it has bf16
    instructions (there a bf16 matmul runs 2-4x fp32 and the image stays within ~30+ dB of fp32's: see
    benchmarks/compare_cpu.py), fp32 elsewhere (emulated bf16 is slower than fp32)."""
    if precision == "auto":
        if device.type in ("cuda", "mps"):
            precision = "fp16"
        else:
            precision = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    return dtype_of(precision)


def training_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training (None: fp32, no autocast). auto is bf16 where it is fast: a GPU that supports
    it, or a CPU with bf16 instructions; fp32 otherwise."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    dtype = dtype_of(precision)
    return None if dtype == torch.float32 else dtype


def load_for_inference(path: Path, device: torch.device, dtype: torch.dtype, vae: Path | None = None,
                       compile: bool | str = False) -> StableDiffusion:
    """The model at `path` on `device` in `dtype`, frozen for inference, its UNet compiled when asked (True or
    "inductor": TorchInductor; "openvino": OpenVINO, on a CPU)."""
    from .compile import check_compiler, compile_unet
    from .weights import load

    backend = "inductor" if compile is True else compile or None
    if backend:
        check_compiler(device, backend)
    model = load(path, device=device, dtype=dtype, vae=vae)
    return compile_unet(model, backend) if backend else model
