"""The training stages, one module each, as the trainer sees them (trainer.Stage): modules to train,
deterministic batches, a loss, pictures, and what each leaves behind.

  vae.py        the KL autoencoder -> vae.safetensors (a VAE part file, weights/parts.py)
  text.py       contrastive pretraining of the text encoder on its own vocabulary -> text.safetensors (+ tokenizer)
  unet.py       the denoiser on the frozen VAE's latents -> model.safetensors (the whole model)
  lora.py       LoRA/LoCon on a frozen model -> lora.safetensors (kohya-ss layout)
  embedding.py  textual inversion on a frozen model -> TOKEN.pt (A1111 layout) or .safetensors (emb_params)
  lcm.py        latent consistency distillation -> model.safetensors (4-step model) or lora.safetensors (LCM-LoRA)
  taesd.py      a tiny autoencoder distilled from a model's VAE -> taesd.safetensors (madebyollin's layout)
  controlnet.py a ControlNet on a frozen model, from its UNet's encoder -> controlnet.safetensors (lllyasviel's)

A batch's random numbers come from draws.BatchDraws, so results do not depend on how a batch is split.
"""
from .text import TextStage
from .unet import UNetStage
from .vae import VAEStage

__all__ = ["VAEStage", "TextStage", "UNetStage"]
