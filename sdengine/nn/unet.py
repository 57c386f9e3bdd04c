"""The denoising UNet with cross-attention (the original UNetModel: SD1.x/SD2.x, and SDXL's layout from
Stability's generative-models, with per-level transformer depth and the "vector" conditioning y).

Module paths equal the keys under `model.diffusion_model.` in original single-file checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from .attention import SpatialTransformer, normalization


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, as in the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


VECTOR_EMBED_DIM = 256  # SDXL's Fourier embedding width per size/crop/aesthetic value


def vector_embedding(values: torch.Tensor, dim: int = VECTOR_EMBED_DIM) -> torch.Tensor:
    """(b, n) scalar conditions (original size h, w; crop top, left; target size h, w; or an aesthetic score) ->
    (b, n * dim): each value's sinusoidal embedding, concatenated in order (generative-models'
    ConcatTimestepEmbedderND; diffusers' add_time_proj over add_time_ids)."""
    b, n = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, n * dim)


def sdxl_vector(pooled: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
    """SDXL's y: the pooled text embedding, then the Fourier embeddings of each (b, k) group of conditions (base:
    original size, crop top-left, target size; refiner: original size, crop, aesthetic score)."""
    values = torch.cat([c.to(pooled.device, torch.float32).reshape(pooled.shape[0], -1) for c in conditions], dim=1)
    return torch.cat([pooled.float(), vector_embedding(values)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Upsampling to the skip connection's size (not blindly 2x) lets latents of odd size pass through.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands each layer what it needs: the time embedding, the context or the output size."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer,
                                      groups)

        depths = cfg.transformer_depth
        assert isinstance(depths, tuple) and cfg.transformer_depth_middle is not None  # set by UNetConfig
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:  # the original's num_classes="sequential": one Sequential inside another
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), transformer(ch, cfg.transformer_depth_middle),
            ResBlock(ch, emb_dim, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            n = cfg.num_res_blocks[level] + 1
            for i in range(n):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == n - 1:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch, groups), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        # Recompute block activations in the backward pass instead of storing them (training memory).
        self.gradient_checkpointing = False

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
             size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, size, use_reentrant=False)
        return block(h, emb, context, size)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Model output (eps or v, per the checkpoint) for latents x at timesteps t given text context and, for
        UNets with a vector input (SDXL), y (b, adm_in_channels)."""
        if (y is not None) != (self.config.adm_in_channels is not None):
            raise ValueError("y must be given exactly when the UNet has a vector input (adm_in_channels = "
                             f"{self.config.adm_in_channels})")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            # The next skip (if any) gives the size an upsampler in this block must reach.
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, size)
        return self.out(h)
