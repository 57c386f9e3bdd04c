"""Frozen configs for the three networks of Stable Diffusion, with the original (CompVis) parameter names.

The presets describe the published models, the model sdengine ships (`shapes`) and small layouts for tests;
`sdengine.weights.detect` builds a ModelConfig from a checkpoint's tensor shapes and key set, so variants with
fewer blocks load without a preset of their own.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    # Res blocks per level on the way down; the way up has one more per level (as in the original UNetModel).
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    # Downsampling factors (1, 2, 4, ...) at which blocks get a SpatialTransformer.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # Transformer blocks in each SpatialTransformer, per level (generative-models' parameter: an int is every
    # level's; SDXL: (0, 2, 10)); the middle block's defaults to the last level's, as in the original.
    transformer_depth: int | tuple[int, ...] = 1
    # 0: the middle block is one res block, no transformer (SSD-1B, Segmind Vega; diffusers' UNetMidBlock2D)
    transformer_depth_middle: int | None = None
    # Transformer blocks of each output block in the original's order (output_blocks.0 first): pruned SDXL UNets
    # keep different depths within a level (SSD-1B: 4, 4, 10 then 2, 1, 1; ComfyUI's transformer_depth_output,
    # diffusers' reverse_transformer_layers_per_block). None: each block its level's transformer_depth.
    transformer_depth_output: tuple[int, ...] | None = None
    context_dim: int = 768
    num_heads: int = 8  # used when num_head_channels == -1 (SD1: 8 heads at every level)
    num_head_channels: int = -1  # SD2: 64 channels per head
    use_linear_in_transformer: bool = False
    norm_groups: int = 32
    # Width of the "vector" conditioning y (SDXL: pooled text + Fourier-embedded size/crop/aesthetic values), added
    # to the time embedding through label_emb (the original's num_classes="sequential"); None: no y (SD1/SD2).
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        # Sets, really: one order so that configs compare equal however they were written.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(self.attention_resolutions)))
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        depth = self.transformer_depth
        depth = (depth,) * len(self.channel_mult) if isinstance(depth, int) else tuple(depth)
        if len(depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level (or one int)")
        if self.transformer_depth_middle is None:
            object.__setattr__(self, "transformer_depth_middle", depth[-1])
        # A level without attention has no transformer: depth 0 there (as SDXL's own config writes it), so that
        # configs compare equal however they were written.
        depth = tuple(d if 2 ** level in self.attention_resolutions else 0 for level, d in enumerate(depth))
        if any(d < 1 for level, d in enumerate(depth) if 2 ** level in self.attention_resolutions):
            raise ValueError(f"transformer_depth {depth} has no blocks at a level with attention "
                             f"(attention_resolutions {self.attention_resolutions})")
        object.__setattr__(self, "transformer_depth", depth)
        if self.transformer_depth_middle is not None and self.transformer_depth_middle < 0:
            raise ValueError(f"transformer_depth_middle must be >= 0, got {self.transformer_depth_middle}")
        if self.transformer_depth_output is not None:
            out, levels = tuple(self.transformer_depth_output), self._output_levels()
            if len(out) != len(levels):
                raise ValueError(f"transformer_depth_output needs one entry per output block ({len(levels)}), got "
                                 f"{len(out)}")
            out = tuple(d if 2 ** level in self.attention_resolutions else 0 for level, d in zip(levels, out))
            if any(d < 1 for level, d in zip(levels, out) if 2 ** level in self.attention_resolutions):
                raise ValueError(f"transformer_depth_output {out} has no blocks where there is attention")
            # the uniform case is written one way (None), so that configs compare equal however they were written
            object.__setattr__(self, "transformer_depth_output", None if out == self._uniform_output_depths() else out)
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")

    def _output_levels(self) -> list[int]:
        """The level of each output block, in order (the deepest level's first)."""
        return [level for level in reversed(range(len(self.channel_mult)))
                for _ in range(self.num_res_blocks[level] + 1)]

    def _uniform_output_depths(self) -> tuple[int, ...]:
        depth = self.transformer_depth
        assert isinstance(depth, tuple)
        return tuple(depth[level] for level in self._output_levels())

    def output_depths(self) -> tuple[int, ...]:
        """Transformer blocks of each output block (0 where there is no attention)."""
        return self.transformer_depth_output or self._uniform_output_depths()

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a transformer with `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    # "clip": SD1's CLIP ViT-L/14 text model (transformers layout, cond_stage_model.transformer.text_model.*)
    # "openclip": SD2's OpenCLIP ViT-H text tower (cond_stage_model.model.*)
    layout: Literal["clip", "openclip"] = "clip"
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # SD2 conditions on the penultimate layer of the OpenCLIP tower (the original's layer="penultimate");
    # this counts the trailing layers the model skips by default. A user's clip_skip adds to it.
    skip_last_layers: int = 0
    pad_with_eos: bool = True  # SD1's tokenizer pads with the end token; SD2's with 0
    eos_token_id: int = 49407
    has_projection: bool = False  # OpenCLIP's text_projection / logit_scale present in the checkpoint
    # SD1/SD2 apply the final layer norm to the layer they read; SDXL's encoders read it raw (hidden_states[-2]).
    final_norm: bool = True
    # SDXL's bigG: the pooled output is the last layer's final-layer-normed end token through text_projection
    # (whatever layer the context comes from); the tower then carries no logit_scale.
    pooled_projection: bool = False

    @property
    def hidden_layers_used(self) -> int:
        return self.layers - self.skip_last_layers


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # SDXL's second text encoder (bigG beside CLIP-L; the refiner has bigG alone, as `text`)
    text_2: TextConfig | None = None
    prediction: Prediction = "eps"
    # The image size (pixels) the model was trained at, when known (our trained models record it); generation
    # defaults to it. None: 512, as A1111 does for any SD checkpoint (SDXL: 1024, its training size).
    sample_size: int | None = None

    @property
    def conditioner(self) -> bool:
        """SDXL's layout: text encoders under `conditioner.embedders.N.` and a vector input to the UNet."""
        return self.unet.adm_in_channels is not None

    @property
    def text_encoders(self) -> tuple[TextConfig, ...]:
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def image_size(self) -> int:
        return self.sample_size or (1024 if self.conditioner else 512)

    @property
    def family(self) -> str:
        """A short name for the architecture: sd1, sd1-inpaint, sd2, sd2-v, sd2-inpaint, sdxl, sdxl-inpaint,
        sdxl-refiner, or custom-*."""
        u = self.unet
        if self.conditioner:  # SDXL's layout, at any size: two text encoders, or bigG alone (the refiner)
            base = "sdxl" if self.text_2 is not None else "sdxl-refiner"
        elif u.context_dim == 768 and u.model_channels == 320 and self.text.layout == "clip":
            base = "sd1"
        elif u.context_dim == 1024 and u.model_channels == 320 and self.text.layout == "openclip":
            base = "sd2"
        else:
            base = "custom"
        if u.in_channels == 9:
            return f"{base}-inpaint"
        if self.prediction == "v":
            return f"{base}-v"
        return base

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        return ModelConfig(
            unet=from_fields(UNetConfig, d.get("unet", {})),
            vae=from_fields(VAEConfig, d.get("vae", {})),
            text=from_fields(TextConfig, d.get("text", {})),
            text_2=None if d.get("text_2") is None else from_fields(TextConfig, d["text_2"]),
            prediction=d.get("prediction", "eps"),
            sample_size=d.get("sample_size"),
        )


def from_fields(cls: type, values: dict[str, Any]) -> Any:
    """A network config from its fields as JSON holds them (lists for tuples); unknown fields are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


SD15 = ModelConfig()
SD21 = ModelConfig(
    unet=UNetConfig(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True),
    text=TextConfig(layout="openclip", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
                    skip_last_layers=1, pad_with_eos=False, has_projection=True),
    prediction="v",
)
SD21_BASE = dataclasses.replace(SD21, prediction="eps")
# A small model with SD's layout (f=8 VAE, cross-attention UNet, CLIP text model), for tests and experiments.
TINY = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), attention_resolutions=(1, 2),
                    context_dim=64, num_heads=-1, num_head_channels=32, use_linear_in_transformer=True),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    text=TextConfig(width=64, layers=2, heads=2, mlp_width=256),
)
# The shipped model's architecture (sdengine/models/default), sized for the shapes world on a CPU: 64x64 images,
# f=4 latents (16x16x4). Its own BPE vocabulary replaces CLIP's when `sdengine train text` builds it.
SHAPES = ModelConfig(
    # 9.0 M parameters, so the whole fp16 model stays under 30 MB: one res block per level, cross-attention at
    # 16x16 and 8x8 (where colour-shape bindings and positions are decided) and in the middle block; at 4x4 a 3x3
    # convolution already sees the whole latent.
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=(1, 1, 1), attention_resolutions=(1, 2),
                    context_dim=256, num_heads=-1, num_head_channels=32, use_linear_in_transformer=True),
    # 48 channels at full resolution: with 16, and still with 32, the points of small stars and the arms of small
    # crosses were lost (they came back as circles and diamonds, failing the checker). 2.1 M parameters.
    vae=VAEConfig(ch=48, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=16),
    text=TextConfig(width=256, layers=4, heads=4, mlp_width=1024),
    sample_size=64,
)
# SHAPES' layout at test size (f=2 VAE, one text layer): `sdengine train --arch shapes-tiny` runs in seconds.
SHAPES_TINY = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), attention_resolutions=(2,),
                    context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),
    vae=VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1),
    text=TextConfig(width=32, layers=1, heads=2, mlp_width=64),
    sample_size=32,
)
# SDXL (Stability's generative-models sd_xl_base.yaml / sd_xl_refiner.yaml): CLIP ViT-L and OpenCLIP ViT-bigG, both
# read raw at the penultimate layer; bigG's pooled output, projected, goes into the UNet's vector input.
SDXL_CLIP_L = dataclasses.replace(SD15.text, skip_last_layers=1, final_norm=False)
SDXL_BIG_G = TextConfig(layout="openclip", width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu",
                        skip_last_layers=1, pad_with_eos=False, has_projection=True, final_norm=False,
                        pooled_projection=True)
SDXL = ModelConfig(
    unet=UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), attention_resolutions=(4, 2),
                    transformer_depth=(0, 2, 10), context_dim=2048, num_heads=-1, num_head_channels=64,
                    use_linear_in_transformer=True, adm_in_channels=2816),
    vae=VAEConfig(scaling_factor=0.13025),
    text=SDXL_CLIP_L, text_2=SDXL_BIG_G,
    sample_size=1024,
)
SDXL_REFINER = ModelConfig(
    unet=UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
                    attention_resolutions=(4, 2), transformer_depth=4, context_dim=1280, num_heads=-1,
                    num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2560),
    vae=VAEConfig(scaling_factor=0.13025),
    text=SDXL_BIG_G,
    sample_size=1024,
)
PRESETS: dict[str, ModelConfig] = {"sdxl": SDXL, "sdxl-refiner": SDXL_REFINER, "sd15": SD15,
                                   "sd21": SD21, "sd21-base": SD21_BASE, "tiny": TINY, "shapes": SHAPES,
                                   "shapes-tiny": SHAPES_TINY}
