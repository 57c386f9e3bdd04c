"""Which weight of the model each LoRA layer name means, in every naming that LoRA files use.

A file names a layer the way its trainer saw the model:
  kohya-ss (A1111, ComfyUI, civitai)  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` (SD1/SD2:
                                      diffusers' module path, dots as underscores), `lora_unet_input_blocks_4_1_...`
                                      (SDXL: the original path), `lora_te_text_model_encoder_layers_0_self_attn_q_proj`
                                      (SDXL: `lora_te1_` CLIP-L, `lora_te2_` bigG; transformers' CLIP names for all)
  PEFT / diffusers                    `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
                                      `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, `text_encoder_2.`
  original (ComfyUI's own saves)      `diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q`
One table from every alias to a Target (the parameter, and for OpenCLIP's fused q/k/v which third of it) is built
from the model itself with the diffusers <-> original table of weights/keys.py, so every layout that loads has
its LoRA names too (ComfyUI builds the same kind of map).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..model import StableDiffusion
from ..weights.keys import _rename, diffusers_text_layers, text_pairs, text_parts, unet_pairs

UNET_PART, TEXT_PART = "unet", "text"  # the two multipliers of `<lora:name:te_w:unet_w>`


@dataclass(frozen=True)
class Target:
    """One patchable weight: `module.<weight>` (rows `rows` of it for OpenCLIP's fused in_proj), its bias."""

    key: str  # the weight's original state-dict key, for messages and backups
    module: nn.Module
    weight: str
    bias: str | None
    rows: tuple[int, int] | None
    part: str  # UNET_PART or TEXT_PART

    def weight_tensor(self):
        w = getattr(self.module, self.weight)
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    def bias_tensor(self):
        b = None if self.bias is None else getattr(self.module, self.bias)
        return b if b is None or self.rows is None else b[self.rows[0]:self.rows[1]]


def _patchable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _unet_aliases(model: StableDiffusion, table: dict[str, Target], kohya: dict[str, str]) -> None:
    pairs = unet_pairs(model.config.unet)
    sdxl = model.config.conditioner
    for local, module in model.unet.named_modules():
        if not _patchable(module):
            continue
        target = Target(f"model.diffusion_model.{local}.weight", module, "weight",
                        "bias" if module.bias is not None else None, None, UNET_PART)
        renamed = _rename(local + ".weight", pairs, reverse=False)
        names = [f"diffusion_model.{local}", f"model.diffusion_model.{local}", f"lora_unet_{_underscored(local)}"]
        kohya[target.key] = names[-1]
        if renamed is not None:
            diffusers = renamed.removesuffix(".weight")
            # kohya's SDXL trainer names the original modules, its SD1/SD2 trainer diffusers' ones; SDXL files
            # converted from diffusers carry diffusers' names, so both are read (ComfyUI does the same)
            names += [f"unet.{diffusers}", diffusers, f"lora_unet_{_underscored(diffusers)}"]
            if not sdxl:
                kohya[target.key] = names[-1]
        for name in names:
            table[name] = target


def _text_aliases(model: StableDiffusion, table: dict[str, Target], kohya_names: dict[str, str]) -> None:
    parts = text_parts(model.config)
    encoders = dict(zip(parts, model.text_encoders))
    for part, (prefix, cfg) in parts.items():
        encoder = encoders[part]
        kohya = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part] if model.config.conditioner \
            else "lora_te_"
        if model.config.conditioner and len(parts) == 1:
            kohya = "lora_te_"  # the refiner: one encoder, named as a single-encoder model's
        layers = diffusers_text_layers(cfg)
        pairs = text_pairs(cfg, layers)
        for local, module in encoder.named_modules():
            transformers: list[tuple[str, Target]] = []
            if cfg.layout == "clip" and _patchable(module) and local.startswith("transformer.text_model."):
                target = Target(f"{prefix}{local}.weight", module, "weight", "bias", None, TEXT_PART)
                transformers.append((local.removeprefix("transformer."), target))
            elif cfg.layout == "openclip" and local.startswith("model.transformer.resblocks."):
                layer = int(local.split(".")[3])
                if layer >= layers:
                    continue
                if local.endswith(".attn"):  # fused q/k/v: each third is its own layer in transformers' names
                    width = cfg.width
                    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                        target = Target(f"{prefix}{local}.in_proj_weight[{name}]", module, "in_proj_weight",
                                        "in_proj_bias", (i * width, (i + 1) * width), TEXT_PART)
                        transformers.append((f"text_model.encoder.layers.{layer}.self_attn.{name}", target))
                elif _patchable(module):
                    renamed = _rename(local + ".weight", pairs, reverse=False)
                    if renamed is not None:
                        target = Target(f"{prefix}{local}.weight", module, "weight", "bias", None, TEXT_PART)
                        transformers.append((renamed.removesuffix(".weight"), target))
            for name, target in transformers:
                short = name.removeprefix("text_model.")  # transformers 5 saves CLIPTextModel without that level
                kohya_names[target.key] = f"{kohya}{_underscored(name)}"
                for alias in (kohya_names[target.key], f"{part}.{name}", f"{part}.{short}"):
                    table[alias] = target


def _tables(model: StableDiffusion) -> tuple[dict[str, Target], dict[str, str]]:
    table: dict[str, Target] = {}
    kohya: dict[str, str] = {}
    _unet_aliases(model, table, kohya)
    _text_aliases(model, table, kohya)
    return table, kohya


def lora_targets(model: StableDiffusion) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of `model` -> the weight it patches."""
    return _tables(model)[0]


def kohya_names(model: StableDiffusion) -> dict[str, str]:
    """Original weight key (OpenCLIP thirds as `...in_proj_weight[q_proj]`) -> the layer's kohya-ss name, as kohya's
    trainer writes it for this family (what `train lora` writes)."""
    return _tables(model)[1]
