"""sdengine: Stable Diffusion on PyTorch, in readable code: models, checkpoints, samplers and training."""
from .config import PRESETS, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .model import StableDiffusion
from .weights import CheckpointError, UnknownArchitecture, convert, load, save

__version__ = "0.1.0"
__all__ = ["load", "save", "convert", "StableDiffusion", "ModelConfig", "UNetConfig", "VAEConfig", "TextConfig",
           "PRESETS", "CheckpointError", "UnknownArchitecture"]
