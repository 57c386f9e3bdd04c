"""Tiny IP-Adapter references: a transformers CLIPVisionModelWithProjection saved with its writer, and IP-Adapter
files in the published layout (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip`, N over diffusers' attention
processors) with the shapes diffusers' load_ip_adapter converts (ImageProjection, IPAdapterPlusImageProjection,
IPAdapterFullImageProjection)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, projection_dim=24, hidden_act="gelu")


def save_image_encoder(folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**VISION, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


def attn2_dims(unet) -> list[int]:
    """The width of each cross-attention processor of a diffusers UNet, in attn_processors order."""
    return [unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for name in unet.attn_processors if name.endswith("attn2.processor")]


def adapter_state_dict(kind: str, unet, image_dim: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random IP-Adapter of `kind` (plain, plus, full) for a diffusers UNet, in the published layout.
    image_dim: the image encoder's projection width (plain) or hidden width (plus, full)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(d):
        return {"weight": 1 + rnd(d, scale=0.1), "bias": rnd(d, scale=0.1)}

    proj: dict[str, torch.Tensor] = {}
    if kind == "plain":
        tokens = 4  # diffusers' converter assumes 4
        proj = {"proj.weight": rnd(tokens * cross, image_dim), "proj.bias": rnd(tokens * cross),
                **{f"norm.{k}": v for k, v in norm(cross).items()}}
    elif kind == "full":
        proj = {"proj.0.weight": rnd(image_dim, image_dim), "proj.0.bias": rnd(image_dim),
                "proj.2.weight": rnd(cross, image_dim), "proj.2.bias": rnd(cross),
                **{f"proj.3.{k}": v for k, v in norm(cross).items()}}
    elif kind == "plus":
        hidden, heads, queries, depth = 64, 2, 6, 4  # diffusers builds 4 layers
        inner = heads * 64
        proj = {"latents": rnd(1, queries, hidden, scale=1.0), "proj_in.weight": rnd(hidden, image_dim),
                "proj_in.bias": rnd(hidden), "proj_out.weight": rnd(cross, hidden), "proj_out.bias": rnd(cross),
                **{f"norm_out.{k}": v for k, v in norm(cross).items()}}
        for i in range(depth):
            p = f"layers.{i}."
            proj |= {p + "0.to_q.weight": rnd(inner, hidden), p + "0.to_kv.weight": rnd(2 * inner, hidden),
                     p + "0.to_out.weight": rnd(hidden, inner), p + "1.1.weight": rnd(4 * hidden, hidden),
                     p + "1.3.weight": rnd(hidden, 4 * hidden)}
            for n in ("0.norm1", "0.norm2", "1.0"):
                proj |= {f"{p}{n}.{k}": v for k, v in norm(hidden).items()}
    else:
        raise ValueError(kind)
    sd = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, dim in enumerate(attn2_dims(unet)):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rnd(dim, cross)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rnd(dim, cross)
    return sd


def reference_image(seed: int = 0, size: tuple[int, int] = (45, 33)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))
