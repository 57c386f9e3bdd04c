"""T2I-Adapter (Mou et al. 2023) as TencentARC's original holds it: a small convolutional encoder that reads the
control image once (pixel-unshuffled to the latent size) and returns one feature map per UNet level; the UNet adds
them inside its way down (`UNetModel.forward(..., adapter=...)`). The features depend on neither the latents nor
the timestep, so they are computed once per generation.

Module paths equal the keys of TencentARC's single files (t2iadapter_*_sd14v1.pth, coadapter-*.pth, A1111's
extension's layout for the SDXL adapters):
- "full" (ldm/modules/encoders/adapter.py Adapter, ksize 1, sk=True, average-pool downsampling): conv_in, then
  body.{level * 2 + r} residual blocks (block1 3x3, block2 1x1; in_conv 1x1 where the width changes);
- "full_xl" (the SDXL adapters: unshuffle by twice the latent factor, no downsampling before level 1, one before
  level 2): the same keys;
- "light" (Adapter_light, the color adapter): body.{level} extractors of in_conv, body.{j} residual blocks (3x3,
  3x3) and out_conv, at a quarter of the level's width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("full", "full_xl", "light")


@dataclass(frozen=True)
class AdapterConfig:
    """kind: full | full_xl | light. in_channels: the control image's channels (3, or 1 for sketch/grey adapters);
    channels: each feature's width; num_res_blocks: residual blocks per level; unshuffle: the pixel-unshuffle factor
    (8 for SD1/SD2 adapters and the light one, 16 for SDXL's: the VAE's factor, or twice it)."""

    kind: str = "full"
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    unshuffle: int = 8

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")

    def downsampled(self, level: int) -> bool:
        """Whether level `level` halves its input first (average pooling, ceil mode as diffusers)."""
        if self.kind == "full_xl":
            return level == 2
        return level > 0

    def feature_scales(self) -> list[int]:
        """Each feature's downscale from the control image."""
        scale, out = self.unshuffle, []
        for level in range(len(self.channels)):
            scale *= 2 if self.downsampled(level) else 1
            out.append(scale)
        return out


class ResnetBlock(nn.Module):
    """The original's ResnetBlock (sk=True): [downsample], [in_conv to the new width], x + block2(relu(block1(x)))."""

    def __init__(self, in_c: int, out_c: int, down: bool, kernel: int = 1):
        super().__init__()
        self.down = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(in_c, out_c, kernel, padding=kernel // 2) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class Extractor(nn.Module):
    """The light adapter's level: [downsample], in_conv (1x1) to a quarter width, residual blocks, out_conv (1x1)."""

    def __init__(self, in_c: int, inter_c: int, out_c: int, blocks: int, down: bool):
        super().__init__()
        self.down = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(in_c, inter_c, 1)
        self.body = nn.Sequential(*[ResnetBlock(inter_c, inter_c, False, kernel=3) for _ in range(blocks)])
        self.out_conv = nn.Conv2d(inter_c, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.config = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        cin = cfg.in_channels * cfg.unshuffle ** 2
        widths = cfg.channels
        self.body = nn.ModuleList()
        if cfg.kind == "light":
            for level, width in enumerate(widths):
                prev = cin if level == 0 else widths[level - 1]
                self.body.append(Extractor(prev, width // 4, width, cfg.num_res_blocks, cfg.downsampled(level)))
            return
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        for level, width in enumerate(widths):
            for r in range(cfg.num_res_blocks):
                prev = widths[level - 1] if level and r == 0 else width
                self.body.append(ResnetBlock(prev, width, r == 0 and cfg.downsampled(level)))

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """One feature map per level for a control image (b, in_channels, H, W) in [0, 1]; H and W multiples of the
        unshuffle factor."""
        f = self.config.unshuffle
        if hint.shape[-1] % f or hint.shape[-2] % f:
            raise ValueError(f"the control image is {hint.shape[-1]}x{hint.shape[-2]}; this T2I-Adapter needs sizes "
                             f"divisible by {f}")
        x = self.unshuffle(hint)
        if self.config.kind == "light":
            features = []
            for block in self.body:
                x = block(x)
                features.append(x)
            return features
        x = self.conv_in(x)
        features, n = [], self.config.num_res_blocks
        for i, block in enumerate(self.body):
            x = block(x)
            if i % n == n - 1:
                features.append(x)
        return features


class AdapterFeatures(nn.Module):
    """A T2I-Adapter's features for one control image, computed once, in the shape of a ControlNet for the denoiser
    (diffusion/denoiser.py's Control calls net(x, hint, t, context, y=None)): the same features whatever x and t,
    broadcast to the batch."""

    def __init__(self, features: list[torch.Tensor]):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [f.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1) for f in self.features]
