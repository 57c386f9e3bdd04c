"""`sdengine train lora`: a kohya-ss LoRA (optionally LoCon, optionally on the text encoder) on a frozen model.

Which layers, as kohya-ss' networks/lora.py chooses them: every Linear and 1x1 conv inside the UNet's attention
blocks (SpatialTransformer: proj_in/out, q/k/v/out, feed-forward) at --rank; with --conv-rank the 3x3 convs of the
res blocks, down- and upsamplers too (LoCon; the res blocks' linears and 1x1 shortcuts then at --rank, as kohya
does); with --text-encoder-lr the text encoder's attention and MLP linears. Each gets a down/up pair (up zero, so
training starts from the base model) whose output, times alpha / rank, is added to the layer's by a forward hook:
the base weights are never written during training. Leaves lora.safetensors in kohya's layout and names
(`{kohya_name}.lora_down.weight`, `.lora_up.weight`, `.alpha`, `ss_*` metadata), which sdengine's read_lora,
A1111/ComfyUI-style loaders and diffusers' load_lora_weights read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ...lora.targets import TEXT_PART, kohya_names, lora_targets
from ...model import StableDiffusion
from ...nn.attention import SpatialTransformer
from ...nn.unet import Downsample, ResBlock, Upsample
from ...weights.io import atomic_path, write_safetensors
from ..data import Source
from .unet import UNetStage

RESULT = "lora.safetensors"
BASE_VERSIONS = {"SD1": "sd_v1", "SD2": "sd_v2", "SDXL": "sdxl_base_v1-0"}  # kohya's ss_base_model_version


class LoraModule(nn.Module):
    """kohya's LoRAModule: down (Linear, or a conv of the base's kernel/stride/padding) then up (1x1), up zero."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, rank, bias=False)
            self.up: nn.Module = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise ValueError(f"no LoRA for a {type(base).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # in the checkpoint and the file, as kohya keeps it
        self.scale = alpha / rank
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.scale * self.multiplier)


class LoraNetwork(nn.Module):
    """The LoRA modules of one part (UNet or text encoder), by kohya name, hooked onto their base layers."""

    def __init__(self, layers: dict[str, tuple[nn.Module, int, float]]):
        super().__init__()
        self.loras = nn.ModuleDict({name: LoraModule(base, rank, alpha)
                                    for name, (base, rank, alpha) in layers.items()})
        self._bases = {name: base for name, (base, _, _) in layers.items()}  # not submodules: not saved, not trained
        self._hooks: list = []

    def attach(self) -> None:
        """Add each LoRA's output to its base layer's from now on (forward hooks; the base weights stay as they are)."""
        self.detach()
        for name, base in self._bases.items():
            lora = self.loras[name]
            self._hooks.append(base.register_forward_hook(lambda m, args, out, lora=lora: out + lora(args[0])))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras.values():
            lora.multiplier = multiplier

    def kohya_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, lora in self.loras.items():
            out[f"{name}.lora_down.weight"] = lora.down.weight.detach().float().cpu()
            out[f"{name}.lora_up.weight"] = lora.up.weight.detach().float().cpu()
            out[f"{name}.alpha"] = lora.alpha.detach().float().cpu()
        return out


def _module_paths(root: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    return [path for path, m in root.named_modules() if isinstance(m, kinds)]


def _inside(path: str, blocks: list[str]) -> bool:
    return any(path.startswith(block + ".") for block in blocks)


def unet_layers(model: StableDiffusion, rank: int, alpha: float, conv_rank: int = 0,
                conv_alpha: float = 1.0) -> dict[str, tuple[nn.Module, int, float]]:
    """kohya name -> (layer, rank, alpha) for the UNet, by kohya's rule (see the module docstring)."""
    names = kohya_names(model)
    attention = _module_paths(model.unet, (SpatialTransformer,))
    conv_blocks = _module_paths(model.unet, (ResBlock, Downsample, Upsample)) if conv_rank else []
    layers = {}
    for path, m in model.unet.named_modules():
        if not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        small = isinstance(m, nn.Linear) or m.kernel_size == (1, 1)
        in_conv_block = _inside(path, conv_blocks)
        if _inside(path, attention) or (in_conv_block and small):
            rank_alpha = (rank, alpha)
        elif in_conv_block:
            rank_alpha = (conv_rank, conv_alpha)
        else:
            continue
        layers[names[f"model.diffusion_model.{path}.weight"]] = (m, *rank_alpha)
    return layers


def text_layers(model: StableDiffusion, rank: int, alpha: float) -> dict[str, tuple[nn.Module, int, float]]:
    """kohya name -> (layer, rank, alpha): the attention and MLP linears of the text layers the UNet reads."""
    names = kohya_names(model)
    used = model.config.text.hidden_layers_used
    layers = {}
    for target in {t.key: t for t in lora_targets(model).values() if t.part == TEXT_PART}.values():
        if target.rows is not None:  # OpenCLIP's fused q/k/v: a hook cannot add to a third of one matmul
            raise ValueError("--text-encoder-lr: a text-encoder LoRA is for CLIP-layout text encoders (SD1); this "
                             "model's OpenCLIP encoder fuses q/k/v (train the UNet only: --text-encoder-lr 0)")
        name = names[target.key]
        layer = int(name.split("_encoder_layers_")[1].split("_")[0]) if "_encoder_layers_" in name else 0
        if layer < used:  # the layers after the one the UNet reads would get no gradient
            layers[name] = (target.module, rank, alpha)
    return layers


class LoraStage(UNetStage):
    """UNetStage's data and loss with the model frozen and LoRA modules hooked in; trains only those."""

    name = "lora"

    def __init__(self, model: StableDiffusion, source: Source | None, rank: int, alpha: float, conv_rank: int = 0,
                 conv_alpha: float | None = None, text_lr: float = 0.0, seed: int = 0, caption_dropout: float = 0.1,
                 init_name: str = "", **unet_options):
        super().__init__(model, source, seed=seed, caption_dropout=caption_dropout, **unet_options)
        model.requires_grad_(False)
        model.unet.eval()
        model.text_encoder.eval()
        conv_alpha = conv_rank if conv_alpha is None else conv_alpha
        self.options = {"rank": rank, "alpha": alpha, "conv_rank": conv_rank, "conv_alpha": conv_alpha,
                        "text_lr": text_lr, "init_name": init_name}
        self.unet_lora = LoraNetwork(unet_layers(model, rank, alpha, conv_rank, conv_alpha))
        self.text_lora = LoraNetwork(text_layers(model, rank, alpha)) if text_lr > 0 else None
        self.train_text = self.text_lora is not None  # batches carry ids; the loss runs the encoder with its LoRA
        self.module_lr = {"text_lora": text_lr} if self.text_lora is not None else {}
        self.trained_steps: int | None = None  # set by the command before export, for ss_steps
        for network in self.networks().values():
            network.attach()

    def networks(self) -> dict[str, LoraNetwork]:
        return {"unet_lora": self.unet_lora, **({"text_lora": self.text_lora} if self.text_lora else {})}

    def trainable(self) -> dict[str, nn.Module]:
        return dict(self.networks())

    def loss(self, batch, step: int):
        self.model.to(batch[0].device)  # the frozen model is not the trainer's to move (a no-op once there)
        return super().loss(batch, step)

    def kohya_state(self) -> dict[str, torch.Tensor]:
        return {k: v for network in self.networks().values() for k, v in network.kohya_state().items()}

    def metadata(self, steps: int | None = None) -> dict[str, str]:
        """kohya's `ss_*` training metadata, as far as it means something here (all values are strings)."""
        o = self.options
        args = {"conv_dim": str(o["conv_rank"]), "conv_alpha": str(o["conv_alpha"])} if o["conv_rank"] else {}
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(o["rank"]),
                "ss_network_alpha": str(float(o["alpha"])), "ss_network_args": json.dumps(args) if args else "",
                "ss_base_model_version": BASE_VERSIONS.get(self.model.config.family, "sd_v1"),
                "ss_v2": str(self.model.config.family == "SD2"), "ss_sd_model_name": o["init_name"],
                "ss_text_encoder_lr": str(o["text_lr"]), "ss_network_train_unet_only": str(self.text_lora is None),
                "ss_resolution": str((self.source.size, self.source.size)) if self.source is not None else "",
                "ss_seed": str(self.seed), "ss_caption_dropout_rate": str(self.caption_dropout),
                "ss_min_snr_gamma": str(self.snr_gamma), "sshs_model_hash": "", "sshs_legacy_hash": ""}
        if steps is not None:
            meta["ss_steps"] = str(steps)
        return {k: v for k, v in meta.items() if v != ""}

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        was = {name: m.training for name, m in modules.items()}
        super().samples({"unet": self.model.unet}, step, out)  # the hooks are on: the samples show the LoRA
        for name, m in modules.items():
            m.train(was[name])

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        write_lora(self.kohya_state(), out / RESULT, self.metadata(self.trained_steps))


def write_lora(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path, force=True) as tmp:
        write_safetensors(tensors, tmp, metadata)
