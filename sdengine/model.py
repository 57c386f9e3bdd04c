"""StableDiffusion: the three networks under the original checkpoint's top-level names.

`StableDiffusion(cfg).state_dict()` has exactly the keys of an original single-file checkpoint
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`; SDXL: `conditioner.embedders.N.*` in place
of `cond_stage_model.*`, as Stability's generative-models holds them), so those files load with strict=True.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ModelConfig
from .nn.clip import TextEncoderBase, build_text_encoder
from .nn.unet import UNetModel
from .nn.vae import AutoencoderKL
from .tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from .embeddings import Embedding


class _DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class Conditioner(nn.Module):
    """SDXL's text encoders in generative-models' order: `embedders.0` CLIP-L and `embedders.1` OpenCLIP bigG (the
    refiner: bigG alone). The size/crop/aesthetic embedders hold no weights (nn.unet.sdxl_vector)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedders = nn.ModuleList(build_text_encoder(t) for t in cfg.text_encoders)


class StableDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: CLIPTokenizer | None = None,
                 tokenizer_2: CLIPTokenizer | None = None):
        super().__init__()
        self.config = cfg
        self.model = _DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.conditioner:
            self.conditioner = Conditioner(cfg)
        else:
            self.cond_stage_model = build_text_encoder(cfg.text)
        self.tokenizer = tokenizer or CLIPTokenizer.default(pad_with_eos=cfg.text.pad_with_eos)
        # the second encoder's (SDXL's bigG pads with 0 where CLIP-L pads with the end token)
        self.tokenizer_2 = None if cfg.text_2 is None else (
            tokenizer_2 or CLIPTokenizer.default(pad_with_eos=cfg.text_2.pad_with_eos))
        self.source: str | None = None  # the path it was loaded from, for display
        # textual inversion embeddings its prompts may name (sdengine/embeddings.py), by name; plain data, not
        # modules: they stay out of state_dict() and follow no .to()
        self.embeddings: dict[str, Embedding] = {}

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> StableDiffusion:
        """Fresh weights for training from scratch: PyTorch's defaults, with the layers the original
        initialises to zero (UNet output, res-block and transformer output projections) zeroed, so every block
        starts as an identity, and text embeddings drawn as CLIP draws them."""
        torch.manual_seed(seed)
        for module in self.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        unet = self.unet
        zeroed = [unet.out[2]] + [m.out_layers[3] for m in unet.modules() if hasattr(m, "out_layers")]
        zeroed += [m.proj_out for m in unet.modules() if hasattr(m, "transformer_blocks")]
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()
        for name, p in (p for encoder in self.text_encoders for p in encoder.named_parameters()):
            if "token_embedding" in name:
                p.normal_(0, 0.02)
            elif "position" in name:
                p.normal_(0, 0.01)
            elif name.endswith("in_proj_weight"):
                torch.nn.init.xavier_uniform_(p)
            elif name.endswith("text_projection"):
                p.normal_(0, self.config.text.width ** -0.5)
        return self

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoderBase:
        """The (first) text encoder."""
        return self.text_encoders[0]

    @property
    def text_encoders(self) -> list[TextEncoderBase]:
        """Every text encoder, in order (SDXL: CLIP-L, bigG), each read with its tokenizer in `tokenizers`."""
        if self.config.conditioner:
            return list(self.conditioner.embedders)  # type: ignore[arg-type]
        return [self.cond_stage_model]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer] if self.tokenizer_2 is None else [self.tokenizer, self.tokenizer_2]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def parameter_counts(self) -> dict[str, int]:
        parts = [("unet", self.unet), ("vae", self.vae)] + [
            ("text_encoder" + (f"_{i + 1}" if i else ""), encoder) for i, encoder in enumerate(self.text_encoders)]
        return {name: sum(p.numel() for p in part.parameters()) for name, part in parts}

    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """Prompts -> text context (b, 77 * chunks, width) for the UNet, read with A1111's prompt syntax
        (sdengine/prompts.py); a plain prompt of at most 75 tokens is one 77-token window, as diffusers encodes it."""
        from .prompts import encode_prompts

        return encode_prompts(self, [prompts] if isinstance(prompts, str) else list(prompts), clip_skip)
