"""ControlNets stored relative to the model's UNet, made whole on load against the UNet they run with:

- "diff" ControlNets (a `difference` key): every tensor the ControlNet shares with the UNet holds the difference
  to the UNet's (A1111's extension adds the UNet's back);
- Control-LoRA (Stability's control-lora-*-rank*.safetensors: a `lora_controlnet` key): the hint encoder, zero
  convolutions, norms and biases in full, and for the copied UNet's linear and convolution weights rank-r factors:
  weight = the UNet's + up @ down (A1111's extension's controlnet_lora.py, ComfyUI's ControlLora). Where the file
  holds a bias of a factored layer, the file's is used, as those two do (diffusers' load_lora_adapter keeps the
  UNet's there).

The copy's layout is the model's UNet's (a Control-LoRA holds too few full tensors to detect it from).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .control_maps import ControlError

if TYPE_CHECKING:
    import torch

DIFFERENCE = "difference"
LORA = "lora_controlnet"
MARKERS = (DIFFERENCE, LORA)


def is_relative(sd: dict[str, torch.Tensor]) -> bool:
    return any(m in sd for m in MARKERS)


def kind(sd: dict[str, torch.Tensor]) -> str:
    return "Control-LoRA" if LORA in sd else "'diff' ControlNet"


def absolute(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], base: dict[str, torch.Tensor] | None,
             source: str) -> dict[str, torch.Tensor]:
    """The whole state dict (float32) for a ControlNet whose keys and shapes are `expected`, from a relative file
    `sd` (original names, no prefix) and the model's UNet weights `base`. Keys neither kind accounts for are kept,
    so that strict loading names them."""
    if base is None:
        raise ControlError(f"{source}: a {kind(sd)} (stored relative to a model's UNet weights) needs the model it "
                           "runs with; load it through a pipeline")
    lora = LORA in sd
    used = set(MARKERS)
    out = {}
    for key, shape in expected.items():
        ours = base.get(key)
        if ours is not None and tuple(ours.shape) != tuple(shape):
            raise ControlError(f"{source}: a {kind(sd)} for another model ({key}: the model's UNet holds "
                               f"{tuple(ours.shape)}, this ControlNet needs {tuple(shape)})")
        if key in sd:
            value = sd[key].float()
            if not lora and ours is not None:
                value = value + ours.detach().to("cpu").float()
        elif lora and ours is not None:
            value = ours.detach().to("cpu").float()
        else:
            continue  # missing: strict loading names it
        used.add(key)
        stem = key.removesuffix(".weight")
        if lora and key.endswith(".weight") and stem + ".up" in sd:
            up, down = sd[stem + ".up"].float(), sd[stem + ".down"].float()
            value = value + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
            used.update((stem + ".up", stem + ".down"))
        out[key] = value
    return out | {k: v for k, v in sd.items() if k not in used}
