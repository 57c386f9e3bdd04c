"""Checkpoint key names: the original (CompVis) layout we hold in memory and the one diffusers <-> original table.

The table is declarative: a list of (original prefix, diffusers prefix) pairs generated from the config, so
layouts with fewer or more blocks map too. Tensors whose *shape* differs between layouts (VAE attention stored
as 1x1 convs vs linears; OpenCLIP's fused q/k/v) are handled in `to_diffusers` / `from_diffusers`.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
CONDITIONER = "conditioner.embedders."  # SDXL's text encoders: conditioner.embedders.0., .1.

# Entries of original checkpoints that are not weights of the three networks (schedule buffers, training-only
# losses, EMA bookkeeping): dropped on load.
IGNORED_PREFIXES = ("first_stage_model.loss.", "model_ema.", "cond_stage_model.model.visual.", "lvlb_weights",
                    "loss.", "conditioner.embedders.0.model.visual.", "conditioner.embedders.1.model.visual.")
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.attn_mask",
    # SDXL: unused by generation and absent from diffusers' CLIPTextModelWithProjection (stable-diffusion.cpp and
    # ComfyUI drop them too)
    "conditioner.embedders.0.model.logit_scale", "conditioner.embedders.1.model.logit_scale",
    "conditioner.embedders.0.model.attn_mask", "conditioner.embedders.1.model.attn_mask",
}

Pairs = list[tuple[str, str]]


def _unet_resnet(orig: str, diff: str) -> Pairs:
    return [(orig + "in_layers.0.", diff + "norm1."), (orig + "in_layers.2.", diff + "conv1."),
            (orig + "emb_layers.1.", diff + "time_emb_proj."), (orig + "out_layers.0.", diff + "norm2."),
            (orig + "out_layers.3.", diff + "conv2."), (orig + "skip_connection.", diff + "conv_shortcut.")]


def unet_pairs(cfg: UNetConfig) -> Pairs:
    pairs: Pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                    ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    if cfg.adm_in_channels is not None:  # SDXL's vector input (diffusers: addition_embed_type="text_time")
        pairs += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    levels = len(cfg.channel_mult)
    index, ds = 1, 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks[level]):
            pairs += _unet_resnet(f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{j}.")
            if ds in cfg.attention_resolutions:
                pairs.append((f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{j}."))
            index += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
            index += 1
            ds *= 2
    pairs += _unet_resnet("middle_block.0.", "mid_block.resnets.0.")
    if cfg.transformer_depth_middle:  # else one res block (SSD-1B, Vega)
        pairs.append(("middle_block.1.", "mid_block.attentions.0."))
        pairs += _unet_resnet("middle_block.2.", "mid_block.resnets.1.")
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        n = cfg.num_res_blocks[level] + 1
        attention = ds in cfg.attention_resolutions
        for j in range(n):
            pairs += _unet_resnet(f"output_blocks.{index}.0.", f"up_blocks.{up}.resnets.{j}.")
            if attention:
                pairs.append((f"output_blocks.{index}.1.", f"up_blocks.{up}.attentions.{j}."))
            if level and j == n - 1:
                pairs.append((f"output_blocks.{index}.{2 if attention else 1}.conv.",
                              f"up_blocks.{up}.upsamplers.0.conv."))
            index += 1
        ds //= 2
    return pairs


def _vae_resnet(orig: str, diff: str) -> Pairs:
    return [(orig + "nin_shortcut.", diff + "conv_shortcut."), (orig, diff)]


def _vae_mid(side: str) -> Pairs:
    pairs = _vae_resnet(f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.")
    pairs += _vae_resnet(f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.")
    attn_o, attn_d = f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0."
    pairs += [(attn_o + "norm.", attn_d + "group_norm."), (attn_o + "q.", attn_d + "to_q."),
              (attn_o + "k.", attn_d + "to_k."), (attn_o + "v.", attn_d + "to_v."),
              (attn_o + "proj_out.", attn_d + "to_out.0.")]
    return pairs


def vae_pairs(cfg: VAEConfig) -> Pairs:
    levels = len(cfg.ch_mult)
    pairs: Pairs = []
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.norm_out.", f"{side}.conv_norm_out."),
                  (f"{side}.conv_out.", f"{side}.conv_out.")]
        pairs += _vae_mid(side)
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs += _vae_resnet(f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.")
        if level != levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv.",
                          f"encoder.down_blocks.{level}.downsamplers.0.conv."))
    for up, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            pairs += _vae_resnet(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.")
        if level:
            pairs.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
    pairs += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    return pairs


def text_pairs(cfg: TextConfig, layers: int) -> Pairs:
    """Pairs for the text encoder; diffusers always holds it as a transformers CLIPTextModel."""
    if cfg.layout == "clip":
        return [("transformer.text_model.", "text_model.")]
    pairs: Pairs = [("model.token_embedding.", "text_model.embeddings.token_embedding."),
                    ("model.ln_final.", "text_model.final_layer_norm.")]
    for i in range(layers):
        o, d = f"model.transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        pairs += [(o + "ln_1.", d + "layer_norm1."), (o + "ln_2.", d + "layer_norm2."),
                  (o + "attn.out_proj.", d + "self_attn.out_proj."), (o + "mlp.c_fc.", d + "mlp.fc1."),
                  (o + "mlp.c_proj.", d + "mlp.fc2.")]
    return pairs


def _rename(key: str, pairs: Pairs, reverse: bool) -> str | None:
    best = None
    for o, d in pairs:
        src, dst = (d, o) if reverse else (o, d)
        if key.startswith(src) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return None if best is None else best[1] + key[len(best[0]):]


def _check_unmapped(unmapped: list[str], what: str) -> None:
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:8])
        raise KeyError(f"{len(unmapped)} {what} keys have no counterpart: {shown}")


def text_parts(cfg: ModelConfig) -> dict[str, tuple[str, TextConfig]]:
    """Each text encoder's diffusers part -> (original prefix, config). SD1/SD2: `cond_stage_model.`; SDXL: the
    conditioner's embedders in order, CLIP-L as text_encoder and bigG as text_encoder_2 (the refiner: bigG alone,
    `conditioner.embedders.0.`, diffusers' text_encoder_2)."""
    if not cfg.conditioner:
        return {"text_encoder": (TEXT, cfg.text)}
    return {("text_encoder_2" if t.pooled_projection else "text_encoder"): (f"{CONDITIONER}{i}.", t)
            for i, t in enumerate(cfg.text_encoders)}


def part_prefixes(cfg: ModelConfig) -> dict[str, str]:
    """diffusers part -> the prefix of its keys in the original layout."""
    return {"unet": UNET, "vae": VAE, **{part: prefix for part, (prefix, _) in text_parts(cfg).items()}}


def diffusers_text_layers(cfg: TextConfig) -> int:
    """Layers diffusers' text model holds: SD2's drops the one SD never reads; SDXL's pipelines read
    hidden_states[-2] of the whole model (and bigG's pooled output comes from the last layer)."""
    return cfg.hidden_layers_used if cfg.final_norm else cfg.layers


def _tables(cfg: ModelConfig) -> dict[str, Pairs]:
    return {"unet": unet_pairs(cfg.unet), "vae": vae_pairs(cfg.vae),
            **{part: text_pairs(t, diffusers_text_layers(t)) for part, (_, t) in text_parts(cfg).items()}}


def to_diffusers(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Original-keyed state dict -> {"unet": ..., "vae": ..., "text_encoder": ..., ["text_encoder_2": ...,]
    "openclip_extras": ...}."""
    prefixes, texts, tables = part_prefixes(cfg), text_parts(cfg), _tables(cfg)
    out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in prefixes} | {"openclip_extras": {}}
    unmapped = []
    for key, value in sd.items():
        part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is None:
            unmapped.append(key)
            continue
        local = key[len(prefixes[part]):]
        if part in texts and texts[part][1].layout == "openclip":
            if _openclip_special(local, value, out, part, texts[part][1]):
                continue
        new = _rename(local, tables[part], reverse=False)
        if new is None:
            unmapped.append(key)
            continue
        if part == "vae" and ".mid_block.attentions." in new and new.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # diffusers stores VAE attention projections as linears
        out[part][new] = value
    _check_unmapped(unmapped, "original")
    return out


def _openclip_special(local: str, value: torch.Tensor, out: dict, part: str, cfg: TextConfig) -> bool:
    """Fused q/k/v, the positional table, the projection, and what diffusers' CLIPTextModel has no place for."""
    te = out[part]
    text_layers = diffusers_text_layers(cfg)
    if local == "model.positional_embedding":
        te["text_model.embeddings.position_embedding.weight"] = value
        return True
    if local.startswith("model.transformer.resblocks."):
        layer = int(local.split(".")[3])
        if layer >= text_layers:  # layers SD2 never reads: kept beside the folder so round trips are exact
            out["openclip_extras"][local] = value
            return True
        if ".attn.in_proj_" in local:
            kind = "weight" if local.endswith("weight") else "bias"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                te[f"text_model.encoder.layers.{layer}.self_attn.{name}.{kind}"] = chunk
            return True
    if local == "model.text_projection" and cfg.pooled_projection:  # x @ P here, a Linear (weight P^T) there
        te["text_projection.weight"] = value.t().contiguous()
        return True
    if local in ("model.text_projection", "model.logit_scale"):
        out["openclip_extras"][local] = value
        return True
    return False


def from_diffusers(parts: dict[str, dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_diffusers`: diffusers part state dicts -> one original-keyed state dict."""
    sd: dict[str, torch.Tensor] = {}
    prefixes, texts, tables = part_prefixes(cfg), text_parts(cfg), _tables(cfg)
    unmapped = []
    for part, tensors in parts.items():
        if part == "openclip_extras":
            sd.update({TEXT + k: v for k, v in tensors.items()})
            continue
        if part not in prefixes:
            raise KeyError(f"a {cfg.family} model has no {part} part")
        prefix = prefixes[part]
        openclip = part in texts and texts[part][1].layout == "openclip"
        fused: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if part in texts and key.endswith("position_ids"):
                continue
            if part in texts and not key.startswith(("text_model.", "text_projection.")):
                key = "text_model." + key  # transformers 5's CLIPTextModel state dict has no text_model level
            if openclip:
                if key == "text_model.embeddings.position_embedding.weight":
                    sd[prefix + "model.positional_embedding"] = value
                    continue
                if key == "text_projection.weight":
                    sd[prefix + "model.text_projection"] = value.t().contiguous()
                    continue
                if any(f"self_attn.{n}_proj." in key for n in "qkv"):
                    layer, kind = key.split(".")[3], key.rsplit(".", 1)[1]
                    fused.setdefault(f"model.transformer.resblocks.{layer}.attn.in_proj_{kind}", {})[key] = value
                    continue
            new = _rename(key, tables[part], reverse=True)
            if new is None:
                unmapped.append(f"{part}/{key}")
                continue
            if part == "vae" and ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
            sd[prefix + new] = value
        for name, pieces in fused.items():
            ordered = [next(v for k, v in pieces.items() if f"self_attn.{n}_proj." in k) for n in "qkv"]
            sd[prefix + name] = torch.cat(ordered, dim=0)
    _check_unmapped(unmapped, "diffusers")
    return sd
