"""Optional compilation of the UNet: TorchInductor for generation (`--compile`, `compile_unet`) and for training
(`sdengine train unet --compile`, `compile_unet_for_training`), or OpenVINO for generation on a CPU
(`--compile openvino`, `compile_unet(model, "openvino")`; openvino_unet.py says what it buys there).

Why: at the small sizes the shipped model runs at (16x16 latents), a UNet call is ~700 small ops and their
per-op overhead, not arithmetic, sets the speed. Inductor fuses the elementwise work around the convolutions
and, with freezing, pre-packs the weights for oneDNN: measured on this project's 2-core CPU, a 64x64 image in
20 steps went from ~0.85 s to ~0.51 s (fp32) and ~0.45 s (bf16). The first call pays for the compilation
(20-45 s on 2 cores; ~14 s when the on-disk cache is warm), so it pays off for batches, eval and the server,
not for one image.
"""
from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import StableDiffusion


BACKENDS = ("inductor", "openvino")


def check_compiler(device: torch.device, backend: str = "inductor") -> None:
    """What a backend needs, checked up front instead of failing mid-generation: inductor writes C++ for CPU
    kernels; OpenVINO runs on the CPU, from the openvino package."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "openvino":
        from .openvino_unet import openvino_available

        if device.type != "cpu":
            raise ValueError(f"--compile openvino runs the UNet on the CPU, not on {device}")
        if not openvino_available():
            raise RuntimeError("--compile openvino needs the openvino package: pip install openvino")
    elif device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH")


def compile_unet(model: StableDiffusion, backend: str = "inductor") -> StableDiffusion:
    """Compile the UNet's forward in place; the module, its parameters and its state_dict keys are unchanged.

    inductor: the weights are folded into the compiled code ("freezing") when it first runs without gradients, so
    load or change weights before generating: later changes are not seen by inference calls. Calls with
    gradients enabled (training) use the compiled graph without freezing. openvino: each input shape is
    converted on its first call, again after the weights change (openvino_unet.py). Returns `model`.
    """
    if backend == "openvino":
        from .openvino_unet import use_openvino

        use_openvino(model)
        return model
    check_compiler(model.device, backend)
    return _compile_forward(model, {"freezing": True})


def compile_unet_for_training(model: StableDiffusion) -> StableDiffusion:
    """Compile the UNet's forward in place for training: no freezing, since the weights change every step (they
    stay graph inputs, so the sample grids drawn without gradients mid-run see the current weights too).
    Measured with benchmarks/train_step_speed.py on an H100 (the shipped model's 9 M UNet, bf16 autocast): batch
    1024 went from 8,900 images/s eager to 13,000 compiled (1.47x) after ~80 s of compilation; eager at batch
    4096 gave 13,200 (the small convolutions and norms are bound by memory traffic, which fusion cuts).
    Returns `model`."""
    return _compile_forward(model, {})


def _compile_forward(model: StableDiffusion, options: dict) -> StableDiffusion:
    """Replace the UNet's forward by its compiled self, once (a second call leaves the first compilation)."""
    check_compiler(model.device)
    unet = model.unet
    if not getattr(unet, "_sdengine_compiled", False):
        unet.forward = torch.compile(unet.forward, options=options or None)
        unet._sdengine_compiled = True
    return model


__all__ = ["BACKENDS", "compile_unet", "compile_unet_for_training", "check_compiler"]
