"""Hires fix (sdengine/hires.py) against diffusers' txt2img + img2img on the upscaled first pass, A1111's target
sizes and step counts. Seamless tiling is in test_tiling.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sampler_harness import SD15_SCHEDULER_CONFIG, max_rel_error

import sdengine
from sdengine.hires import HiresFix
from sdengine.pipeline import Pipeline, Request

W, H = 24, 16  # the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def pipes(sd1_folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    txt.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    for p in (txt, img):
        p.set_progress_bar_config(disable=True)
    return {"ours": Pipeline(sdengine.load(sd1_folder)), "txt": txt, "img": img}


def test_latent_hires_fix_is_txt2img_then_img2img_on_the_upscaled_latents(pipes):
    """A1111's pass with the "Latent" upscaler: bilinear latent upscale, then exactly `steps` img2img steps, the
    tail of a schedule of int(steps / strength) = int(3 / 0.55) = 5 steps (diffusers: 5 steps at strength 0.7)."""
    gen = [torch.Generator().manual_seed(3)]
    first_ref = pipes["txt"]("a red circle", num_inference_steps=4, guidance_scale=5, generator=gen, height=H,
                             width=W, output_type="latent").images
    up = F.interpolate(first_ref, size=(H, W), mode="bilinear")  # 2x the latent size
    ref = pipes["img"]("a red circle", image=up, strength=0.7, num_inference_steps=5, guidance_scale=5,
                       generator=[torch.Generator().manual_seed(3)], output_type="latent").images

    pipe = pipes["ours"]
    first_req = Request(prompt="a red circle", steps=4, cfg_scale=5, seed=3, width=W, height=H,
                        hires=HiresFix(2, steps=3, denoising_strength=0.55))
    first = pipe.sample(first_req)
    assert max_rel_error(first, first_ref) < 1e-3
    steps = []
    latents = pipe.second_pass(first_req, first, callback=lambda i, n, x, d: steps.append(i))
    req = first_req.second_pass()
    assert (req.width, req.height, req.steps, len(steps)) == (2 * W, 2 * H, 5, 3)
    assert max_rel_error(latents, ref) < 1e-3


def test_image_upscaler_hires_fix_resizes_the_8_bit_first_pass(pipes):
    gen = [torch.Generator().manual_seed(4)]
    first = pipes["txt"]("a blue square", num_inference_steps=4, guidance_scale=5, generator=gen, height=H,
                         width=W, output_type="np").images[0]
    image = Image.fromarray((first * 255).astype(np.uint8)).resize((2 * W, 2 * H), Image.LANCZOS)  # A1111 truncates
    ref = pipes["img"]("a blue square", image=image, strength=0.7, num_inference_steps=5, guidance_scale=5,
                       generator=[torch.Generator().manual_seed(4)], output_type="latent").images
    req = Request(prompt="a blue square", steps=4, cfg_scale=5, seed=4, width=W, height=H,
                  hires=HiresFix(2, upscaler="Lanczos", steps=3, denoising_strength=0.55))
    latents = pipes["ours"].second_pass(req, pipes["ours"].sample(req))
    assert max_rel_error(latents, ref) < 2e-2  # a decoded pixel's last bit can round differently before the resize


@pytest.mark.parametrize("steps,strength", [(3, 0.55), (20, 0.7), (10, 0.3), (7, 1.0), (15, 0.999)])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "lms", "ddim"])
def test_second_pass_runs_exactly_a1111s_hires_steps_of_its_longer_schedule(steps, strength, sampler):
    from sdengine.diffusion.schedule import SD_SCHEDULE

    first = Request(prompt="x", steps=30, sampler=sampler, width=64, height=64,
                    hires=HiresFix(steps=steps, denoising_strength=strength))
    req = first.second_pass()
    total = int(steps / min(strength, 0.999))
    assert req.steps == total
    full = req.sampler_spec.sigmas(SD_SCHEDULE, total)
    run = max(1, steps - 1) if sampler == "ddim" else steps  # A1111's timestep samplers: t_enc = steps - 1
    assert req.strength == strength and req.denoise_steps == run
    tail = req.sampler_spec.img2img_sigmas(SD_SCHEDULE, total, req.run_strength) if req.run_strength < 1 else full
    per_step = (len(full) - 1) // total if len(full) - 1 >= total else 1
    assert len(tail) - 1 == min(run * per_step, len(full) - 1)
    np.testing.assert_array_equal(tail, full[len(full) - len(tail):])


def test_target_sizes_follow_a1111():
    assert HiresFix(2.0).target(64, 48) == (128, 96, 0, 0)
    assert HiresFix(1.5).target(40, 40) == (56, 56, 0, 0)  # multiples of 8
    assert HiresFix(1.5).output_size(40, 40) == HiresFix(1.5).output_size(40, 40, downscale=2) == (56, 56)
    assert HiresFix(resize_x=160).target(64, 48) == (160, 120, 0, 0)
    assert HiresFix(resize_y=96).target(64, 48) == (128, 96, 0, 0)
    # both sides with another aspect ratio: cover them, then crop the excess in latent pixels
    assert HiresFix(resize_x=160, resize_y=160).target(64, 48) == (208, 160, 6, 0)  # 213 -> 208
    assert HiresFix(resize_x=160, resize_y=160).target(64, 48, downscale=2) == (208, 160, 24, 0)
    for f in (2, 8):
        assert HiresFix(resize_x=160, resize_y=160).output_size(64, 48, f) == (160, 160)
    assert HiresFix(resize_x=96, resize_y=160).target(64, 64) == (160, 160, 8, 0)


def test_generate_with_hires_fix_writes_a1111s_fields(pipes):
    pipe = pipes["ours"]
    kw = dict(steps=3, cfg_scale=5, seed=2, width=W, height=H)
    plain = pipe.generate("a red circle", **kw)[0]
    image = pipe.generate("a red circle", **kw, hires=HiresFix(2, steps=2, denoising_strength=0.5))[0]
    assert image.size == (2 * W, 2 * H)
    text = image.info["parameters"]
    assert f"Size: {W}x{H}" in text and "Denoising strength: 0.5" in text
    assert "Hires upscale: 2, Hires steps: 2" in text and "Hires upscaler" not in text
    assert text.split("\n")[0] == plain.info["parameters"].split("\n")[0]
    cropped = pipe.generate("a red circle", **kw, hires=HiresFix(resize_x=40, resize_y=40, upscaler="Latent (nearest)",
                                                                 sampler="dpmpp_2m", prompt="a blue circle"))
    text = cropped[0].info["parameters"]
    assert cropped[0].size == (40, 40)
    assert 'Hires sampler: DPM++ 2M, Hires prompt: a blue circle, Hires resize: 40x40' in text
    assert "Hires upscaler: Latent (nearest)" in text and "Hires upscale:" not in text


@pytest.mark.parametrize("fields,match", [
    (dict(scale=0.5), "scale"), (dict(scale=float("nan")), "scale"), (dict(upscaler="R-ESRGAN 4x+"), "upscaler"),
    (dict(denoising_strength=0), "denoising"), (dict(steps=-1), "steps"), (dict(resize_x=-8), "resize x"),
    (dict(resize_y=20), "resize y"),
    (dict(sampler="nope"), "sampler"), (dict(schedule="cosine"), "schedule"),
])
def test_bad_hires_values_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        HiresFix(**fields)


def test_a_too_large_hires_target_fails_before_the_first_pass(pipes):
    calls = []
    with pytest.raises(ValueError, match="width"):
        pipes["ours"].generate("x", steps=2, width=W, height=H, hires=HiresFix(resize_x=9000),
                               callback=lambda *a: calls.append(a))
    assert not calls
