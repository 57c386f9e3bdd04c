"""sdengine: Stable Diffusion on PyTorch, in readable code: models, checkpoints, samplers and training.

The public names load lazily, so `import sdengine` (and `sdengine --help`) stays fast until torch is needed.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "load": "weights", "save": "weights", "convert": "weights", "merge": "weights", "CheckpointError": "weights",
    "UnknownArchitecture": "weights", "StableDiffusion": "model", "ModelConfig": "config", "UNetConfig": "config",
    "VAEConfig": "config", "TextConfig": "config", "PRESETS": "config", "Pipeline": "pipeline",
    "Request": "request", "HiresFix": "hires", "ControlUnit": "control", "ImagePrompt": "ip_adapter",
    "compile_unet": "compile", "keep_freed_memory": "cpu_memory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdengine' has no attribute {name!r}")
