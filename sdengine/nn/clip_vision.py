"""CLIP's image tower with its projection (the role of transformers' CLIPVisionModelWithProjection): what
IP-Adapter reads an image prompt with. ViT-H/14 (h94's SD1.5 image_encoder) and ViT-bigG/14 (SDXL's), tiny ones
in tests.

Module paths equal the transformers keys (`vision_model.*`, `visual_projection.weight`); OpenCLIP's original
layout (`visual.*`) is renamed to them on load (openclip_to_transformers). The encoder layers are the text
encoder's (nn/clip.py), without the causal mask. Preprocessing is CLIPImageProcessor's: shortest side resized
(PIL bicubic), centre crop, CLIP's mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from .clip import CLIPEncoderLayer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """Field names as TextConfig's where they mean the same (the encoder layers are shared)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_width: int = 5120
    projection_dim: int = 1024
    activation: Literal["quick_gelu", "gelu"] = "gelu"
    eps: float = 1e-5

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


VIT_H_14 = VisionConfig()  # laion CLIP-ViT-H-14: h94/IP-Adapter models/image_encoder
VIT_BIGG_14 = VisionConfig(width=1664, layers=48, heads=16, mlp_width=8192, projection_dim=1280)  # sdxl_models/
# Widths whose head count is in no shape: the published towers (OpenAI's ViT-L/14 is 1024 wide, quick_gelu)
KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.positions, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.layers))  # type: ignore


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # (sic: transformers' spelling)
        self.encoder = CLIPVisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPVisionModelWithProjection(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor, penultimate: bool = False) -> torch.Tensor:
        """Preprocessed pixels (b, 3, size, size) -> image embeddings (b, projection_dim), or with penultimate the
        hidden states before the last layer (b, positions, width): transformers' hidden_states[-2], which the
        "plus" IP-Adapters read."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        layers = vm.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        if penultimate:
            return x
        x = layers[-1](x)
        return self.visual_projection(vm.post_layernorm(x[:, 0]))


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """CLIPImageProcessor: RGB, shortest side to `size` (PIL bicubic on 8-bit pixels), centre crop, scaled to
    [0, 1] and normalised with CLIP's mean/std -> (1, 3, size, size) float32."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BICUBIC)
    w, h = image.size
    top, left = int((h - size) / 2.0), int((w - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    pixels = (pixels - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


# --- layouts and detection ------------------------------------------------------------------------------------------

IGNORED = ("vision_model.embeddings.position_ids",)  # a buffer older transformers saved


def openclip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's `visual.*` keys renamed to transformers' (the fused in_proj split in three, proj transposed)."""
    out: dict[str, torch.Tensor] = {}
    renames = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
               "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
               "visual.ln_pre.": "vision_model.pre_layrnorm.", "visual.ln_post.": "vision_model.post_layernorm."}
    layer = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
             "attn.out_proj.": "self_attn.out_proj."}
    for key, value in sd.items():
        if key == "visual.positional_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key.startswith("visual.transformer.resblocks."):
            n, rest = key[len("visual.transformer.resblocks."):].split(".", 1)
            base = f"vision_model.encoder.layers.{n}."
            if rest.startswith("attn.in_proj_"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    out[f"{base}self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = part
            else:
                old = next((o for o in layer if rest.startswith(o)), None)
                out[base + (layer[old] + rest[len(old):] if old else rest)] = value
        else:
            old = next((o for o in renames if key.startswith(o)), None)
            out[renames[old] + key[len(old):] if old else key] = value
    return out


def detect_vision(sd: dict[str, torch.Tensor], hints: dict | None = None) -> VisionConfig:
    """The tower's shape from a transformers-keyed state dict. Head count, activation and layer-norm eps are in no
    shape: `hints` (a transformers config.json's values) gives them, else the published towers' (KNOWN_HEADS; gelu
    but for OpenAI's ViT-L/14)."""
    hints = hints or {}
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    heads = hints.get("num_attention_heads") or KNOWN_HEADS.get(width) or max(1, width // 64)
    openai_l = width == 1024 and layers == 24
    activation = hints.get("hidden_act") or ("quick_gelu" if openai_l else "gelu")
    if activation not in ("gelu", "quick_gelu"):
        raise ValueError(f"an image encoder with activation {activation!r}: only gelu and quick_gelu are supported")
    return VisionConfig(image_size=grid * patch_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                        mlp_width=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                        projection_dim=sd["visual_projection.weight"].shape[0], activation=activation,
                        eps=float(hints.get("layer_norm_eps", 1e-5)))
