"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer"), written from the paper: a 3x3
conv, residual Swin Transformer blocks (RSTB: Swin layers with (shifted-)window self-attention and a relative
position bias, then a conv, plus a skip), a conv after the body with a long skip, and one of the paper's
reconstruction heads. Module paths equal the keys of the published files (JingyunLiang/SwinIR's
`model_zoo/swinir/*.pth`), so they load strictly; their `relative_position_index` and `attn_mask` buffers are
derived from the window size and the image size and are recomputed, not read.

Takes and returns images in [0, 1], (b, c, h, w); any h and w (reflect-padded to a multiple of the window).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean, subtracted by every published colour model


@dataclass(frozen=True)
class SwinIRConfig:
    """The original constructor's names. upsampler: "pixelshuffle" (classical SR), "pixelshuffledirect"
    (lightweight SR), "nearest+conv" (real-world SR), "" (denoising and JPEG artifacts: upscale 1, the net predicts a
    residual). img_range 255 for the JPEG models (window 7), 1 elsewhere."""

    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    upscale: int = 2
    img_range: float = 1.0
    upsampler: str = "pixelshuffle"
    resi_connection: str = "1conv"
    num_feat: int = 64

    @property
    def scale(self) -> int:
        return self.upscale


def _resi_conv(dim: int, kind: str) -> nn.Module:
    """The conv before a residual connection: one 3x3, or (to save parameters) 3x3 -> 1x1 -> 3x3 at a quarter width."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim, 3, 1, 1))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per head for each relative offset."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack((ys.flatten(), xs.flatten()))  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :] + window - 1  # offsets shifted to 0 .. 2w-2
        self.register_buffer("relative_position_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (windows * b, N, C); mask: (windows, N, N) of 0 / -100, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:  # windows are ordered image by image: (b, windows, ...) broadcasts the mask over b
            q, k, v = (t.view(bw // mask.shape[0], mask.shape[0], *t.shape[1:]) for t in (q, k, v))
            bias = bias[None] + mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.reshape(bw, self.num_heads, n, -1).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm attention over windows (every second block on windows shifted by half a window, so information
    crosses window borders), then a pre-norm MLP; both residual."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        (h, w), b, c, ws = size, x.shape[0], x.shape[2], self.window
        t = self.norm1(x).view(b, h, w, c)
        if self.shift:
            t = torch.roll(t, (-self.shift, -self.shift), (1, 2))
        windows = t.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        windows = self.attn(windows, mask if self.shift else None)
        t = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            t = torch.roll(t, (self.shift, self.shift), (1, 2))
        x = x + t.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(SwinTransformerBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2,
                                                         mlp_ratio) for i in range(depth))


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin layers, then a conv on the feature map, plus the block's input."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, resi: str):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window, mlp_ratio)
        self.conv = _resi_conv(dim, resi)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
        t = x
        for block in self.residual_group.blocks:
            t = block(t, size, mask)
        b, _, c = t.shape
        return self.conv(t.transpose(1, 2).reshape(b, c, *size)).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Patch size 1: the feature map as tokens, layer-normed (the files' `patch_embed.norm`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)


def shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N): 0 where two pixels of a shifted window were neighbours before the cyclic shift, -100 where
    the roll brought together pixels from opposite borders (they must not attend to each other)."""
    def region(n: int) -> torch.Tensor:
        r = torch.zeros(n, dtype=torch.long)
        r[n - window:n - shift], r[n - shift:] = 1, 2
        return r

    ids = region(h)[:, None] * 3 + region(w)[None, :]
    ids = ids.view(h // window, window, w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


class SwinIR(nn.Module):
    def __init__(self, config: SwinIRConfig):
        super().__init__()
        c = self.config = config
        if c.upsampler not in UPSAMPLERS:
            raise ValueError(f"unknown SwinIR upsampler {c.upsampler!r}")
        dim, feat = c.embed_dim, c.num_feat
        self.register_buffer("mean", torch.tensor(RGB_MEAN if c.in_chans == 3 else (0.0,) * c.in_chans)
                             .view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(c.in_chans, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(RSTB(dim, d, heads, c.window_size, c.mlp_ratio, c.resi_connection)
                                    for d, heads in zip(c.depths, c.num_heads, strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _resi_conv(dim, c.resi_connection)
        if c.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU())  # slope 0.01
        if c.upsampler == "pixelshuffle":  # x2 stages (or one x3): conv to r*r*feat channels, pixel shuffle
            stages = [3] if c.upscale == 3 else [2] * (c.upscale.bit_length() - 1)
            self.upsample = nn.Sequential(*(m for r in stages for m in (nn.Conv2d(feat, r * r * feat, 3, 1, 1),
                                                                        nn.PixelShuffle(r))))
            self.conv_last = nn.Conv2d(feat, c.in_chans, 3, 1, 1)
        elif c.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(dim, c.upscale ** 2 * c.in_chans, 3, 1, 1),
                                          nn.PixelShuffle(c.upscale))
        elif c.upsampler == "nearest+conv":
            for i in range(c.upscale.bit_length() - 1):
                setattr(self, f"conv_up{i + 1}", nn.Conv2d(feat, feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(feat, c.in_chans, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(dim, c.in_chans, 3, 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b, dim, h, w = x.shape
        ws = self.config.window_size
        mask = shift_mask(h, w, ws, ws // 2).to(x.device)
        t = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            t = layer(t, (h, w), mask)
        return self.norm(t).transpose(1, 2).reshape(b, dim, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % c.window_size, -w % c.window_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
        x = (x - self.mean) * c.img_range
        first = self.conv_first(x)
        body = self.conv_after_body(self.features(first)) + first
        if c.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(body)))
        elif c.upsampler == "pixelshuffledirect":
            out = self.upsample(body)
        elif c.upsampler == "nearest+conv":
            t = self.conv_before_upsample(body)
            for i in range(c.upscale.bit_length() - 1):
                t = F.leaky_relu(getattr(self, f"conv_up{i + 1}")(F.interpolate(t, scale_factor=2, mode="nearest")),
                                 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(t), 0.2))
        else:
            out = x + self.conv_last(body)
        return (out / c.img_range + self.mean)[..., : h * c.upscale, : w * c.upscale]
