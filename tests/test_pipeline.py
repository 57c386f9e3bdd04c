"""Generation against diffusers' pipelines (txt2img, img2img, inpaint) with the same weights, seeds and settings;
Request's checks; the VAE's fp32 fallback when a half-precision decode overflows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import save_pipeline
from sampler_harness import max_rel_error, use_scheduler

import sdengine
from sdengine.diffusion.samplers import SAMPLERS
from sdengine.hires import HiresFix
from sdengine.images import image_to_tensor, mask_to_tensor
from sdengine.pipeline import Pipeline
from sdengine.request import Request

W, H = 40, 32  # non-square, multiples of 8; the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def pipes(reference):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(reference["folder"], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return {"ours": Pipeline(sdengine.load(reference["folder"])), "ref": ref}


def init_image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(H, W, 3) * 255).astype(np.uint8))


def right_half_mask() -> Image.Image:
    return Image.fromarray(((np.arange(W)[None, :].repeat(H, 0) >= W // 2) * 255).astype(np.uint8))


DETERMINISTIC = [name for name, spec in SAMPLERS.items() if not spec.stochastic and spec.diffusers_class]


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_txt2img_matches_diffusers(pipes, sampler):
    spec = SAMPLERS[sampler]
    use_scheduler(pipes["ref"], spec.diffusers_class, **spec.diffusers_options)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    ref = pipes["ref"]("a red circle", negative_prompt="blue", num_inference_steps=6, guidance_scale=7.5,
                       generator=gens, height=H, width=W, num_images_per_prompt=2, output_type="latent").images
    ours = pipes["ours"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, sampler=sampler,
                                        cfg_scale=7.5, seed=5, width=W, height=H, batch_size=2))
    assert max_rel_error(ours, ref) < 1e-3


def test_txt2img_images_match(pipes):
    use_scheduler(pipes["ref"], "EulerDiscreteScheduler")
    ref = pipes["ref"]("a photo", num_inference_steps=4, generator=[torch.Generator().manual_seed(1)],
                       height=H, width=W, output_type="np").images[0]
    img = pipes["ours"].generate("a photo", steps=4, seed=1, width=W, height=H)[0]
    diff = np.abs(np.asarray(img).astype(float) - (ref * 255).round())
    assert diff.mean() <= 1.0 and img.size == (W, H)
    assert "Seed: 1" in img.info["parameters"] and "Sampler: Euler" in img.info["parameters"]


@pytest.mark.parametrize("strength", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_img2img_matches_diffusers(pipes, sampler, strength):
    """Strength 1.0 included: img2img keeps its image noised to sigma_max (only inpainting starts from noise)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    if sampler not in SAMPLERS:
        pytest.skip(f"{sampler} not registered")
    spec = SAMPLERS[sampler]
    ref = StableDiffusionImg2ImgPipeline(**pipes["ref"].components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, spec.diffusers_class, **spec.diffusers_options)
    out = ref("a red circle", image=init_image(), strength=strength, num_inference_steps=10, guidance_scale=5,
              generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    req = Request(prompt="a red circle", steps=10, sampler=sampler, cfg_scale=5, seed=3, width=W, height=H,
                  strength=strength)
    ours = pipes["ours"].sample(req, init=image_to_tensor(init_image(), W, H))
    assert max_rel_error(ours, out) < 1e-3


@pytest.mark.parametrize("steps,n", [(10, 1), (10, 4), (10, 10), (7, 5)])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim", "plms"])
def test_denoise_steps_runs_exactly_the_last_n_steps(sampler, steps, n):
    """denoise_steps (A1111's img2img count, the hires pass) cuts the tail by diffusers' rule at a strength that
    selects exactly n steps, whatever strength the infotext reports."""
    from sdengine.diffusion.schedule import SD_SCHEDULE

    req = Request(prompt="x", steps=steps, sampler=sampler, width=64, height=64, strength=0.3, denoise_steps=n)
    full = req.sampler_spec.sigmas(SD_SCHEDULE, steps)
    if n == steps:
        assert req.run_strength == 1.0  # the whole schedule (Pipeline.sample keeps an img2img's image)
        return
    tail = req.sampler_spec.img2img_sigmas(SD_SCHEDULE, steps, req.run_strength)
    per_step = (len(full) - 1) // steps if len(full) - 1 >= steps else 1  # Heun: two sigmas a step
    if sampler not in ("ddim", "plms"):  # the discrete samplers slice diffusers' timestep lists their own way
        assert len(tail) - 1 == n * per_step
    assert req.sampler_spec.img2img_sigmas(SD_SCHEDULE, steps, (n + 0.4) / steps).tolist() == tail.tolist()
    assert Request(prompt="x", steps=steps, strength=0.3).run_strength == 0.3
    for bad in (0, steps + 1, 2.5):
        with pytest.raises(ValueError, match="denoise steps"):
            Request(prompt="x", steps=steps, denoise_steps=bad)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_matches_diffusers(pipes, strength):
    """Ordinary UNets: the known region is blended back at every step, as diffusers does."""
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline(**pipes["ref"].components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "EulerDiscreteScheduler")
    out = ref("a red circle", image=init_image(), mask_image=right_half_mask(), strength=strength,
              num_inference_steps=8, guidance_scale=5, generator=[torch.Generator().manual_seed(3)],
              output_type="latent", height=H, width=W).images
    req = Request(prompt="a red circle", steps=8, sampler="euler", cfg_scale=5, seed=3, width=W, height=H,
                  strength=strength)
    ours = pipes["ours"].sample(req, init=image_to_tensor(init_image(), W, H),
                                mask=mask_to_tensor(right_half_mask(), W, H))
    assert max_rel_error(ours, out) < 1e-3


def test_inpainting_unet_matches_diffusers(tmp_path):
    """9-channel inpainting UNets see the mask and the masked image's latents."""
    from diffusers import StableDiffusionInpaintPipeline

    save_pipeline("sd1", tmp_path / "inpaint", in_channels=9)
    ref = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inpaint", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "EulerDiscreteScheduler")
    pipe = Pipeline(sdengine.load(tmp_path / "inpaint"))
    for strength in (1.0, 0.5):
        out = ref("a cat", image=init_image(), mask_image=right_half_mask(), strength=strength,
                  num_inference_steps=5, guidance_scale=4, generator=[torch.Generator().manual_seed(9)],
                  output_type="latent", height=H, width=W).images
        req = Request(prompt="a cat", steps=5, sampler="euler", cfg_scale=4, seed=9, width=W, height=H,
                      strength=strength)
        ours = pipe.sample(req, init=image_to_tensor(init_image(), W, H), mask=mask_to_tensor(right_half_mask(), W, H))
        assert max_rel_error(ours, out) < 1e-3


def test_batch_image_reproducible_alone(pipes):
    """Image i of a batch uses seed + i and comes out the same when generated alone."""
    batch = pipes["ours"].sample(Request(prompt="x", steps=3, seed=10, width=W, height=H, batch_size=3))
    alone = pipes["ours"].sample(Request(prompt="x", steps=3, seed=12, width=W, height=H))
    assert max_rel_error(batch[2:], alone) < 1e-4  # the same up to float reassociation in batched kernels
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("sampler", [n for n, s in SAMPLERS.items() if s.stochastic])
def test_stochastic_samplers_are_deterministic_per_seed(pipes, sampler):
    run = lambda seed: pipes["ours"].sample(Request(prompt="x", steps=4, sampler=sampler, seed=seed, width=W, height=H))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_callback_sees_every_step(pipes):
    seen = []
    pipes["ours"].generate("x", steps=5, width=W, height=H, callback=lambda i, n, x, d: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]


@pytest.mark.parametrize("bad", [dict(width=30), dict(height=0), dict(width=8200), dict(steps=0),
                                 dict(cfg_scale=float("nan")), dict(sampler="nope"), dict(schedule="weird"),
                                 dict(strength=0.0), dict(batch_size=0)])
def test_bad_requests_fail_before_any_work(bad):
    with pytest.raises(ValueError) as e:
        Request(prompt="x", **bad)
    assert "\n" not in str(e.value)
    if "sampler" in bad:
        assert "euler" in str(e.value)  # the valid ones are listed


def test_seed_minus_one_picks_and_reports(pipes):
    req = Request(prompt="x", seed=-1, width=W, height=H)
    assert req.seed >= 0 and req.seeds == [req.seed]


def test_request_is_keyword_only_frozen_and_resolves_its_seeds_once():
    with pytest.raises(TypeError):
        Request("a cat", "", 20)  # the positional form, where a new field would silently shift values
    req = Request(prompt="x", seed=-1, subseed=-1, width=64, height=64)
    with pytest.raises(AttributeError):
        req.steps = 3  # type: ignore[misc]
    again = req.sized(32, 32)  # derived requests keep the drawn seeds
    assert again is req and (req.seed, req.subseed) == (req.iteration(0).seed, req.iteration(0).subseed)
    assert Request(prompt="x", sampler="DPM++ 2M").sampler == "dpmpp_2m"  # one spelling from here on
    assert Request(prompt="x").sized(24, 16).width == 24 and Request(prompt="x", width=8).sized(24, 16).width == 8


def test_batches_of_n_iter_continue_the_seeds_as_a1111():
    req = Request(prompt="x", seed=10, subseed=50, batch_size=2, n_iter=3, width=64, height=64)
    assert [b.seeds for b in map(req.iteration, range(3))] == [[10, 11], [12, 13], [14, 15]]
    varied = Request(prompt="x", seed=10, subseed=50, subseed_strength=0.5, batch_size=2, n_iter=2)
    assert [b.seeds for b in map(varied.iteration, range(2))] == [[10, 10], [10, 10]]
    assert [b.subseeds for b in map(varied.iteration, range(2))] == [[50, 51], [52, 53]]
    with pytest.raises(ValueError, match="batch 3 of a request with 3"):
        req.iteration(3)
    with pytest.raises(ValueError, match="seed"):  # the last image's seed must exist too
        Request(prompt="x", seed=2 ** 64 - 64 - 5, batch_size=2, n_iter=3)


def test_run_makes_every_batch_and_equals_the_batches_alone(pipes):
    pipe = pipes["ours"]
    images = pipe.run(Request(prompt="a red circle", steps=2, seed=3, width=W, height=H, n_iter=2))
    alone = pipe.generate("a red circle", steps=2, seed=4, width=W, height=H)[0]
    assert [im.info["seed"] for im in images] == [3, 4]
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone))
    assert images[1].info["parameters"] == alone.info["parameters"]


def test_a_hires_target_too_large_is_refused_before_any_work():
    with pytest.raises(ValueError, match="up to 8192"):
        Request(prompt="x", width=4096, height=64, hires=HiresFix(4.0))
    Request(prompt="x", hires=HiresFix(4.0))  # unsized: checked once the size is known (Pipeline.run)
    with pytest.raises(ValueError, match="up to 8192"):
        Request(prompt="x", hires=HiresFix(4.0)).sized(4096, 64)


# ---- VAE half-precision fallback ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vae_decode_falls_back_to_fp32_on_overflow(sd1_folder, monkeypatch, dtype):
    model = sdengine.load(sd1_folder, dtype=dtype)
    decoder_class = type(model.vae.decoder)  # patched on the class: the fp32 fallback decodes with a copy
    real = decoder_class.forward
    calls = []

    def overflowing(self, z):  # what an SD1.5 VAE does in fp16 on some latents
        calls.append(z.dtype)
        out = real(self, z)
        return out if z.dtype == torch.float32 else torch.full_like(out, float("inf"))

    monkeypatch.setattr(decoder_class, "forward", overflowing)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = Pipeline(model).decode(latents)
    assert calls == [dtype, torch.float32]
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all() and 0 <= pixels.min() <= pixels.max() <= 1
    assert pixels.std() > 0.01  # a real decode, not a clamp of inf/nan
    assert next(model.vae.parameters()).dtype == dtype  # the shared VAE was never changed
    assert all(p.dtype == dtype for p in model.unet.parameters())
    monkeypatch.setattr(decoder_class, "forward", real)
    reference = Pipeline(model.float()).decode(latents)  # the same (rounded) weights, all in fp32
    assert torch.equal(pixels, reference)  # the fallback is a full fp32 decode
