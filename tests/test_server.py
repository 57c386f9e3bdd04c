"""`sdengine serve` end to end: a real server process on loopback with a tiny model, called over HTTP.

Checked: every /sdapi/v1 route and the native /api/v1/jobs; parallel requests keep their own seeds and give the
images a direct Pipeline gives; interrupt/skip stop only the running job; auth; caps and bad inputs are 4xx with
a message (never 500); a failing job leaves the server serving; memory after a load test is back near baseline.
"""
from __future__ import annotations

import base64
import io
import json
import statistics
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps
from server_helpers import Running, serve, write_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

AUTH = ("tester", "s3cret")
SMALL = {"prompt": "a red circle above a blue square", "steps": 2, "width": 64, "height": 64}
LONG = {**SMALL, "steps": 5000}  # interrupted long before the end


def test_serve_without_the_extra_is_one_line():
    """The engine and its CLI work without fastapi; `serve` says what to install."""
    code = ("import sys; sys.modules['fastapi'] = None; from sdengine.cli import run; "
            "assert 'fastapi' not in [m for m in sys.modules if sys.modules[m] is not None]; sys.exit(run(['serve']))")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'sdengine[server]'" in r.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Running:
    """The tiny model, another one and a broken file, with auth and room for the queue and long jobs."""
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    models.mkdir()
    write_model(models / "tiny.safetensors", 0)
    write_model(models / "other.safetensors", 1)
    (models / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with serve(root, auth=AUTH, extra=["--max-steps", "5000", "--max-batch", "8", "--max-prompt-chars", "500",
                                       "--queue-size", "8"]) as running:
        yield running


@pytest.fixture(scope="module")
def pipe(server: Running):
    import torch

    from sdengine.pipeline import Pipeline
    from sdengine.weights import load

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (--threads 1), and for the same reason
    yield Pipeline(load(server.models / "tiny.safetensors", dtype=torch.float32))
    torch.set_num_threads(threads)


def b64png(image: Image.Image, pnginfo=None) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buf.getvalue()).decode()


def unb64(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def same(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to one level of rounding (the server and this process may order float sums differently)."""
    x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    return x.shape == y.shape and int(np.abs(x - y).max()) <= 1


def info_of(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def test_listing_routes(server: Running):
    samplers = {s["name"]: s for s in server.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "Euler", "LMS", "Heun", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "PLMS", "UniPC",
            "LCM"} <= set(samplers)
    assert "k_dpmpp_2m" in samplers["DPM++ 2M"]["aliases"] and samplers["DPM++ 2M"]["options"] == {
        "scheduler": "karras"}
    names = {s["name"] for s in server.get("/sdapi/v1/schedulers").json()}
    assert {"automatic", "karras", "exponential", "normal"} <= names
    models = {m["model_name"]: m for m in server.get("/sdapi/v1/sd-models").json()}
    assert set(models) == {"tiny", "other", "broken"}
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models.values())
    assert all("/" not in m["filename"] and str(server.models) not in json.dumps(m) for m in models.values())
    assert models["tiny"]["title"] == f"tiny.safetensors [{models['tiny']['hash']}]"
    assert models["tiny"]["sha256"].startswith(models["tiny"]["hash"]) and len(models["tiny"]["hash"]) == 10
    assert "photo" in {s["name"] for s in server.get("/sdapi/v1/prompt-styles").json()}
    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models["tiny"]["title"] and options["CLIP_stop_at_last_layers"] == 1
    idle = server.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    assert {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
            "sampling_steps"} <= set(idle["state"])
    fresh = server.models / "fresh.safetensors"
    fresh.write_bytes((server.models / "tiny.safetensors").read_bytes())
    assert server.post("/sdapi/v1/refresh-checkpoints", {}).status_code == 200
    assert "fresh" in {m["model_name"] for m in server.get("/sdapi/v1/sd-models").json()}
    fresh.unlink()


def test_txt2img_variation_seeds(server: Running, pipe):
    """subseed/subseed_strength/seed_resize_from_w,h as A1111: with a variation every image keeps the seed and the
    variation seed counts up across the batches of n_iter; the image equals the Python API's with the same values."""
    body = {**SMALL, "seed": 3, "subseed": 20, "subseed_strength": 0.4, "seed_resize_from_w": 96,
            "seed_resize_from_h": 72, "batch_size": 1, "n_iter": 2}
    r = server.post("/sdapi/v1/txt2img", body)
    info = info_of(r)
    assert info["all_subseeds"] == [20, 21] and info["all_seeds"] == [3, 3] and info["subseed_strength"] == 0.4
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (96, 72)
    assert "Seed: 3, Size: 64x64" in info["infotexts"][1]
    assert "Variation seed: 21, Variation seed strength: 0.4, Seed resize from: 96x72" in info["infotexts"][1]
    assert not any("subseed" in w for w in info["warnings"])
    expected = pipe.generate(SMALL["prompt"], steps=2, cfg_scale=7.0, seed=3, width=64, height=64, subseed=21,
                             subseed_strength=0.4, seed_resize_from=(96, 72))[0]
    assert same(unb64(r.json()["images"][1]), expected)
    bad = server.post("/sdapi/v1/txt2img", {**SMALL, "subseed_strength": 2})
    assert bad.status_code == 422 and "subseed_strength" in bad.text


def test_txt2img_hires_fix_and_tiling(server: Running, pipe):
    """enable_hr with A1111's fields: a second pass at hr_scale, reported as A1111 does (the first pass's size,
    the Hires fields); tiling; the image equals the Python API's with the same settings."""
    from sdengine.hires import HiresFix

    body = {**SMALL, "seed": 6, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2,
            "denoising_strength": 0.6, "hr_upscaler": "Latent (nearest)", "hr_sampler_name": "Use same sampler",
            "hr_checkpoint_name": "Use same checkpoint", "tiling": True}
    r = server.post("/sdapi/v1/txt2img", body)
    info = info_of(r)
    image = unb64(r.json()["images"][0])
    assert image.size == (96, 96) and info["width"] == 64 and info["denoising_strength"] == 0.6
    assert info["extra_generation_params"]["Hires upscale"] == 1.5
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent (nearest)"
    text = info["infotexts"][0]
    assert "Size: 64x64" in text and "Denoising strength: 0.6" in text and "Tiling: True" in text
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (nearest)" in text
    assert info["warnings"] == []
    expected = pipe.generate(SMALL["prompt"], steps=2, cfg_scale=7.0, seed=6, width=64, height=64, tiling=True,
                             hires=HiresFix(1.5, upscaler="Latent (nearest)", steps=2, denoising_strength=0.6))[0]
    assert same(image, expected)
    info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_resize_x": 96,
                                                     "hr_sampler_name": "DPM++ 2M", "hr_prompt": "a green circle"}))
    assert "Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires prompt: a green circle, Hires resize: 96x0" \
        in info["infotexts"][0] and info["denoising_strength"] == 0.75
    for extra, needle in (({"hr_scale": 8}, "hires fix makes 512x512"), ({"hr_upscaler": "R-ESRGAN 4x+"}, "upscaler"),
                          ({"hr_resize_x": 100}, "multiple of 8"), ({"denoising_strength": 0}, "denoising")):
        bad = server.post("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, **extra})
        assert bad.status_code == 422 and needle in bad.text, (extra, bad.text)


def test_txt2img_fields_seeds_and_images(server: Running, pipe):
    r = server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 42, "batch_size": 2, "n_iter": 2, "eta": 1.0,
                                          "s_noise": 1, "scheduler": "automatic", "restore_faces": True,
                                          "alwayson_scripts": {}, "unknown_client_field": 3})
    info = info_of(r)
    body = r.json()
    assert len(body["images"]) == 4 and info["all_seeds"] == [42, 43, 44, 45] and info["seed"] == 42
    assert body["parameters"]["n_iter"] == 2 and body["parameters"]["steps"] == 2
    assert info["batch_size"] == 2 and info["sampler_name"] == "Euler" and info["sd_model_name"] == "tiny"
    assert info["width"] == 64 and info["cfg_scale"] == 7.0 and len(info["sd_model_hash"]) == 10
    assert any("restore_faces" in w for w in info["warnings"]) and len(info["all_prompts"]) == 4
    for key in ("prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "all_subseeds",
                "subseed_strength", "infotexts", "styles", "clip_skip", "job_timestamp", "index_of_first_image",
                "is_using_inpainting_conditioning", "seed_resize_from_w", "denoising_strength"):
        assert key in info
    for i, data in enumerate(body["images"]):
        image = unb64(data)
        assert image.size == (64, 64) and image.info["parameters"] == info["infotexts"][i]
        assert f"Seed: {42 + i}," in info["infotexts"][i]
    assert same(unb64(body["images"][3]), pipe.generate(SMALL["prompt"], steps=2, cfg_scale=7.0, seed=45,
                                                        width=64, height=64)[0])

    info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 1, "sampler_name": "DPM++ 2M Karras",
                                                     "styles": ["photo"],
                                                     "override_settings": {"CLIP_stop_at_last_layers": 2}}))
    text = info["infotexts"][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text and "Clip skip: 2" in text and info["clip_skip"] == 2
    assert "photograph" in info["all_prompts"][0] and info["prompt"] == SMALL["prompt"] and info["styles"] == ["photo"]
    for sampler, scheduler, expect in (("k_dpmpp_2m", "exponential", "Schedule type: Exponential"),
                                       ("Euler a", "Karras", "Sampler: Euler a, Schedule type: Karras"),
                                       ("DDIM", None, "Sampler: DDIM,")):
        info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "sampler_name": sampler, "scheduler": scheduler}))
        assert expect in info["infotexts"][0]
    assert server.post("/sdapi/v1/txt2img", {**SMALL, "sampler_index": "Heun", "send_images": False}).json()[
        "images"] == []


def test_token_merging_ratio_is_a1111s_option(server: Running, pipe):
    """token_merging_ratio (A1111's ToMe setting) per request in override_settings, or kept through /options; the
    image says it was used, as A1111's does."""
    info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 5,
                                                     "override_settings": {"token_merging_ratio": 0.5}}))
    assert "Token merging ratio: 0.5" in info["infotexts"][0]
    assert "Token merging ratio" not in info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 5}))["infotexts"][0]
    assert server.post("/sdapi/v1/options", {"token_merging_ratio": 0.3}).status_code == 200
    try:
        assert server.get("/sdapi/v1/options").json()["token_merging_ratio"] == 0.3
        assert "Token merging ratio: 0.3" in info_of(server.post("/sdapi/v1/txt2img", SMALL))["infotexts"][0]
    finally:
        server.post("/sdapi/v1/options", {"token_merging_ratio": 0.0})


def test_parallel_requests_keep_their_seeds(server: Running, pipe):
    seeds = [1000 + 17 * i for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda s: server.post("/sdapi/v1/txt2img", {**SMALL, "seed": s}), seeds))
    for seed, r in zip(seeds, responses):
        info = info_of(r)
        assert info["all_seeds"] == [seed] and f"Seed: {seed}," in info["infotexts"][0]
        assert r.json()["parameters"]["seed"] == seed
        direct = pipe.generate(SMALL["prompt"], steps=2, cfg_scale=7.0, seed=seed, width=64, height=64)[0]
        assert same(unb64(r.json()["images"][0]), direct), seed


def test_img2img_resize_modes_and_inpaint(server: Running, pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    body = {**SMALL, "steps": 4, "seed": 7, "init_images": [b64png(image)], "denoising_strength": 0.5}
    r = server.post("/sdapi/v1/img2img", body)
    info = info_of(r)
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert r.json()["parameters"]["init_images"] is None  # include_init_images is false
    # A1111 runs int(0.5 * 4) + 1 = 3 of the 4 steps with its k-diffusion samplers; diffusers' count is 2
    direct = pipe.img2img(image, SMALL["prompt"], strength=0.5, steps=4, seed=7, cfg_scale=7.0, denoise_steps=3)[0]
    assert same(unb64(r.json()["images"][0]), direct)
    assert not same(direct, pipe.img2img(image, SMALL["prompt"], strength=0.5, steps=4, seed=7, cfg_scale=7.0)[0])
    wide = Image.fromarray(rng.integers(0, 255, (48, 96, 3), dtype=np.uint8))
    for mode in (0, 1, 2, 3):
        r = server.post("/sdapi/v1/img2img", {**SMALL, "resize_mode": mode, "batch_size": 2,
                                              "init_images": ["data:image/png;base64," + b64png(wide)]})
        assert r.status_code == 200, (mode, r.text)
        assert [unb64(d).size for d in r.json()["images"]] == [(64, 64)] * 2
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    for only_masked in (False, True):  # the inverted mask's box (the right half) fits to the whole 64x64 image
        r = server.post("/sdapi/v1/img2img", {**body, "mask": b64png(mask), "inpainting_mask_invert": 1,
                                              "mask_blur": 0, "denoising_strength": 0.75, "inpainting_fill": 1,
                                              "inpaint_full_res": only_masked})
        direct = pipe.inpaint(image, ImageOps.invert(mask), SMALL["prompt"], strength=0.75, steps=4, seed=7,
                              cfg_scale=7.0, denoise_steps=4)[0]
        direct.paste(image.crop((0, 0, 32, 64)), (0, 0))  # A1111 pastes the unmasked original back
        assert same(unb64(r.json()["images"][0]), direct)
        assert "Mask mode: Inpaint not masked" in info_of(r)["infotexts"][0]


@pytest.mark.parametrize("steps,strength,sampler,expected", [
    (20, 0.75, "euler", 16), (20, 0.75, "dpmpp_2m", 16), (20, 0.75, "ddim", 15), (20, 0.75, "plms", 15),
    (20, 1.0, "euler", 20), (20, 1.0, "ddim", 19), (4, 0.1, "euler", 1), (4, 0.1, "ddim", 1), (7, 0.5, "lms", 4),
])
def test_img2img_runs_a1111s_step_count(steps, strength, sampler, expected):
    """setup_img2img_steps: t_enc = int(min(strength, 0.999) * steps); k-diffusion samplers run t_enc + 1 steps,
    DDIM/PLMS/UniPC (A1111's timestep samplers) t_enc."""
    from sdengine.diffusion.img2img_steps import a1111_img2img_steps

    assert a1111_img2img_steps(steps, strength, sampler) == (steps, expected)


def test_inpaint_only_masked_returns_the_original_with_the_box_repainted(server: Running):
    """A1111's API default (inpaint_full_res): the mask's padded box is generated at width x height and pasted
    back into the original, whatever its size; everything outside the blurred mask is the original's."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8))  # 160 wide, 96 high
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (100, 40, 116, 56))
    r = server.post("/sdapi/v1/img2img", {**SMALL, "steps": 3, "seed": 11, "init_images": [b64png(image)],
                                          "mask": b64png(mask), "inpaint_full_res_padding": 8})
    out = unb64(r.json()["images"][0])
    assert out.size == (160, 96)
    arr, orig = np.asarray(out.convert("RGB")).astype(int), np.asarray(image).astype(int)
    far = np.ones((96, 160), bool)
    far[40 - 12:56 + 12, 100 - 12:116 + 12] = False  # the mask blurred by 4 reaches ~3 sigma
    assert (arr[far] == orig[far]).all()
    assert np.abs(arr[44:52, 104:112] - orig[44:52, 104:112]).mean() > 20  # the masked box was repainted
    info = info_of(r)["infotexts"][0]
    assert "Mask blur: 4" in info and "Inpaint area: Only masked" in info and "Masked area padding: 8" in info


def wait_for(server: Running, ok, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress = server.get("/sdapi/v1/progress", skip_current_image="true").json()
        if ok(progress):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"timed out; last progress: {progress}")


def in_background(fn, *args) -> dict:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", fn(*args)))
    thread.start()
    box["thread"] = thread
    return box


def test_progress_interrupt_and_skip(server: Running, pipe):
    long = in_background(server.post, "/sdapi/v1/txt2img", {**LONG, "seed": 5})
    wait_for(server, lambda p: p["state"]["sampling_step"] >= 2)
    progress = server.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 5000
    assert unb64(progress["current_image"]).size == (64, 64)
    assert server.get("/sdapi/v1/progress", skip_current_image="true").json()["current_image"] is None
    queued = in_background(server.post, "/sdapi/v1/txt2img", {**SMALL, "seed": 9})
    wait_for(server, lambda p: p["queued"] >= 1)
    assert server.post("/sdapi/v1/interrupt", {}).status_code == 200
    long["thread"].join(120)
    queued["thread"].join(120)
    info = info_of(long["r"])  # A1111 returns the images it has: the last denoised estimate
    assert info["interrupted"] and len(long["r"].json()["images"]) == 1 and "Steps: 5000," in info["infotexts"][0]
    info = info_of(queued["r"])  # the job behind it is not affected
    assert not info["interrupted"] and info["all_seeds"] == [9]
    assert same(unb64(queued["r"].json()["images"][0]),
                pipe.generate(SMALL["prompt"], steps=2, cfg_scale=7.0, seed=9, width=64, height=64)[0])

    both = in_background(server.post, "/sdapi/v1/txt2img", {**LONG, "seed": 20, "n_iter": 2})
    wait_for(server, lambda p: p["state"]["sampling_step"] >= 2 and p["state"]["job_count"] == 2)
    server.post("/sdapi/v1/skip", {})  # ends batch 1; batch 2 runs
    wait_for(server, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 1)
    server.post("/sdapi/v1/interrupt", {})
    both["thread"].join(120)
    info = info_of(both["r"])
    assert info["all_seeds"] == [20, 21] and len(both["r"].json()["images"]) == 2
    assert server.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_native_jobs_queue_full_and_cancel(server: Running):
    with server.client() as c:
        job = c.post("/api/v1/jobs", json={**SMALL, "seed": 3}).json()
        assert job["status"] in ("queued", "running") and job["mode"] == "txt2img"
        deadline = time.time() + 120
        while c.get(f"/api/v1/jobs/{job['id']}").json()["status"] != "succeeded":
            assert time.time() < deadline
            time.sleep(0.05)
        result = c.get(f"/api/v1/jobs/{job['id']}/result").json()
        assert json.loads(result["info"])["all_seeds"] == [3] and result["parameters"]["seed"] == 3
        assert len(result["images"]) == 1

        long = c.post("/api/v1/jobs", json=LONG).json()
        deadline = time.time() + 120
        while c.get(f"/api/v1/jobs/{long['id']}").json()["status"] != "running":
            assert time.time() < deadline
            time.sleep(0.05)
        waiting = [c.post("/api/v1/jobs", json=SMALL) for _ in range(8)]
        assert all(r.status_code == 202 for r in waiting)
        full = c.post("/api/v1/jobs", json=SMALL)
        assert full.status_code == 429 and "queue is full" in full.json()["detail"]
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 429
        assert c.get(f"/api/v1/jobs/{waiting[0].json()['id']}").json()["position"] == 1
        for i, r in enumerate(waiting):  # both ways of cancelling
            jid = r.json()["id"]
            cancelled = c.delete(f"/api/v1/jobs/{jid}") if i % 2 else c.post(f"/api/v1/jobs/{jid}/cancel")
            assert cancelled.json()["status"] == "cancelled"
            assert c.get(f"/api/v1/jobs/{jid}/result").status_code == 409
        assert c.get(f"/api/v1/jobs/{long['id']}/result").status_code == 409  # not finished
        c.delete(f"/api/v1/jobs/{long['id']}")
        deadline = time.time() + 120
        while c.get(f"/api/v1/jobs/{long['id']}").json()["status"] == "running":
            assert time.time() < deadline
            time.sleep(0.05)
        assert c.get(f"/api/v1/jobs/{long['id']}").json()["status"] == "cancelled"
        assert c.get("/api/v1/jobs/nope").status_code == 404
        assert c.post("/api/v1/jobs", json={**SMALL, "mode": "upscale"}).status_code == 422
        assert c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 4}).status_code == 200


def test_auth(server: Running):
    for auth in (None, ("tester", "wrong"), ("other", "s3cret")):
        with server.client(auth=auth) as c:
            for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/samplers", "/api/v1/jobs"):
                r = c.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
            assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 401
    with server.client() as c:
        assert c.get("/").status_code == 200 and c.get("/docs").status_code == 200


def fake_png(width: int, height: int) -> str:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's first bytes."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return base64.b64encode(bytes(data)).decode()


def truncated_png() -> str:
    data = base64.b64decode(b64png(Image.new("RGB", (64, 64), (200, 10, 10)).effect_spread(8)))
    return base64.b64encode(data[: len(data) // 2]).decode()


BAD = [
    ("txt2img", {"width": 512}, "width"),
    ("txt2img", {"height": 100}, "multiple of 8"),
    ("txt2img", {"steps": 5001}, "steps"),
    ("txt2img", {"batch_size": 9}, "batch_size"),
    ("txt2img", {"n_iter": 50}, "n_iter"),
    ("txt2img", {"prompt": "x" * 501}, "at most 500"),
    ("txt2img", {"negative_prompt": "x" * 501}, "negative_prompt"),
    ("txt2img", {"cfg_scale": 1e9}, "cfg_scale"),
    ("txt2img", {"seed": 2 ** 70}, "seed"),
    ("txt2img", {"sampler_name": "Euler z"}, "unknown sampler"),
    ("txt2img", {"scheduler": "sgm_wobbly"}, "unknown scheduler"),
    ("txt2img", {"styles": ["no such style"]}, "unknown style"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../models/tiny.safetensors"}}, "paths"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "paths"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing"}}, "no model named"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 40}}, "CLIP_stop_at_last_layers"),
    ("txt2img", {"override_settings": {"token_merging_ratio": 1.5}}, "token_merging_ratio"),
    ("options", {"token_merging_ratio": "half"}, "token_merging_ratio"),
    ("txt2img", {"script_name": "loopback"}, "scripts"),
    ("txt2img", {"width": "wide"}, "width"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": ["!!not base64!!"]}, "base64"),
    ("img2img", {"init_images": ["https://example.com/cat.png"]}, "URL"),
    ("img2img", {"init_images": ["file:///etc/passwd"]}, "URL"),
    ("img2img", {"init_images": [base64.b64encode(b"just some text").decode()]}, "not an image"),
    ("img2img", {"init_images": [fake_png(30000, 30000)]}, "too large"),
    ("img2img", {"init_images": [fake_png(3000, 3000)]}, "pixels"),
    ("img2img", {"init_images": [truncated_png()]}, "truncated"),
    ("img2img", {"init_images": [fake_png(8, 8)] * 3, "batch_size": 2}, "init_images"),
    ("img2img", {"init_images": ["data:image/png,abc"]}, "base64"),
    ("img2img", {"init_images": [b64png(Image.new("RGB", (64, 64)))], "denoising_strength": 0}, "denoising"),
    ("img2img", {"init_images": [b64png(Image.new("RGB", (64, 64)))], "mask": "???"}, "mask"),
    ("img2img", {"init_images": [b64png(Image.new("RGB", (64, 64)))], "resize_mode": 7}, "resize_mode"),
    ("options", {"outdir_samples": "/tmp"}, "paths and folders"),
    ("options", {"sd_model_checkpoint": "/tmp/evil.safetensors"}, "paths"),
    ("options", {"CLIP_stop_at_last_layers": 0}, "CLIP_stop_at_last_layers"),
    ("options", {"sd_vae": "../vae.pt"}, "sd_vae"),
    ("png-info", {"image": "http://127.0.0.1/x.png"}, "URL"),
]


def test_caps_and_bad_inputs_are_422_with_a_message(server: Running):
    with server.client() as c:
        for route, body, needle in BAD:
            full = {**SMALL, **body} if route != "options" and route != "png-info" else body
            r = c.post(f"/sdapi/v1/{route}", json=full)
            assert r.status_code == 422, (route, body, r.status_code, r.text[:300])
            assert needle in json.dumps(r.json()["detail"]), (route, body, r.text[:300])
        r = c.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 8}).status_code == 200  # still serving


def test_failing_job_then_next_and_model_switch(server: Running, pipe):
    r = server.post("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "broken"}})
    assert r.status_code == 500 and "broken.safetensors could not be loaded" in r.json()["detail"]
    info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 11}))  # the next job is served as usual
    assert info["sd_model_name"] == "tiny" and info["all_seeds"] == [11]
    info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 11,
                                                     "override_settings": {"sd_model_checkpoint": "other"}}))
    assert info["sd_model_name"] == "other"
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 2}).json() \
        is None
    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("other.safetensors [") and options["CLIP_stop_at_last_layers"] == 2
    info = info_of(server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 11}))
    assert info["sd_model_name"] == "other" and info["clip_skip"] == 2
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny.safetensors",
                                             "CLIP_stop_at_last_layers": 1}).status_code == 200
    r = server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 12})
    assert info_of(r)["sd_model_name"] == "tiny"
    assert same(unb64(r.json()["images"][0]), pipe.generate(SMALL["prompt"], steps=2, cfg_scale=7.0, seed=12,
                                                            width=64, height=64)[0])


def test_png_info_round_trip(server: Running):
    r = server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 77, "negative_prompt": "blurry, (ugly:1.2)"})
    image, infotext = r.json()["images"][0], info_of(r)["infotexts"][0]
    out = server.post("/sdapi/v1/png-info", {"image": image}).json()
    assert out["info"] == infotext and out["parameters"]["Seed"] == 77 and out["parameters"]["Steps"] == 2
    assert out["parameters"]["Prompt"] == SMALL["prompt"] and out["parameters"]["Size-1"] == 64
    assert out["parameters"]["Negative prompt"] == "blurry, (ugly:1.2)"
    plain = server.post("/sdapi/v1/png-info", {"image": b64png(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


@pytest.mark.slow
def test_load_and_memory(server: Running):
    """>= 50 small jobs from 4 clients at once: all correct, and the server's memory back near its baseline."""
    def one(seed: int) -> tuple[float, int, int]:
        with server.client() as c:
            t = time.perf_counter()
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": seed})
            return time.perf_counter() - t, r.status_code, info_of(r)["all_seeds"][0] if r.status_code == 200 else -1

    list(map(one, range(4)))  # warm up (first-use allocations are not a leak)
    baseline = server.rss_mb()
    seeds = list(range(5000, 5060))
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, seeds))
    wall = time.perf_counter() - start
    assert [(code, seed) for _, code, seed in results] == [(200, s) for s in seeds]
    latencies = sorted(t for t, _, _ in results)
    time.sleep(0.5)
    after = server.rss_mb()
    print(f"\nload: {len(seeds)} txt2img 64x64 2 steps, 4 clients: {len(seeds) / wall:.2f} req/s, "
          f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p95 "
          f"{latencies[int(0.95 * len(latencies)) - 1] * 1000:.0f} ms; RSS {baseline:.0f} -> {after:.0f} MB")
    assert after < baseline + 150, (baseline, after)
