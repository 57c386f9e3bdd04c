"""Attention blocks of the UNet: CrossAttention, GEGLU feed-forward, SpatialTransformer.

Attribute names follow the original (CompVis ldm.modules.attention) so checkpoint keys load with strict=True.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as the original does, so half-precision runs keep their statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.weight is not None and \
                self.weight.dtype == torch.bfloat16:
            # PyTorch's CPU kernel computes bf16 statistics and output in float32 itself: the same values (a rare
            # last-bit rounding apart) without the float copies, measured 5x (a 512² VAE map) to 20x (a 64² UNet
            # map) faster. Mixed runs (bf16 autocast over fp32 weights) keep the path below.
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=eps)


# Query chunks are sized so that one chunk's score matrix (batch x heads x rows x keys) stays under this many
# elements (256 MiB in fp32), should the kernel that runs materialise it.
MAX_SCORES = 1 << 26


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over (b, heads, tokens, d), in memory that does not grow with tokens².

    PyTorch's fused kernels (flash / memory-efficient, CPU and CUDA) never build the tokens x tokens matrix, but
    they need a contiguous last dimension: q/k/v taken as a transposed view of a (b, c, pixels) map fall back to
    the math kernel, which does (the VAE's mid-block attention of a 1024² decode of the shipped model, 65536
    pixels: 16 GiB, and the process was killed). So q/k/v are made contiguous, and away from CUDA, whose fused
    kernels are always there, long sequences are attended MAX_SCORES at a time in query chunks: each query row's
    softmax is over all keys either way, so the chunks give the same result (up to float rounding)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, heads, n, _ = q.shape
    per_row = b * heads * k.shape[-2]
    if q.device.type == "cuda" or is_causal or n * per_row <= MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    rows = max(1, MAX_SCORES // per_row)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v) for i in range(0, n, rows)], dim=2)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    # Decoupled cross-attention (IP-Adapter, nn/ip_adapter.py): callables q (b, heads, n, d) -> a term added to
    # the attention's output before to_out; set by an adapter for one UNet call and removed after it
    extra: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (b, tokens, heads*d) -> (b, heads, tokens, d)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v)
        for term in self.extra:
            out = out + term(q)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features (b, c, h, w) attend to themselves and to the text context, as a residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalization(channels, groups, eps=1e-6)
        # SD1 projects with 1x1 convolutions, SD2 with linears: the same map, stored with different shapes.
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
