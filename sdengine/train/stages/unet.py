"""`sdengine train unet`: the denoiser on latents of the frozen VAE, conditioned on the frozen text encoder (or one
trained with it), captions dropped 10% of the time so classifier-free guidance works; eps or v target, min-SNR
weighting. Leaves model.safetensors: the whole model in the original single-file layout."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...diffusion.schedule import SD_SCHEDULE, NoiseSchedule
from ...images import images_to_tensor
from ...model import StableDiffusion
from ...nn.unet import sdxl_vector
from ..data import Geometry, Source, batch_geometry, batch_items
from ..draws import BatchDraws, Draw
from ..plots import image_grid

if TYPE_CHECKING:
    from ..latent_cache import LatentCache

RESULT = "model.safetensors"


def shift_timesteps(u: torch.Tensor, shift: float, steps: int = SD_SCHEDULE.num_train_timesteps) -> torch.Tensor:
    """Timesteps from uniform u in [0, 1) under the shift SD3 applies to its sampling schedule, t/T = s u /
    (1 + (s - 1) u): s = 1 is uniform, s = 3 puts half the draws above t = 750. The layout of a scene (which
    object goes left) is settled at high noise, where the eps loss barely sees it (an x0 error counts
    sqrt(SNR) ~ 0.1 there), so drawing more of those steps gives it more of the gradient."""
    x = shift * u / (1 + (shift - 1) * u)
    return (x * steps).long().clamp(0, steps - 1)


def read_text_layer(model: StableDiffusion, clip_skip: int) -> StableDiffusion:
    """Condition the UNet on the text encoder's layer `clip_skip` from the end of those it reads now (1: the same;
    2: the one before, as kohya's --clip_skip and A1111's "Clip skip"). The choice goes into the config as
    skip_last_layers, so the saved model reads that layer by default in sdengine (other programs need their clip
    skip set to match); the layers after it stay in the file, unread."""
    text = model.config.text
    if model.config.conditioner:
        raise ValueError("--clip-skip is for SD1/SD2 models: SDXL's UNet reads both text encoders' penultimate "
                         "layers")
    if clip_skip < 1 or clip_skip > text.hidden_layers_used:
        raise ValueError(f"--clip-skip must be 1 to {text.hidden_layers_used}, the text encoder's layers in use "
                         f"(got {clip_skip})")
    text = dataclasses.replace(text, skip_last_layers=text.skip_last_layers + clip_skip - 1)
    model.config = dataclasses.replace(model.config, text=text)
    model.cond_stage_model.config = text
    return model


class UNetStage:
    name = "unet"
    SAMPLING = {"steps": 20, "cfg_scale": 5.0}  # how the sample grids are generated

    def __init__(self, model: StableDiffusion, source: Source | None, seed: int = 0, caption_dropout: float = 0.1,
                 snr_gamma: float = 5.0, sample_prompts: list[str] | None = None, train_text: bool = False,
                 timestep_shift: float = 1.0, snr_floor: float = 0.0, schedule: NoiseSchedule = SD_SCHEDULE):
        """train_text: train the text encoder with the UNet (one optimizer) instead of keeping it frozen; batches
        then carry token ids and the loss runs the encoder with gradients. timestep_shift: draw timesteps towards
        the noisy end (shift_timesteps); 1 draws them uniformly, as SD's trainer does."""
        if timestep_shift <= 0:
            raise ValueError(f"the timestep shift must be positive (got {timestep_shift})")
        self.model, self.source, self.seed, self.train_text = model, source, seed, train_text
        self.timestep_shift, self.snr_floor, self.schedule = timestep_shift, snr_floor, schedule
        self.caption_dropout, self.snr_gamma = caption_dropout, snr_gamma
        self.sample_prompts = sample_prompts or ["a red circle", "two blue squares", "a green triangle above a "
                                                 "yellow circle", "a big purple square on a black background"]
        self.sdxl = model.config.conditioner  # conditioned on both text encoders and the vector y
        if self.sdxl and train_text:
            raise ValueError("--train-text-encoder is for SD1/SD2 models: SDXL's text encoders stay frozen here")
        model.vae.requires_grad_(False).eval()
        for encoder in model.text_encoders:
            encoder.requires_grad_(train_text).train(train_text)
        for layer in model.text_encoder.layer_list()[model.config.text.hidden_layers_used:]:
            layer.requires_grad_(False)  # the layers after the one the UNet reads get no gradient (SD2, clip skip)
        for name, p in model.text_encoder.named_parameters():  # OpenCLIP's contrastive head: the UNet never reads it
            if name.endswith(("text_projection", "logit_scale")):
                p.requires_grad_(False)
        self.cache: LatentCache | None = None  # set by use_cache: batches come from it instead of the source
        vae = model.config.vae
        side = source.size // vae.downscale if source is not None else 0
        self.draws = self._draws((vae.embed_dim, side, side))

    def _draws(self, latent: tuple[int, ...], rows: int = 0) -> BatchDraws:
        """A position's caption dropout, cache row (with a cache), posterior sample, noise and timestep."""
        fields = {"drop": Draw("rand"), **({"row": Draw("randint", high=rows)} if rows else {}),
                  "posterior": Draw("randn", latent), "noise": Draw("randn", latent), "u": Draw("rand")}
        return BatchDraws(self.seed, fields)

    def check_cache(self) -> None:
        """Refuse a latent cache where it cannot serve (asked before the cache is built)."""
        if self.sdxl:
            raise ValueError("--cache-latents is not supported for SDXL: the cache holds one text encoder's ids and "
                             "no image sizes")

    def use_cache(self, cache: LatentCache) -> None:
        """Train on pre-encoded latents (latent_cache.py): each batch position draws a row of the cache."""
        self.check_cache()
        self.cache = cache
        self.draws = self._draws(tuple(cache.mean.shape[1:]), rows=len(cache))
        self.empty_ids = self.model.tokenizer([""], max_length=cache.ids.shape[1])[0].to(cache.ids.device)

    def trainable(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet, **({"text": self.model.text_encoder} if self.train_text else {})}

    def _condition(self, ids: torch.Tensor) -> torch.Tensor:
        """What a batch carries for the text: the frozen encoder's features, or the ids when it is trained."""
        return ids if self.train_text else self.model.text_encoder.to(ids.device)(ids)[0].float()

    def sdxl_condition(self, captions: list[str], geometry: list[Geometry], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's (context, y) for captions as generation feeds them: both text encoders' features side by side, and
        y from bigG's pooled output with each image's original size and crop (batch_geometry) and the training
        size as the target (Pipeline.vector builds it with the same sdxl_vector)."""
        contexts, pooled = [], None
        for encoder, tokenizer in zip(self.model.text_encoders, self.model.tokenizers):
            z, pooled = encoder.to(device)(tokenizer(captions, max_length=encoder.config.max_positions).to(device))
            contexts.append(z.float())
        assert pooled is not None and self.source is not None
        original = torch.tensor([[h, w] for (w, h), _ in geometry])  # rows of (height, width), as generation
        crop = torch.tensor([[top, left] for _, (left, top) in geometry])
        target = torch.tensor([[self.source.size, self.source.size]] * len(geometry))
        return torch.cat(contexts, dim=-1), sdxl_vector(pooled.float(), original, crop, target)

    def _timesteps(self, u: torch.Tensor) -> torch.Tensor:
        return shift_timesteps(u, self.timestep_shift, self.schedule.num_train_timesteps)

    @torch.no_grad()
    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        """(scaled latents z0, conditioning, timesteps, noise) of batch positions `indices` of step `step`."""
        draws = self.draws(step, indices, device)
        drop = draws["drop"] < self.caption_dropout
        if self.cache is not None:
            rows = draws["row"].to(self.cache.mean.device)
            mean, std = self.cache.mean[rows].to(device).float(), self.cache.std[rows].to(device).float()
            ids = self.cache.ids[rows].to(device).long()
            cond = self._condition(torch.where(drop[:, None], self.empty_ids.to(device), ids))
        else:
            items = items if items is not None else batch_items(self.source, step, indices)
            vae = self.model.vae.to(device)
            post = vae.encode(images_to_tensor([im for im, _ in items], device).to(next(vae.parameters()).dtype))
            mean, std = post.mean.float(), post.std.float()
            captions = ["" if d else c for d, (_, c) in zip(drop.tolist(), items)]
            if self.sdxl:
                cond = self.sdxl_condition(captions, batch_geometry(self.source, step, indices), device)
            else:
                cond = self._condition(
                    self.model.tokenizer(captions, max_length=self.model.config.text.max_positions).to(device))
        z0 = (mean + std * draws["posterior"]) * self.model.config.vae.scaling_factor
        return z0, cond, self._timesteps(draws["u"]), draws["noise"]

    def loss(self, batch, step: int):
        z0, cond, t, noise = batch
        y = None
        if self.sdxl:
            context, y = cond
        else:
            context = self.model.text_encoder(cond)[0].float() if self.train_text else cond
        return self.denoising_loss(z0, t, noise, lambda x_t: self.model.unet(x_t, t, context, y)), {}

    def denoising_loss(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       predict: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The weighted error of predict(x_t) (the UNet's output on z0 noised to t) against eps or v: the one loss of
        every stage that trains through the UNet (this one, LoRA, embedding, ControlNet)."""
        x_t = self.schedule.q_sample(z0, t, noise)
        target = noise if self.model.config.prediction == "eps" else self.schedule.velocity(z0, t, noise)
        per_item = (predict(x_t).float() - target).pow(2).mean(dim=(1, 2, 3))
        if self.snr_gamma > 0:  # min-SNR weighting (Hang et al. 2023): no step dominates the gradient
            abar = self.schedule.alphas_cumprod.to(z0.device)[t]
            snr = abar / (1 - abar)
            # snr_floor: an x0 error at high noise weighs at least snr_floor (eps alone weighs it SNR ~ 0.005-0.05
            # there, so the layout, settled at those steps, gets almost no gradient)
            weight = snr.clamp(min=self.snr_floor, max=self.snr_gamma) / (
                snr if self.model.config.prediction == "eps" else snr + 1)
            per_item = per_item * weight
        return per_item.mean()

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        from ...pipeline import Pipeline

        unet = self.model.unet
        was = unet.training
        unet.eval()
        # The pipeline runs the whole model on one device; with a latent cache the VAE never left the CPU.
        self.model.to(next(unet.parameters()).device)
        size = self.source.size
        images = []
        for prompt in self.sample_prompts:
            images += Pipeline(self.model).generate(prompt, seed=0, width=size, height=size, batch_size=2,
                                                    **self.SAMPLING)
        image_grid(images, columns=len(images) // 2 if len(images) > 4 else len(images),
                   labels=[p for p in self.sample_prompts for _ in range(2)]).save(out)
        unet.train(was)

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        from ...weights import save

        save(self.model, out / RESULT, dtype=torch.float16, force=True)
