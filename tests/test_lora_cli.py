"""LoRAs on the command line: `generate --lora`, `<lora:...>` with --lora-dir, `merge --lora` (baking), `info` reading
the hashes back, and one-line errors for bad LoRA options."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_cli_error, run_cli
from lora_helpers import random_kohya
from PIL import Image
from safetensors.torch import save_file

import sdengine
from sdengine.config import PRESETS
from sdengine.lora import LoraPatcher, LoraUse, read_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loracli")
    model = sdengine.StableDiffusion(PRESETS["tiny"]).init_weights(seed=1)
    sdengine.save(model, root / "model.safetensors")
    (root / "loras").mkdir()
    save_file(random_kohya(model, seed=3), root / "loras" / "style.safetensors")
    return root


def _generate(files, *extra):
    return run_cli("generate", "a red circle", "--model", files / "model.safetensors", "--steps", "2", "--seed", "1",
                   "--width", "32", "--height", "32", "--quiet", "--device", "cpu", *extra)


@pytest.mark.slow
def test_generate_with_lora_option_and_tag_agree(files, tmp_path):
    plain = _generate(files, "--out", tmp_path / "plain.png")
    by_option = _generate(files, "--lora", files / "loras" / "style.safetensors:0.8", "--out", tmp_path / "a.png")
    by_tag = run_cli("generate", "a red circle <lora:style:0.8>", "--model", files / "model.safetensors", "--steps",
                     "2", "--seed", "1", "--width", "32", "--height", "32", "--quiet", "--device", "cpu",
                     "--lora-dir", files / "loras", "--out", tmp_path / "b.png")
    assert plain.returncode == by_option.returncode == by_tag.returncode == 0, (by_option.stderr, by_tag.stderr)
    a, b, p = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "plain.png"))
    assert np.array_equal(a, b) and not np.array_equal(a, p)
    info = run_cli("info", tmp_path / "b.png", "--json")
    params = json.loads(info.stdout)
    assert params["Prompt"] == "a red circle <lora:style:0.8>" and params["Lora hashes"].startswith("style: ")
    missing = run_cli("generate", "a <lora:nosuch:1>", "--model", files / "model.safetensors", "--steps", "1",
                      "--width", "32", "--height", "32", "--quiet", "--device", "cpu", "--out", tmp_path / "d.png")
    assert missing.returncode == 0 and "warning: LoRA not found: nosuch" in missing.stderr


def test_bad_lora_options_are_one_line_errors(files, tmp_path):
    assert_cli_error(_generate(files, "--lora", "nosuch", "--out", tmp_path / "x.png"), "no LoRA named 'nosuch'")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    assert_cli_error(_generate(files, "--lora", broken, "--out", tmp_path / "x.png"), "broken.safetensors")
    assert_cli_error(_generate(files, "--lora", f"{files / 'loras' / 'style.safetensors'}:abc",
                               "--out", tmp_path / "x.png"), "not a number")
    assert not (tmp_path / "x.png").exists()


def test_merge_bakes_a_lora_in(files, tmp_path):
    out = tmp_path / "baked.safetensors"
    proc = run_cli("merge", files / "model.safetensors", "--lora", f"{files / 'loras' / 'style.safetensors'}:0.6",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    baked = sdengine.load(out)
    model = sdengine.load(files / "model.safetensors")
    LoraPatcher(model).apply([LoraUse(read_lora(files / "loras" / "style.safetensors"), 0.6, 0.6)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, baked.state_dict()[key]), key
    assert_cli_error(run_cli("merge", files / "model.safetensors", "--out", tmp_path / "y.safetensors"),
                     "--lora")
