"""The engine's newer features through the HTTP API, in this process (FastAPI's TestClient over the real app, tiny
models): ControlNet units in alwayson_scripts and the /controlnet routes, the upscalers and A1111's extras routes,
the x/y/z plot and outpainting scripts, A1111's scheduler labels, and the heap trimmed when the queue goes idle."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

SMALL = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7}


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pattern(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def write_model(path, seed: int) -> None:
    """A tiny model whose UNet answers its input (init_weights zeroes the output layers: every image would be the
    noise alone, whatever conditions it)."""
    from sdengine.config import TINY
    from sdengine.model import StableDiffusion
    from sdengine.weights import save

    model = StableDiffusion(TINY).init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save(model, path)


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    for name in ("models", "controlnet", "upscalers"):
        (root / name).mkdir()
    write_model(root / "models" / "tiny.safetensors", 0)
    write_model(root / "models" / "other.safetensors", 1)
    from sdengine.upscalers import build
    from sdengine.upscalers.nets import CompactConfig

    torch.manual_seed(0)
    net = build(CompactConfig(num_feat=8, num_conv=1, upscale=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / "upscalers" / "tiny-x2.safetensors")
    return root


@pytest.fixture(scope="module")
def client(folders):
    from fastapi.testclient import TestClient

    from sdengine.control import save_controlnet
    from sdengine.nn.controlnet import ControlNet, ControlNetConfig
    from sdengine.prompts import BUNDLED_STYLES, load_styles
    from sdengine.server.app import create_app
    from sdengine.server.registry import ModelRegistry
    from sdengine.server.service import Service
    from sdengine.server.validation import Limits

    patch = pytest.MonkeyPatch()
    patch.setenv("SDENGINE_UPSCALERS", str(folders / "upscalers"))
    registry = ModelRegistry(folders / "models", None, torch.device("cpu"), torch.float32, lora_dirs=[],
                             embedding_dirs=[], controlnet_dir=folders / "controlnet")
    registry.ensure("tiny.safetensors")
    registry.default_name = registry.current.name
    net = ControlNet(ControlNetConfig(unet=registry.pipeline.model.config.unet))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # zero convolutions would make it do nothing
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_controlnet(net, folders / "controlnet" / "cn_tiny.safetensors")
    service = Service(registry, Limits(max_width=64, max_height=64, max_steps=3, max_batch=4, queue_size=4),
                      load_styles(BUNDLED_STYLES), threads=1)
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        c.service = service
        yield c
    patch.undo()


def generate(client, path: str = "/sdapi/v1/txt2img", **fields) -> tuple[list[Image.Image], dict]:
    r = client.post(path, json={**SMALL, **fields})
    assert r.status_code == 200, r.text
    return [decode(im) for im in r.json()["images"]], json.loads(r.json()["info"])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- ControlNet ----------------------------------------------------------------------------------------------------

def unit(**fields) -> dict:
    return {"enabled": True, "module": "none", "model": "cn_tiny", "weight": 1.0, "image": b64(pattern(seed=5)),
            "resize_mode": "Crop and Resize", "control_mode": "Balanced", "pixel_perfect": False, **fields}


def test_controlnet_unit_changes_the_image_and_is_recorded(client):
    plain, _ = generate(client)
    controlled, info = generate(client, alwayson_scripts={"controlnet": {"args": [unit()]}})
    assert np.abs(pixels(controlled[0]) - pixels(plain[0])).mean() > 0.5, (info["infotexts"], info["warnings"])
    text = info["infotexts"][0]
    assert 'ControlNet 0: "Module: none, Model: cn_tiny [' in text, text
    assert str(client.service.registry.controlnet_dir) not in text  # named, never by the server's path
    assert not any("alwayson" in w for w in info["warnings"])
    disabled, info = generate(client, alwayson_scripts={"ControlNet": {"args": [unit(enabled=False)]}})
    assert np.array_equal(pixels(disabled[0]), pixels(plain[0]))
    # the extension's dict image, its index settings, and a hash in the name as /controlnet/model_list gives it
    listed = client.get("/controlnet/model_list").json()["model_list"]
    assert len(listed) == 1 and listed[0].startswith("cn_tiny [")
    again, _ = generate(client, alwayson_scripts={"controlnet": {"args": [
        unit(model=listed[0], image={"image": b64(pattern(seed=5)), "mask": None}, resize_mode=1, control_mode=0)]}})
    assert np.array_equal(pixels(again[0]), pixels(controlled[0]))


def test_controlnet_in_img2img_uses_the_init_image_without_its_own(client):
    images, info = generate(client, "/sdapi/v1/img2img", init_images=[b64(pattern(seed=1))], denoising_strength=0.6,
                            alwayson_scripts={"controlnet": {"args": [unit(image=None, module="invert")]}})
    assert "ControlNet 0: " in info["infotexts"][0] and "invert" in info["infotexts"][0]


@pytest.mark.parametrize("bad,why", [
    ({"model": "nope"}, "no ControlNet"), ({"model": "../controlnet/cn_tiny"}, "paths are not accepted"),
    ({"weight": "heavy"}, "weight"), ({"guidance_start": 0.9, "guidance_end": 0.1}, "start"),
    ({"module": "openpose_full"}, "preprocessor"), ({"image": "not base64!"}, "image"),
    ({"control_mode": 7}, "control mode"),
])
def test_bad_controlnet_unit_is_a_422(client, bad, why):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit(**bad)]}}})
    assert r.status_code == 422, r.text
    assert why in r.json()["detail"] and "args[0]" in r.json()["detail"], r.json()


def test_txt2img_unit_without_an_image_is_a_422(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [
        unit(image=None)]}}})
    assert r.status_code == 422 and "needs a control image" in r.json()["detail"]


def test_other_alwayson_scripts_are_still_named_as_ignored(client):
    _, info = generate(client, alwayson_scripts={"ADetailer": {"args": []}, "controlnet": {"args": []}})
    assert info["warnings"] == ["alwayson_scripts ignored: ADetailer"]


def test_controlnet_routes(client):
    assert client.get("/controlnet/version").json() == {"version": 2}
    modules = client.get("/controlnet/module_list").json()["module_list"]
    assert "none" in modules and "canny" in modules and "invert" in modules
    image = pattern(seed=2)
    r = client.post("/controlnet/detect", json={"controlnet_module": "invert", "controlnet_input_images": [b64(image)]})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(decode(r.json()["images"][0])), 255 - pixels(image))
    r = client.post("/controlnet/detect", json={"controlnet_module": "depth_midas",
                                                "controlnet_input_images": [b64(image)]})
    assert r.status_code == 422 and "controlnet_module" in r.json()["detail"]


# --- upscalers and extras ------------------------------------------------------------------------------------------

def test_upscalers_are_listed_as_a1111_lists_them(client):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "tiny-x2"]
    assert set(listed[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert listed[3]["scale"] == 2 and listed[3]["model_path"] is None
    assert "Latent" in [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]


def test_extra_single_image_upscales_by_a_model_and_by_size(client):
    image = pattern(24, 16, seed=4)
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(image), "upscaler_1": "tiny-x2",
                                                           "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    assert decode(r.json()["image"]).size == (48, 32) and "tiny-x2" in r.json()["html_info"]
    r = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64(image), "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 40,
        "upscaler_1": "Lanczos", "upscaler_2": "tiny-x2", "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    assert decode(r.json()["image"]).size == (40, 40)  # covered, then cropped to the size (upscaling_crop)
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64(image), "name": "a"}] * 2,
                                                           "upscaler_1": "Nearest", "upscaling_resize": 1.5})
    assert r.status_code == 200, r.text
    assert [decode(im).size for im in r.json()["images"]] == [(32, 24)] * 2


@pytest.mark.parametrize("fields,why", [
    ({"upscaler_1": "missing"}, "upscaler_1"), ({"upscaler_1": "../upscalers/tiny-x2"}, "not paths"),
    ({"upscaling_resize": 8, "upscaler_1": "Lanczos"}, "pixels"), ({"resize_mode": 3}, "resize_mode"),
])
def test_bad_extras_are_a_422(client, fields, why):
    big = pattern(256, 256)  # 8x: 2048x2048, over this server's 16 * 64 * 64 pixels
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(big), **fields})
    assert r.status_code == 422 and why in r.json()["detail"], r.text


# --- schedulers ----------------------------------------------------------------------------------------------------

def test_schedulers_take_a1111_labels(client):
    listed = {s["name"]: s["label"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert listed["sgm_uniform"] == "SGM Uniform" and listed["align_your_steps"] == "Align Your Steps"
    for label, shown in (("SGM Uniform", "SGM Uniform"), ("Align Your Steps", "Align Your Steps"),
                         ("polyexponential", "Polyexponential"), ("Beta", "Beta"), ("Simple", "Simple")):
        _, info = generate(client, scheduler=label)
        assert f"Schedule type: {shown}" in info["infotexts"][0], (label, info["infotexts"][0])


def test_automatic_schedule_follows_a1111_for_the_newer_samplers():
    from sdengine.server.validation import resolve_sampler

    assert resolve_sampler("DPM2", None) == ("dpm2", "karras")
    assert resolve_sampler("DPM++ 2S a", "Automatic") == ("dpmpp_2s_a", "karras")
    assert resolve_sampler("DPM++ 3M SDE", None) == ("dpmpp_3m_sde", "exponential")
    assert resolve_sampler("Restart", None) == ("restart", "karras")


# --- memory --------------------------------------------------------------------------------------------------------

def test_heap_is_trimmed_when_the_queue_goes_idle(client, monkeypatch):
    from sdengine import cpu_memory

    assert client.service.queue.on_idle is cpu_memory.release
    calls = []
    monkeypatch.setattr(client.service.queue, "on_idle", lambda: calls.append(client.service.queue.waiting()))
    generate(client)
    for _ in range(100):  # called just after the job's answer is set
        if calls:
            break
        time.sleep(0.05)
    # at least once, and only ever with nothing waiting (a job of an earlier test may finish in the same window)
    assert calls and all(waiting == 0 for waiting in calls)
    assert cpu_memory.release() in (True, False)  # callable anywhere; a no-op without glibc


# --- scripts -------------------------------------------------------------------------------------------------------

def xyz_args(x_type: int, x_values: str, y_type: int = 0, y_values: str = "", lone: bool = True, **at) -> list:
    args = [x_type, x_values, [], y_type, y_values, [], 0, "", [], True, lone, False, False, 0, False, False]
    for i, value in at.items():
        args[int(i[1:])] = value
    return args


def test_scripts_are_listed(client):
    listed = client.get("/sdapi/v1/scripts").json()
    assert listed["txt2img"] == ["x/y/z plot"]
    assert set(listed["img2img"]) == {"x/y/z plot", "outpainting mk2", "poor man's outpainting", "sd upscale"}


def test_xyz_plot_returns_the_grid_then_the_cells(client):
    # txt2img's list: 4 Steps, 6 CFG Scale (A1111's indices)
    images, info = generate(client, script_name="x/y/z plot", script_args=xyz_args(4, "1-2", 6, "3, 7"))
    assert len(images) == 5 and len(info["infotexts"]) == 5
    grid, cells = images[0], images[1:]
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # two by two cells and the labels
    assert "Script: X/Y/Z plot, X Type: Steps, X Values: 1-2, Y Type: CFG Scale" in info["infotexts"][0]
    assert "Steps: 1" in info["infotexts"][1] and "CFG scale: 3" in info["infotexts"][1]  # x fastest, as A1111
    assert "Steps: 2" in info["infotexts"][2] and "CFG scale: 7" in info["infotexts"][4]
    single, _ = generate(client, steps=2, cfg_scale=7)
    assert np.array_equal(pixels(cells[3]), pixels(single[0]))  # a cell is that request's image
    only_grid, _ = generate(client, script_name="X/Y/Z plot", script_args=xyz_args(4, "1-2", lone=False))
    assert len(only_grid) == 1


def test_xyz_plot_legend_margin_and_sub_grids(client):
    # X: 4 Steps, Z: 6 CFG Scale; draw_legend off (args[9]), include_sub_grids (args[11]), margin_size 2 (args[13])
    args = xyz_args(4, "1-2", lone=False)
    args[6], args[7], args[9], args[11], args[13] = 6, "3, 7", False, True, 2
    images, info = generate(client, script_name="x/y/z plot", script_args=args)
    assert [im.size for im in images] == [(2 * (2 * 64 + 2) + 2, 64), (130, 64), (130, 64)]
    assert np.array_equal(pixels(images[2]), pixels(images[0])[:, 132:])


def test_xyz_plot_choice_axes_take_the_dropdown(client):
    # 9: Sampler, 11: Checkpoint name, 17: Schedule type on txt2img's list; values from the dropdown lists
    args = xyz_args(9, "", 17, "", x2=["Euler", "DPM++ 2M"], y5=["Karras", "SGM Uniform"])
    args[6], args[8] = 11, ["tiny.safetensors", "other"]
    images, info = generate(client, script_name="x/y/z plot", script_args=args, steps=2)
    assert len(images) == 1 + 8
    texts = info["infotexts"][1:]
    assert "Sampler: DPM++ 2M" in texts[1] and "Schedule type: SGM Uniform" in texts[2] and "Model: other" in texts[4]
    _, info = generate(client)  # the request's model again afterwards
    assert "Model: tiny" in info["infotexts"][0]


@pytest.mark.parametrize("args,why", [
    (xyz_args(27, "x"), "VAE"), (xyz_args(99, "1"), "x_type"), (xyz_args(4, "1-100"), "cells"),
    (xyz_args(4, "many"), "not a number"), (xyz_args(23, "0.5"), "img2img"), (xyz_args(11, "missing"), "no model"),
])
def test_bad_xyz_plot_is_a_422(client, args, why):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 422 and why in r.json()["detail"], r.text


def test_unknown_script_is_a_422(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "outpainting mk2"})
    assert r.status_code == 422 and "not supported in txt2img" in r.json()["detail"]


@pytest.mark.parametrize("script,args", [
    ("outpainting mk2", ["", 8, 4, ["left", "down"], 1.0, 0.05]),
    ("poor man's outpainting", [8, 4, 1, ["left", "down"]]),
])
def test_outpainting_scripts_extend_the_image(client, script, args):
    source = pattern(48, 48, seed=9)
    images, info = generate(client, "/sdapi/v1/img2img", init_images=[b64(source)], width=48, height=48,
                            script_name=script, script_args=args, denoising_strength=0.8)
    out = pixels(images[0])
    assert images[0].size == (56, 56) and "Size: 56x56" in info["infotexts"][0]
    # the old picture is kept away from the seam (the mask reaches 8 pixels in and is blurred by 4)
    assert np.abs(out[:32, 24:] - pixels(source)[:32, 16:]).mean() < 3


def test_outpainting_over_the_size_cap_is_a_422(client):
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(pattern())], "script_name":
                                               "outpainting mk2", "script_args": ["", 64, 8, ["left"], 1.0, 0.05]})
    assert r.status_code == 422 and "at most 64x64" in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64(pattern())], "script_name":
                                               "poor man's outpainting", "script_args": [8, 4, 0, ["sideways"]]})
    assert r.status_code == 422 and "direction" in r.json()["detail"], r.text


def test_hires_fix_takes_an_upscaler_from_the_listing(client):
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    images, info = generate(client, width=32, height=32, enable_hr=True, hr_scale=2, hr_upscaler=names[-1],
                            hr_second_pass_steps=1, denoising_strength=0.5)
    assert images[0].size == (64, 64) and f"Hires upscaler: {names[-1]}" in info["infotexts"][0]


def test_sd_upscale_script_upscales_then_repaints_tiles(client):
    """A1111's "sd upscale" script_args [info, overlap, upscaler_index, scale]: the index into /sdapi/v1/upscalers;
    the image is the engine's sd_upscale of the first init image, tiles of the request's size."""
    from sdengine.sd_upscale import sd_upscale

    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    source = pattern(40, 24, seed=6)
    images, info = generate(client, "/sdapi/v1/img2img", init_images=[b64(source)], width=32, height=32, seed=5,
                            script_name="sd upscale", script_args=["", 16, names.index("tiny-x2"), 2],
                            denoising_strength=0.6)
    assert len(images) == 1 and images[0].size == (80, 48)
    assert "SD upscale upscaler: tiny-x2" in info["infotexts"][0] and "Size: 32x32" in info["infotexts"][0]
    from sdengine.metadata import parse_parameters
    from sdengine.request import Request, fields_from_parameters

    # the same request from the image's own parameters (Size: the tile's, the strength, the sampler...)
    req = Request(**fields_from_parameters(parse_parameters(info["infotexts"][0])))
    assert (req.width, req.height, req.strength, req.seed) == (32, 32, 0.6, 5)
    want = sd_upscale(client.service.registry.pipeline, req.a1111_img2img(), source, "tiny-x2", 2.0, overlap=16)[0]
    assert np.abs(pixels(images[0]) - pixels(want)).max() <= 1


@pytest.mark.parametrize("args,fields,why", [
    (["", 16, 99, 2], {}, "upscaler"), (["", 300, 1, 2], {}, "overlap"), (["", 16, 1, 0], {}, "scale factor"),
    (["", 16, 1, 1], {"width": 64, "height": 64}, "smaller than a tile"),
    (["", 16, 1, 8], {"size": (64, 48)}, "pixels"),
    (["", 16, 1, 2], {"mask": "x"}, "mask"),
])
def test_bad_sd_upscale_is_a_422(client, args, fields, why):
    fields = dict(fields)
    size = fields.pop("size", (40, 24))
    body = {**SMALL, "init_images": [b64(pattern(*size))], "width": 32, "height": 32, "script_name": "sd upscale",
            "script_args": args, **fields}
    if "mask" in fields:
        body["mask"] = b64(pattern(40, 24))
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and why in r.json()["detail"], r.text


def test_options_report_the_selected_model_after_an_override(client):
    """A job's override_settings that restore afterwards (A1111's default) load another model for that job; /options
    still reports the selected one, the model the next job runs, as A1111 does."""
    _, info = generate(client, override_settings={"sd_model_checkpoint": "other"})
    assert "Model: other" in info["infotexts"][0]
    assert client.service.registry.current.name == "other.safetensors"   # still loaded: nothing reloads eagerly
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny.safetensors [")
    _, info = generate(client)
    assert "Model: tiny" in info["infotexts"][0]
