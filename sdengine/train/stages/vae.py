"""`sdengine train vae`: the KL autoencoder. L1 reconstruction weighted up on foreground pixels (objects, not the
background that fills most of the image) + KL to N(0, I). Leaves vae.safetensors, a VAE part file with its latent
scaling factor; a decoder-only fine-tune of a whole model's VAE also leaves that model, its UNet untouched."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...config import VAEConfig
from ...images import images_to_tensor, tensor_to_images
from ...model import StableDiffusion
from ...nn.vae import AutoencoderKL
from ...weights.io import read_tensors
from ...weights.keys import TEXT, UNET
from ...weights.parts import part_from_tensors, write_part
from ..data import Source, batch_items
from ..draws import BatchDraws, Draw
from ..plots import image_grid

RESULT = "vae.safetensors"


class VAEStage:
    name = "vae"

    def __init__(self, cfg: VAEConfig, source: Source, seed: int = 0, fg_weight: float = 10.0,
                 kl_weight: float = 1e-6, init: AutoencoderKL | None = None, decoder_only: bool = False,
                 model: StableDiffusion | None = None):
        """init: start from these weights instead of fresh ones. decoder_only: train the decoder alone, the
        encoder and so the latent space fixed, as SD's ft-EMA/ft-MSE VAEs were made: every UNet trained on the
        old latents works with the new decoder. model: the whole checkpoint `init` is the VAE of; export then
        writes it again with the new decoder."""
        if decoder_only and init is None:
            raise ValueError("--decoder-only fine-tunes a trained VAE: give it with --init")
        if model is not None and not decoder_only:
            raise ValueError("a whole model's VAE is fine-tuned with --decoder-only: a retrained encoder would move "
                             "the latent space its UNet learnt")
        self.cfg, self.source, self.seed = cfg, source, seed
        self.fg_weight, self.kl_weight = fg_weight, kl_weight
        self.decoder_only, self.checkpoint_model = decoder_only, model
        self.vae = (init if init is not None else AutoencoderKL(cfg)).float().requires_grad_(True)
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        side = source.size // cfg.downscale if source is not None else 0
        self.draws = BatchDraws(seed, {"posterior": Draw("randn", (cfg.embed_dim, side, side))})

    def trainable(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        items = items if items is not None else batch_items(self.source, step, indices)
        return images_to_tensor([image for image, _ in items], device), self.draws(step, indices, device)["posterior"]

    @staticmethod
    def foreground(x: torch.Tensor) -> torch.Tensor:
        """Pixels that differ from the image's background, taken as its corner colour (b, 1, h, w)."""
        corner = x[:, :, :1, :1]
        return ((x - corner).abs().amax(dim=1, keepdim=True) > 0.1).float()

    def loss(self, batch, step: int):
        x, eps = batch
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            post = self.vae.encode(x)
        # a posterior sample, not its mean: the decoder also meets latents the UNet made, never exactly a mean
        z = post.mean + post.std * eps.to(post.mean.dtype)
        rec = self.vae.decode(z)
        weight = 1 + self.fg_weight * self.foreground(x)
        rec_loss = ((rec.float() - x).abs() * weight).mean()
        if self.decoder_only:  # the KL term is the encoder's: nothing trained here moves it
            return rec_loss, {"rec": rec_loss.item()}
        kl = post.kl().float().mean() / x[0].numel()  # LDM's ratio: summed KL vs summed reconstruction error
        return rec_loss + self.kl_weight * kl, {"rec": rec_loss.item(), "kl": kl.item()}

    def eval_images(self, n: int = 16) -> list[np.ndarray]:
        return [self.source.item(10 ** 12 + i)[0] for i in range(n)]  # far from any training index

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        vae = modules["vae"]
        was = vae.training
        vae.eval()
        x = images_to_tensor(self.eval_images(), next(vae.parameters()).device)
        rec = vae.decode(vae.encode(x).mode())
        image_grid(tensor_to_images((torch.cat([x, rec]) + 1) / 2), columns=len(x)).save(out)
        vae.train(was)

    @torch.no_grad()
    def scaling_factor(self, vae: AutoencoderKL, n: int = 256) -> float:
        """1 / std of the latents, SD's recipe, so diffused latents have unit variance."""
        x = images_to_tensor(self.eval_images(n), next(vae.parameters()).device)
        return float(1.0 / vae.encode(x).mode().float().std())

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        vae = modules["vae"]
        # an untrained encoder keeps its latents, so its scaling factor too (a whole model's stays exact)
        scale = self.cfg.scaling_factor if self.decoder_only else round(self.scaling_factor(vae), 5)
        write_part(out / RESULT, "vae", vae, dataclasses.replace(self.cfg, scaling_factor=scale))
        if self.checkpoint_model is not None:  # its VAE is the module trained here (EMA weights copied in)
            from ...weights import save

            save(self.checkpoint_model, out / "model.safetensors", dtype=torch.float16, force=True)


def load_init(path: Path) -> tuple[AutoencoderKL, VAEConfig, StableDiffusion | None]:
    """The VAE to fine-tune from PATH: one `sdengine train vae` wrote, a standalone SD VAE file, or a whole
    checkpoint's (single file or diffusers folder; the model comes back too, to be written again)."""
    from ...weights import load

    path = Path(path)
    if path.is_file():
        tensors, meta = read_tensors(path)
        if not any(k.startswith((UNET, TEXT, "conditioner.")) for k in tensors):
            part = part_from_tensors(tensors, meta, str(path), "vae")
            return part.module(), part.config, None
    model = load(path)  # whole checkpoints: `load` also settles their config and tokenizer
    return model.vae, model.config.vae, model
