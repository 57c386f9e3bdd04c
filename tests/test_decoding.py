"""How generation decodes (sdengine/decoding.py): the VAE in tiles when the request asks or the image is large, the
tiny autoencoder (TAESD) for previews and `--vae-tiny` final images; the CLI options and their errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdengine
from sdengine import decoding
from sdengine.cli import run
from sdengine.nn.seamless import circular_padding
from sdengine.nn.taesd import TAESDConfig, TinyAutoencoder, taesd_tensors
from sdengine.pipeline import Pipeline
from sdengine.request import FieldError, Request

FAST = ["--steps", "2", "--width", "24", "--height", "16", "--quiet", "--precision", "fp32"]


@pytest.fixture(scope="module")
def pipe(sd1_folder) -> Pipeline:
    return Pipeline(sdengine.load(sd1_folder))


def tiny_for(model: sdengine.StableDiffusion, seed: int = 0, latent_channels: int = 4) -> TinyAutoencoder:
    levels = {2: (1, 3), 4: (1, 3, 3), 8: (1, 3, 3, 3)}[model.config.vae.downscale]
    torch.manual_seed(seed)
    cfg = TAESDConfig(latent_channels=latent_channels, channels=8, encoder_blocks=levels,
                      decoder_blocks=tuple(reversed(levels)))
    return TinyAutoencoder(cfg).eval().requires_grad_(False)


class Spy:
    def __init__(self, monkeypatch, name: str):
        self.calls = 0
        real = getattr(decoding, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(decoding, name, spy)


def test_vae_tiling_field_is_checked():
    with pytest.raises(FieldError, match="vae tiling must be true, false or null"):
        Request(vae_tiling="yes")
    with pytest.raises(FieldError, match="seamless"):
        Request(vae_tiling=True, tiling=True)
    assert Request(vae_tiling=False).vae_tiling is False


def test_tiles_as_asked_and_when_the_untiled_pass_is_too_big(pipe, monkeypatch):
    model = pipe.model
    assert decoding.tiled(model, 2048, 2048, 1, True) and not decoding.tiled(model, 2048, 2048, 1, False)
    monkeypatch.setattr(decoding, "AUTO_TILE_BYTES", 1)
    assert decoding.tiled(model, 1024, 1024, 1, None)
    assert not decoding.tiled(model, 512, 512, 1, None)  # within one tile: tiling would change nothing
    with circular_padding([model.vae]):  # seamless images are never tiled automatically
        assert not decoding.tiled(model, 1024, 1024, 1, None)
    monkeypatch.setattr(decoding, "AUTO_TILE_BYTES", 1 << 60)
    assert not decoding.tiled(model, 1024, 1024, 1, None)


def test_the_pipeline_decodes_and_encodes_in_tiles_when_asked(pipe, monkeypatch):
    decodes, encodes = Spy(monkeypatch, "decode_tiled"), Spy(monkeypatch, "encode_tiled")
    fields = {"prompt": "a cat", "steps": 2, "seed": 3, "width": 24, "height": 16}
    untiled = pipe.run(Request(**fields))[0]
    assert decodes.calls == 0
    tiled = pipe.run(Request(**fields, vae_tiling=True))[0]
    assert decodes.calls == 1  # within one tile the tiled decode is the untiled one
    assert np.array_equal(np.asarray(untiled), np.asarray(tiled))
    pipe.run(Request(**fields, vae_tiling=True, strength=0.5), init=untiled)
    assert encodes.calls == 1 and decodes.calls == 2


def test_tiny_autoencoder_decodes_previews_and_final_images_when_asked(pipe):
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    full = pipe.decode(latents)
    assert torch.equal(pipe.decode(latents, tiny=True), full)  # no tiny autoencoder loaded: the VAE
    pipe.tiny_vae = tiny_for(pipe.model)
    try:
        want = (pipe.tiny_vae.decode(latents).float() / 2 + 0.5).clamp(0, 1)
        assert torch.equal(pipe.decode(latents, tiny=True), want)
        assert torch.equal(pipe.decode(latents), full)  # final images keep the VAE unless tiny_final
    finally:
        pipe.tiny_vae = None


@pytest.fixture
def cli(sd1_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDENGINE_DEBUG", raising=False)

    def call(*args):
        code = run([str(a) for a in args] + ["--model", str(sd1_folder)])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def test_cli_vae_tiny_and_vae_tiling(cli, pipe, tmp_path):
    tiny = tiny_for(pipe.model, seed=1)
    save_file(taesd_tensors(tiny), tmp_path / "taesd.safetensors")
    code, _, err = cli("generate", "a cat", "--seed", "2", *FAST, "--vae-tiny", tmp_path / "taesd.safetensors",
                       "--out", tmp_path / "tiny.png")
    assert code == 0, err
    pipe.tiny_vae, pipe.tiny_final = tiny, True
    try:
        want = pipe.run(Request(prompt="a cat", seed=2, steps=2, width=24, height=16))[0]
    finally:
        pipe.tiny_vae, pipe.tiny_final = None, False
    with Image.open(tmp_path / "tiny.png") as got:
        assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1

    code, _, err = cli("generate", "a cat", *FAST, "--vae-tiling", "--out", tmp_path / "tiles.png")
    assert code == 0 and (tmp_path / "tiles.png").exists(), err
    code, _, err = cli("generate", "a cat", *FAST, "--vae-tiling", "--tiling", "--out", tmp_path / "x.png")
    assert code == 1 and "seamless" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("generate", "a cat", *FAST, "--vae-tiny", tmp_path / "missing.pth", "--out", tmp_path / "y.png")
    assert code == 1 and "missing.pth" in err and not (tmp_path / "y.png").exists()
    save_file(taesd_tensors(tiny_for(pipe.model, latent_channels=16)), tmp_path / "taesd3.safetensors")
    code, _, err = cli("generate", "a cat", *FAST, "--vae-tiny", tmp_path / "taesd3.safetensors", "--out",
                       tmp_path / "z.png")
    assert code == 1 and "16-channel latents" in err and not (tmp_path / "z.png").exists()


def test_the_memory_estimate_counts_the_tiled_decode_where_it_would_run():
    """The server's refusals (memory_estimate.refusal) follow the decode that will run: a 2048² SD1.5 image decodes
    in tiles unless the request says otherwise, so only then does it need the untiled pass's memory."""
    from sdengine.config import SD15
    from sdengine.memory_estimate import estimate

    untiled = estimate(SD15, 2048, 2048, vae_tiling=False).decode
    assert estimate(SD15, 2048, 2048).decode == estimate(SD15, 2048, 2048, vae_tiling=True).decode < untiled / 10
    assert estimate(SD15, 256, 256).decode == estimate(SD15, 256, 256, vae_tiling=False).decode  # one tile


def test_the_shipped_model_has_its_own_tiny_autoencoder(tmp_path, capsys):
    """`--vae-tiny` without a file decodes the shipped model with the TAESD trained for its latent space (shipped
    beside it); on any other model that is a one-line error, as is a serve registry guessing it for another model."""
    from sdengine import runtime
    from sdengine.nn.taesd import load_taesd

    shipped = runtime.default_model()
    tiny_file = runtime.shipped_taesd(shipped)
    assert tiny_file is not None and tiny_file.parent == shipped.parent
    assert runtime.shipped_taesd(tmp_path / "other.safetensors") is None and runtime.shipped_taesd(None) is None
    out = tmp_path / "tiny.png"
    args = ["generate", "a red circle", "--seed", "3", "--steps", "2", "--precision", "fp32", "--quiet"]
    assert run([*args, "--out", str(out), "--vae-tiny"]) == 0
    pipe = Pipeline(sdengine.load(shipped))
    pipe.tiny_vae, pipe.tiny_final = load_taesd(tiny_file), True
    want = np.asarray(pipe.run(Request(prompt="a red circle", seed=3, steps=2))[0], dtype=np.int16)
    with Image.open(out) as got:
        assert np.abs(np.asarray(got, dtype=np.int16) - want).max() <= 1
    pipe.tiny_vae, pipe.tiny_final = None, False
    full = np.asarray(pipe.run(Request(prompt="a red circle", seed=3, steps=2))[0], dtype=np.int16)
    assert np.abs(full - want).mean() > 0.1       # it is the tiny decoder that drew it, not the VAE
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    sdengine.save(sdengine.load(shipped), other)
    assert run([*args, "--model", str(other), "--out", str(tmp_path / "x.png"), "--vae-tiny"]) == 1
    err = capsys.readouterr().err
    assert "--vae-tiny" in err and "other.safetensors" in err and len(err.strip().splitlines()) == 1


def test_the_server_previews_the_shipped_model_with_its_tiny_autoencoder():
    from sdengine import runtime
    from sdengine.server.registry import ModelRegistry

    registry = ModelRegistry(None, runtime.default_model(), torch.device("cpu"), torch.float32, lora_dirs=[],
                             embedding_dirs=[])
    pipe, _ = registry.ensure("model.safetensors")
    assert pipe.tiny_vae is not None and not pipe.tiny_final   # previews only: final images stay the VAE's
