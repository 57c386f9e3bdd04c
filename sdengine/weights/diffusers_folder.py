"""diffusers folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/): configs and tensors, both ways.

Tensors are renamed through the one table in keys.py; the folder's config.json files become our frozen
configs and back. We write what diffusers' StableDiffusionPipeline.from_pretrained reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..diffusion.schedule import SD_SCHEDULE
from ..nn.unet import VECTOR_EMBED_DIM
from ..tokenizer import CLIPTokenizer
from .detect import UnknownArchitecture
from .io import CheckpointError, read_tensors, write_safetensors
from .keys import diffusers_text_layers, from_diffusers, text_parts, to_diffusers

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"),
    "text_encoder": ("model", "model.fp16", "pytorch_model", "pytorch_model.fp16"),
}
OPENCLIP_EXTRAS = "sdengine_openclip_extras.safetensors"  # what diffusers' CLIPTextModel has no place for
# SD's training schedule, as in the scheduler/ folder of the published SD1.x/SD2.x pipelines.
SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": SD_SCHEDULE.beta_start,
                    "beta_end": SD_SCHEDULE.beta_end, "beta_schedule": SD_SCHEDULE.beta_schedule,
                    "num_train_timesteps": SD_SCHEDULE.num_train_timesteps, "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": SD_SCHEDULE.steps_offset, "clip_sample": False,
                    "trained_betas": None}
# diffusers UNet features that change the architecture beyond SD1.x/SD2.x/SDXL (LCM-distilled, ...).
UNSUPPORTED_UNET = ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").exists() or (path / "unet").is_dir())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"diffusers folder is missing {path.parent.name}/{path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _read_part_tensors(folder: Path, part: str, kind: str | None = None, dtype: torch.dtype | None = None
                       ) -> dict[str, torch.Tensor]:
    """The weights in folder/part, a model of `kind` (default: part) as diffusers names its files; floating ones
    cast to dtype as they are read (None: as stored)."""
    d = folder / part
    if not d.is_dir():
        raise CheckpointError(f"diffusers folder {folder} is missing its {part}/ folder")
    for stem in WEIGHT_NAMES[kind or part]:
        for ext in (".safetensors", ".bin"):
            if (d / (stem + ext)).exists():
                return read_tensors(d / (stem + ext), dtype)[0]
        index = d / f"{stem}.safetensors.index.json"
        if index.exists():  # sharded weights
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(_read_json(index)["weight_map"].values())):
                tensors.update(read_tensors(d / shard, dtype)[0])
            return tensors
    raise CheckpointError(f"diffusers folder {folder}: no weights file in {part}/")


def _per_level(value: Any, levels: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def _uniform(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnknownArchitecture(f"unsupported UNet: {name} {value} differs within a down block")
        return value[0]
    return value


def unet_config_from_diffusers(c: dict[str, Any]) -> UNetConfig:
    for name in UNSUPPORTED_UNET:
        if c.get(name) is not None:
            raise UnknownArchitecture(f"unsupported UNet: its config sets {name}={c[name]!r} (not SD1.x/SD2.x/SDXL)")
    adm = None
    if c.get("addition_embed_type") is not None:  # SDXL: pooled text + Fourier-embedded time ids
        if c["addition_embed_type"] != "text_time" or c.get("addition_time_embed_dim") != VECTOR_EMBED_DIM:
            raise UnknownArchitecture(f"unsupported UNet: addition_embed_type={c['addition_embed_type']!r}, "
                                      f"addition_time_embed_dim={c.get('addition_time_embed_dim')!r} (SDXL: "
                                      f"'text_time', {VECTOR_EMBED_DIM})")
        adm = c["projection_class_embeddings_input_dim"]
    boc = list(c["block_out_channels"])
    levels = len(boc)
    mc = boc[0]
    attention = tuple(2 ** i for i, t in enumerate(c["down_block_types"]) if "CrossAttn" in t)
    heads = _per_level(c.get("num_attention_heads") or c.get("attention_head_dim", 8), levels)
    per_head = {ch // h for ch, h in zip(boc, heads)}
    if len(set(heads)) == 1:
        head_args = {"num_heads": heads[0], "num_head_channels": -1}
    elif len(per_head) == 1:
        head_args = {"num_heads": -1, "num_head_channels": per_head.pop()}
    else:
        raise UnknownArchitecture(f"unsupported attention head layout {heads} for channels {boc}")
    # per down block an int, or (SSD-1B) a list per layer, which must agree within the block
    depth = tuple(_uniform(d, "transformer_layers_per_block") for d in
                  _per_level(c.get("transformer_layers_per_block", 1), levels))
    res_blocks = _per_level(c.get("layers_per_block", 2), levels)
    output = None
    if (reverse := c.get("reverse_transformer_layers_per_block")) is not None:  # per up block: an int or per layer
        output = tuple(d for up, n in zip(reverse, reversed(res_blocks))
                       for d in (up if isinstance(up, (list, tuple)) else [up] * (n + 1)))
    mid_type = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise UnknownArchitecture(f"unsupported UNet: mid_block_type={mid_type!r} (SD's cross-attention middle "
                                  "block, or SSD-1B's single res block)")
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(b // mc for b in boc), num_res_blocks=res_blocks,
        attention_resolutions=attention, transformer_depth=depth, transformer_depth_output=output,
        transformer_depth_middle=depth[-1] if mid_type == "UNetMidBlock2DCrossAttn" else 0,
        adm_in_channels=adm, context_dim=c.get("cross_attention_dim", 768),
        use_linear_in_transformer=bool(c.get("use_linear_projection", False)),
        norm_groups=c.get("norm_num_groups", 32), **head_args)


def unet_config_to_diffusers(u: UNetConfig) -> dict[str, Any]:
    boc = [u.model_channels * m for m in u.channel_mult]
    attn = [2 ** i in u.attention_resolutions for i in range(len(boc))]
    # diffusers' middle block takes the last level's depth: a level without attention holds any value, so 1
    # there except the last, which carries the middle block's
    depth = [d if a else 1 for d, a in zip(u.transformer_depth, attn)]  # type: ignore[arg-type]
    middle = u.transformer_depth_middle  # 0: one res block, diffusers' UNetMidBlock2D, which takes no depth
    if middle and not attn[-1]:
        depth[-1] = middle
    elif middle and depth[-1] != middle:
        raise ValueError("diffusers cannot hold a middle-block transformer depth other than the last level's")
    pruned: dict[str, Any] = {}
    if u.transformer_depth_output is not None:  # per up block, a depth per layer (1 where there is no attention)
        out = iter(u.transformer_depth_output)
        pruned["reverse_transformer_layers_per_block"] = [
            [max(next(out), 1) for _ in range(n + 1)] for n in reversed(u.num_res_blocks)]
    vector = {} if u.adm_in_channels is None else {
        "addition_embed_type": "text_time", "addition_time_embed_dim": VECTOR_EMBED_DIM,
        "projection_class_embeddings_input_dim": u.adm_in_channels}
    return {**vector, **pruned,
        "_class_name": "UNet2DConditionModel", "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": boc, "layers_per_block": list(u.num_res_blocks),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if u.transformer_depth_middle else "UNetMidBlock2D",
        "cross_attention_dim": u.context_dim,
        "attention_head_dim": [u.heads_for(b)[0] for b in boc], "use_linear_projection": u.use_linear_in_transformer,
        "transformer_layers_per_block": depth, "norm_num_groups": u.norm_groups, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1,
        "center_input_sample": False, "mid_block_scale_factor": 1, "sample_size": 64,
    }


def vae_config_from_diffusers(c: dict[str, Any]) -> VAEConfig:
    boc = list(c["block_out_channels"])
    return VAEConfig(in_channels=c.get("in_channels", 3), out_ch=c.get("out_channels", 3), ch=boc[0],
                     ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.get("layers_per_block", 1),
                     z_channels=c.get("latent_channels", 4), embed_dim=c.get("latent_channels", 4),
                     norm_groups=c.get("norm_num_groups", 32), scaling_factor=c.get("scaling_factor", 0.18215))


def read_vae_folder(folder: Path) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """A diffusers AutoencoderKL folder (what its save_pretrained writes: config.json and the weights) ->
    (diffusers-named tensors, config)."""
    return _read_part_tensors(folder.parent, folder.name, "vae"), vae_config_from_diffusers(
        _read_json(folder / "config.json"))


def vae_config_from_tensors(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Config of a diffusers-named VAE state dict (a standalone VAE file without its config.json)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks.")})
    mults = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // ch for i in levels)
    blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
    z = sd["decoder.conv_in.weight"].shape[1]
    return VAEConfig(ch=ch, ch_mult=mults, num_res_blocks=blocks, z_channels=z, embed_dim=z,
                     in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0])


def vae_config_to_diffusers(v: VAEConfig) -> dict[str, Any]:
    n = len(v.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.out_ch,
            "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "latent_channels": v.z_channels, "norm_num_groups": v.norm_groups, "act_fn": "silu",
            "scaling_factor": v.scaling_factor, "sample_size": 512}


def text_config_from_diffusers(c: dict[str, Any], extra_layers: int, has_projection: bool,
                               sdxl: bool = False) -> TextConfig:
    """A text encoder's config.json -> TextConfig. sdxl: one of SDXL's encoders, read raw at the penultimate layer
    of the whole model; has_projection there: bigG (text_encoder_2, a CLIPTextModelWithProjection), whose projected
    pooled output SDXL uses."""
    act = c.get("hidden_act", "quick_gelu")
    openclip = act == "gelu"  # SD2's OpenCLIP tower; SD1's OpenAI CLIP uses quick_gelu
    if sdxl:
        projected = has_projection
        if projected and c.get("projection_dim", c["hidden_size"]) != c["hidden_size"]:
            raise UnknownArchitecture(f"unsupported text encoder: projection_dim {c['projection_dim']} is not its "
                                      f"width {c['hidden_size']}")
        return TextConfig(
            layout="openclip" if openclip else "clip", vocab_size=c["vocab_size"], width=c["hidden_size"],
            max_positions=c.get("max_position_embeddings", 77), layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"], mlp_width=c["intermediate_size"], activation=act, skip_last_layers=1,
            pad_with_eos=not openclip, eos_token_id=c.get("eos_token_id") or c["vocab_size"] - 1,
            has_projection=projected, final_norm=False, pooled_projection=projected)
    return TextConfig(
        layout="openclip" if openclip else "clip", vocab_size=c["vocab_size"], width=c["hidden_size"],
        max_positions=c.get("max_position_embeddings", 77), layers=c["num_hidden_layers"] + extra_layers,
        heads=c["num_attention_heads"], mlp_width=c["intermediate_size"], activation=act,
        skip_last_layers=extra_layers, pad_with_eos=not openclip,
        eos_token_id=c.get("eos_token_id") or c["vocab_size"] - 1, has_projection=has_projection)


def text_config_to_diffusers(t: TextConfig) -> dict[str, Any]:
    return {"architectures": ["CLIPTextModelWithProjection" if t.pooled_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": t.mlp_width, "num_hidden_layers": diffusers_text_layers(t),
            "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions, "hidden_act": t.activation,
            "layer_norm_eps": 1e-5, "projection_dim": t.width, "bos_token_id": t.eos_token_id - 1,
            "eos_token_id": t.eos_token_id, "pad_token_id": 1, "torch_dtype": "float32"}


def read_folder(folder: Path, dtype: torch.dtype | None = None
                ) -> tuple[dict[str, torch.Tensor], ModelConfig, tuple[CLIPTokenizer, ...]]:
    """A diffusers folder -> (original-keyed tensors, config, its tokenizers: one per text encoder, each read from
    the folder); dtype as in _read_part_tensors."""
    unet = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    if unet.adm_in_channels is not None:
        return _read_sdxl_folder(folder, unet, dtype)
    for part in PARTS:
        if not (folder / part).is_dir():
            raise CheckpointError(f"diffusers folder {folder} is missing its {part}/ folder")
    extras_path = folder / "text_encoder" / OPENCLIP_EXTRAS
    extras = read_tensors(extras_path, dtype)[0] if extras_path.exists() else {}
    extra_layers = len({k.split(".")[3] for k in extras if k.startswith("model.transformer.resblocks.")})
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    cfg = ModelConfig(
        unet=unet,
        vae=vae_config_from_diffusers(_read_json(folder / "vae" / "config.json")),
        text=text_config_from_diffusers(_read_json(folder / "text_encoder" / "config.json"), extra_layers,
                                        "model.text_projection" in extras),
        prediction="v" if scheduler.get("prediction_type") == "v_prediction" else "eps")
    parts = {p: _read_part_tensors(folder, p, dtype=dtype) for p in ("unet", "vae", "text_encoder")}
    parts["openclip_extras"] = extras
    parts["text_encoder"] = {k if k.startswith("text_model.") else "text_model." + k: v
                             for k, v in parts["text_encoder"].items()}
    tokenizer = CLIPTokenizer.from_dir(folder / "tokenizer")
    return from_diffusers(parts, cfg), cfg, (tokenizer,)


SDXL_TEXT_PARTS = ("text_encoder", "text_encoder_2")  # CLIP-L, bigG (the refiner: text_encoder_2 alone)


def _read_sdxl_folder(folder: Path, unet: UNetConfig, dtype: torch.dtype | None = None
                      ) -> tuple[dict[str, torch.Tensor], ModelConfig, tuple[CLIPTokenizer, ...]]:
    """A StableDiffusionXLPipeline (or the refiner's StableDiffusionXLImg2ImgPipeline) folder, each text encoder
    with the folder's own tokenizer (tokenizer_2/ of the published SDXL folders: CLIP's vocabulary padded with "!",
    id 0; a fine-tune may carry another vocabulary)."""
    texts = [p for p in SDXL_TEXT_PARTS if (folder / p).is_dir()]
    for part in ("vae", "scheduler", *[p.replace("text_encoder", "tokenizer") for p in texts]):
        if not (folder / part).is_dir():
            raise CheckpointError(f"diffusers folder {folder} is missing its {part}/ folder")
    if not texts:
        raise CheckpointError(f"diffusers folder {folder} has an SDXL UNet but no text_encoder/ or text_encoder_2/")
    configs = [text_config_from_diffusers(_read_json(folder / p / "config.json"), 0, p == "text_encoder_2",
                                          sdxl=True) for p in texts]
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    cfg = ModelConfig(unet=unet, vae=vae_config_from_diffusers(_read_json(folder / "vae" / "config.json")),
                      text=configs[0], text_2=configs[1] if len(configs) > 1 else None,
                      prediction="v" if scheduler.get("prediction_type") == "v_prediction" else "eps")
    parts = {p: _read_part_tensors(folder, p, "text_encoder" if p in texts else None, dtype)
             for p in ("unet", "vae", *texts)}
    tokenizers = tuple(CLIPTokenizer.from_dir(folder / p.replace("text_encoder", "tokenizer")) for p in texts)
    return from_diffusers(parts, cfg), cfg, tokenizers


def write_folder(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: CLIPTokenizer, folder: Path,
                 tokenizer_2: CLIPTokenizer | None = None) -> None:
    """Write an original-keyed state dict as a diffusers StableDiffusionPipeline folder (folder must exist)."""
    if cfg.conditioner:
        return _write_sdxl_folder(sd, cfg, [tokenizer] + ([tokenizer_2] if tokenizer_2 else []), folder)
    parts = to_diffusers(sd, cfg)
    model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
                   "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}
    configs = {"unet": unet_config_to_diffusers(cfg.unet), "vae": vae_config_to_diffusers(cfg.vae),
               "text_encoder": text_config_to_diffusers(cfg.text)}
    for part, config in configs.items():
        (folder / part).mkdir()
        (folder / part / "config.json").write_text(json.dumps(config, indent=2))
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        write_safetensors(parts[part], folder / part / name, metadata={"format": "pt"})
    if parts["openclip_extras"]:
        write_safetensors(parts["openclip_extras"], folder / "text_encoder" / OPENCLIP_EXTRAS)
    (folder / "scheduler").mkdir()
    scheduler = dict(SCHEDULER_CONFIG, prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    tokenizer.save(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _write_sdxl_folder(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokenizers: list[CLIPTokenizer],
                       folder: Path) -> None:
    """SDXL as diffusers' StableDiffusionXLPipeline (the refiner: StableDiffusionXLImg2ImgPipeline) writes it."""
    parts = to_diffusers(sd, cfg)
    texts = list(text_parts(cfg))
    refiner = "text_encoder" not in texts
    model_index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1", "feature_extractor": [None, None], "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": not refiner, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None], "tokenizer": [None, None]}
    if refiner:
        model_index["requires_aesthetics_score"] = True
    configs = {"unet": unet_config_to_diffusers(cfg.unet), "vae": vae_config_to_diffusers(cfg.vae)}
    for part, (_, text) in text_parts(cfg).items():
        configs[part] = text_config_to_diffusers(text)
        model_index[part] = ["transformers", text_config_to_diffusers(text)["architectures"][0]]
        model_index[part.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    for part, config in configs.items():
        (folder / part).mkdir()
        (folder / part / "config.json").write_text(json.dumps(config, indent=2))
        name = "model.safetensors" if part in texts else "diffusion_pytorch_model.safetensors"
        write_safetensors(parts[part], folder / part / name, metadata={"format": "pt"})
    for part, tokenizer in zip(texts, tokenizers):
        tokenizer.save(folder / part.replace("text_encoder", "tokenizer"))
    (folder / "scheduler").mkdir()
    scheduler = dict(SCHEDULER_CONFIG, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                     timestep_spacing="leading", use_karras_sigmas=False,
                     prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")
    for key in ("set_alpha_to_one", "skip_prk_steps", "clip_sample"):
        scheduler.pop(key)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
