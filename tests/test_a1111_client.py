"""A client library written for AUTOMATIC1111 (webuiapi, from PyPI, unmodified) against a real `sdengine serve`.

It builds its requests the way A1111 expects (every field sent, eta 1.0, s_noise 1, scheduler "automatic", images
as data URLs, basic auth through a requests session) and reads the responses the way A1111 answers them.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from server_helpers import serve

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi", reason="pip install webuiapi (the test extra)")

AUTH = ("client", "pa55")
SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("client"), auth=AUTH) as running:
        # as its README shows, with the auth A1111's --api-auth asks for
        yield webuiapi.WebUIApi(host=running.host, port=running.port, sampler="Euler a", steps=2,
                                username=AUTH[0], password=AUTH[1])


def test_txt2img(api):
    result = api.txt2img(prompt="a red bicycle", negative_prompt="blurry", seed=31, cfg_scale=6.5,
                         sampler_name="Euler a", **SMALL)
    assert isinstance(result.image, Image.Image) and result.image.size == (64, 64)
    assert result.info["seed"] == 31 and result.info["all_seeds"] == [31]
    assert result.info["prompt"] == "a red bicycle" and result.info["sampler_name"] == "Euler a"
    infotext = result.info["infotexts"][0]
    assert infotext.startswith("a red bicycle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 6.5")
    assert "Seed: 31," in infotext and result.image.info["parameters"] == infotext
    assert result.parameters["prompt"] == "a red bicycle" and result.parameters["steps"] == 2

    batch = api.txt2img(prompt="two cats", seed=5, batch_size=2, sampler_name="DPM++ 2M", scheduler="karras",
                        **SMALL)
    assert len(batch.images) == 2 and batch.info["all_seeds"] == [5, 6]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in batch.info["infotexts"][1]
    again = api.txt2img(prompt="a red bicycle", negative_prompt="blurry", seed=31, cfg_scale=6.5,
                        sampler_name="Euler a", **SMALL)
    assert again.image.tobytes() == result.image.tobytes()  # same seed, same image

    png = api.png_info(result.image)  # a PIL image goes back as a PNG with its text
    assert png.info == infotext


def test_img2img_and_inpaint(api):
    source = Image.new("RGB", (96, 96), (20, 120, 220))
    source.paste((250, 220, 30), (24, 24, 72, 72))
    result = api.img2img(images=[source], prompt="a yellow square", denoising_strength=0.5, seed=8, **SMALL)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.info["infotexts"][0] and result.info["all_seeds"] == [8]

    mask = Image.new("L", (96, 96), 0)
    mask.paste(255, (0, 0, 48, 96))  # white: repaint the left half
    inpainted = api.img2img(images=[source], mask_image=mask, inpainting_fill=1, prompt="a yellow square",
                            denoising_strength=0.75, seed=8, **SMALL)
    # webuiapi asks for "Only masked" (inpaint_full_res) as A1111's API does: the original's size comes back,
    # its unmasked half as it was (beyond the blur of 4 px), the masked half repainted
    assert inpainted.image.size == (96, 96) and inpainted.info["all_seeds"] == [8]
    out, src = np.asarray(inpainted.image.convert("RGB")).astype(int), np.asarray(source).astype(int)
    assert (out[:, 60:] == src[:, 60:]).all() and np.abs(out[:, :36] - src[:, :36]).mean() > 5
    assert "Inpaint area: Only masked" in inpainted.info["infotexts"][0]


def test_listings_options_and_progress(api):
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    models = api.util_get_model_names()
    assert len(models) == 1 and models[0].startswith("tiny.safetensors [")
    assert api.util_get_current_model() == models[0]
    assert api.get_sd_models()[0]["model_name"] == "tiny"
    assert "photo" in {s["name"] for s in api.get_prompt_styles()}
    assert api.get_scripts() == {"txt2img": ["x/y/z plot"],  # asked at construction (extension check)
                                 "img2img": ["x/y/z plot", "outpainting mk2", "poor man's outpainting",
                                             "sd upscale"]}
    assert not api.has_controlnet and not api.has_adetailer

    api.util_set_model("tiny")  # A1111's way of switching: set sd_model_checkpoint to the closest title
    assert api.util_get_current_model() == models[0]
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert "Clip skip: 2" in api.txt2img(prompt="x", seed=1, **SMALL).info["infotexts"][0]
    api.set_options({"CLIP_stop_at_last_layers": 1})
    api.util_wait_for_ready(check_interval=0.1)  # idle: progress 0 and no job
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert api.interrupt() == {"interrupted": None} and api.skip() == {"skipped": None}
    assert api.refresh_checkpoints() is None


def test_without_credentials_is_refused(api):
    anonymous = webuiapi.WebUIApi(baseurl=api.baseurl)
    with pytest.raises(RuntimeError) as refused:
        anonymous.txt2img(prompt="x", **SMALL)
    assert refused.value.args[0] == 401


def test_scripts_through_the_client(api):
    """webuiapi's script_name/script_args, in A1111's layouts: the X/Y/Z plot (grid first, then the cells), the
    outpainting mk2 script and SD upscale (upscaler 1: Lanczos in /sdapi/v1/upscalers' list)."""
    xyz = [4, "1-2", [], 0, "", [], 0, "", [], True, True, False, False, 0, False, False]   # X: Steps 1, 2
    grid = api.txt2img(prompt="a cat", seed=3, script_name="x/y/z plot", script_args=xyz, **SMALL)
    assert len(grid.images) == 3 and grid.images[0].width > 2 * 64
    assert "X Type: Steps, X Values: 1-2" in grid.info["infotexts"][0]
    source = Image.new("RGB", (64, 64), (20, 120, 220))
    out = api.img2img(images=[source], prompt="a cat", seed=3, denoising_strength=0.8, script_name="outpainting mk2",
                      script_args=["", 16, 4, ["left", "right"], 1.0, 0.05], **SMALL)
    assert out.image.size == (96, 64)
    up = api.img2img(images=[source], prompt="a cat", seed=3, denoising_strength=0.3, script_name="sd upscale",
                     script_args=["", 16, 1, 1.5], steps=2, width=48, height=48)
    assert up.image.size == (96, 96) and "SD upscale upscaler: Lanczos" in up.info["infotexts"][0]
