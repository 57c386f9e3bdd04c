"""Text encoders: SD1's CLIP ViT-L/14 text model and SD2's OpenCLIP ViT-H text tower (SDXL: both kinds, CLIP-L and
OpenCLIP bigG, read raw at the penultimate layer, bigG's pooled output projected).

Both are the same causal pre-norm transformer; they differ in parameter layout (and so in checkpoint keys),
activation, and which layer SD reads. Each is wrapped so that its module paths equal the original keys under
`cond_stage_model.`: `transformer.text_model.*` (SD1) and `model.*` (SD2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation_fn(name: str):
    return quick_gelu if name == "quick_gelu" else F.gelu


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = True
                     ) -> torch.Tensor:
    b, n, c = q.shape
    q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, c)


# Textual inversion: (row, position, vectors (n, width)) -- the token embeddings of row `row` from `position` on
# are replaced by the vectors (the prompt holds n placeholder ids there), before positions are added, as A1111's
# EmbeddingsWithFixes does.
Fixes = list[tuple[int, int, torch.Tensor]]


def apply_fixes(x: torch.Tensor, fixes: Fixes | None) -> torch.Tensor:
    if not fixes:
        return x
    x = x.clone()  # a slice assignment on a copy keeps the vectors in the autograd graph (embedding training)
    for row, pos, vectors in fixes:
        if pos + vectors.shape[0] > x.shape[1]:
            raise ValueError(f"{vectors.shape[0]} embedding vectors at position {pos} overrun {x.shape[1]} tokens")
        x[row, pos:pos + vectors.shape[0]] = vectors.to(device=x.device, dtype=x.dtype)
    return x


class TextEncoderBase(nn.Module):
    """Shared forward logic: embeddings -> layers -> final layer norm, stopping at the layer SD reads."""

    config: TextConfig

    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def positions(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, fixes: Fixes | None = None) -> torch.Tensor:
        """Token embeddings (with any textual inversion vectors in place) plus position embeddings."""
        return apply_fixes(self.token_embedding()(ids), fixes) + self.positions(ids.shape[1])

    def layer_list(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(self, ids: torch.Tensor, upto: int | None = None, fixes: Fixes | None = None
                      ) -> list[torch.Tensor]:
        """[embeddings, after layer 1, ..., after layer `upto`] (all layers by default), without the final norm."""
        layers = self.layer_list()
        upto = len(layers) if upto is None else upto
        x = self.embed(ids, fixes)
        states = [x]
        for layer in layers[:upto]:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, fixes: Fixes | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (b, n) -> (context (b, n, width), pooled (b, width or projection width)).

        clip_skip=1 gives the layer this model's SD conditions on; 2 the one before it (A1111's "Clip skip")...
        The final layer norm is applied to the chosen layer, as SD1/SD2 and A1111 do (SDXL: not, config.final_norm).
        pooled: the context's end token; with config.pooled_projection (SDXL's bigG) the last layer's, normed and
        projected, as diffusers' text_embeds. fixes: textual inversion vectors to put in place (apply_fixes).
        """
        cfg = self.config
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        index = cfg.hidden_layers_used - (clip_skip - 1)
        if index < 1:
            raise ValueError(f"clip_skip {clip_skip} exceeds the {cfg.hidden_layers_used} layers in use")
        states = self.hidden_states(ids, upto=None if cfg.pooled_projection else index, fixes=fixes)
        hidden = self.final_norm(states[index]) if cfg.final_norm else states[index]
        eos = (ids == cfg.eos_token_id).int().argmax(dim=-1)  # first end token of each row
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if cfg.pooled_projection:
            return hidden, self.final_norm(states[-1])[rows, eos] @ self.projection()
        return hidden, hidden[rows, eos]

    def projection(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no text projection")


# --- SD1: CLIP text model in the transformers layout -------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.act = activation_fn(activation)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-norm layer; the image tower (nn/clip_vision.py, a VisionConfig of the same field names) attends
    without the causal mask."""

    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_width, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class _TransformerHolder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class CLIPTextEncoder(TextEncoderBase):
    """SD1's text encoder; keys `transformer.text_model.*` under `cond_stage_model.`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.transformer = _TransformerHolder(cfg)

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def positions(self, n: int) -> torch.Tensor:
        return self.transformer.text_model.embeddings.position_embedding.weight[:n]

    def layer_list(self) -> nn.ModuleList:
        return self.transformer.text_model.encoder.layers

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.text_model.final_layer_norm(x)


# --- SD2: OpenCLIP text tower --------------------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """Parameters named as torch.nn.MultiheadAttention's, which OpenCLIP checkpoints use."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = activation_fn(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenCLIPMLP(cfg.width, cfg.mlp_width, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextTower(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.has_projection:  # CLIP's contrastive head; SD1/SD2 do not use it, checkpoints carry it
            self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.width))
            if not cfg.pooled_projection:  # SDXL files may carry one too: dropped on load (keys.IGNORED_KEYS)
                self.logit_scale = nn.Parameter(torch.tensor(0.0))


class OpenCLIPTextEncoder(TextEncoderBase):
    """SD2's text encoder; keys `model.*` under `cond_stage_model.`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = OpenCLIPTextTower(cfg)

    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def positions(self, n: int) -> torch.Tensor:
        return self.model.positional_embedding[:n]

    def layer_list(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ln_final(x)

    def projection(self) -> torch.Tensor:
        return self.model.text_projection


def build_text_encoder(cfg: TextConfig) -> TextEncoderBase:
    return CLIPTextEncoder(cfg) if cfg.layout == "clip" else OpenCLIPTextEncoder(cfg)
