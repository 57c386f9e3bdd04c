"""Adapters for the LoRA tests: PEFT LoRAs attached to reference modules, their weights under kohya-ss names, and
random kohya LoRAs over every layer a model has (shared by the LoRA, network, CLI and server tests)."""
from __future__ import annotations

import copy

import torch
from safetensors.torch import save_file

from sdengine.lora import kohya_names, lora_targets


def randomize(module: torch.nn.Module, seed: int, names: tuple[str, ...]) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_adapted(module: torch.nn.Module, targets: list[str], seed: int, alpha: int = 8, rank: int = 4, **extra):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    adapted = inject_adapter_in_model(config, copy.deepcopy(module))
    randomize(adapted, seed, ("lora_A", "lora_B", "lora_magnitude"))
    return adapted.eval(), config


def kohya_file(model, peft_lora, path, unet_only: bool = False) -> None:
    """The PEFT weights under kohya-ss names (lora_down = A, lora_up = B, alpha = the PEFT config's)."""
    from peft.utils import get_peft_model_state_dict

    names = kohya_names(model)
    by_alias = {alias: key for alias, t in lora_targets(model).items() for key in [t.key]}
    out = {}
    for part, prefix, alpha in (("unet", "unet.", 8.0), ("text", "text_encoder.", 2.0)):
        if part == "text" and unet_only:
            continue
        for key, value in get_peft_model_state_dict(peft_lora[part]).items():
            layer, role = key.rsplit(".lora_", 1)
            kohya = names[by_alias[prefix + layer]]
            out[f"{kohya}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(out, path)


def random_kohya(model, rank: int = 2, seed: int = 0, conv: bool = True) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA (LoCon with conv) over every layer of `model` that a LoRA can patch."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, name in kohya_names(model).items():
        w = next(t for t in lora_targets(model).values() if t.key == key).weight_tensor()
        if w.ndim == 4 and not conv:
            continue
        out[f"{name}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []),
                                                    generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out
