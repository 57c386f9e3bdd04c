"""Architecture detection: a ModelConfig from a checkpoint's tensor shapes and key set, never its file name.

Shapes fix everything except the attention head split (heads do not change any tensor's shape), GroupNorm's group
count, the VAE's latent scale, the vocabulary and the prediction type; for those we follow the published families
(SD1: 8 heads; SD2: 64 channels per head; 32 groups) unless the file's own metadata says otherwise, and SD2's eps/v
is probed from the weights by the loader. A file with exactly the shipped model's shapes is that model (or a
fine-tune of it) stripped of its metadata: it takes the shipped file's recorded config and vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..tokenizer import CLIPTokenizer
from .keys import CONDITIONER, TEXT, UNET, VAE
from .metadata import CLIP_VOCAB_SIZE, CONFIG_METADATA, TOKENIZER_METADATA, tokenizer_from_metadata

SDXL_SCALING_FACTOR = 0.13025


class UnknownArchitecture(ValueError):
    pass


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with a readable error: name missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise UnknownArchitecture(f"{source}: unknown architecture; " + "; ".join(problems))


def load_frozen(net: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, error: type[Exception],
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`net` (built on the meta device) holding `sd` under check_keys' strict names (its complaint raised as `error`),
    on `device` in `dtype` (default fp32), frozen for inference: how every add-on network (ControlNet, T2I-Adapter,
    IP-Adapter, its image encoder) is loaded."""
    try:
        check_keys(net, sd, source)
    except UnknownArchitecture as e:
        raise error(str(e)) from None
    net.load_state_dict(sd, strict=True, assign=True)
    return net.to(device, dtype or torch.float32).eval().requires_grad_(False)


def _indices(keys: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _need(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise UnknownArchitecture(f"not a Stable Diffusion checkpoint: missing key {key!r}")
    return sd[key]


def detect_unet(sd: dict[str, torch.Tensor], heads_hint: dict | None = None) -> UNetConfig:
    keys = [k[len(UNET):] for k in sd if k.startswith(UNET)]
    conv_in = _need(sd, UNET + "input_blocks.0.0.weight")
    mc, in_channels = conv_in.shape[0], conv_in.shape[1]
    out_channels = _need(sd, UNET + "out.2.weight").shape[0]
    # Walk the input blocks: a block with a resblock adds to the current level, a downsampler closes it.
    mults: list[int] = []
    res_counts: list[int] = []
    attention: set[int] = set()
    depths: list[int] = []
    count, ds, channels, level_depths = 0, 1, mc, [0]
    for i in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            mults.append(channels // mc)
            res_counts.append(count)
            depths.append(_level_depth(level_depths, len(mults) - 1))
            count, ds, level_depths = 0, ds * 2, [0]
            continue
        channels = sd[UNET + f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
        count += 1
        if f"input_blocks.{i}.1.norm.weight" in keys:
            attention.add(ds)
            level_depths = [d for d in level_depths if d] + [_depth(keys, f"input_blocks.{i}.1.")]
    mults.append(channels // mc)
    res_counts.append(count)
    depths.append(_level_depth(level_depths, len(mults) - 1))
    # the middle block's transformer, or (SSD-1B, Vega: one res block) the first one there is, tells the context
    # width and the projection kind
    transformers = sorted(k.removesuffix("proj_in.weight") for k in keys
                          if re.fullmatch(r"(middle_block|input_blocks\.\d+)\.1\.proj_in\.weight", k))
    first = transformers[-1] if transformers else "middle_block.1."  # "middle_block." sorts after "input_blocks."
    proj_in = _need(sd, UNET + first + "proj_in.weight")
    context_dim = _need(sd, UNET + first + "transformer_blocks.0.attn2.to_k.weight").shape[1]
    middle = _depth(keys, "middle_block.1.")
    if not middle and "middle_block.2.in_layers.0.weight" in keys:
        raise UnknownArchitecture("unsupported UNet: a middle block of two res blocks without a transformer")
    # None without output blocks (a ControlNet's encoder half, detected through this function): the default
    output = tuple(_depth(keys, f"output_blocks.{i}.1.") for i in _indices(keys, r"output_blocks\.(\d+)\.")) or None
    label = sd.get(UNET + "label_emb.0.0.weight")
    heads = heads_hint or _head_rule(context_dim, [mc * m for m in mults])
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=mc, channel_mult=tuple(mults),
        num_res_blocks=tuple(res_counts), attention_resolutions=tuple(sorted(attention)),
        transformer_depth=tuple(depths), transformer_depth_middle=middle, transformer_depth_output=output,
        adm_in_channels=None if label is None else label.shape[1],
        context_dim=context_dim, use_linear_in_transformer=proj_in.ndim == 2,
        norm_groups=norm_groups([mc * m for m in mults]), **heads)


def _depth(keys: list[str], prefix: str) -> int:
    """Transformer blocks in the SpatialTransformer at `prefix` (0: none there)."""
    return len(_indices(keys, re.escape(prefix) + r"transformer_blocks\.(\d+)\."))


def _level_depth(depths: list[int], level: int) -> int:
    """A level's transformer depth from its input blocks' (one per level on the way down, as every published
    layout has it; the way up may differ per block)."""
    if len(set(depths)) > 1:
        raise UnknownArchitecture(f"unsupported UNet: input blocks of level {level} have different transformer "
                                  f"depths {depths}")
    return depths[0]


def _head_rule(context_dim: int, level_channels: list[int]) -> dict[str, int]:
    """SD1 (CLIP-L context) uses 8 heads, SD2 64 channels per head; other layouts take the first that fits."""
    rules = [{"num_heads": -1, "num_head_channels": 64}, {"num_heads": 8, "num_head_channels": -1}]
    if context_dim == 768:
        rules.reverse()
    for rule in rules + [{"num_heads": 1, "num_head_channels": -1}]:
        n = rule["num_heads"] if rule["num_heads"] > 0 else rule["num_head_channels"]
        if all(c % n == 0 for c in level_channels):
            return rule
    raise AssertionError("unreachable: one head always fits")


def detect_vae(sd: dict[str, torch.Tensor], prefix: str = VAE) -> VAEConfig:
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    conv_in = _need(sd, prefix + "encoder.conv_in.weight")
    ch = conv_in.shape[0]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    mults = tuple(sd[prefix + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    blocks = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    return VAEConfig(norm_groups=norm_groups([ch * m for m in mults]),
        in_channels=conv_in.shape[1], out_ch=_need(sd, prefix + "decoder.conv_out.weight").shape[0], ch=ch,
        ch_mult=mults, num_res_blocks=blocks, z_channels=_need(sd, prefix + "decoder.conv_in.weight").shape[1],
        embed_dim=_need(sd, prefix + "post_quant_conv.weight").shape[1])


def norm_groups(channels: list[int]) -> int:
    """The GroupNorm group count of a UNet or VAE whose levels have these channel counts. Groups are in no tensor's
    shape (a GroupNorm's weight is per channel): SD's 32 where every level divides into it, else the largest power
    of two that does (sdengine's shapes VAE, 48/96 channels, uses 16). The UNet's skip concatenations are sums of
    level widths, so they divide too. A file's recorded config overrides this guess."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def detect_text(sd: dict[str, torch.Tensor], heads_hint: int | None = None, prefix: str = TEXT,
                sdxl: bool = False) -> TextConfig:
    """The text encoder under `prefix`. sdxl: one of SDXL's conditioner embedders (penultimate layer read raw;
    bigG's pooled output projected)."""
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    found = _detect_text(sd, keys, heads_hint, prefix)
    if sdxl:
        found = dataclasses.replace(found, skip_last_layers=1, final_norm=False,
                                    pooled_projection=found.has_projection)
    return found


def _detect_text(sd: dict[str, torch.Tensor], keys: list[str], heads_hint: int | None, prefix: str) -> TextConfig:
    if any(k.startswith("transformer.text_model.") for k in keys):
        p = prefix + "transformer.text_model."
        tok = _need(sd, p + "embeddings.token_embedding.weight")
        width = tok.shape[1]
        return TextConfig(
            layout="clip", vocab_size=tok.shape[0], width=width,
            max_positions=_need(sd, p + "embeddings.position_embedding.weight").shape[0],
            layers=len(_indices(keys, r"transformer\.text_model\.encoder\.layers\.(\d+)\.")),
            heads=heads_hint or width // 64, mlp_width=_need(sd, p + "encoder.layers.0.mlp.fc1.weight").shape[0],
            activation="quick_gelu", skip_last_layers=0, pad_with_eos=True, eos_token_id=tok.shape[0] - 1)
    if any(k.startswith("model.") for k in keys):
        p = prefix + "model."
        tok = _need(sd, p + "token_embedding.weight")
        width = tok.shape[1]
        return TextConfig(
            layout="openclip", vocab_size=tok.shape[0], width=width,
            max_positions=_need(sd, p + "positional_embedding").shape[0],
            layers=len(_indices(keys, r"model\.transformer\.resblocks\.(\d+)\.")),
            heads=heads_hint or width // 64,
            mlp_width=_need(sd, p + "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
            activation="gelu", skip_last_layers=1, pad_with_eos=False, eos_token_id=tok.shape[0] - 1,
            has_projection=p + "text_projection" in sd)
    raise UnknownArchitecture(f"no text encoder found: expected keys under '{prefix}transformer.text_model.' "
                              f"(CLIP) or '{prefix}model.' (OpenCLIP)")


SHIPPED = Path(__file__).parents[1] / "models" / "default" / "model.safetensors"


@functools.lru_cache(maxsize=4)
def _recorded(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's tensor shapes and metadata, from its header alone (no tensor is read)."""
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}


def known_model(sd: dict[str, torch.Tensor]) -> tuple[ModelConfig, CLIPTokenizer | None] | None:
    """The shipped model's recorded config and vocabulary when `sd` has exactly its keys and shapes (the shipped
    file, or a fine-tune of it, saved without metadata); None otherwise. What no shape tells (head split, latent
    scale, vocabulary, training size) is then known, not guessed: its pixels are the shipped file's."""
    if not SHIPPED.is_file():
        return None
    shapes, metadata = _recorded(SHIPPED)
    if len(shapes) != len(sd) or any(tuple(v.shape) != shapes.get(k) for k, v in sd.items()):
        return None
    cfg = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA]))
    return cfg, tokenizer_from_metadata(metadata, cfg.text.pad_with_eos, SHIPPED)


def _check_vocabulary(text: TextConfig) -> None:
    """Without a vocabulary in the file, the tokenizer is CLIP's: a smaller embedding table would fail at the first
    prompt with an index error, so say it now, and what to load instead."""
    if text.vocab_size < CLIP_VOCAB_SIZE:
        raise UnknownArchitecture(
            f"the text encoder has a {text.vocab_size}-token vocabulary, not CLIP's {CLIP_VOCAB_SIZE}, and the file "
            f"does not carry it (no '{TOKENIZER_METADATA}' metadata: stripped?); load the file it "
            f"was made from, or a diffusers folder with its tokenizer/ (sdengine convert SRC DST --to diffusers)")


def detect(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """Config of an original-keyed state dict (prediction type 'eps'; the loader probes SD2 for 'v')."""
    if not any(k.startswith(UNET) for k in sd):
        sample = ", ".join(sorted(sd)[:5])
        raise UnknownArchitecture(
            f"not a Stable Diffusion checkpoint: no 'model.diffusion_model.' keys (found: {sample})")
    unet, vae = detect_unet(sd), detect_vae(sd)
    if unet.adm_in_channels is None:
        text = detect_text(sd)
        _check_vocabulary(text)
        return ModelConfig(unet=unet, vae=vae, text=text)
    # SDXL: its VAE (SD's layout) is trained to another latent scale; text encoders under conditioner.embedders.N.
    vae = dataclasses.replace(vae, scaling_factor=SDXL_SCALING_FACTOR)
    texts = [detect_text(sd, prefix=f"{CONDITIONER}{i}.", sdxl=True) for i in range(2)
             if any(k.startswith(f"{CONDITIONER}{i}.") for k in sd)]
    if not texts:
        raise UnknownArchitecture(f"an SDXL UNet without text encoders: expected keys under '{CONDITIONER}0.'")
    for text in texts:
        _check_vocabulary(text)
    return ModelConfig(unet=unet, vae=vae, text=texts[0], text_2=texts[1] if len(texts) > 1 else None)
