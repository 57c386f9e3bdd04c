"""IP-Adapter's modules (Ye et al. 2023, tencent-ailab/IP-Adapter), under the published files' key names: the image
projection (`image_proj.*`: ImageProjModel, the "plus" Resampler or the "full face" MLP) and the decoupled
cross-attention's key/value maps (`ip_adapter.N.to_k_ip.weight`, N counting diffusers' attention processors: the
cross-attention layers are the odd ones, in diffusers' attn_processors order: down blocks, up blocks, middle).

Decoupled cross-attention: each cross-attention layer adds scale * softmax(q k_ipᵀ/√d) v_ip over the image tokens to
its attention over the text (before to_out), as diffusers' IPAdapterAttnProcessor2_0. The UNet is patched for one
call at a time (IPAdapter.attached) and left exactly as it was afterwards.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .attention import BasicTransformerBlock, CrossAttention, attention

HEAD_DIM = 64  # the Resampler's head width (the published files' and diffusers' converter's rule)


@dataclass(frozen=True)
class IPAdapterConfig:
    """kind: "plain" (ImageProjModel over the image embedding), "plus" (Resampler over the image encoder's
    penultimate hidden states) or "full" (MLP over them: "full face"). image_dim: the projection's input width (the
    encoder's projection_dim for plain, its width otherwise); cross_dim: the UNet's context width; tokens: image
    tokens per image for plain and plus; attn_dims: each cross-attention layer's width, in the files' order."""

    kind: Literal["plain", "plus", "full"]
    image_dim: int
    cross_dim: int
    attn_dims: tuple[int, ...]
    tokens: int = 4
    hidden_dim: int = 0  # plus: the Resampler's width, depth, heads and feed-forward ratio
    depth: int = 0
    heads: int = 0
    ff_mult: int = 4

    @property
    def penultimate(self) -> bool:
        """Whether the projection reads the encoder's penultimate hidden states (else its image embedding)."""
        return self.kind != "plain"


class ImageProjModel(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.image_dim, cfg.tokens * cfg.cross_dim)
        self.norm = nn.LayerNorm(cfg.cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class MLPProjModel(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        d = cfg.image_dim
        self.proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.cross_dim), nn.LayerNorm(cfg.cross_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and themselves."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        inner = heads * HEAD_DIM
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        b = q.shape[0]
        q, k, v = (t.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        return self.to_out(attention(q, k, v).transpose(1, 2).reshape(b, -1, self.heads * HEAD_DIM))


class Resampler(nn.Module):
    """The "plus" projection: learned latent queries through perceiver layers over the image features."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.latents = nn.Parameter(torch.zeros(1, cfg.tokens, dim))
        self.proj_in = nn.Linear(cfg.image_dim, dim)
        self.proj_out = nn.Linear(dim, cfg.cross_dim)
        self.norm_out = nn.LayerNorm(cfg.cross_dim)
        inner = dim * cfg.ff_mult
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, cfg.heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                          nn.Linear(inner, dim, bias=False))]) for _ in range(cfg.depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPAttention(nn.Module):
    """One cross-attention layer's image key/value maps."""

    def __init__(self, cross_dim: int, dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor, scale: float, q: torch.Tensor) -> torch.Tensor:
        """scale x attention of q (b, heads, n, d) over the image tokens (b, m, cross_dim)."""
        b, heads, _, d = q.shape
        k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (self.to_k_ip(tokens), self.to_v_ip(tokens)))
        return scale * attention(q, k, v)


PROJECTIONS: dict[str, type[nn.Module]] = {"plain": ImageProjModel, "plus": Resampler, "full": MLPProjModel}


def unwrap(unet: nn.Module) -> nn.Module:
    """The UNetModel inside a wrapper (DeepCache's)."""
    while not hasattr(unet, "input_blocks") and isinstance(getattr(unet, "unet", None), nn.Module):
        unet = unet.unet
    return unet


def cross_attentions(unet: nn.Module) -> list[CrossAttention]:
    """A UNet's cross-attention layers in diffusers' attn_processors order (down blocks, up blocks, middle block):
    the order IP-Adapter files number them in."""
    unet = unwrap(unet)
    parts = (unet.input_blocks, unet.output_blocks, unet.middle_block)
    return [m.attn2 for part in parts for m in part.modules() if isinstance(m, BasicTransformerBlock)]


class IPAdapter(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.config = cfg
        self.image_proj = PROJECTIONS[cfg.kind](cfg)
        # keys "1", "3", ...: the odd attention processors (the even ones, self-attention, hold no weights)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): IPAttention(cfg.cross_dim, dim)
                                         for i, dim in enumerate(cfg.attn_dims)})

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Image embeddings (n, image_dim) or penultimate hidden states (n, positions, image_dim) of n images ->
        their tokens, concatenated (1, n x tokens, cross_dim): diffusers' list of images for one adapter."""
        tokens = self.image_proj(features.to(next(self.parameters()).dtype))
        return tokens.reshape(1, -1, tokens.shape[-1])

    @contextlib.contextmanager
    def attached(self, unet: nn.Module, tokens: torch.Tensor, scale: float) -> Iterator[None]:
        """The UNet's cross-attention layers each add `scale` x their attention over `tokens` (b, m, cross_dim),
        for the duration; restored exactly on exit (several adapters nest). Scale 0: nothing is attached (as
        diffusers skips the layer). A UNet whose forward is compiled or replays CUDA graphs runs its plain forward
        meanwhile."""
        layers = cross_attentions(unet)
        if len(layers) != len(self.ip_adapter):
            raise ValueError(f"the IP-Adapter has {len(self.ip_adapter)} cross-attention layers; the UNet has "
                             f"{len(layers)}")
        if scale == 0:
            yield
            return
        saved = [(layer, layer.__dict__.get("extra")) for layer in layers]
        base = unwrap(unet)
        # A forward replaced by CUDA graphs (cuda_graphs.GraphedForward: a replayed graph would leave the term out)
        # or by torch.compile (compile.py: frozen, and re-traced at every new term): the plain one runs meanwhile
        replaced = base.__dict__.get("forward")
        plain = replaced
        while hasattr(plain, "fn") or hasattr(plain, "_torchdynamo_orig_callable"):
            plain = getattr(plain, "fn", None) or plain._torchdynamo_orig_callable  # type: ignore[union-attr]
        try:
            if plain is not replaced:
                base.forward = plain
            for layer, kv in zip(layers, self.ip_adapter.values()):
                layer.extra = (*layer.extra, functools.partial(kv, tokens, scale))
            yield
        finally:
            if plain is not replaced:
                base.forward = replaced
            for layer, before in saved:
                if before is None:
                    layer.__dict__.pop("extra", None)  # back to the class's empty default
                else:
                    layer.extra = before
