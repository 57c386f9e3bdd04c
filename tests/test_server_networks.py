"""LoRAs and embeddings through the HTTP API (issue 30, part 5), in this process (FastAPI's TestClient over the real
app, tiny models): A1111's /sdapi/v1/loras, /refresh-loras, /embeddings and /refresh-embeddings; `<lora:...>` tags in
txt2img change the image and leave "Lora hashes" in the infotext; an unknown LoRA is a warning, a bad tag or a broken
file a 422; LoRAs are found by name in the server's folder only, whatever path a client writes; a model switch keeps
the folders."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from lora_helpers import random_kohya
from PIL import Image
from safetensors.torch import save_file
from server_helpers import write_model

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

SMALL = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("networks")
    for name in ("models", "loras", "embeddings", "outside"):
        (root / name).mkdir()
    write_model(root / "models" / "tiny.safetensors", 0)
    write_model(root / "models" / "other.safetensors", 1)
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 64, generator=g) * 0.1}, root / "embeddings" / "tok.safetensors")
    save_file({"emb_params": torch.randn(1, 32, generator=g) * 0.1}, root / "embeddings" / "narrow.safetensors")
    (root / "loras" / "broken.safetensors").write_bytes(bytes(range(256)) * 4)  # no safetensors header
    return root


@pytest.fixture(scope="module")
def client(folders):
    from fastapi.testclient import TestClient

    from sdengine.prompts import BUNDLED_STYLES, load_styles
    from sdengine.server.app import create_app
    from sdengine.server.registry import ModelRegistry
    from sdengine.server.service import Service
    from sdengine.server.validation import Limits

    registry = ModelRegistry(folders / "models", None, torch.device("cpu"), torch.float32,
                             lora_dirs=[folders / "loras"], embedding_dirs=[folders / "embeddings"])
    registry.ensure("tiny.safetensors")
    registry.default_name = registry.current.name
    write_lora(registry.pipeline.model, folders / "loras" / "style.safetensors", seed=1,
               metadata={"ss_output_name": "style-v1"})
    write_lora(registry.pipeline.model, folders / "outside" / "evil.safetensors", seed=2)
    service = Service(registry, Limits(max_width=64, max_height=64, max_steps=3, max_batch=2, queue_size=4),
                      load_styles(BUNDLED_STYLES), threads=1)
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        c.service = service
        yield c


def write_lora(model, path, seed: int, metadata: dict[str, str] | None = None) -> None:
    save_file(random_kohya(model, seed=seed), path, metadata=metadata)


def txt2img(client, **fields) -> tuple[np.ndarray, str, dict]:
    """(the image as an int array, its infotext, info) of a request that must succeed."""
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.info["parameters"] == info["infotexts"][0]  # the PNG carries what info shows
    return np.asarray(image.convert("RGB"), dtype=np.int16), info["infotexts"][0], info


@pytest.fixture(scope="module")
def plain(client) -> np.ndarray:
    return txt2img(client)[0]


def test_loras_are_listed_with_a1111_fields(client, folders):
    loras = {e["name"]: e for e in client.get("/sdapi/v1/loras").json()}
    assert set(loras) == {"broken", "style"}  # the folder's files, never the one outside it
    style = loras["style"]
    assert set(style) == {"name", "alias", "path", "metadata", "sd_version", "sdengine_context_dim"}  # A1111's + 2
    assert (style["sd_version"], style["sdengine_context_dim"]) == ("Unknown", 64)  # the tiny model's width
    assert style["alias"] == "style-v1" and style["metadata"] == {"ss_output_name": "style-v1"}
    assert style["path"] == str(folders / "loras" / "style.safetensors")  # the server's own folder, as A1111 shows
    assert loras["broken"]["metadata"] == {} and loras["broken"]["alias"] == "broken"


def test_refresh_loras_finds_a_new_file(client, folders):
    new = folders / "loras" / "sub" / "late.safetensors"
    new.parent.mkdir()
    write_lora(client.service.registry.pipeline.model, new, seed=3)
    try:
        assert "late" not in [e["name"] for e in client.get("/sdapi/v1/loras").json()]  # listed when refreshed
        r = client.post("/sdapi/v1/refresh-loras")
        assert r.status_code == 200 and r.json() is None  # A1111 answers null
        assert "late" in [e["name"] for e in client.get("/sdapi/v1/loras").json()]
    finally:
        new.unlink()
        client.post("/sdapi/v1/refresh-loras")


def test_lora_changes_the_image_and_is_recorded(client, folders, plain):
    from sdengine.lora.library import addnet_hash

    image, text, info = txt2img(client, prompt="a red circle <lora:style:0.8>")
    assert np.abs(image - plain).mean() > 1, "the LoRA did not change the image"
    shorthash = addnet_hash(folders / "loras" / "style.safetensors")[:12]
    assert f'Lora hashes: "style: {shorthash}"' in text, text  # quoted as A1111 quotes it
    assert text.startswith("a red circle <lora:style:0.8>")  # the prompt as written, tag and all
    assert info["warnings"] == [] and "Warnings" not in text
    weaker = txt2img(client, prompt="a red circle <lora:style:0.3>")[0]
    assert not np.array_equal(weaker, image)
    assert np.array_equal(txt2img(client)[0], plain)  # taken out again, exactly


def test_unknown_lora_is_a_warning(client, plain):
    image, text, info = txt2img(client, prompt="a red circle <lora:nosuch:1>")
    assert "LoRA not found: nosuch" in info["warnings"]
    assert re.search(r"Warnings: .*LoRA not found: nosuch", text), text
    assert np.array_equal(image, plain)  # the tag is cut from the prompt, not encoded as text


@pytest.mark.parametrize("prompt, needle", [
    ("a red circle <lora:style:abc>", "'abc' is not a number"),
    ("<lora:style:1:nan>", "must be a number"),
    ("<lora::1>", "names no LoRA"),
    ("".join(f"<lora:l{i}:1>" for i in range(40)), "at most 32"),
])
def test_bad_tags_are_a_422(client, prompt, needle):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": prompt})
    assert r.status_code == 422 and needle in r.json()["detail"] and r.json()["detail"].startswith("prompt "), r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "hr_prompt": prompt})
    assert r.status_code == 422 and r.json()["detail"].startswith("hr_prompt "), r.text


def test_broken_lora_file_is_a_422_with_its_reason(client, plain):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a red circle <lora:broken:1>"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "LoraError" and "broken" in r.json()["detail"], r.text
    assert np.array_equal(txt2img(client)[0], plain)  # and the server goes on as before


def test_client_paths_are_never_opened(client, folders, plain, monkeypatch):
    """Names are looked up in the folder's listing: a path in a tag is an unknown name, and no file is read."""
    import sdengine.lora.library as library

    opened = []
    real = library.read_lora
    monkeypatch.setattr(library, "read_lora", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    outside = folders / "outside" / "evil"
    for name in ("../outside/evil", str(outside), "../../../../etc/passwd", "..\\outside\\evil", "sub/../style"):
        image, text, info = txt2img(client, prompt=f"a red circle <lora:{name}:1>")
        assert f"LoRA not found: {name}" in info["warnings"], (name, info["warnings"])
        assert "Lora hashes" not in text and np.array_equal(image, plain), name
    assert opened == []


def test_disable_extra_networks_leaves_the_tags_out(client, plain):
    image, text, info = txt2img(client, prompt="a red circle <lora:style:0.8>", disable_extra_networks=True)
    assert np.array_equal(image, plain) and "Lora hashes" not in text and info["warnings"] == []


def test_a_switched_model_gets_the_folders_too(client):
    body = {"prompt": "a red circle <lora:style:1> tok", "override_settings": {"sd_model_checkpoint": "other"}}
    _, text, info = txt2img(client, **body)
    assert info["sd_model_name"] == "other" and "Lora hashes" in text and "TI hashes" in text, text
    assert "tok" in client.get("/sdapi/v1/embeddings").json()["loaded"]  # the loaded model's scan
    txt2img(client)  # back to the default model for the tests that follow


def test_embeddings_are_listed_and_refreshed(client, folders):
    body = client.get("/sdapi/v1/embeddings").json()
    assert set(body) == {"loaded", "skipped"}
    assert body["loaded"]["tok"]["shape"] == 64 and body["loaded"]["tok"]["vectors"] == 2
    assert set(body["loaded"]["tok"]) == {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}
    assert "narrow" in body["skipped"]  # made for a 32-wide text encoder
    _, text, _ = txt2img(client, prompt="a red circle, tok")
    assert "TI hashes" in text and "tok: " in text, text

    late = folders / "embeddings" / "late.safetensors"
    save_file({"emb_params": torch.ones(1, 64) * 0.01}, late)
    try:
        assert "late" not in client.get("/sdapi/v1/embeddings").json()["loaded"]
        r = client.post("/sdapi/v1/refresh-embeddings")
        assert r.status_code == 200 and r.json() is None
        assert "late" in client.get("/sdapi/v1/embeddings").json()["loaded"]
    finally:
        late.unlink()
        client.post("/sdapi/v1/refresh-embeddings")
    assert "late" not in client.get("/sdapi/v1/embeddings").json()["loaded"]


def test_serve_refuses_a_missing_lora_folder(tmp_path, capsys):
    from sdengine.cli import run

    assert run(["serve", "--lora-dir", str(tmp_path / "nope"), "--models-dir", str(tmp_path)]) == 1
    assert "--lora-dir" in capsys.readouterr().err


def test_refiner_checkpoint_takes_over_the_schedule(client, plain, monkeypatch):
    """A1111's refiner_checkpoint / refiner_switch_at: another model by name continues the schedule (any model of
    the same latent space, as A1111 allows; SDXL's refiner is the usual one), recorded in the infotext. (The tiny
    models' UNets start as identities, so the images cannot tell the models apart: a spy sees the ensemble run;
    tests/test_sdxl.py checks its latents.)"""
    from sdengine.pipeline import Pipeline

    runs = []
    ensemble = Pipeline.sample_with_refiner
    monkeypatch.setattr(Pipeline, "sample_with_refiner", lambda self, req, refiner, switch_at, callback=None: (
        runs.append((refiner.model.source, switch_at)) or ensemble(self, req, refiner, switch_at, callback)))
    _, infotext, _ = txt2img(client, refiner_checkpoint="other.safetensors", refiner_switch_at=0.5)
    assert "Refiner: other.safetensors" in infotext and "Refiner switch at: 0.5" in infotext
    assert len(runs) == 1 and str(runs[0][0]).endswith("other.safetensors") and runs[0][1] == 0.5
    none, _, _ = txt2img(client, refiner_checkpoint="None")
    assert np.array_equal(none, plain) and len(runs) == 1
    for body, fragment in (({"refiner_checkpoint": "../models/other.safetensors"}, "paths are not accepted"),
                           ({"refiner_checkpoint": "nosuch"}, "no model named"),
                           ({"refiner_checkpoint": "other.safetensors", "refiner_switch_at": 1.5},
                            "refiner_switch_at")):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, **body})
        assert r.status_code == 422 and fragment in r.text, r.text


def test_a_prompt_of_too_many_chunks_is_a_422(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a BREAK " * 200})
    assert r.status_code == 422 and "chunks" in r.text, r.text
