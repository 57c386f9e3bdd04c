"""The server's size caps come from the model that runs a request when `serve` is given none (issue 34): twice the
size the model runs at, at least 1024 — the shipped 64-pixel model 1024, SD1.5 1024, SDXL 2048 — read from the
loaded model's config, or from another model's file header before it loads; given caps still win."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sdengine import runtime
from sdengine.server.errors import BadInput
from sdengine.server.registry import ModelRegistry
from sdengine.server.validation import BodyReader, Limits

pytest.importorskip("fastapi")


def fake_sdxl(path) -> None:
    """A file whose header reads as an SDXL single file (never loaded: only its header is looked at)."""
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, path)


def test_native_size_reads_the_family_from_the_header_or_the_folder(tmp_path):
    fake_sdxl(tmp_path / "xl.safetensors")
    assert runtime.native_size(tmp_path / "xl.safetensors") == 1024
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, tmp_path / "sd1.safetensors")
    assert runtime.native_size(tmp_path / "sd1.safetensors") == 512
    for sample_size, size in ((128, 1024), (96, 768), (64, 512)):
        (tmp_path / f"d{sample_size}" / "unet").mkdir(parents=True)
        (tmp_path / f"d{sample_size}" / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
        assert runtime.native_size(tmp_path / f"d{sample_size}") == size
    assert runtime.native_size(runtime.default_model()) == 64


def test_caps_follow_the_model_unless_given(tmp_path):
    assert Limits().caps_for(64) == (1024, 1024) and Limits().caps_for(1024) == (2048, 2048)
    assert Limits(max_width=640).caps_for(1024) == (640, 2048) and Limits(64, 64).caps_for(1024) == (64, 64)
    models = tmp_path / "models"
    models.mkdir()
    fake_sdxl(models / "xl.safetensors")
    registry = ModelRegistry(models, runtime.default_model(), torch.device("cpu"), torch.float32, lora_dirs=[],
                             embedding_dirs=[])
    registry.ensure("model.safetensors")           # the shipped model, loaded: its config says 64
    registry.default_name = registry.current.name
    settings = {"CLIP_stop_at_last_layers": 1, "live_previews_enable": False, "token_merging_ratio": 0.0,
                "sdxl_refiner_low_aesthetic_score": 2.5, "sdxl_refiner_high_aesthetic_score": 6.0}
    reader = BodyReader(Limits(), registry, {}, settings)
    assert reader.caps(None) == (1024, 1024) and reader.caps("xl.safetensors") == (2048, 2048)
    body = {"prompt": "a red circle", "steps": 1, "width": 1536, "height": 1024}
    with pytest.raises(BadInput, match="width must be at most 1024 on this server for this model"):
        reader.read(body, "txt2img")
    job = reader.read({**body, "override_settings": {"sd_model_checkpoint": "xl"}}, "txt2img")
    assert (job.request.width, job.caps) == (1536, (2048, 2048))     # allowed for an SDXL model, before it loads
    with pytest.raises(BadInput, match="at most 512 on this server, got 1536"):
        BodyReader(Limits(512, 512), registry, {}, settings).read(body, "txt2img")
