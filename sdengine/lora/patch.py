"""Applying LoRAs: weights patched in place, and given back bit for bit.

Why patching and not an on-the-fly path: a generation evaluates every layer 2 x steps times (CFG) per image, and
the same LoRAs usually stay for many generations; a patch costs one delta per layer once, then nothing, while an
on-the-fly low-rank branch costs two extra matmuls per layer per evaluation (more for LoHa/LoKr, which must
rebuild their weight anyway). Restoring copies back the untouched original kept aside at the first patch, never
subtracts, so 1,000 apply/restore cycles leave every weight bitwise as loaded, in fp32, fp16 or bf16.
Patching is skipped when the same LoRAs at the same weights are asked again (A1111 caches the same way).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..model import StableDiffusion
from .formats import Lora, LoraError
from .targets import TEXT_PART, UNET_PART, Target, lora_targets


@dataclass(frozen=True)
class LoraUse:
    """One LoRA with its multipliers: A1111's `<lora:name:te:unet>`, ComfyUI's strength_clip/strength_model."""

    lora: Lora
    unet: float = 1.0
    text: float = 1.0


@dataclass
class ApplyReport:
    applied: dict[str, int] = field(default_factory=dict)  # LoRA name -> layers patched
    skipped: dict[str, list[str]] = field(default_factory=dict)  # LoRA name -> its layers this model lacks

    def warnings(self) -> list[str]:
        out = []
        for name, layers in self.skipped.items():
            shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
            out.append(f"LoRA {name}: {len(layers)} of its layers are not in this model and were skipped ({shown})")
        return out


CONTEXT_FAMILIES = {768: "SD1", 1024: "SD2", 2048: "SDXL", 1280: "the SDXL refiner"}


def _family_hint(lora: Lora) -> str:
    """The family a LoRA was made for, from its cross-attention key projection's input width."""
    for name, layer in lora.layers.items():
        if ("attn2_to_k" in name or "attn2.to_k" in name) and "down" in layer.tensors:
            return CONTEXT_FAMILIES.get(layer.tensors["down"].shape[1], "another model family")
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_input_blocks_")) for n in lora.layers):
        return "SDXL"
    return "another model family"


def _patch(tensor: torch.Tensor, original: torch.Tensor, delta: torch.Tensor) -> None:
    """tensor = original + delta, rounded once: in place for fp32 (apply restores first, so the weight is the
    original), through fp32 for half precision."""
    if tensor.dtype == torch.float32:
        tensor.add_(delta)
    else:
        tensor.copy_((original.float() + delta).to(tensor.dtype))


class LoraPatcher:
    """Keeps `model`'s weights patched with one set of LoRAs at a time."""

    def __init__(self, model: StableDiffusion):
        self.model = model
        self._targets: dict[str, Target] | None = None
        self._originals: dict[str, tuple[Target, torch.Tensor, torch.Tensor | None]] = {}
        self._patched: set[str] = set()  # keys whose weights hold a patch now
        self._active: tuple = ()
        self._report = ApplyReport()

    @classmethod
    def of(cls, model: StableDiffusion) -> LoraPatcher:
        """The model's one patcher: two patchers on one model would each take the other's patch for the original."""
        patcher = model.__dict__.get("_lora_patcher")
        if patcher is None:
            patcher = model.__dict__["_lora_patcher"] = cls(model)
        return patcher

    @property
    def targets(self) -> dict[str, Target]:
        if self._targets is None:
            self._targets = lora_targets(self.model)
        return self._targets

    @torch.no_grad()
    def apply(self, uses: Sequence[LoraUse]) -> ApplyReport:
        """Patch the model with `uses` (replacing whatever was applied before); nothing for an empty list."""
        signature = tuple((u.lora, u.unet, u.text) for u in uses)  # Lora compares by identity
        if signature == self._active:
            return self._report
        self.restore()
        deltas: dict[str, list] = {}
        report = ApplyReport()
        try:
            for use in uses:
                report.applied[use.lora.name] = self._collect(use, deltas, report)
            for key, (target, d, b) in deltas.items():
                _, w0, b0 = self._originals[key]
                _patch(target.weight_tensor(), w0, d)
                if b is not None:
                    _patch(target.bias_tensor(), b0, b)
                self._patched.add(key)
        except BaseException:
            self.restore()
            raise
        self._active, self._report = signature, report
        return report

    def _collect(self, use: LoraUse, deltas: dict[str, list], report: ApplyReport) -> int:
        """Add `use`'s deltas (times its multipliers) to `deltas`; the number of layers that fit."""
        skipped, fitted = [], 0
        for name, layer in use.lora.layers.items():
            target = self.targets.get(name)
            if target is None:
                skipped.append(name)
                continue
            original = self._original(target)
            try:
                d = layer.delta(original[1])
            except LoraError:  # a layer of that name with another shape: made for another family
                skipped.append(name)
                continue
            fitted += 1
            multiplier = use.unet if target.part == UNET_PART else use.text
            if multiplier == 0:
                continue
            entry = deltas.setdefault(target.key, [target, None, None])
            entry[1] = d * multiplier if entry[1] is None else entry[1] + d * multiplier
            b = layer.bias_delta()
            if b is not None and target.bias is not None:
                entry[2] = b * multiplier if entry[2] is None else entry[2] + b * multiplier
        if not fitted:
            raise LoraError(f"LoRA {use.lora.name} fits none of this {self.model.config.family} model's layers "
                            f"({len(use.lora.layers)} layers; it looks made for {_family_hint(use.lora)})")
        if skipped or use.lora.unsupported:
            report.skipped[use.lora.name] = sorted(skipped + use.lora.unsupported)
        return fitted

    def _original(self, target: Target) -> tuple[Target, torch.Tensor, torch.Tensor | None]:
        if target.key not in self._originals:
            bias = target.bias_tensor()
            self._originals[target.key] = (target, target.weight_tensor().detach().clone(),
                                           None if bias is None else bias.detach().clone())
        return self._originals[target.key]

    @torch.no_grad()
    def restore(self) -> None:
        """Every patched weight back, bitwise as it was before the first patch. The originals stay kept (as A1111
        keeps them), so the next patch copies nothing aside; `forget` lets them go."""
        for key in self._patched:
            target, w0, b0 = self._originals[key]
            target.weight_tensor().copy_(w0)
            if b0 is not None:
                target.bias_tensor().copy_(b0)
        self._patched.clear()
        self._active, self._report = (), ApplyReport()

    def forget(self) -> None:
        """Restore, then drop the kept originals: their memory back, and weights changed by other code since (a
        training step, a load_state_dict) become the originals of the next patch."""
        self.restore()
        self._originals.clear()


__all__ = ["ApplyReport", "LoraPatcher", "LoraUse", "TEXT_PART", "UNET_PART"]
