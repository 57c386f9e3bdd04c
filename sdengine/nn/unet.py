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


class Encoder:
    """The UNet's way down as the original builds it: time (and vector) embedding, input blocks, middle block. The
    UNet and the ControlNet (which copies this half) both build theirs here, so their layouts cannot drift."""

    def __init__(self, cfg: UNetConfig):
        self.cfg = cfg
        self.emb_dim = cfg.model_channels * 4
        self.skip_channels: list[int] = []
        self.channels = cfg.model_channels  # after the input blocks: the middle block's width
        self.ds = 1  # after the input blocks: the deepest downsampling factor
        # after the input blocks: where T2I-Adapter features join, one input block per level (UNetModel.forward)
        self.adapter_points: list[int] = []

    def transformer(self, ch: int, depth: int) -> SpatialTransformer:
        cfg = self.cfg
        heads, dim_head = cfg.heads_for(ch)
        return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer,
                                  cfg.norm_groups)

    def time_embed(self) -> nn.Sequential:
        mc, emb_dim = self.cfg.model_channels, self.emb_dim
        return nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def label_emb(self) -> nn.Sequential | None:
        """The original's num_classes="sequential": one Sequential inside another (SDXL's vector input)."""
        if self.cfg.adm_in_channels is None:
            return None
        return nn.Sequential(nn.Sequential(
            nn.Linear(self.cfg.adm_in_channels, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)))

    def input_blocks(self) -> nn.ModuleList:
        cfg, groups, emb_dim = self.cfg, self.cfg.norm_groups, self.emb_dim
        mc = cfg.model_channels
        depths = cfg.transformer_depth
        assert isinstance(depths, tuple)  # set by UNetConfig
        blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]
        ch, ds = mc, 1
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self.transformer(ch, depths[level]))
                blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            # diffusers adds a level's feature after its last attention block, or after a level without attention
            # as a whole (its downsampler too): SD1.5's blocks 2, 5, 8, 11 (the original's), SDXL's 3, 5, 8
            self.adapter_points.append(len(blocks) - 1)
            if level != levels - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                if ds not in cfg.attention_resolutions:
                    self.adapter_points[-1] = len(blocks) - 1
                ds *= 2
        self.channels, self.ds = ch, ds
        return blocks

    def middle_block(self) -> TimestepEmbedSequential:
        ch, groups, depth = self.channels, self.cfg.norm_groups, self.cfg.transformer_depth_middle
        assert depth is not None
        if depth == 0:  # SSD-1B, Segmind Vega: one res block (diffusers' UNetMidBlock2D)
            return TimestepEmbedSequential(ResBlock(ch, self.emb_dim, ch, groups))
        return TimestepEmbedSequential(ResBlock(ch, self.emb_dim, ch, groups), self.transformer(ch, depth),
                                       ResBlock(ch, self.emb_dim, ch, groups))


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        enc = Encoder(cfg)
        emb_dim = enc.emb_dim
        self.time_embed = enc.time_embed()
        if (label_emb := enc.label_emb()) is not None:
            self.label_emb = label_emb
        self.input_blocks = enc.input_blocks()
        self.adapter_points = tuple(enc.adapter_points)
        self.middle_block = enc.middle_block()
        skip_channels, ch, ds = list(enc.skip_channels), enc.channels, enc.ds
        transformer = enc.transformer

        self.output_blocks = nn.ModuleList()
        output_depths = iter(cfg.output_depths())
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            n = cfg.num_res_blocks[level] + 1
            for i in range(n):
                layers: list[nn.Module] = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                depth = next(output_depths)
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, depth))
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

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The time embedding, plus the vector y's for UNets with a vector input (SDXL)."""
        if (y is not None) != (self.config.adm_in_channels is not None):
            raise ValueError("y must be given exactly when the UNet has a vector input (adm_in_channels = "
                             f"{self.config.adm_in_channels})")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None,
                adapter: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Model output (eps or v, per the checkpoint) for latents x at timesteps t given text context and, for
        UNets with a vector input (SDXL), y (b, adm_in_channels). control: ControlNet residuals, one per input
        block then the middle block's (nn/controlnet.py), added to the skip connections and to the middle block's
        output as the original ControlledUnetModel does (diffusers: down_block_additional_residuals and
        mid_block_additional_residual). adapter: T2I-Adapter features (nn/t2i_adapter.py), one per level added to
        the output of input block `adapter_points[i]` (its skip connection too), and a surplus one to the middle
        block's output (SDXL's adapters; diffusers' down_intrablock_additional_residuals)."""
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control holds {len(control)} residuals; this UNet takes {len(self.input_blocks) + 1} "
                             "(one per input block and the middle block's)")
        emb = self.embed(x, timesteps, y)
        context = context.to(x.dtype)
        points = dict(zip(self.adapter_points, adapter or ()))
        if adapter is not None and not len(self.adapter_points) <= len(adapter) <= len(self.adapter_points) + 1:
            raise ValueError(f"adapter holds {len(adapter)} features; this UNet takes {len(self.adapter_points)} "
                             f"(one per level) or {len(self.adapter_points) + 1}")
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context)
            if i in points:
                h = h + points[i].to(h.dtype)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if adapter is not None and len(adapter) > len(self.adapter_points):
            h = h + adapter[-1].to(h.dtype)
        if control is not None:
            h = h + control[-1].to(h.dtype)
            skips = [s + c.to(s.dtype) for s, c in zip(skips, control)]
        for block in self.output_blocks:
            skip = skips.pop()
            # The next skip (if any) gives the size an upsampler in this block must reach.
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, size)
        return self.out(h)
