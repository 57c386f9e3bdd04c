"""The generation service behind the routes: the job runner (n_iter batches, progress, previews, interrupt/skip/
cancel) over the model registry, with bodies read into GenJobs by server/validation.py."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import datetime
from typing import Any

import torch
from PIL import Image

from .. import __version__, cpu_memory
from ..diffusion.samplers import SAMPLERS
from ..images import image_to_tensor, mask_to_tensor, tensor_to_images
from ..pipeline import NonFiniteError, Pipeline
from ..prompts import Style
from ..request import AESTHETIC_SCORES, Request
from . import scripts
from .images import encode_png
from .jobs import Job, JobQueue, StopSampling
from .registry import ModelEntry, ModelRegistry
from .samplers import AESTHETIC_OPTIONS
from .validation import BodyReader, GenJob, Limits, check_clip_skip


class Service:
    """Everything the routes share: caps, models, settings, styles and the queue with its runner. `registries`:
    one per device (serve --devices), each with its own pipeline and a worker of the queue; `registry` (the
    first) answers listings and checks requests."""

    def __init__(self, registry: ModelRegistry, limits: Limits, styles: dict[str, Style], threads: int | None = None,
                 registries: list[ModelRegistry] | None = None):
        self.registries = registries or [registry]
        self.registry, self.limits, self.styles, self.threads = self.registries[0], limits, styles, threads
        self._stale: set[int] = set()  # workers whose pipeline has not seen the latest /refresh-embeddings
        # A1111's defaults; a preview is a full VAE decode, hence one every 10 steps at most
        self.settings: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "live_previews_enable": True,
                                         "show_progress_every_n_steps": 10, "token_merging_ratio": 0.0,
                                         "sdxl_refiner_high_aesthetic_score": AESTHETIC_SCORES[0],
                                         "sdxl_refiner_low_aesthetic_score": AESTHETIC_SCORES[1]}
        self.bodies = BodyReader(limits, registry, styles, self.settings)
        # the heap trimmed whenever the queue goes idle: bursts of mixed-size jobs fragment it (cpu_memory.release)
        self.queue = JobQueue(self.run, max_waiting=limits.queue_size, on_idle=cpu_memory.release,
                              workers=len(self.registries))
        self._preview_lock = threading.Lock()
        self._preview_cache: tuple[str, int, str | None] = ("", -1, None)

    def read(self, body: dict[str, Any], mode: str) -> GenJob:
        """A request body -> a job that can run (BadInput otherwise). Request threads."""
        return self.bodies.read(body, mode)

    check_clip_skip = staticmethod(check_clip_skip)

    def worker_registry(self, job: Job) -> ModelRegistry:
        """The models of the device that runs `job`."""
        return self.registries[job.worker]

    # --- the worker threads (one per device) ---------------------------------------------------------------

    def run(self, job: Job) -> dict[str, Any]:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread: set it here
        registry = self.worker_registry(job)
        if job.mode == "extras":  # an upscale (server/extras.py): its own work, on this thread
            return job.spec(job)
        if job.mode == "load":  # this device loads it now, the others when they next generate
            registry.ensure(job.spec)
            for other in self.registries:
                other.default_name = registry.current.name
            return {}
        if job.mode == "refresh":  # between jobs, so no generation sees the embeddings change under it
            registry.loras.refresh()
            self._stale = set(range(len(self.registries)))  # each worker refreshes its own, between its jobs
        if job.worker in self._stale:
            self._stale.discard(job.worker)
            if registry.pipeline is not None:
                registry.pipeline.networks.refresh()
                registry.pipeline.networks.embeddings()
        if job.mode == "refresh":
            return {}
        gen: GenJob = job.spec
        job.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        warnings = list(gen.warnings)  # and each batch's networks' (unknown LoRA, skipped layers...)
        if gen.script is not None:  # x/y/z plot (server/scripts.py): its cells, then the grid
            images, more = scripts.run_xyz(self, job, gen)
            warnings += [w for w in more if w not in warnings]
            pipe, entry = registry.ensure(gen.model)  # the request's model again, for the info
        else:
            pipe, entry = registry.ensure(gen.model)
            job.job_count = gen.request.n_iter
            if gen.upscale is not None:  # "sd upscale" (server/scripts.py)
                images = scripts.run_sd_upscale(job, gen, pipe, self.for_model(gen, pipe))
            else:
                images = self.images(job, gen, pipe, self.for_model(gen, pipe), warnings)
        if "sd_model_checkpoint" in gen.persist:
            for other in self.registries:
                other.default_name = entry.name
        if "CLIP_stop_at_last_layers" in gen.persist:
            self.settings["CLIP_stop_at_last_layers"] = gen.request.clip_skip
        if "token_merging_ratio" in gen.persist:
            self.settings["token_merging_ratio"] = gen.request.tome
        for key in AESTHETIC_OPTIONS:
            if key in gen.persist:
                self.settings[key] = gen.persist[key]
        infotexts = [image.info.get("parameters", "") for image in images]
        encoded = [encode_png(image, text) for image, text in zip(images, infotexts)] if gen.send_images else []
        return {"images": encoded, "info": json.dumps(self.info(gen, entry, pipe, infotexts, job, warnings))}

    @staticmethod
    def for_model(gen: GenJob, pipe: Pipeline) -> Request:
        """The job's request for the model that runs it: a refiner run as the model itself takes the aesthetic-score
        options too (as A1111 conditions any refiner on them; the others have no such input)."""
        cfg = pipe.model.config
        if cfg.conditioner and cfg.text_2 is None and gen.request.refiner is None:
            return dataclasses.replace(gen.request, **gen.aesthetic)
        return gen.request

    def images(self, job: Job, gen: GenJob, pipe: Pipeline, req: Request, warnings: list[str],
               offset: int = 0) -> list[Image.Image]:
        """One request's n_iter batches (init images, mask and paste-back from `gen`), each image with its
        infotext in .info["parameters"]. `offset`: the first batch's number in the job's progress."""
        init = torch.cat([image_to_tensor(img, req.width, req.height) for img in gen.init]) if gen.init else None
        mask = mask_to_tensor(gen.mask, req.width, req.height) if gen.mask is not None else None
        inpaint: dict[str, Any] = {}
        if gen.masked is not None and gen.mask is not None:
            inpaint = {"latent_mask": gen.masked.latent_mask(gen.mask, pipe.model.config.vae.downscale),
                       "masked_latents": gen.masked.latent_fill}
        images: list[Image.Image] = []
        latest: list[torch.Tensor] = []  # the current batch's last denoised estimate

        def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            job.step, job.steps = step + 1, total
            latest[:] = [denoised]
            # a reference, not a copy: no device sync per step (samplers never write into `denoised`)
            job.preview, job.preview_step = denoised[:1], job.preview_step + 1
            job.check()

        for n in range(req.n_iter):
            if job.cancel:
                raise StopSampling("cancel")
            if job.interrupt:  # between batches: return the batches done so far
                break
            job.skip, job.job_no, job.step, job.steps = False, offset + n, 0, 0
            batch = pipe.resolve(req.iteration(n))  # wildcards chosen for this batch's seed
            latest.clear()
            try:
                latents = pipe.latents(batch, init, mask, callback, **inpaint)
            except StopSampling as stop:  # interrupt/skip keep the last estimate, as A1111 does
                if stop.kind == "cancel" or not latest:
                    raise
                latents = latest[0]
            warnings += [w for w in pipe.networks.warnings if w not in warnings]
            for i, image in enumerate(pipe.to_images(latents, batch, gen.masked.extra if gen.masked else None)):
                images.append(gen.masked.finish(image, i) if gen.masked is not None else image)
        return images

    def info(self, gen: GenJob, entry: ModelEntry, pipe: Pipeline, infotexts: list[str], job: Job,
             warnings: list[str]) -> dict:
        req = gen.request
        count = req.batch_size * req.n_iter
        sha = self.worker_registry(job).sha256(entry)
        inpainting_unet = pipe.model.config.unet.in_channels == 9
        resize_from = req.seed_resize_from or (-1, -1)
        batches = [req.iteration(n) for n in range(req.n_iter)]  # their seeds follow A1111's rules (Request)
        fields = req.infotext_fields(0)
        extra = {k: v for k, v in fields.items() if v is not None and (k.startswith("Hires") or k == "Schedule type")}
        return {
            "prompt": gen.prompt, "all_prompts": [req.prompt] * count,
            "negative_prompt": gen.negative_prompt, "all_negative_prompts": [req.negative_prompt] * count,
            "seed": req.seed, "all_seeds": [s for b in batches for s in b.seeds],
            "subseed": req.subseed, "all_subseeds": [s for b in batches for s in b.subseeds],
            "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height,
            "sampler_name": SAMPLERS[req.sampler].display, "scheduler": req.schedule, "cfg_scale": req.cfg_scale,
            "steps": req.steps, "batch_size": req.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": entry.stem, "sd_model_hash": sha[:10] if sha else None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": resize_from[0],
            "seed_resize_from_h": resize_from[1],
            "denoising_strength": gen.denoising_strength,
            "extra_generation_params": extra,
            "index_of_first_image": 0, "infotexts": infotexts, "styles": gen.styles,
            "job_timestamp": job.job_timestamp, "clip_skip": req.clip_skip,
            "is_using_inpainting_conditioning": inpainting_unet and gen.mode == "img2img",
            "version": f"sdengine {__version__}",
            # ours: whether sampling was stopped early, what was ignored, and the job's id for /api/v1/jobs
            "interrupted": job.interrupt, "warnings": warnings, "job_id": job.id,
        }

    # --- extra networks (request threads) --------------------------------------------------------------------

    def loras(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/loras: the LoRA folders' files (whatever model is loaded)."""
        return self.registry.loras.api_list()

    def embeddings(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/embeddings for the loaded model (scanned when it loaded or on refresh, in the
        worker; nothing is read here)."""
        fresh = [r.pipeline for w, r in enumerate(self.registries) if w not in self._stale and r.pipeline is not None]
        return fresh[0].networks.embeddings().api() if fresh else {"loaded": {}, "skipped": {}}

    # --- progress (request threads) ------------------------------------------------------------------------

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        job = self.queue.running
        if job is None or job.mode in ("load", "refresh", "extras"):  # no generation running
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "current_task": None, "state": {
                        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                        "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                        "sampling_steps": 0}, "queued": self.queue.waiting()}
        progress = job.progress
        elapsed = time.time() - (job.started or time.time())
        image = None
        if not skip_current_image and self.settings["live_previews_enable"] and \
                self.settings["show_progress_every_n_steps"] > 0:
            image = self.preview(job)
        label = f"Batch {job.job_no + 1} out of {job.job_count}" if job.job_count > 1 else f"scripts_{job.mode}"
        return {"progress": progress, "eta_relative": elapsed / progress - elapsed if progress > 0 else 0.0,
                "current_image": image, "textinfo": f"Sampling step {job.step}/{job.steps}" if job.steps else None,
                "current_task": job.id, "queued": self.queue.waiting(), "state": {
                    "skipped": job.skip, "interrupted": job.interrupt, "stopping_generation": False, "job": label,
                    "job_count": job.job_count, "job_timestamp": job.job_timestamp, "job_no": job.job_no,
                    "sampling_step": job.step, "sampling_steps": job.steps, "job_id": job.id}}

    def preview(self, job: Job) -> str | None:
        """The running job's latest denoised estimate through the VAE, as base64 PNG. A new one at most every
        show_progress_every_n_steps steps however many clients poll, one decode at a time: polling cannot pile
        up work (on a CPU a full-size decode costs more than a few UNet steps)."""
        with self._preview_lock:
            latent, step, pipe = job.preview, job.preview_step, self.worker_registry(job).pipeline
            if latent is None or pipe is None:
                return None
            cached_id, cached_step, cached = self._preview_cache
            if cached_id == job.id and 0 <= step - cached_step < self.settings["show_progress_every_n_steps"]:
                return cached
            try:
                png = encode_png(tensor_to_images(pipe.decode(latent, tiny=True))[0])  # TAESD where loaded
            except NonFiniteError:  # an estimate gone NaN: no preview (the job itself fails with the message)
                png = None
            self._preview_cache = (job.id, step, png)
            return png
