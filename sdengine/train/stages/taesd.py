"""`sdengine train taesd --init MODEL`: distil a tiny autoencoder (TAESD, sdengine/nn/taesd.py) from a whole
model's VAE, as madebyollin trained his: the decoder learns the VAE decoder's pixels from the same latents, the
encoder the VAE encoder's latents, both by mean squared error (no adversarial term: on the shapes world's flat
colours MSE alone is sharp enough, and a discriminator would double the cost on a CPU). Latents are the scaled
ones the diffusion runs on, so the result drops in where the pipeline decodes.

Writes taesd.safetensors (both halves, `taesd_encoder.*` / `taesd_decoder.*`, as ComfyUI reads one file) and
madebyollin's two files taesd_encoder.safetensors / taesd_decoder.safetensors (nn.Sequential keys `1.conv.0.weight`,
as taesd.py, diffusers' conversion and A1111 read them), plus eval.json: the PSNR of the tiny decoder against the VAE
decoder on held-out scenes.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...images import images_to_tensor, tensor_to_images
from ...model import StableDiffusion
from ...nn.taesd import DECODER, ENCODER, TAESDConfig, TinyAutoencoder, taesd_tensors
from ...weights.io import atomic_path, write_safetensors
from ..data import Source, batch_items
from ..draws import BatchDraws, Draw
from ..plots import image_grid

RESULT = "taesd.safetensors"
HALVES = {"encoder": "taesd_encoder.safetensors", "decoder": "taesd_decoder.safetensors"}


def default_channels(model: StableDiffusion) -> int:
    """madebyollin's 64 for a full-size VAE (128 channels at full resolution); 32 for a small one such as the shipped
    model's (48): a 64-channel TAESD would cost about as much as that VAE's own decoder."""
    return 64 if model.config.vae.ch >= 128 else 32


def taesd_config(model: StableDiffusion, channels: int) -> TAESDConfig:
    """madebyollin's block counts (1, 3, 3, 3) / (3, 3, 3, 1) for f=8, with one level fewer per halving less."""
    levels = len(model.config.vae.ch_mult)
    return TAESDConfig(latent_channels=model.config.vae.embed_dim, channels=channels,
                       encoder_blocks=(1,) + (3,) * (levels - 1), decoder_blocks=(3,) * (levels - 1) + (1,))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] image batches, both clamped to the range a PNG keeps, over all their pixels."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@torch.no_grad()
def decoder_psnr(taesd: TinyAutoencoder, model: StableDiffusion, latents: torch.Tensor, batch: int = 16) -> float:
    """PSNR of the tiny decoder against the model's VAE decoder on the same scaled latents."""
    scale = model.config.vae.scaling_factor
    ours, theirs = [], []
    for z in latents.split(batch):
        ours.append(taesd.decode(z).float())
        theirs.append(model.vae.decode(z / scale).float())
    return psnr(torch.cat(ours), torch.cat(theirs))


class TAESDStage:
    name = "taesd"

    def __init__(self, model: StableDiffusion, source: Source, seed: int = 0, channels: int | None = None,
                 latent_weight: float = 1.0):
        """model: the whole model whose VAE is imitated (frozen). latent_weight: the encoder's loss weight against
        the decoder's (scaled latents have about unit variance, [-1, 1] pixels a few tenths)."""
        if source.size % 2 ** (len(model.config.vae.ch_mult) - 1):
            raise ValueError(f"--size {source.size} is not a multiple of the VAE's downscale factor")
        self.model, self.source, self.seed, self.latent_weight = model, source, seed, latent_weight
        self.vae = model.vae.float().eval().requires_grad_(False)
        self.scale = model.config.vae.scaling_factor
        self.cfg = taesd_config(model, channels or default_channels(model))
        self.taesd = TinyAutoencoder(self.cfg).float().requires_grad_(True)
        side = source.size // self.cfg.downscale
        self.draws = BatchDraws(seed, {"posterior": Draw("randn", (model.config.vae.embed_dim, side, side))})

    def trainable(self) -> dict[str, nn.Module]:
        return {"taesd": self.taesd}

    @torch.no_grad()
    def teacher(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """(VAE encoder's scaled latents (mean), the latents the decoder learns from, the VAE's pixels for those):
        a posterior sample when eps is given, as the UNet's latents are never exactly a mean."""
        self.vae.to(x.device)  # the frozen VAE is not the trainer's to move (a no-op once there)
        with torch.autocast(x.device.type, enabled=False):  # the target in full precision
            post = self.vae.encode(x)
            z = post.mean if eps is None else post.mean + post.std * eps
            return post.mean * self.scale, z * self.scale, self.vae.decode(z)

    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        items = items if items is not None else batch_items(self.source, step, indices)
        x = images_to_tensor([image for image, _ in items], device)
        return (x, *self.teacher(x, self.draws(step, indices, device)["posterior"]))

    def loss(self, batch, step: int):
        x, latents, z, pixels = batch
        enc = ((self.taesd.encode(x).float() - latents) ** 2).mean()
        dec = ((self.taesd.decode(z).float() - pixels) ** 2).mean()
        return dec + self.latent_weight * enc, {"dec": dec.item(), "enc": enc.item()}

    def eval_images(self, n: int = 64) -> list[np.ndarray]:
        return [self.source.item(10 ** 12 + i)[0] for i in range(n)]  # far from any training index

    @torch.no_grad()
    def evaluate(self, taesd: TinyAutoencoder, n: int = 64) -> dict[str, float]:
        """On n held-out scenes: the tiny decoder vs the VAE decoder (PSNR, dB) on the VAE's latents, the tiny
        round trip vs the VAE's, and the encoder's latent RMSE."""
        device = next(taesd.parameters()).device
        x = images_to_tensor(self.eval_images(n), device)
        latents, _, pixels = self.teacher(x)
        was = taesd.training
        taesd.eval()
        ours = torch.cat([taesd.encode(b) for b in x.split(16)])
        result = {"images": n, "decoder_psnr": decoder_psnr(taesd, self.model, latents),
                  "roundtrip_psnr": psnr(torch.cat([taesd.decode(z) for z in ours.split(16)]), pixels),
                  "encoder_rmse": (ours - latents).pow(2).mean().sqrt().item(),
                  "latent_std": latents.std().item()}
        taesd.train(was)
        return result

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        """Rows: the scenes, the VAE's reconstruction, the tiny decoder's (VAE latents), the tiny round trip."""
        taesd = modules["taesd"]
        was = taesd.training
        taesd.eval()
        x = images_to_tensor(self.eval_images(16), next(taesd.parameters()).device)
        latents, _, pixels = self.teacher(x)
        rows = torch.cat([x, pixels, taesd.decode(latents), taesd.decode(taesd.encode(x))]).clamp(-1, 1)
        image_grid(tensor_to_images((rows + 1) / 2), columns=len(x)).save(out)
        taesd.train(was)

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        taesd = modules["taesd"]
        meta = {"sdengine_taesd": json.dumps({"latent_scaling_factor": self.scale, "trained_for": "sdengine",
                                              "channels": self.cfg.channels})}
        write_taesd(taesd, out, meta)
        report = self.evaluate(taesd)
        with atomic_path(out / "eval.json", force=True) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")


def write_taesd(taesd: TinyAutoencoder, out: Path, metadata: dict[str, str] | None = None) -> None:
    """taesd.safetensors (both halves, prefixed) and madebyollin's two files in `out`, each written atomically."""
    tensors = taesd_tensors(taesd)
    with atomic_path(out / RESULT, force=True) as tmp:
        write_safetensors(tensors, tmp, metadata)
    for half, name in HALVES.items():
        prefix = ENCODER if half == "encoder" else DECODER
        with atomic_path(out / name, force=True) as tmp:
            write_safetensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, tmp,
                              {"format": "pt"})


# --- `sdengine train taesd` (sdengine/cli/train.py has its options) ----------------------------------------------

def build_taesd(args: argparse.Namespace, source: Source) -> TAESDStage:
    from ...weights import load

    return TAESDStage(load(args.init), source, seed=args.seed, channels=args.channels,
                      latent_weight=args.latent_weight)
