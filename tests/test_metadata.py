"""The A1111 "parameters" PNG text: format/parse round trips, the A1111 layout, and PNGs written by the pipeline
(tEXt for Latin-1, iTXt otherwise) read back with PIL, read_parameters and `sdengine info`."""
from __future__ import annotations

import json

import pytest
from PIL import Image

import sdengine
from sdengine.cli import run
from sdengine.metadata import format_parameters, parse_parameters, read_parameters, save_png
from sdengine.pipeline import Pipeline

PARAMS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 3012455161,
    "Size": "512x768", "Model hash": "6ce0161689", "Model": 'my, model: v2 "final"', "Denoising strength": 0.45,
    "Clip skip": 2, "Variation seed strength": 1e-05, "Lora hashes": "add_detail: 7c6bad76eb54, other: 0123456789ab",
    "Hires prompt": "line one\nline two", "Note": 'say "hi"', "Version": "sdengine 0.1.0",
}


def test_round_trip_gives_back_every_field():
    prompt = "a cat, (red hair:1.2),\nsecond line: with a colon"
    negative = "lowres, bad anatomy\nand a second negative line"
    text = format_parameters(prompt, negative, PARAMS)
    back = parse_parameters(text)
    assert back.pop("Prompt") == prompt
    assert back.pop("Negative prompt") == negative
    assert (back.pop("Size-1"), back.pop("Size-2")) == (512, 768)
    assert back == PARAMS
    for key in ("Steps", "Seed", "Clip skip"):
        assert type(back[key]) is int
    for key in ("CFG scale", "Denoising strength", "Variation seed strength"):
        assert type(back[key]) is float


def test_layout_order_quoting_and_no_empty_negative_line():
    params = {"Version": "v", "Extra thing": 3, "Seed": 1, "Steps": 2, "Model": None, "CFG scale": 7.0,
              "Size": "8x8", "Lora hashes": "a: 1, b: 2"}
    text = format_parameters("a prompt", "", params)
    assert text == ('a prompt\nSteps: 2, CFG scale: 7, Seed: 1, Size: 8x8, Extra thing: 3, '
                    'Lora hashes: "a: 1, b: 2", Version: v')
    assert "Negative prompt" not in text
    back = parse_parameters(text)
    assert back["Negative prompt"] == "" and "Model" not in back and back["CFG scale"] == 7
    # an empty prompt with a negative prompt
    back = parse_parameters(format_parameters("", "ugly", {"Steps": 1, "Seed": 2, "Size": "8x8"}))
    assert (back["Prompt"], back["Negative prompt"], back["Seed"]) == ("", "ugly", 2)


@pytest.mark.parametrize("old, sampler, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
    ("Euler a", "Euler a", None),
    ("DPM++ SDE", "DPM++ SDE", None),
])
def test_old_sampler_names_split_into_sampler_and_schedule(old, sampler, schedule):
    back = parse_parameters(f"a cat\nSteps: 20, Sampler: {old}, CFG scale: 7, Seed: 1, Size: 64x64")
    assert back["Sampler"] == sampler
    assert back.get("Schedule type") == schedule
    # a newer infotext that names its schedule keeps the sampler as written
    back = parse_parameters(f"a cat\nSteps: 20, Sampler: {old}, Schedule type: Uniform, CFG scale: 7, Seed: 1")
    assert (back["Sampler"], back["Schedule type"]) == (old, "Uniform")


# What AUTOMATIC1111 v1.6 writes (old sampler name, prompt lines ending in ", ", hashes JSON-quoted).
A1111_SAMPLE = """masterpiece, best quality, (red hair:1.2), \n1girl, looking at viewer, <lora:add_detail:0.5>
Negative prompt: lowres, bad anatomy, (worst quality:1.4), \nwatermark
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3012455161, Size: 512x768, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, ENSD: 31337, Hires upscale: 2, \
Hires resize: 1024x1536, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", \
TI hashes: "easynegative: c74b4e810b03", \
Version: v1.6.0"""


def test_a1111_sample_parses_as_a1111_does():
    got = parse_parameters(A1111_SAMPLE)
    # A1111's parse_generation_parameters strips each prompt line and splits the old sampler name
    assert got["Prompt"] == ("masterpiece, best quality, (red hair:1.2),\n"
                             "1girl, looking at viewer, <lora:add_detail:0.5>")
    assert got["Negative prompt"] == "lowres, bad anatomy, (worst quality:1.4),\nwatermark"
    assert got["Sampler"] == "DPM++ 2M" and got["Schedule type"] == "Karras"
    assert (got["Steps"], got["CFG scale"], got["Seed"], got["Clip skip"], got["ENSD"]) == (28, 7, 3012455161, 2, 31337)
    assert (got["Size-1"], got["Size-2"]) == (512, 768)
    assert got["Model hash"] == "6ce0161689" and got["Model"] == "v1-5-pruned-emaonly"
    assert got["Denoising strength"] == 0.5 and got["Hires upscale"] == 2 and got["Hires upscaler"] == "Latent"
    assert (got["Hires resize-1"], got["Hires resize-2"]) == (1024, 1536)  # every WxH value, as A1111 splits
    assert got["Lora hashes"] == "add_detail: 7c6bad76eb54" and got["TI hashes"] == "easynegative: c74b4e810b03"
    assert got["Version"] == "v1.6.0"


def test_prompt_only_text_has_no_parameters():
    # fewer than three `Key: value` pairs on the last line: it is prompt, as in A1111
    assert parse_parameters("a cat\nstyle: oil, mood: calm") == {
        "Prompt": "a cat\nstyle: oil, mood: calm", "Negative prompt": ""}


# ---- PNGs written by the pipeline ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline(sdengine.load(sd1_folder))


def chunk_types(path) -> set[bytes]:
    """The PNG chunk types that hold a "parameters" keyword."""
    data = path.read_bytes()
    return {kind for kind in (b"tEXt", b"iTXt", b"zTXt") if kind + b"parameters\0" in data}


@pytest.mark.parametrize("prompt, chunk", [
    ("a red cat, (sharp:1.2)", b"tEXt"),
    ("un café, crème brûlée", b"tEXt"),  # Latin-1 still fits tEXt
    ("a cat 🐱 on a mat", b"iTXt"),
    ("一只红色的猫, 夜晚", b"iTXt"),
])
def test_pipeline_png_parameters_read_back(pipe, tmp_path, prompt, chunk):
    negative = "blurry, 模糊" if chunk == b"iTXt" else "blurry"
    image = pipe.generate(prompt, negative_prompt=negative, steps=2, sampler="dpmpp_2m", schedule="karras",
                          cfg_scale=6.5, seed=7, width=40, height=32)[0]
    text = image.info["parameters"]
    path = tmp_path / "out.png"
    save_png(image, path, text)
    assert chunk_types(path) == {chunk}
    with Image.open(path) as img:
        assert img.info["parameters"] == text and img.size == (40, 32)
    assert read_parameters(path) == text
    got = parse_parameters(read_parameters(path))
    assert (got["Prompt"], got["Negative prompt"]) == (prompt, negative)
    assert (got["Steps"], got["Sampler"], got["Schedule type"], got["CFG scale"], got["Seed"], got["Size"]) == (
        2, "DPM++ 2M", "Karras", 6.5, 7, "40x32")
    assert got["Version"].startswith("sdengine ")


def test_info_command_reads_png_parameters(pipe, tmp_path, capsys):
    image = pipe.generate("a cat 🐱", steps=1, seed=3, width=16, height=16, cfg_scale=1.0)[0]
    path = tmp_path / "cat.png"
    save_png(image, path, image.info["parameters"])
    assert run(["info", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["Prompt"] == "a cat 🐱" and got["Seed"] == 3 and got["Size"] == "16x16"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert read_parameters(plain) is None
    assert run(["info", str(plain)]) == 1
    assert capsys.readouterr().err.startswith("sdengine: error:")
