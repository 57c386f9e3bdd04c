"""ControlNet (Zhang et al. 2023) as the original ControlLDM holds it: a trainable copy of the UNet's way down (time
and vector embedding, input blocks, middle block), a small hint encoder that brings the control image to the
latent size and adds it after the first input block, and one zero-initialised 1x1 convolution per input block plus
one after the middle block. Its outputs are residuals the UNet adds to its skip connections and middle block
(`UNetModel.forward(..., control=...)`).

Module paths equal the keys under `control_model.` in lllyasviel's single files (control_v11p_sd15_canny.pth, ...):
input_hint_block.N, zero_convs.N.0, middle_block_out.0, and the UNet's own names for the copied half.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import UNetConfig
from .unet import Encoder, TimestepEmbedSequential, timestep_embedding

# The hint encoder's widths in the paper and every published ControlNet: three stride-2 stages take a 512x512 image
# to the 64x64 latent. Tiny test models take fewer stages (one per VAE halving).
HINT_BLOCK_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """unet: the layout of the copied encoder half (a UNetConfig; its output side is unused). hint_channels: the
    control image's channels (3; inpainting ControlNets read 3 as well, masked pixels set to -1). global_pool: the
    residuals are averaged over space and act on guidance's conditional half only (the shuffle ControlNet: the
    original's global_average_pooling, diffusers' global_pool_conditions); in no tensor's shape, read from the
    file's .yaml or config.json."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS
    global_pool: bool = False

    @property
    def downscale(self) -> int:
        """How much smaller than the control image the hint encoder's output is (the VAE's factor)."""
        return 2 ** (len(self.hint_block_channels) - 1)


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


def _hint_block(cfg: ControlNetConfig) -> TimestepEmbedSequential:
    """conv, SiLU, then per stage (conv, SiLU, stride-2 conv, SiLU), then a zero conv to the model's width: the
    original's flat Sequential, so its indices (0, 2, 4, ... 14 for four stages) are the file's."""
    widths = cfg.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    out = nn.Conv2d(widths[-1], cfg.unet.model_channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return TimestepEmbedSequential(*layers, out)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        enc = Encoder(cfg.unet)
        self.time_embed = enc.time_embed()
        if (label_emb := enc.label_emb()) is not None:
            self.label_emb = label_emb
        self.input_hint_block = _hint_block(cfg)
        self.input_blocks = enc.input_blocks()
        self.zero_convs = nn.ModuleList([_zero_conv(ch) for ch in enc.skip_channels])
        self.middle_block = enc.middle_block()
        self.middle_block_out = _zero_conv(enc.channels)

    @property
    def residuals(self) -> int:
        """How many tensors forward returns: one per input block, and the middle block's."""
        return len(self.input_blocks) + 1

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residuals for the UNet (ControlNet.forward of the original cldm.py): x the UNet's input latents (b, 4,
        h, w), hint the control image (b, 3, 8h, 8w) in [0, 1], timesteps, context and y as the UNet takes them."""
        ucfg = self.config.unet
        if (y is not None) != (ucfg.adm_in_channels is not None):
            raise ValueError("y must be given exactly when the ControlNet has a vector input (adm_in_channels = "
                             f"{ucfg.adm_in_channels})")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, ucfg.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)
        guided = self.input_hint_block(hint.to(x.dtype), emb, context)
        if guided.shape[-2:] != x.shape[-2:]:
            f = self.config.downscale
            raise ValueError(f"the control image is {hint.shape[-1]}x{hint.shape[-2]}; this ControlNet needs "
                             f"{f}x the latents' {x.shape[-1]}x{x.shape[-2]}")
        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:  # the hint joins after the first convolution
                h = h + guided
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
