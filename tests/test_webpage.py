"""The web page at /, driven end to end in headless Chromium against a real `sdengine serve` process (tiny model).

Checked: the page loads its lists from the API, generates from the form (gallery item with the infotext, a PNG
download that carries the parameters), shows live progress with a preview and interrupts, sends img2img and an
inpainting mask painted with the mouse, sends a ControlNet unit and an X/Y/Z plot, offers only the LoRAs made for
the loaded model, and with --api-auth loads only with credentials.

Uses Debian's chromium (/usr/bin/chromium) through Playwright; no browser is downloaded. Skipped without it.
"""
from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from server_helpers import serve

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.slow,  # Chromium and two server processes: ~25 s in all
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason="no /usr/bin/chromium: apt-get install chromium (Debian's; .ci/run does)")]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AUTH = ("painter", "p4ss-word")
SCREENSHOT = Path("/tmp/sdengine-webpage.png")
INPAINT_SCREENSHOT = Path("/tmp/sdengine-webpage-inpaint.png")
CONTROL_SCREENSHOT = Path("/tmp/sdengine-webpage-control.png")
GRID_SCREENSHOT = Path("/tmp/sdengine-webpage-grid.png")
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield browser
        browser.close()


SD1_LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """With a LoRA folder (one kohya LoRA for the tiny model, one made for SD1), an embeddings folder (one
    embedding) and a ControlNet folder (one ControlNet for the tiny model)."""
    import torch
    from lora_helpers import random_kohya
    from safetensors.torch import save_file

    from sdengine.config import TINY
    from sdengine.control import save_controlnet
    from sdengine.model import StableDiffusion
    from sdengine.nn.controlnet import ControlNet, ControlNetConfig

    root = tmp_path_factory.mktemp("web")
    for name in ("loras", "embeddings", "controlnet"):
        (root / name).mkdir()
    save_file(random_kohya(StableDiffusion(TINY)), root / "loras" / "style.safetensors")
    # SD1's cross-attention reads 768-wide text: listed by the server, not offered for the 64-wide tiny model
    save_file({f"{SD1_LORA_KEY}.lora_down.weight": torch.zeros(2, 768), f"{SD1_LORA_KEY}.lora_up.weight":
               torch.zeros(320, 2), f"{SD1_LORA_KEY}.alpha": torch.tensor(2.0)}, root / "loras" / "sd15.safetensors")
    save_file({"emb_params": torch.full((1, TINY.text.width), 0.01)}, root / "embeddings" / "tok.safetensors")
    save_controlnet(ControlNet(ControlNetConfig(unet=TINY.unet)), root / "controlnet" / "cn_tiny.safetensors")
    with serve(root, extra=["--max-steps", "5000", "--lora-dir", str(root / "loras"), "--embeddings-dir",
                            str(root / "embeddings"), "--controlnet-dir", str(root / "controlnet")]) as running:
        yield running


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webauth")
    (root / "controlnet").mkdir()  # empty: the page's ControlNet panel stays hidden
    with serve(root, auth=AUTH, extra=["--controlnet-dir", str(root / "controlnet")]) as running:
        yield running


class Page:
    """A fresh browser context and page; JavaScript errors on the page fail the test."""

    def __init__(self, browser, strict: bool = True, **context_args):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, **context_args)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        if strict:
            self.page.on("pageerror", lambda e: self.errors.append(str(e)))
            self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def open(self, url: str):
        response = self.page.goto(url)
        assert response is not None and response.status == 200, response and response.status
        self.page.wait_for_selector("body[data-ready=true]")
        expect(self.page.locator("#sampler option")).not_to_have_count(0)
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def web(browser):
    pages: list[Page] = []

    def make(strict: bool = True, **context_args) -> Page:
        pages.append(Page(browser, strict, **context_args))
        return pages[-1]

    yield make
    for p in pages:
        p.close()
    for p in pages:
        assert not p.errors, p.errors


def fill_small(page, prompt: str, steps: int = 2, seed: int | None = None) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    if seed is not None:
        page.get_by_label("Random").uncheck()
        page.get_by_label("Seed", exact=True).fill(str(seed))


def png_text(data: bytes) -> str:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.info["parameters"]


def test_generate_from_the_page(server, web, tmp_path):
    start = time.perf_counter()
    page = web().open(server.url)
    assert page.title() == "sdengine"
    samplers = page.locator("#sampler option").all_inner_texts()
    assert "Euler a" in samplers and "DPM++ 2M" in samplers
    assert page.get_by_label("Sampler").input_value() == "Euler a"
    assert "automatic" in [o.get_attribute("value") for o in page.locator("#scheduler option").all()]
    assert page.get_by_label("Model").input_value().startswith("tiny.safetensors")
    assert page.get_by_label("Seed", exact=True).is_disabled()  # random by default: -1
    prompt = "a lighthouse on a cliff at dawn"
    fill_small(page, prompt, seed=1234)
    page.get_by_label("Schedule").select_option("karras")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert body["prompt"] == prompt and body["steps"] == 2 and body["seed"] == 1234 and body["width"] == 64
    assert body["sampler_name"] == "Euler a" and body["scheduler"] == "karras" and "override_settings" not in body

    item = page.locator("#gallery li").first
    expect(item.locator(".infotext")).to_contain_text("Steps:", timeout=WAIT_MS)
    text = item.locator(".infotext").inner_text()
    assert text.startswith(prompt) and "Steps: 2, Sampler: Euler a, Schedule type: Karras" in text
    assert "Seed: 1234," in text and "Size: 64x64" in text
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 image")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Interrupt")).to_be_disabled()
    image = item.locator("img")
    assert "seed 1234" in image.get_attribute("alt") and prompt in image.get_attribute("alt")
    assert page.evaluate("img => img.complete && img.naturalWidth", image.element_handle()) == 64

    link = item.get_by_role("link", name="Download PNG")
    href = link.get_attribute("href")
    assert href.startswith("blob:") or href.startswith("data:image/png;base64,"), href
    assert link.get_attribute("download") .endswith("-1234-a-lighthouse-on-a-cliff-at-dawn.png")
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert png_text(saved.read_bytes()) == text  # the file carries the parameters shown

    shot = tmp_path / "webpage.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, SCREENSHOT)
    assert Image.open(shot).size[0] == 1280

    item.get_by_role("button", name="Reuse seed 1234").click()  # the seed goes back into the form
    assert page.get_by_label("Seed", exact=True).input_value() == "1234"
    print(f"\nwebpage: generated through the page in {time.perf_counter() - start:.1f} s; screenshot {SCREENSHOT}")


def test_hires_fix_and_tiling_from_the_page(server, web):
    page = web().open(server.url)
    fill_small(page, "a tiled floor", seed=5)
    assert page.get_by_label("Upscale by").is_disabled()  # until the hires fix is on
    page.get_by_label("Hires fix").check()
    page.get_by_label("Upscale by").fill("1.5")
    page.get_by_label("Hires steps").fill("1")
    page.get_by_label("Tiling").check()
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert (body["enable_hr"], body["hr_scale"], body["denoising_strength"], body["hr_second_pass_steps"],
            body["tiling"]) == (True, 1.5, 0.7, 1, True)
    item = page.locator("#gallery li").first
    expect(item.locator(".infotext")).to_contain_text("Hires upscale: 1.5", timeout=WAIT_MS)
    assert "Tiling: True" in item.locator(".infotext").inner_text()
    assert page.evaluate("img => img.complete && img.naturalWidth", item.locator("img").element_handle()) == 96
    page.get_by_label("Change an image").check()  # a txt2img option: not shown for img2img
    expect(page.locator("#hires-section")).to_be_hidden()


def test_live_progress_and_interrupt(server, web):
    page = web().open(server.url)
    fill_small(page, "an endless staircase", steps=5000, seed=7)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_contain_text("/5000", timeout=WAIT_MS)
    preview = page.locator("#live-preview")
    expect(preview).to_be_visible(timeout=WAIT_MS)
    assert preview.get_attribute("src").startswith("data:image/png;base64,")
    assert 0 < float(page.locator("#progress").get_attribute("value") or page.evaluate(
        "document.getElementById('progress').value")) < 1
    page.get_by_role("button", name="Interrupt").click()
    item = page.locator("#gallery li").first
    expect(item.locator(".badge")).to_have_text("Interrupted", timeout=WAIT_MS)
    assert "Steps: 5000," in item.locator(".infotext").inner_text()
    expect(page.locator("#progress-text")).to_contain_text("Interrupted")
    expect(preview).to_be_hidden()


def test_lora_and_embedding_lists_insert_into_the_prompts(server, web):
    page = web().open(server.url)
    expect(page.locator("#networks")).to_have_attribute("open", "")  # shown: the server has some
    loras, embeddings = page.locator("#lora-list button"), page.locator("#embedding-list button")
    expect(loras).to_have_text(["style"])  # sd15 is for SD1, not the loaded (64-wide) model: not offered
    expect(page.locator("#lora-hidden")).to_have_text("1 hidden: made for SD1, not the loaded model.")
    listed = {entry["name"]: entry for entry in server.get("/sdapi/v1/loras").json()}
    assert (listed["sd15"]["sd_version"], listed["sd15"]["sdengine_context_dim"]) == ("SD1", 768)
    assert (listed["style"]["sd_version"], listed["style"]["sdengine_context_dim"]) == ("Unknown", 64)
    assert {"name", "alias", "path", "metadata"} <= set(listed["sd15"])  # A1111's fields kept
    assert server.get("/sdapi/v1/options").json()["sdengine_context_dim"] == 64
    page.get_by_label("Show all LoRAs").check()
    expect(loras).to_have_text(["sd15", "style"])
    page.get_by_label("Show all LoRAs").uncheck()
    expect(loras).to_have_text(["style"])
    expect(embeddings).to_have_text(["tok"])
    fill_small(page, "a red circle", seed=3)
    loras.first.click()
    prompt = page.get_by_label("Prompt", exact=True)
    assert prompt.input_value() == "a red circle <lora:style:1>"
    page.get_by_label("Negative prompt").fill("blurry")  # embeddings go where one typed last
    embeddings.first.click()
    assert page.get_by_label("Negative prompt").input_value() == "blurry tok"
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    assert sent.value.post_data_json["prompt"] == "a red circle <lora:style:1>"
    text = page.locator("#gallery li .infotext").first
    expect(text).to_contain_text("Lora hashes: \"style: ", timeout=WAIT_MS)
    expect(text).to_contain_text("TI hashes: \"tok: ")

    late = Path(server.models.parent / "loras" / "late.safetensors")
    late.write_bytes((server.models.parent / "loras" / "style.safetensors").read_bytes())
    with page.expect_request("**/sdapi/v1/refresh-loras"):
        page.get_by_role("button", name="Refresh lists").click()
    expect(loras).to_have_text(["late", "style"])
    expect(page.get_by_role("button", name="Refresh lists")).to_be_enabled()
    page.reload()  # the prompt is kept between visits, with its tag
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_label("Prompt", exact=True).input_value() == "a red circle <lora:style:1>"


def source_png(path: Path) -> Path:
    image = Image.new("RGB", (128, 128), (30, 90, 200))
    image.paste((240, 200, 40), (32, 32, 96, 96))
    image.save(path)
    return path


def decode_data_url(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_img2img_and_inpaint_from_the_page(server, web, tmp_path):
    page = web().open(server.url)
    fill_small(page, "a yellow square, oil painting", seed=99)
    page.get_by_label("Change an image").check()
    page.get_by_role("button", name="Generate").click()  # no image yet: said so, nothing sent
    expect(page.get_by_role("alert")).to_contain_text("Choose a source image")
    page.get_by_label("Upload an image").set_input_files(str(source_png(tmp_path / "source.png")))
    expect(page.get_by_alt_text("The uploaded source image")).to_be_visible()
    page.get_by_label("Strength").fill("0.5")
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert body["denoising_strength"] == 0.5 and "mask" not in body
    assert decode_data_url(body["init_images"][0]).size == (128, 128)
    expect(page.locator("#gallery li .infotext").first).to_contain_text("Denoising strength: 0.5", timeout=WAIT_MS)
    expect(page.get_by_role("alert")).to_be_hidden()

    page.get_by_label("Repaint part of an image").check()
    canvas = page.get_by_role("img", name="Mask painting area")
    expect(canvas).to_be_visible()
    page.get_by_role("button", name="Generate").click()  # an empty mask would repaint nothing
    expect(page.get_by_role("alert")).to_contain_text("Paint over the part")
    page.get_by_label("Brush size").fill("16")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    for i in range(1, 11):  # a stroke down the left quarter
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * (0.1 + 0.08 * i), steps=2)
    page.mouse.up()
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    mask = decode_data_url(body["mask"]).convert("L")
    assert mask.size == (128, 128) and body["denoising_strength"] == 0.5
    assert mask.getpixel((25, 64)) == 255 and mask.getpixel((100, 64)) == 0  # white = repaint, the rest black
    assert mask.getextrema() == (0, 255)
    expect(page.locator("#gallery li")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator("#gallery li .infotext").first).to_contain_text("Seed: 99,")
    page.screenshot(path=str(tmp_path / "inpaint.png"), full_page=True)
    shutil.copyfile(tmp_path / "inpaint.png", INPAINT_SCREENSHOT)

    page.get_by_role("button", name="Invert").click()  # the keyboard-usable mask tools
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.get_by_role("button", name="Generate").click()
    inverted = decode_data_url(sent.value.post_data_json["mask"]).convert("L")
    assert inverted.getpixel((25, 64)) == 0 and inverted.getpixel((100, 64)) == 255
    expect(page.locator("#gallery li")).to_have_count(3, timeout=WAIT_MS)
    page.get_by_role("button", name="Clear results").click()
    expect(page.locator("#gallery li")).to_have_count(0)


def test_control_panel_sends_a_unit_the_server_applies(server, web, tmp_path):
    page = web().open(server.url)
    panel = page.locator("#control-section")
    expect(panel).to_be_visible()
    panel.locator("summary").click()
    assert page.get_by_label("ControlNet", exact=True).input_value().startswith("cn_tiny [")  # model_list's name
    modules = page.locator("#control-module option").all_inner_texts()
    assert "canny" in modules and "invert" in modules and page.get_by_label("Preprocessor").input_value() == "none"
    fill_small(page, "a yellow square", steps=5, seed=11)
    page.locator("#control-section").evaluate("details => { details.open = true; }")  # Chromium may keep it open
    page.get_by_label("Use ControlNet").check()
    page.get_by_role("button", name="Generate").click()  # no control image in txt2img: said so, nothing sent
    expect(page.get_by_role("alert")).to_contain_text("Choose a control image")
    page.get_by_label("Control image").set_input_files(str(source_png(tmp_path / "control.png")))
    expect(page.get_by_alt_text("The control image")).to_be_visible()
    page.get_by_label("Preprocessor").select_option("invert")
    with page.expect_request("**/controlnet/detect") as sent:
        page.get_by_role("button", name="Preview preprocessor").click()
    assert sent.value.post_data_json["controlnet_module"] == "invert"
    detected = page.get_by_alt_text("The preprocessor's output")
    expect(detected).to_be_visible()
    inverted = decode_data_url(detected.get_attribute("src"))
    assert inverted.convert("RGB").getpixel((5, 5)) == (255 - 30, 255 - 90, 255 - 200)  # the source, inverted
    page.get_by_label("Control weight").fill("0.8")
    page.get_by_label("Starting step").fill("0.2")
    page.get_by_label("Ending step").fill("0.8")
    page.get_by_label("Control mode").select_option(label="ControlNet first")
    page.get_by_label("Resize mode").select_option("Just Resize")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    [unit] = sent.value.post_data_json["alwayson_scripts"]["controlnet"]["args"]
    assert (unit["module"], unit["weight"], unit["guidance_start"], unit["guidance_end"], unit["control_mode"]) == \
        ("invert", 0.8, 0.2, 0.8, "ControlNet is more important")
    assert unit["enabled"] is True and unit["model"].startswith("cn_tiny [") and unit["resize_mode"] == "Just Resize"
    assert decode_data_url(unit["image"]).size == (128, 128)
    text = page.locator("#gallery li .infotext").first
    expect(text).to_contain_text('ControlNet 0: "Module: invert, Model: cn_tiny [', timeout=WAIT_MS)
    for part in ("Weight: 0.8", "Resize Mode: Just Resize", "Guidance Start: 0.2", "Guidance End: 0.8",
                 "Control Mode: ControlNet is more"):
        expect(text).to_contain_text(part)
    page.screenshot(path=str(tmp_path / "control.png"), full_page=True)
    shutil.copyfile(tmp_path / "control.png", CONTROL_SCREENSHOT)
    page.reload()  # the unit's settings are kept between visits (not the image, and not switched on)
    page.wait_for_selector("body[data-ready=true]")
    assert (page.get_by_label("Preprocessor").input_value(), page.get_by_label("Control weight").input_value(),
            page.get_by_label("Control mode").input_value()) == ("invert", "0.8", "ControlNet is more important")
    assert not page.get_by_label("Use ControlNet").is_checked()
    fill_small(page, "a yellow square", steps=5, seed=11)
    page.locator("#control-section").evaluate("details => { details.open = true; }")  # Chromium may keep it open
    page.get_by_label("Use ControlNet").check()
    page.get_by_role("button", name="Generate").click()  # the image is not kept: asked for again
    expect(page.get_by_role("alert")).to_contain_text("Choose a control image")
    page.get_by_label("Use ControlNet").uncheck()  # off: no unit sent
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    assert "alwayson_scripts" not in sent.value.post_data_json
    expect(page.locator("#gallery li")).to_have_count(1, timeout=WAIT_MS)


def test_control_panel_takes_ip_adapter_units(server, web, tmp_path):
    """IP-Adapters listed as the extension lists them (model_list, ip-adapter* modules): the panel pairs the model
    with its module and sends the unit as any other. The lists and the answer are stubbed (this server has none)."""
    import json

    page = web().page
    models = {"model_list": ["cn_tiny [a4ed4526]", "ip-adapter_sd15 [12345678]"]}
    modules = {"module_list": ["none", "canny", "ip-adapter_clip_sd15", "ip-adapter-auto"]}
    page.route("**/controlnet/model_list", lambda route: route.fulfill(json=models))
    page.route("**/controlnet/module_list", lambda route: route.fulfill(json=modules))
    page.route("**/sdapi/v1/txt2img", lambda route: route.fulfill(json={
        "images": [], "parameters": {}, "info": json.dumps({"infotexts": []})}))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    page.locator("#control-section summary").click()
    assert page.get_by_label("Preprocessor").input_value() == "none"
    page.get_by_label("ControlNet", exact=True).select_option("ip-adapter_sd15 [12345678]")
    assert page.get_by_label("Preprocessor").input_value() == "ip-adapter_clip_sd15"
    expect(page.get_by_role("button", name="Preview preprocessor")).to_be_disabled()  # a reference, not a map
    page.get_by_label("Control image").set_input_files(str(source_png(tmp_path / "reference.png")))
    expect(page.get_by_alt_text("The control image")).to_be_visible()
    page.get_by_label("Control weight").fill("0.6")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    [unit] = sent.value.post_data_json["alwayson_scripts"]["controlnet"]["args"]
    assert (unit["model"], unit["module"], unit["weight"]) == ("ip-adapter_sd15 [12345678]", "ip-adapter_clip_sd15",
                                                               0.6)
    page.get_by_label("ControlNet", exact=True).select_option("cn_tiny [a4ed4526]")  # back to a ControlNet
    assert page.get_by_label("Preprocessor").input_value() == "none"
    expect(page.get_by_role("button", name="Preview preprocessor")).to_be_enabled()


def assert_values_resolve(axis: str, values: list[str]) -> None:
    from sdengine.server.samplers import SCHEDULER_KEYS, resolve_sampler

    assert len(values) > 1 or axis == "Checkpoint name", values
    for value in values:
        if axis == "Sampler":
            resolve_sampler(value, None)
        elif axis == "Schedule type":
            assert value.lower() == "automatic" or value.lower() in SCHEDULER_KEYS, value
        else:
            assert value == "tiny", value


def test_xyz_grid_from_the_page(server, web, tmp_path):
    info = {(s["name"], s["is_img2img"]): s["args"] for s in server.get("/sdapi/v1/script-info").json()}
    axes = info[("x/y/z plot", False)][0]["choices"]
    page = web().open(server.url)
    page.locator("#xyz-section summary").click()
    offered = page.locator("#xyz-x-type option").all_text_contents()
    assert "Steps" in offered and "Sampler" in offered and "Denoising" not in offered  # txt2img's plottable axes
    assert "VAE" not in offered  # A1111 has it; the server cannot plot it
    fill_small(page, "a blue triangle", steps=1, seed=21)
    page.get_by_label("Make a grid").check()
    page.get_by_label("X axis").select_option("Steps")
    page.get_by_label("X values").fill("1-2")
    for axis in ("Schedule type", "Checkpoint name", "Sampler"):  # "All": every name, as the server takes it
        page.get_by_label("Y axis").select_option(axis)
        page.get_by_role("button", name="Every Y value").click()
        assert_values_resolve(axis, page.get_by_label("Y values").input_value().split(", "))
    expect(page.get_by_role("button", name="Every X value")).to_be_disabled()  # Steps: no list to take
    page.get_by_label("Y values").fill("Euler, DPM++ 2M")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    args = body["script_args"]
    assert body["script_name"] == "x/y/z plot" and len(args) == len(info[("x/y/z plot", False)])
    assert (axes[args[0]], args[1], axes[args[3]], args[4], axes[args[6]]) == \
        ("Steps", "1-2", "Sampler", "Euler, DPM++ 2M", "Nothing")
    items = page.locator("#gallery li")
    expect(items).to_have_count(5, timeout=WAIT_MS)  # the grid, then its 4 cells
    grid = items.first
    expect(grid.locator(".badge")).to_have_text("Grid")
    assert "Script: X/Y/Z plot, X Type: Steps, X Values: 1-2, Y Type: Sampler" in grid.locator(".infotext").inner_text()
    size = page.evaluate("img => [img.complete && img.naturalWidth, img.naturalHeight]", grid.locator("img")
                         .element_handle())
    assert size[0] > 2 * 64 and size[1] > 2 * 64  # two by two cells and their labels
    assert "Sampler: DPM++ 2M" in items.nth(4).locator(".infotext").inner_text()  # x fastest, as A1111
    page.screenshot(path=str(tmp_path / "grid.png"), full_page=True)
    shutil.copyfile(tmp_path / "grid.png", GRID_SCREENSHOT)
    page.reload()  # the axes and values are kept between visits; the grid is off again
    page.wait_for_selector("body[data-ready=true]")
    assert (page.get_by_label("Y axis").input_value(), page.get_by_label("Y values").input_value()) == \
        ("Sampler", "Euler, DPM++ 2M")
    assert page.get_by_label("X values").input_value() == "1-2" and not page.get_by_label("Make a grid").is_checked()
    page.get_by_label("Change an image").check()  # img2img's list: Denoising, and its own indices
    assert "Denoising" in page.locator("#xyz-x-type option").all_text_contents()
    page.get_by_label("Make a grid").uncheck()


def refused(page, url: str) -> None:
    """Chromium either shows the 401 answer or, having no (right) credentials to retry with, gives up with
    ERR_INVALID_AUTH_CREDENTIALS: both are a refusal, and the page's form never appears."""
    try:
        response = page.goto(url)
    except sync_api.Error as e:
        assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e), e
    else:
        assert response.status == 401 and response.headers["www-authenticate"].startswith("Basic")
    assert page.locator("#gen-form").count() == 0


def test_page_needs_credentials(auth_server, web):
    anonymous = web(strict=False)  # the browser logs each 401 as a console error
    refused(anonymous.page, auth_server.url)
    for path in ("/", "/static/app.js", "/static/style.css", "/sdapi/v1/samplers"):
        assert anonymous.context.request.get(auth_server.url + path).status == 401, path
    wrong = web(strict=False, http_credentials={"username": AUTH[0], "password": "nope"})
    refused(wrong.page, auth_server.url)
    assert wrong.context.request.get(auth_server.url + "/").status == 401

    page = web(http_credentials={"username": AUTH[0], "password": AUTH[1]}).open(auth_server.url)
    assert "Euler a" in page.locator("#sampler option").all_inner_texts()  # the page's API calls pass too
    expect(page.locator("#control-section")).to_be_hidden()  # no ControlNet in the server's folder
    fill_small(page, "a locked door")
    page.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard shortcut generates
    expect(page.locator("#gallery li .infotext").first).to_contain_text("a locked door", timeout=WAIT_MS)
    assert page.get_by_label("Seed", exact=True).input_value() == "-1"


def test_size_defaults_to_the_loaded_models(web, tmp_path):
    """Issue 34 (6): the page defaulted to 512x512 whatever the model (the shipped model is 64x64: a first click
    gave a slow, broken image). The models folder links to the shipped model (a symlink, which `serve` once
    refused)."""
    import sdengine

    shipped = Path(sdengine.__file__).parent / "models" / "default" / "model.safetensors"
    if not shipped.is_file():
        pytest.skip("this install has no shipped model")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.safetensors").symlink_to(shipped)
    with serve(tmp_path) as running:
        page = web().open(running.url)
        assert (page.get_by_label("Width").input_value(), page.get_by_label("Height").input_value()) == ("64", "64")
        # common sizes: the model's square and SDXL's aspect buckets scaled to it (1152x896 at 1024 -> 72x56 here)
        labels = page.locator("#size-preset option").all_inner_texts()
        assert "64 × 64 (the model's)" in labels and "72 × 56" in labels and len(labels) == 10
        page.select_option("#size-preset", "72x56")
        assert (page.get_by_label("Width").input_value(), page.get_by_label("Height").input_value()) == ("72", "56")
