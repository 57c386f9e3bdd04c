"""The model sdengine ships (sdengine/models/default/): present, small, self-describing, and used when no --model
is given. Its quality is measured by `sdengine eval` (model card), not here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sdengine
from sdengine.runtime import default_model, native_size
from sdengine.tokenizer import CLIPTokenizer

SHIPPED = Path(sdengine.__file__).parent / "models" / "default"


def test_shipped_model_is_small_and_self_describing():
    path = default_model()
    assert path == SHIPPED / "model.safetensors" and path.stat().st_size <= 30_000_000
    model = sdengine.load(path)
    assert model.config.sample_size == 64 and native_size(path) == 64
    assert model.config.family.startswith("custom") and model.config.vae.downscale == 4
    files = CLIPTokenizer.from_dir(SHIPPED / "tokenizer")  # the tokenizer files beside it are the embedded one
    prompt = ["a red circle above a blue square", "two small green stars on a black background"]
    assert files(prompt, max_length=77).tolist() == model.tokenizer(prompt, max_length=77).tolist()


@pytest.mark.slow  # a real process that loads the shipped model (~4 s)
def test_generate_without_model_uses_the_shipped_one(tmp_path):
    out = tmp_path / "img.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDENGINE_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "sdengine", "generate", "a red circle above a blue square", "--steps",
                        "2", "--seed", "1", "--out", str(out), "--quiet"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    assert image.size == (64, 64) and "Steps: 2" in image.info["parameters"]


def test_native_size_without_a_recorded_one(tmp_path):
    assert native_size(tmp_path / "missing.safetensors") == 512
    (tmp_path / "x.safetensors").write_bytes(b"\x01")
    assert native_size(tmp_path / "x.safetensors") == 512
