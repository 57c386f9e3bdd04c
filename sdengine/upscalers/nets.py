"""The super-resolution networks, written from their papers' descriptions, each with a frozen config whose fields
are the original parameter names. Module paths equal the keys of the layout the newest published files use
(BasicSR's for RRDBNet, Real-ESRGAN's for SRVGGNetCompact), so those load with strict=True and no mapping; older
layouts are renamed once, at the edge (detect.py).

Both take and return images in [0, 1], (b, c, h, w); any h and w.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# --- ESRGAN / Real-ESRGAN: RRDBNet (Wang et al. 2018, "ESRGAN"; BasicSR's arch/rrdbnet_arch.py names) ------------

@dataclass(frozen=True)
class RRDBConfig:
    """num_upsample: nearest x2 + conv stages (conv_up1..n). unshuffle: the input's pixel-unshuffle factor
    (Real-ESRGAN x2 uses 2 and x1 uses 4, so its body runs at a quarter/sixteenth of the pixels). plus: ESRGAN+'s
    extra 1x1 residual paths in each dense block."""

    num_in_ch: int = 3  # the image's channels (conv_first sees num_in_ch * unshuffle**2)
    num_out_ch: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    num_upsample: int = 2
    unshuffle: int = 1
    plus: bool = False

    @property
    def scale(self) -> int:
        return 2 ** self.num_upsample // self.unshuffle


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block's input and every earlier output (dense connections); the last
    back to num_feat channels, added to the input scaled by 0.2 (residual scaling keeps the deep net stable)."""

    def __init__(self, num_feat: int, num_grow_ch: int, plus: bool):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow_ch, num_grow_ch, 3, 1, 1))
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        # ESRGAN+: a 1x1 projection of the input added to the second conv's output, which is added to the fourth's
        self.conv1x1 = nn.Conv2d(num_feat, num_grow_ch, 1, bias=False) if plus else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.leaky_relu
        x1 = act(self.conv1(x), 0.2)
        x2 = act(self.conv2(torch.cat((x, x1), 1)), 0.2)
        if self.conv1x1 is not None:
            x2 = x2 + self.conv1x1(x)
        x3 = act(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = act(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        if self.conv1x1 is not None:
            x4 = x4 + x2
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual: three dense blocks, their result added to the input scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int, plus: bool):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch, plus)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch, plus)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch, plus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBConfig):
        super().__init__()
        c = self.config = config
        self.conv_first = nn.Conv2d(c.num_in_ch * c.unshuffle ** 2, c.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(c.num_feat, c.num_grow_ch, c.plus) for _ in range(c.num_block)))
        self.conv_body = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        for i in range(c.num_upsample):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(c.num_feat, c.num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        h, w = x.shape[-2:]
        if c.unshuffle > 1:  # reflect-pad to a multiple of the factor, as Real-ESRGAN's inference does; cropped below
            pad_h, pad_w = -h % c.unshuffle, -w % c.unshuffle
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
            x = F.pixel_unshuffle(x, c.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(c.num_upsample):
            up = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        return out[..., : h * c.scale, : w * c.scale]


# --- Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3) ---------------------------------

@dataclass(frozen=True)
class CompactConfig:
    """A plain stack of 3x3 convs with per-channel PReLUs at low resolution; the last conv makes upscale**2 values per
    output pixel (pixel shuffle), added to the nearest-upsampled input (the net learns the residual)."""

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_conv: int = 16
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: CompactConfig):
        super().__init__()
        c = self.config = config
        layers: list[nn.Module] = [nn.Conv2d(c.num_in_ch, c.num_feat, 3, 1, 1), nn.PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1), nn.PReLU(c.num_feat)]
        layers.append(nn.Conv2d(c.num_feat, c.num_out_ch * c.upscale ** 2, 3, 1, 1))
        self.body = nn.ModuleList(layers)  # body.N: the published files' keys (a ModuleList, not a Sequential)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        base = F.interpolate(x, scale_factor=self.config.upscale, mode="nearest")
        return F.pixel_shuffle(out, self.config.upscale) + base
