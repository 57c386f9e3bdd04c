"""The engine's newer features through the HTTP API, in this process (FastAPI's TestClient over the real app, tiny
models): ControlNet units in alwayson_scripts and the /controlnet routes, the upscalers and A1111's extras routes,
the x/y/z plot and outpainting scripts, A1111's scheduler labels, and the heap trimmed when the queue goes idle."""
from __future__ import annotations

import base64
import io
import json

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
    assert calls == [0]
    assert cpu_memory.release() in (True, False)  # callable anywhere; a no-op without glibc
