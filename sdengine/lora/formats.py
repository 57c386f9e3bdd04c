"""LoRA files: read any common layout into layers, each able to give its weight delta.

Layouts, told apart by key suffix and tensor shapes (never by file name):
  kohya-ss LoRA / LoCon   `.lora_down.weight` `.lora_up.weight` [`.lora_mid.weight`] [`.alpha`] [`.dora_scale`]
  PEFT / diffusers        `.lora_A.weight` `.lora_B.weight` [`.lora_magnitude_vector`], alpha in the
                          `lora_adapter_metadata` JSON (`lora_alpha`, `alpha_pattern`, `use_rslora`), else scale 1;
                          diffusers' older attention-processor files (`.processor.to_q_lora.down.weight`)
  LyCORIS LoHa            `.hada_w1_a` `.hada_w1_b` `.hada_w2_a` `.hada_w2_b` [`.hada_t1` `.hada_t2`]
  LyCORIS LoKr            `.lokr_w1` | `.lokr_w1_a`+`_b`, `.lokr_w2` | `.lokr_w2_a`+`_b` [`.lokr_t2`]
  LyCORIS full / IA3      `.diff` [`.diff_b`]; `.weight` + `.on_input`
The scale is alpha / rank (alpha / sqrt(rank) for rsLoRA), 1 without an alpha; DoRA's magnitude rescales the
merged weight per output row or input column, whichever its shape says (LyCORIS stores either).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..weights.io import CheckpointError, read_tensors

MAX_LAYERS = 20_000  # SDXL's full LoCon has ~2,500 layers; more is not a LoRA


class LoraError(ValueError):
    """A file that is no LoRA, a broken one, or one that fits nothing of the model."""


# suffix in the file -> the role it plays; longest match wins
_SUFFIXES: dict[str, str] = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_A.default.weight": "down", "lora_B.default.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    "lora_magnitude_vector.default.weight": "magnitude", "dora_scale": "dora_scale", "alpha": "alpha",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b", "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff", "diff_b": "diff_b", "on_input": "on_input", "weight": "ia3",
}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)
# diffusers' attention-processor LoRA files: `attn1.processor.to_q_lora.down.weight` means `attn1.to_q`
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")
_PREFIXES = ("base_model.model.",)


def _split(key: str) -> tuple[str, str] | None:
    key = _PROCESSOR.sub(lambda m: f".{m.group(1)}{'.0' if m.group(1) == 'to_out' else ''}.lora.", key)
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    for suffix in _BY_LENGTH:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], _SUFFIXES[suffix]
    return None


@dataclass
class LoraLayer:
    """One patched layer of a LoRA file: its tensors by role, and the scale its alpha gives."""

    name: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None  # from the file's `.alpha` or PEFT's metadata
    rslora: bool = False

    @property
    def kind(self) -> str | None:
        t = self.tensors
        if "down" in t and "up" in t:
            return "lora"
        if all(k in t for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return "loha"
        if ("lokr_w1" in t or "lokr_w1_a" in t) and ("lokr_w2" in t or "lokr_w2_a" in t):
            return "lokr"
        if "diff" in t:
            return "full"
        if "ia3" in t and "on_input" in t:
            return "ia3"
        return None

    def _scale(self, rank: int | None) -> float:
        if rank is None or self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """This layer's change to `weight` at multiplier 1, in fp32 and weight's shape (DoRA included)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        kind = self.kind
        needs_weight = kind == "ia3" or "magnitude" in t or "dora_scale" in t
        w = weight.detach().float() if needs_weight else weight.detach()  # an fp32 copy only where the math uses W
        if kind == "lora":
            down, up = t["down"], t["up"]
            if "mid" in t:  # LoCon's Tucker core: up (out, r), mid (r, r, k, k), down (r, in)
                d = torch.einsum("i j ..., j r, p i -> p r ...", t["mid"], down.flatten(1), up.flatten(1))
            else:
                d = up.flatten(1) @ down.flatten(1)
            d = d * self._scale(down.shape[0])
        elif kind == "loha":
            if "hada_t1" in t:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, k, k)
                d1 = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                d2 = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:
                d1 = t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)
                d2 = t["hada_w2_a"] @ t["hada_w2_b"].flatten(1)
            d = d1 * d2 * self._scale(t["hada_w1_b"].shape[0])
        elif kind == "lokr":
            d = self._lokr(t, w)
        elif kind == "full":
            d = t["diff"]
        elif kind == "ia3":
            scale = t["ia3"].flatten()
            on_input = bool(t["on_input"].flatten()[0])
            shape = [1] * w.ndim
            shape[1 if on_input else 0] = -1
            d = w * scale.view(shape)
        else:
            raise LoraError(f"layer {self.name}: unsupported LoRA kind (roles {sorted(t)})")
        if d.numel() != w.numel():
            raise LoraError(f"layer {self.name}: a delta of shape {tuple(d.shape)} cannot change a weight of shape "
                            f"{tuple(w.shape)}")
        d = d.reshape(w.shape)
        if "magnitude" in t:  # PEFT: one value per output channel, whatever its shape ((out,) or (1, out, 1, 1))
            d = _dora(w, d, t["magnitude"], per_output=True) - w
        elif "dora_scale" in t:  # LyCORIS/kohya: (out, 1, ...) per output row, (1, in, ...) per input column
            d = _dora(w, d, t["dora_scale"], per_output=t["dora_scale"].shape[0] == w.shape[0]) - w
        return d

    def _lokr(self, t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        rank = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
            rank = t["lokr_w1_b"].shape[0]
        w2 = t.get("lokr_w2")
        if w2 is None:
            rank = t["lokr_w2_b"].shape[0]
            if "lokr_t2" in t:
                w2 = torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
                if w.ndim == 4:  # a conv's w2 carries the kernel: (b, d * kh * kw) -> (b, d, kh, kw)
                    w2 = w2.view(w2.shape[0], -1, *w.shape[2:])
        while w1.ndim < w2.ndim:
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1, w2) * self._scale(rank)

    def bias_delta(self) -> torch.Tensor | None:
        return self.tensors["diff_b"].float() if "diff_b" in self.tensors else None


def _dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, per_output: bool) -> torch.Tensor:
    """DoRA: the merged weight W + dW rescaled to the learnt magnitude, per output row (PEFT; LyCORIS' default)
    or per input column (LyCORIS' wd_on_out=False)."""
    merged = w + delta
    if per_output:
        norm = merged.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, *[1] * (w.ndim - 2))
    return merged * (magnitude.reshape(norm.shape) / norm)


@dataclass(eq=False)  # compared by identity: the patcher's "same LoRAs as last time" test
class Lora:
    """A LoRA file, read: its layers by the name the file gives them (see targets.py for what names mean)."""

    name: str
    path: Path | None
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)  # layers of kinds sdengine does not apply (OFT, norms)


def _peft_config(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata`: {"unet.lora_alpha": 8, "text_encoder.r": 4, ...} -> per part."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    parts: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        part, _, name = key.rpartition(".")
        parts.setdefault(part, {})[name] = value
    return parts


def _peft_alpha(layer: str, config: dict) -> float | None:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", layer):  # PEFT's own rule for per-module patterns
            return float(alpha)
    return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def lora_from_tensors(tensors: dict[str, torch.Tensor], name: str, path: Path | None = None,
                      metadata: dict[str, str] | None = None) -> Lora:
    metadata = metadata or {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        grouped.setdefault(split[0], {})[split[1]] = value
    peft = _peft_config(metadata)
    layers: dict[str, LoraLayer] = {}
    unsupported = []
    for layer_name, parts in grouped.items():
        alpha_t = parts.pop("alpha", None)
        layer = LoraLayer(layer_name, parts)
        if layer.kind is None:
            unsupported.append(layer_name)
            continue
        for role, value in parts.items():
            if not torch.isfinite(value.float()).all():
                raise LoraError(f"{name}: layer {layer_name} holds NaN or Inf values ({role})")
        if alpha_t is not None:
            layer.alpha = float(alpha_t.float().flatten()[0])
        elif layer.kind == "lora":
            part = layer_name.split(".", 1)[0]
            config = peft.get(part, {})
            layer.alpha = _peft_alpha(layer_name.split(".", 1)[-1], config)
            layer.rslora = bool(config.get("use_rslora", False))
        if layer.kind == "lora":
            down, up = parts["down"], parts["up"]
            if down.shape[0] != up.shape[1] or ("mid" in parts and parts["mid"].shape[:2] != (up.shape[1],) * 2):
                raise LoraError(f"{name}: layer {layer_name} has ranks that disagree (down {tuple(down.shape)}, "
                                f"up {tuple(up.shape)})")
        layers[layer_name] = layer
    if not layers:
        shown = ", ".join(sorted(unknown + unsupported)[:4]) or "no tensors"
        raise LoraError(f"{name}: not a LoRA (no lora_down/lora_up, lora_A/lora_B, LoHa, LoKr or full-diff layers; "
                        f"found {shown})")
    if len(layers) > MAX_LAYERS:
        raise LoraError(f"{name}: {len(layers)} layers is more than any LoRA has (limit {MAX_LAYERS})")
    return Lora(name, path, layers, metadata, unsupported)


def read_lora(path: str | Path, name: str | None = None) -> Lora:
    """Read a LoRA file (.safetensors, or a pickle holding only tensors: code in a pickle is refused unrun)."""
    path = Path(path)
    try:
        tensors, metadata = read_tensors(path)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    return lora_from_tensors(tensors, name or path.stem, path, metadata)
