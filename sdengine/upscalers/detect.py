"""Which upscaler a state dict holds, from its key set and tensor shapes (never its file name), and its renaming to
the in-memory names of nets.py.

Layouts in the wild:
- ESRGAN, old (xinntao's original, most community "4x-..." models): `model.0` conv, `model.1.sub.N.RDBk.convj.0`
  dense blocks, `model.1.sub.<num_block>` trunk conv, then a flattened Sequential: `model.3`, `model.6`, ... the
  upsampling convs, then the HR conv and the last conv two indices apart. ESRGAN+ adds `...RDBk.conv1x1.weight`.
- ESRGAN, BasicSR (Real-ESRGAN's RealESRGAN_x4plus / x2plus / 4x-AnimeSharp ...): `conv_first`, `body.N.rdbk.convj`,
  `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`; x2 and x1 pixel-unshuffle the input (12 or 48
  input channels).
- ESRGAN, BSRGAN/RealSR: `RRDB_trunk.N.RDBk.convj`, `trunk_conv`, `upconv1/2`, `HRconv`.
- SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3): `body.0` conv, `body.1` PReLU, ..., last conv.
- SwinIR (JingyunLiang/SwinIR's model zoo): `conv_first`, `patch_embed.norm`, `layers.i.residual_group.blocks.j.
  {norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}`, `layers.i.conv`, `norm`,
  `conv_after_body`, and the head's convs; hyperparameters from shapes.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from .nets import CompactConfig, RRDBConfig
from .swinir import SwinIRConfig

Config = RRDBConfig | CompactConfig | SwinIRConfig

EXPECTED = ("ESRGAN/Real-ESRGAN RRDBNet ('model.0.weight' + 'model.1.sub.0.RDB1.conv1.0.weight', or "
            "'conv_first.weight' + 'body.0.rdb1.conv1.weight') or Real-ESRGAN SRVGGNetCompact ('body.0.weight' conv "
            "+ 'body.1.weight' PReLU, ...) or SwinIR ('conv_first.weight' + 'layers.0.residual_group.blocks.0...')")


class UpscalerFormatError(ValueError):
    """A state dict that is no known upscaler architecture, or a broken one; one line naming what was expected."""


def _rrdb_config(sd: dict[str, torch.Tensor], num_upsample: int) -> RRDBConfig:
    first = sd["conv_first.weight"]
    num_feat, in_ch = first.shape[0], first.shape[1]
    out_ch = sd["conv_last.weight"].shape[0]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("body.")}
    # Real-ESRGAN's x2/x1 models pixel-unshuffle RGB into 12/48 channels (spandrel reads it from the same ratio)
    unshuffle = next((f for f in (2, 4) if in_ch == out_ch * f * f), 1)
    return RRDBConfig(num_in_ch=in_ch // unshuffle ** 2, num_out_ch=out_ch, num_feat=num_feat,
                      num_block=max(blocks) + 1 if blocks else 0, num_grow_ch=sd["body.0.rdb1.conv1.weight"].shape[0],
                      num_upsample=num_upsample, unshuffle=unshuffle,
                      plus=any(k.endswith(".conv1x1.weight") for k in sd))


def _rename(sd: dict[str, torch.Tensor], rules: list[tuple[str, str | Callable[[re.Match], str]]]
            ) -> dict[str, torch.Tensor]:
    """Each key through the first rule (regex, replacement) that matches it; a key no rule matches is an error."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                out[new] = value
                break
        else:
            raise UpscalerFormatError(f"unexpected key {key!r} for an ESRGAN RRDBNet")
    return out


def _old_esrgan(sd: dict[str, torch.Tensor]) -> tuple[RRDBConfig, dict[str, torch.Tensor]]:
    """xinntao's original layout -> BasicSR's names. The top level is one flattened Sequential: conv, shortcut(trunk),
    [upsample, conv, lrelu] per x2, conv, lrelu, conv; so the k-th upsampling conv is model.{3k} and the last two
    convs sit two indices apart after them."""
    top = sorted({int(k.split(".")[1]) for k in sd if re.match(r"^model\.\d+\.(weight|bias)$", k)})
    if not top or top[0] != 0 or len(top) < 3:
        raise UpscalerFormatError(f"an ESRGAN file without its first and last convs (model.N: {top})")
    hr, last = top[-2], top[-1]
    ups = top[1:-2]
    if last != hr + 2 or ups != [3 * (i + 1) for i in range(len(ups))] or hr != 3 * len(ups) + 2:
        raise UpscalerFormatError(f"an ESRGAN file whose layers model.N ({top}) fit no x1/x2/x4/x8 RRDBNet "
                                  "(x3 models are not supported)")
    trunk = max(int(k.split(".")[3]) for k in sd if k.startswith("model.1.sub."))
    rules: list[tuple[str, str | Callable[[re.Match], str]]] = [
        (r"model\.0\.(weight|bias)", r"conv_first.\1"),
        (r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", r"body.\1.rdb\2.conv\3.\4"),
        (r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv1x1\.weight", r"body.\1.rdb\2.conv1x1.weight"),
        (rf"model\.1\.sub\.{trunk}\.(weight|bias)", r"conv_body.\1"),
        (rf"model\.{hr}\.(weight|bias)", r"conv_hr.\1"),
        (rf"model\.{last}\.(weight|bias)", r"conv_last.\1"),
        (r"model\.(\d+)\.(weight|bias)", lambda m: f"conv_up{int(m[1]) // 3}.{m[2]}"),
    ]
    new = _rename(sd, rules)
    return _rrdb_config(new, len(ups)), new


def _bsrgan(sd: dict[str, torch.Tensor]) -> tuple[RRDBConfig, dict[str, torch.Tensor]]:
    new = _rename(sd, [
        (r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)", r"body.\1.rdb\2.conv\3.\4"),
        (r"trunk_conv\.(weight|bias)", r"conv_body.\1"), (r"upconv(\d)\.(weight|bias)", r"conv_up\1.\2"),
        (r"HRconv\.(weight|bias)", r"conv_hr.\1"), (r"(conv_first|conv_last)\.(weight|bias)", r"\1.\2"),
    ])
    return _rrdb_config(new, _count(new, r"conv_up(\d+)\.weight")), new


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    return len([k for k in sd if re.match(f"^{pattern}$", k)])


def _compact(sd: dict[str, torch.Tensor]) -> tuple[CompactConfig, dict[str, torch.Tensor]]:
    n = max(int(k.split(".")[1]) for k in sd if k.startswith("body.")) + 1
    # body: conv, prelu, (conv, prelu) * num_conv, conv: an odd count, convs 4-D at even indices, PReLU weights 1-D
    for i in range(n):
        weight = sd.get(f"body.{i}.weight")
        if weight is None or weight.ndim != (4 if i % 2 == 0 else 1):
            raise UpscalerFormatError(f"an SRVGGNetCompact whose body.{i} is not a {'conv' if i % 2 == 0 else 'PReLU'}"
                                      f" ({'missing' if weight is None else tuple(weight.shape)})")
    if n % 2 == 0 or n < 3:
        raise UpscalerFormatError(f"an SRVGGNetCompact ends with body.{n - 1}, not a conv")
    first, last = sd["body.0.weight"], sd[f"body.{n - 1}.weight"]
    in_ch, num_feat = first.shape[1], first.shape[0]
    upscale = math.isqrt(last.shape[0] // in_ch)
    if in_ch * upscale ** 2 != last.shape[0]:
        raise UpscalerFormatError(f"an SRVGGNetCompact whose last conv makes {last.shape[0]} channels: not "
                                  f"{in_ch} x a square scale")
    return CompactConfig(num_in_ch=in_ch, num_out_ch=in_ch, num_feat=num_feat, num_conv=(n - 3) // 2,
                         upscale=upscale), dict(sd)


def _swinir(sd: dict[str, torch.Tensor]) -> tuple[SwinIRConfig, dict[str, torch.Tensor]]:
    # buffers derived from the window and the training size: recomputed by the net, not read
    sd = {k: v for k, v in sd.items() if not k.endswith((".relative_position_index", ".attn_mask"))}
    first = sd["conv_first.weight"]
    embed_dim, in_chans = first.shape[0], first.shape[1]
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
    depths = tuple(len({k.split(".")[4] for k in sd if k.startswith(f"layers.{i}.residual_group.blocks.")})
                   for i in layers)
    block = "layers.0.residual_group.blocks.0"
    table = sd[f"{block}.attn.relative_position_bias_table"]
    heads = tuple(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1] for i in layers)
    window = (math.isqrt(table.shape[0]) + 1) // 2
    num_feat = sd["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in sd else 64
    if "conv_before_upsample.0.weight" in sd and "conv_up1.weight" in sd:
        upsampler, upscale = "nearest+conv", 2 ** _count(sd, r"conv_up\d+\.weight")
    elif "conv_before_upsample.0.weight" in sd:
        upsampler = "pixelshuffle"
        stages = [k for k in sd if re.match(r"^upsample\.\d+\.weight$", k)]  # conv to r*r*num_feat, shuffle by r
        upscale = math.prod(math.isqrt(sd[k].shape[0] // num_feat) for k in stages)
    elif "upsample.0.weight" in sd:
        upsampler, upscale = "pixelshuffledirect", math.isqrt(sd["upsample.0.weight"].shape[0] // in_chans)
    else:
        upsampler, upscale = "", 1
    config = SwinIRConfig(in_chans=in_chans, embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
                          mlp_ratio=sd[f"{block}.mlp.fc1.weight"].shape[0] / embed_dim, upscale=upscale,
                          img_range=255.0 if window == 7 else 1.0,  # the JPEG models, the only ones with window 7
                          upsampler=upsampler, resi_connection="1conv" if "conv_after_body.weight" in sd else "3conv",
                          num_feat=num_feat)
    return config, sd


def detect(sd: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, state dict under nets.py's names). UpscalerFormatError when it fits nothing."""
    keys = set(sd)
    if {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= keys:
        return _old_esrgan(sd)
    if {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"} <= keys:
        new = dict(sd)
        return _rrdb_config(new, _count(new, r"conv_up(\d+)\.weight")), new
    if {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight"} <= keys:
        return _bsrgan(sd)
    if {"conv_first.weight", "layers.0.residual_group.blocks.0.attn.relative_position_bias_table",
            "layers.0.residual_group.blocks.0.mlp.fc1.weight"} <= keys:
        return _swinir(sd)
    if {"body.0.weight", "body.1.weight"} <= keys and sd["body.1.weight"].ndim == 1:
        return _compact(sd)
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise UpscalerFormatError(f"not a known upscaler architecture: expected {EXPECTED}; found keys like {sample}")
