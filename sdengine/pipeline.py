"""txt2img, img2img and inpainting: the generation loop, unrolled and readable in one place.

A Request goes through named steps, each the one place its concern lives:
  networks     the prompt's <lora:...> tags patched into the weights, embeddings made known (networks.py)
  condition    prompt and negative prompt -> Conditioning (cross-attention context; later SDXL's vector)
  sigmas       the sampler's schedule, or its img2img tail
  sample       seed -> noise (+ the encoded init image) -> sampler over the denoiser stack -> latents
  denoiser     UNet as x0 estimator -> classifier-free guidance -> inpainting's known-region blend
  second_pass  the hires fix: upscale, then img2img at the larger size
  decode       latents -> pixels; to_images adds each image's A1111 "parameters" text
Random draws happen on the CPU, per image, in the same order as diffusers' pipelines with a list of generators,
so a seed gives the same image here, there and on any device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__, decoding
from .accel import accelerated
from .control import ControlNets
from .diffusion.denoiser import AnyConditioning, CFGDenoiser, Conditioning, Denoiser, ScheduledConditioning
from .diffusion.samplers import SAMPLERS, BatchNoise
from .diffusion.schedule import SD_SCHEDULE, SDXL_SCHEDULE, NoiseSchedule
from .diffusion.variation import initial_noise
from .hires import upscale_latents, upscale_pixels
from .images import image_to_tensor, mask_to_tensor, tensor_to_images
from .ip_adapter import IPAdapters
from .metadata import format_parameters
from .model import StableDiffusion
from .networks import Networks, strip_tags
from .nn.seamless import circular_padding
from .nn.taesd import TinyAutoencoder
from .nn.unet import sdxl_vector
from .prompt_schedule import has_schedule, schedule
from .prompts import encode_text
from .request import AESTHETIC_SCORES, Request
from .runtime import embeddings_dir, loras_dir, model_hash, wildcards_dir
from .wildcards import expand, has_wildcards

# callback(step, total_steps, latents (VE space), denoised x0 estimate)
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
MASKED_LATENTS = ("original", "noise", "zeros")


class NonFiniteError(RuntimeError):
    """Sampling or decoding gave NaN or Inf: an error, never a black image reported as success (the CLI exits
    non-zero, the server answers 500 with this message)."""


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{what} hold NaN or Inf ({bad} of {x.numel()} values): the model overflowed in "
                             f"{str(x.dtype).removeprefix('torch.')} or its weights are broken; nothing was written "
                             "(try --precision fp32, a lower CFG scale or weaker emphasis)")
    return x


class Pipeline:
    def __init__(self, model: StableDiffusion, schedule: NoiseSchedule = SD_SCHEDULE, networks: Networks | None = None):
        """networks: the LoRA and embedding folders prompts may name (default: $SDENGINE_HOME/loras and
        .../embeddings, see runtime.loras_dir)."""
        self.model = model
        if schedule is SD_SCHEDULE and model.config.conditioner:  # SDXL: Align Your Steps' SDXL table, as A1111 takes
            schedule = SDXL_SCHEDULE
        self.schedule = schedule
        self.networks = networks or Networks(model, [loras_dir()], [embeddings_dir()])
        self.wildcards: Path | None = wildcards_dir()  # __name__ wildcards' folder (wildcards.py)
        self.refiner_loader: Callable[[str], StableDiffusion] | None = None
        self._refiners: dict[str, Pipeline] = {}
        self._model_hash: str | None | bool = False  # computed on first use
        # ControlNets by name ($SDENGINE_HOME/controlnet, or paths), loaded on first use
        self.controlnets = ControlNets(model.config.unet, model.device, model.dtype,
                                       latent_factor=model.config.vae.downscale, base=model.unet)
        # IP-Adapters and their image encoders ($SDENGINE_HOME/ipadapter, or paths), loaded on first use
        self.ip_adapters = IPAdapters(model.unet, model.device, model.dtype)
        # the tiny autoencoder (nn/taesd.py), when one is loaded: for previews, and for final images if tiny_final
        # (the hires fix's intermediate decode always takes the VAE)
        self.tiny_vae: TinyAutoencoder | None = None
        self.tiny_final = False

    # --- public API ---------------------------------------------------------------------------------------------

    def run(self, req: Request, init: Image.Image | list[Image.Image] | None = None, mask: Image.Image | None = None,
            callback: Callback | None = None) -> list[Image.Image]:
        """Every image of the request (batch_size x n_iter), each with its parameters in image.info["parameters"]
        and its seed in image.info["seed"] (its variation seed in "subseed"). init: img2img (one image, or one
        per image of the batch); with mask (white = repaint): inpainting. Width/height default to the init
        image's, else the model's training size."""
        req = self.sized(req, init)
        self.controlnets.check(req.controls)  # every ControlNet found before any work
        self.ip_adapters.check(req.image_prompts)  # every IP-Adapter and its image encoder too
        inits = [init] if isinstance(init, Image.Image) else init
        pixels = None if inits is None else torch.cat([image_to_tensor(im, req.width, req.height) for im in inits])
        mask_t = None if mask is None else mask_to_tensor(mask, req.width, req.height)
        images = []
        for n in range(req.n_iter):
            batch = self.resolve(req.iteration(n))
            images += self.to_images(self.latents(batch, pixels, mask_t, callback), batch)
        return images

    def resolve(self, batch: Request) -> Request:
        """One batch with its wildcards and {a|b} variants chosen for its first seed (the chosen prompt is the one
        the images' parameters record, as Dynamic Prompts writes it)."""
        if not (has_wildcards(batch.prompt) or has_wildcards(batch.negative_prompt)):
            return batch
        return dataclasses.replace(batch, prompt=expand(batch.prompt, batch.seed, self.wildcards),
                                   negative_prompt=expand(batch.negative_prompt, batch.seed, self.wildcards))

    def generate(self, prompt: str = "", *, callback: Callback | None = None, **fields: Any) -> list[Image.Image]:
        """txt2img: `fields` are Request's (steps, sampler, cfg_scale, seed, width, height, hires, ...)."""
        return self.run(Request(prompt=prompt, **fields), callback=callback)

    def img2img(self, image: Image.Image, prompt: str = "", *, strength: float = 0.75,
                callback: Callback | None = None, **fields: Any) -> list[Image.Image]:
        """Start from `image` noised to the point `strength` of the way up the schedule (diffusers' convention:
        int(steps * strength) steps are run; `denoise_steps=n` runs exactly the last n, as A1111 counts them).
        At strength 1.0 the image is still there, under sigma_max's noise."""
        return self.run(Request(prompt=prompt, strength=strength, **fields), init=image, callback=callback)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str = "", *, strength: float = 1.0,
                callback: Callback | None = None, **fields: Any) -> list[Image.Image]:
        """Repaint where the mask is white. 9-channel inpainting UNets see mask and masked image; other UNets
        get the known region blended back at every step."""
        return self.run(Request(prompt=prompt, strength=strength, **fields), init=image, mask=mask,
                        callback=callback)

    def sized(self, req: Request, init: Image.Image | list[Image.Image] | None = None) -> Request:
        """`req` with an unset width/height taken from the init image (rounded down to x8), else the model."""
        first = init[0] if isinstance(init, list) else init
        if first is not None:
            return req.sized(first.width // 8 * 8, first.height // 8 * 8)
        return req.sized(self.model.config.image_size, self.model.config.image_size)

    def latents(self, req: Request, init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                callback: Callback | None = None, **inpaint: Any) -> torch.Tensor:
        """One batch (n_iter 1) of a sized request: the first pass, then the hires fix's second pass if asked."""
        if req.refiner is not None:
            if init is not None or mask is not None:
                raise ValueError("a refiner continues a txt2img schedule here; img2img and inpainting with a "
                                 "refiner are not supported")
            latents = self.sample_with_refiner(req, self.refiner_pipeline(req.refiner), req.refiner_switch_at,
                                               callback)
        else:
            latents = self.sample(req, init=init, mask=mask, callback=callback, **inpaint)
        return latents if req.hires is None else self.second_pass(req, latents, callback)

    def refiner_pipeline(self, name: str) -> Pipeline:
        """The refiner `name` (a path or a models-folder name) as a pipeline on this model's device and precision,
        loaded once; `refiner_loader` (name -> StableDiffusion) replaces how it is found (the server's registry)."""
        if name not in self._refiners:
            if self.refiner_loader is not None:
                model = self.refiner_loader(name)
            else:
                from .runtime import load_for_inference, resolve_model

                model = load_for_inference(resolve_model(name), self.model.device, self.model.dtype)
            self._refiners = {name: Pipeline(model, self.schedule)}  # one kept: a refiner is large
        return self._refiners[name]

    # --- the steps ----------------------------------------------------------------------------------------------

    def tiling(self, req: Request) -> AbstractContextManager[None]:
        """The networks as `req` wants them: wrapping around for a seamless request (its ControlNets too), as loaded
        otherwise."""
        nets = [self.controlnets.get(u.model)[0] for u in req.controls] if req.tiling else []
        return circular_padding([self.model.unet, self.model.vae, *nets], req.tiling)

    @torch.no_grad()
    def condition(self, req: Request, first_pass_steps: int | None = None
                  ) -> tuple[AnyConditioning, AnyConditioning | None]:
        """(prompt, negative prompt) as conditionings for the batch; no negative when guidance is off. The two
        contexts get the same number of 77-token chunks (the shorter one padded with empty chunks). SDXL: both
        text encoders, and the vector y (`vector`); an empty negative prompt is zeros, as diffusers' SDXL pipeline
        does (force_zeros_for_empty_prompt; not the refiner's). A prompt that edits or alternates
        (`[from:to:when]`, `[a|b]`: prompt_schedule.py) gives a ScheduledConditioning over the steps run;
        first_pass_steps: this is the hires fix's second pass (A1111 counts its steps on from the first pass's)."""
        model, n = self.model, req.batch_size
        prompt, negative = strip_tags(req.prompt), strip_tags(req.negative_prompt)  # the LoRAs are patched in
        if has_schedule(prompt) or has_schedule(negative):
            return self._scheduled_condition(req, prompt, negative, first_pass_steps)
        cond, pooled = encode_text(model, [prompt] * n, req.clip_skip)
        if req.cfg_scale == 1.0:
            return Conditioning(cond, self.vector(req, pooled)), None
        if model.config.text_2 is not None and not negative:
            zeros = Conditioning(torch.zeros_like(cond), self.vector(req, torch.zeros_like(pooled), negative=True))
            return Conditioning(cond, self.vector(req, pooled)), zeros
        uncond, uncond_pooled = encode_text(model, [negative] * n, req.clip_skip, min_chunks=cond.shape[1] // 77)
        if uncond.shape[1] > cond.shape[1]:  # a longer negative: pad the prompt
            cond, pooled = encode_text(model, [prompt] * n, req.clip_skip, min_chunks=uncond.shape[1] // 77)
        return (Conditioning(cond, self.vector(req, pooled)),
                Conditioning(uncond, self.vector(req, uncond_pooled, negative=True)))

    def _scheduled_condition(self, req: Request, prompt: str, negative: str, first_pass_steps: int | None
                             ) -> tuple[AnyConditioning, AnyConditioning | None]:
        """Each text of the prompt's (and negative prompt's) schedule encoded once, all to one chunk count."""
        steps = req.steps if first_pass_steps is None else (req.denoise_steps or req.steps)
        prompts = schedule(prompt, steps, first_pass_steps)
        negatives = schedule(negative, steps, first_pass_steps) if req.cfg_scale != 1.0 else []
        texts = {text for _, text in prompts} | {text for _, text in negatives}
        encoded = {t: encode_text(self.model, [t] * req.batch_size, req.clip_skip) for t in texts}
        chunks = max(c.shape[1] for c, _ in encoded.values()) // 77
        for t, (c, _) in list(encoded.items()):
            if c.shape[1] // 77 < chunks:
                encoded[t] = encode_text(self.model, [t] * req.batch_size, req.clip_skip, min_chunks=chunks)
        sdxl_zeros = self.model.config.text_2 is not None

        def conditioning(text: str, is_negative: bool) -> Conditioning:
            c, pooled = encoded[text]
            if is_negative and sdxl_zeros and not text:
                c, pooled = torch.zeros_like(c), torch.zeros_like(pooled)
            return Conditioning(c, self.vector(req, pooled, negative=is_negative))

        def scheduled(entries: list[tuple[int, str]], is_negative: bool) -> AnyConditioning:
            if len(entries) == 1:
                return conditioning(entries[0][1], is_negative)
            return ScheduledConditioning(tuple((end, conditioning(t, is_negative)) for end, t in entries))

        return scheduled(prompts, False), (scheduled(negatives, True) if negatives else None)

    def vector(self, req: Request, pooled: torch.Tensor, negative: bool = False) -> torch.Tensor | None:
        """SDXL's vector input y: the pooled text embedding and the Fourier-embedded original size (h, w), crop
        top-left and target size, as diffusers and A1111 pass them: the generated size, crop (0, 0). The refiner
        conditions on an aesthetic score in place of the target size (req.aesthetic_score, and
        req.negative_aesthetic_score for the negative: 6.0 and 2.5 by default, as diffusers and A1111). None for
        UNets without a vector input."""
        refiner = self.model.config.conditioner and self.model.config.text_2 is None
        if not refiner and req.refiner is None and (req.aesthetic_score, req.negative_aesthetic_score) != \
                AESTHETIC_SCORES:
            raise ValueError(f"aesthetic scores condition SDXL refiners; this is {self.model.config.family} and no "
                             "refiner was given")
        if not self.model.config.conditioner:
            if req.original_size or req.target_size or req.crop != (0, 0):
                raise ValueError(f"original size, crop and target size condition SDXL models; this is "
                                 f"{self.model.config.family}")
            return None
        assert req.width is not None and req.height is not None
        n = pooled.shape[0]

        def hw(pair: tuple[int, int] | None) -> torch.Tensor:  # (width, height) -> rows of (height, width)
            w, h = pair or (req.width, req.height)
            return torch.tensor([[h, w]] * n)

        crop = torch.tensor([[req.crop[1], req.crop[0]]] * n)  # (top, left), generative-models' order
        if refiner:
            score = req.negative_aesthetic_score if negative else req.aesthetic_score
            return sdxl_vector(pooled, hw(req.original_size), crop, torch.full((n, 1), score))
        return sdxl_vector(pooled, hw(req.original_size), crop, hw(req.target_size))

    def sigmas(self, req: Request, img2img: bool) -> torch.Tensor:
        """The sampler's sigmas (final one appended); for img2img below full strength, the tail it runs."""
        spec = req.sampler_spec
        if img2img and req.run_strength < 1.0:
            sigmas = spec.img2img_sigmas(self.schedule, req.steps, req.run_strength, req.schedule, req.spacing)
        else:
            sigmas = spec.sigmas(self.schedule, req.steps, req.schedule, req.spacing)
        return torch.from_numpy(sigmas)

    def denoiser(self, req: Request, cond: AnyConditioning, uncond: AnyConditioning | None) -> CFGDenoiser:
        """The UNet as an x0 estimator under classifier-free guidance: what the sampler calls."""
        unet = Denoiser(self.model.unet, self.schedule, self.model.config.prediction)
        return CFGDenoiser(unet, cond, uncond, req.cfg_scale)

    @torch.no_grad()
    def sample(self, req: Request, init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               callback: Callback | None = None, masked_latents: str = "original",
               latent_mask: torch.Tensor | None = None, init_latents: torch.Tensor | None = None,
               first_pass_steps: int | None = None) -> torch.Tensor:
        """Latents (b, 4, h/8, w/8) of one batch, VP-scaled as the VAE expects after dividing by the scaling factor.

        init: pixels (1 or b, 3, h, w) in [-1, 1] to start from (img2img); mask (1, 1, h, w), 1 = repaint.
        masked_latents: what the encoded init image holds under the mask before noising: "original", "noise"
        (unit Gaussian noise: AUTOMATIC1111's "latent noise") or "zeros" ("latent nothing").
        latent_mask: (1, 1, h/8, w/8) in [0, 1], where the latents are repainted; default: `mask` resized nearest.
        A soft one blends the known region in gradually (AUTOMATIC1111 without mask_round).
        init_latents: (b, 4, h/8, w/8) scaled latents to start img2img from instead of encoding `init`."""
        if req.width is None or req.height is None or req.n_iter != 1:
            raise ValueError("Pipeline.sample takes one sized batch: use Pipeline.run, or Request.sized/iteration")
        if masked_latents not in MASKED_LATENTS:
            raise ValueError(f"masked_latents must be one of {', '.join(MASKED_LATENTS)}, not {masked_latents!r}")
        self.networks.activate(req)  # the prompt's LoRAs patched in (nothing to do when they already are)
        with self.tiling(req):
            return self._sample(req, init, mask, callback, masked_latents, latent_mask, init_latents,
                                first_pass_steps)

    def _sample(self, req: Request, init: torch.Tensor | None, mask: torch.Tensor | None, callback: Callback | None,
                masked_latents: str, latent_mask: torch.Tensor | None, init_latents: torch.Tensor | None,
                first_pass_steps: int | None = None) -> torch.Tensor:
        model, device, spec = self.model, self.model.device, req.sampler_spec
        f = model.config.vae.downscale
        shape = (req.batch_size, model.config.unet.out_channels, req.height // f, req.width // f)
        if latent_mask is not None and latent_mask.shape[-2:] != shape[-2:]:
            raise ValueError(f"latent_mask must be {tuple(shape[-2:])}, got {tuple(latent_mask.shape[-2:])}")
        if init_latents is not None and tuple(init_latents.shape) != shape:
            raise ValueError(f"init_latents must be {shape}, got {tuple(init_latents.shape)}")
        generators = [torch.Generator().manual_seed(s) for s in req.seeds]
        noise_source = BatchNoise(generators, shape, device)
        cond, uncond = self.condition(req, first_pass_steps)

        img2img = init is not None or init_latents is not None
        sigmas = self.sigmas(req, img2img)
        if req.controls:  # the units' hints at this pass's size, each acting on its share of the steps run
            controls, uncontrols = self.controlnets.controls(req.controls, req.width, req.height, len(sigmas) - 1,
                                                             req.batch_size, guided=uncond is not None, mask=mask)
            cond = cond.with_controls(controls)
            uncond = uncond.with_controls(uncontrols) if uncond is not None else None
        if req.image_prompts:  # IP-Adapters: the images' tokens; guidance's negative half those of a zero image
            tokens, untokens = self.ip_adapters.tokens(req.image_prompts, req.batch_size)
            cond = cond.with_image_tokens(tokens)
            uncond = uncond.with_image_tokens(untokens) if uncond is not None else None
        strength = req.run_strength if img2img else 1.0
        inpainting_unet = model.config.unet.in_channels == 9
        image_latents = None
        if init_latents is not None:
            image_latents = init_latents.to(device, torch.float32)
        elif init is not None and (not inpainting_unet or strength < 1.0 or mask is None):
            image_latents = self.encode_image(init, generators, req.vae_tiling)
        variation = req.variation(f)
        noise = noise_source() if variation is None else initial_noise(noise_source, req.seeds, variation)
        if mask is None:
            latent_mask = None
        else:
            if latent_mask is None:
                latent_mask = F.interpolate(mask.to(device), size=shape[-2:])
            latent_mask = latent_mask.to(device).expand(shape[0], 1, -1, -1)
            if image_latents is not None and masked_latents != "original":  # "noise": the seed's own noise, as A1111
                hole = torch.zeros_like(image_latents) if masked_latents == "zeros" else noise
                image_latents = image_latents * (1 - latent_mask) + hole * latent_mask
        # img2img keeps its image even at full strength (noised to sigma_max, as diffusers' img2img and A1111 do);
        # inpainting at full strength starts the hole from pure noise (diffusers' inpaint pipelines)
        if image_latents is not None and (strength < 1.0 or mask is None):
            x = image_latents + noise * sigmas[0]
        else:
            x = noise * spec.initial_scale(float(sigmas[0]), req.spacing)

        if mask is not None and inpainting_unet:  # the UNet sees the mask and the masked image
            concat = torch.cat([latent_mask, self.encode_image(init * (mask < 0.5), generators, req.vae_tiling)],
                               dim=1)
            cond = cond.with_concat(concat)
            uncond = uncond.with_concat(concat) if uncond is not None else None
        denoise = guided = self.denoiser(req, cond, uncond)
        if latent_mask is not None and not inpainting_unet:
            denoise = known_region_blend(denoise, latent_mask, image_latents, noise, sigmas[0])
        extra = {"prediction": model.config.prediction} if spec.uses_prediction else {}
        with accelerated(guided, req.accelerations, len(sigmas) - 1, tome_seed=req.seeds[0]):
            x = spec(denoise, x, sigmas, callback=follow_steps(guided, callback), noise=noise_source, **extra)
        latents = check_finite(x / (1 + sigmas[-1] ** 2) ** 0.5, "the sampled latents")
        if latent_mask is not None and not inpainting_unet:  # the known region exactly as encoded
            latents = image_latents * (1 - latent_mask) + latents * latent_mask
        return latents

    @torch.no_grad()
    def sample_with_refiner(self, req: Request, refiner: Pipeline, switch_at: float = 0.8,
                            callback: Callback | None = None) -> torch.Tensor:
        """txt2img latents (VP-scaled, as `sample` gives them) from SDXL's ensemble of experts: this model runs the
        schedule down to the switch point, `refiner` continues the same schedule on its latents, as diffusers'
        denoising_end / denoising_start pair does (the base runs the steps whose timestep is at least
        round(1000 * (1 - switch_at))). Stochastic samplers draw the refiner's noise from fresh generators of the
        image seeds."""
        if not 0.0 < switch_at < 1.0:
            raise ValueError(f"the refiner switch point must lie in (0, 1), got {switch_at}")
        if req.width is None or req.height is None or req.n_iter != 1:
            raise ValueError("sample_with_refiner takes one sized batch: use Request.sized/iteration")
        ours, theirs = self.model.config, refiner.model.config
        if (ours.unet.out_channels, ours.vae.downscale, ours.vae.scaling_factor) != (
                theirs.unet.out_channels, theirs.vae.downscale, theirs.vae.scaling_factor):
            raise ValueError(f"the refiner ({theirs.family}) works in another latent space than the model "
                             f"({ours.family}): {theirs.unet.out_channels} channels at 1/{theirs.vae.downscale}, "
                             f"scale {theirs.vae.scaling_factor} vs {ours.unet.out_channels} at "
                             f"1/{ours.vae.downscale}, scale {ours.vae.scaling_factor}")
        sigmas = self.sigmas(req, img2img=False)
        cutoff = round(self.schedule.num_train_timesteps * (1 - switch_at))
        timesteps = self.schedule.sigma_to_t(sigmas[:-1].numpy()).round()
        k = int((timesteps >= cutoff).sum())
        if k == 0 or k == len(timesteps):
            raise ValueError(f"switch point {switch_at} leaves no steps to the {'base' if k == 0 else 'refiner'}")
        head = _Head(self.model, self.schedule, sigmas[: k + 1], self.networks)
        head.ip_adapters = self.ip_adapters  # the adapters and image encoders already loaded, and their folders
        total = len(sigmas) - 1  # progress counts the whole schedule, base and refiner steps together

        def progress(offset: int) -> Callback | None:
            return None if callback is None else lambda i, n, *a: callback(offset + i, total, *a)

        x = head.sample(req, callback=progress(0)) * (1 + sigmas[k] ** 2) ** 0.5  # the sampler's latents at sigma_k
        spec = req.sampler_spec
        f = refiner.model.config.vae.downscale
        shape = (req.batch_size, refiner.model.config.unet.out_channels, req.height // f, req.width // f)
        noise = BatchNoise([torch.Generator().manual_seed(s) for s in req.seeds], shape, refiner.model.device)
        with refiner.tiling(req):
            denoise = refiner.denoiser(req, *refiner.condition(req))
            denoise.step = k  # prompt editing continues where the base model stopped
            extra = {"prediction": refiner.model.config.prediction} if spec.uses_prediction else {}
            with accelerated(denoise, req.accelerations, len(sigmas) - 1, tome_seed=req.seeds[0]):
                x = spec(denoise, x.to(refiner.model.device), sigmas[k:], noise=noise,
                         callback=follow_steps(denoise, progress(k), offset=k), **extra)
        return x / (1 + sigmas[-1] ** 2) ** 0.5

    def second_pass(self, first: Request, latents: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
        """The hires fix (A1111's sample_hr_pass): the first pass's latents upscaled (in latent space, or decoded,
        resized and encoded again), then img2img at the larger size, its noise drawn again from the same seeds."""
        assert first.hires is not None and first.width is not None and first.height is not None
        f = self.model.config.vae.downscale
        hr, req = first.hires, first.second_pass(f)
        if hr.in_latent_space:
            return self.sample(req, init_latents=upscale_latents(latents, hr, first.width, first.height, f),
                               callback=callback, first_pass_steps=first.steps)
        with self.tiling(first):
            pixels = self.decode(latents, first.vae_tiling)
        return self.sample(req, init=upscale_pixels(pixels, hr, first.width, first.height, f), callback=callback,
                           first_pass_steps=first.steps)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generators: list[torch.Generator], tiling: bool | None = None
                     ) -> torch.Tensor:
        """Pixels in [-1, 1] (1 or b images) -> scaled latents, one posterior sample per image from its generator;
        tiling: the request's vae_tiling (None: tiled when large, decoding.py)."""
        tiles = decoding.tiled(self.model, pixels.shape[-2], pixels.shape[-1], 1, tiling, encode=True)
        return decoding.encode(self.model, pixels, generators, tiles)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling: bool | None = None, tiny: bool = False) -> torch.Tensor:
        """Latents -> pixels in [0, 1]: by the VAE (in tiles when `tiling` says so, or, None, when the image is large:
        decoding.py), or with `tiny` by the tiny autoencoder where one is loaded (previews; final images when
        `tiny_final`)."""
        f = self.model.config.vae.downscale
        small = self.tiny_vae if tiny else None
        tiles = small is None and decoding.tiled(self.model, latents.shape[-2] * f, latents.shape[-1] * f,
                                                 latents.shape[0], tiling)
        pixels = decoding.decode(self.model, latents, tiles, small)
        return (check_finite(pixels, "the decoded pixels") / 2 + 0.5).clamp(0, 1)

    def to_images(self, latents: torch.Tensor, req: Request, extra: dict[str, Any] | None = None
                  ) -> list[Image.Image]:
        """Decoded images, each with its infotext; `extra` adds infotext fields (before Version)."""
        with self.tiling(req):
            pixels = self.decode(latents, req.vae_tiling, tiny=self.tiny_final)
        images = tensor_to_images(pixels)
        shared = self._batch_infotext(req)  # hashes, warnings, ControlNet units: the same for every image
        for i, img in enumerate(images):
            img.info["parameters"] = self.infotext(req, i, extra, shared)
            img.info["seed"] = req.seeds[i]
            if req.subseed_strength:
                img.info["subseed"] = req.subseeds[i]
        return images

    def _batch_infotext(self, req: Request) -> dict[str, Any]:
        """The parameters every image of a batch shares beyond the Request's: LoRA/TI hashes, warnings, units."""
        return {**self.networks.infotext_fields(req), **self.controlnets.infotext_fields(req.controls),
                **self.ip_adapters.infotext_fields(req.image_prompts)}

    def infotext(self, req: Request, index: int, extra: dict[str, Any] | None = None,
                 shared: dict[str, Any] | None = None) -> str:
        """Image `index` of the batch's A1111 parameters line (shared: _batch_infotext's, when already made)."""
        if self._model_hash is False:
            self._model_hash = model_hash(self.model.source)
        source = Path(self.model.source) if self.model.source else None
        params = {**req.infotext_fields(index), "Model hash": self._model_hash,
                  "Model": source.stem if source else None,
                  **(self._batch_infotext(req) if shared is None else shared), **(extra or {}),
                  "Version": f"sdengine {__version__}"}
        return format_parameters(req.prompt, req.negative_prompt, params)


class _Head(Pipeline):
    """A pipeline that samples only the first part of a schedule (the base model's share of an ensemble)."""

    def __init__(self, model: StableDiffusion, schedule: NoiseSchedule, head: torch.Tensor, networks: Networks):
        super().__init__(model, schedule, networks)
        self.head = head

    def sigmas(self, req: Request, img2img: bool) -> torch.Tensor:
        return self.head


def follow_steps(guided: CFGDenoiser, callback: Callback | None, offset: int = 0) -> Callback | None:
    """The sampler's per-step callback, also moving prompt editing and ControlNet start/end on to the next step
    (only where something follows the steps: otherwise the callback as given)."""
    if not guided.scheduled:
        return callback

    def on_step(i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        guided.step = offset + i + 1
        if callback is not None:
            callback(i, n, x, denoised)

    return on_step


def known_region_blend(model: Callable, latent_mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor,
                       sigma_start: torch.Tensor) -> Callable:
    """Inpainting with an ordinary UNet: before every evaluation but the first, the known region (mask 0) is
    replaced by the image noised to the current sigma with the initial noise, as diffusers' inpaint pipeline
    does after each step. Sampler updates are elementwise, so blending the model's input is the same thing."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma.max() < sigma_start:
            x = (known + noise * sigma) * (1 - latent_mask) + x * latent_mask
        return model(x, sigma)

    return denoise


__all__ = ["Pipeline", "Request", "SAMPLERS", "Callback", "model_hash"]
