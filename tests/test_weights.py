"""Checkpoint I/O: exact round trips, the key variants found in the wild, standalone VAEs, detection from shapes."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from reference import make_components
from safetensors.torch import load_file, save_file

import sdengine
from sdengine.config import PRESETS, SD15, SD21_BASE, TINY, ModelConfig, UNetConfig
from sdengine.model import StableDiffusion
from sdengine.weights import detect
from sdengine.weights.keys import TEXT, UNET, VAE


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{p.name}/{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdengine.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def single(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "model.safetensors"
    sdengine.save(sdengine.load(reference["folder"]), path)
    return path


def test_single_diffusers_single_is_exact(single, tmp_path):
    assert run_cli("convert", single, tmp_path / "d", "--to", "diffusers").returncode == 0
    assert run_cli("convert", tmp_path / "d", tmp_path / "back.safetensors", "--to", "single").returncode == 0
    tensors_equal(load_file(single), load_file(tmp_path / "back.safetensors"))
    # ... and diffusers -> single -> diffusers gives the same folder tensors
    sdengine.convert(tmp_path / "back.safetensors", tmp_path / "d2", to="diffusers")
    tensors_equal(folder_tensors(tmp_path / "d"), folder_tensors(tmp_path / "d2"))


def test_openclip_tower_with_unused_layer_and_projection_round_trips(tmp_path):
    """An SD2-style original file: its last text layer is never read and text_projection is unused, yet both
    survive single -> diffusers -> single bit for bit (diffusers' CLIPTextModel keeps neither)."""
    cfg = dataclasses.replace(PRESETS["sd21-base"], unet=TINY.unet, vae=TINY.vae, text=dataclasses.replace(
        PRESETS["sd21-base"].text, width=64, layers=3, heads=1, mlp_width=128))
    model = StableDiffusion(cfg).init_weights(seed=3)
    sdengine.save(model, tmp_path / "a.safetensors")
    sdengine.convert(tmp_path / "a.safetensors", tmp_path / "d", to="diffusers")
    sdengine.convert(tmp_path / "d", tmp_path / "b.safetensors", to="single")
    tensors_equal(load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors"))
    folder = sdengine.load(tmp_path / "d")
    ids = folder.tokenizer("round trip")
    with torch.no_grad():
        assert torch.equal(folder.text_encoder(ids)[0], model.text_encoder(ids)[0])


def test_convert_dtype(single, tmp_path):
    sdengine.convert(single, tmp_path / "h.safetensors", to="single", dtype="fp16")
    half = load_file(tmp_path / "h.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}
    model = sdengine.load(tmp_path / "h.safetensors", dtype=None)
    assert model.dtype == torch.float16


def _reference_output(model: StableDiffusion) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, model.config.unet.context_dim, generator=g)
    ids = model.tokenizer("variants")
    with torch.no_grad():
        return {"unet": model.unet(x, torch.tensor([10]), ctx), "vae": model.vae.decode(x),
                "text": model.text_encoder(ids)[0]}


def test_key_variants_in_the_wild(sd1_folder, tmp_path):
    """A .ckpt as old tools wrote it: state_dict wrapper, text keys without text_model., position_ids, VAE
    attention as linears, schedule buffers, full-training EMA entries and losses; fp16 and bf16."""
    model = sdengine.load(sd1_folder)
    expected = _reference_output(model)
    sd = model.state_dict()
    wild: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(TEXT + "transformer.text_model."):
            k = k.replace("transformer.text_model.", "transformer.")
        if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 4:
            v = v[:, :, 0, 0]
        wild[k] = v
    wild[TEXT + "transformer.embeddings.position_ids"] = torch.arange(77)[None]
    wild["alphas_cumprod"] = torch.rand(1000)
    wild[VAE + "loss.logvar"] = torch.zeros(())
    ema = {k: v + 1.0 for k, v in sd.items() if k.startswith(UNET)}
    wild.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ema.items()})
    wild["model_ema.decay"] = torch.tensor(0.9999)
    torch.save({"state_dict": wild, "global_step": 10}, tmp_path / "wild.ckpt")

    # The head split is in no tensor shape: a .ckpt (no metadata) of a non-SD head layout gets its config given.
    loaded = sdengine.load(tmp_path / "wild.ckpt", config=model.config)
    for name, out in _reference_output(loaded).items():
        assert torch.allclose(out, expected[name], atol=1e-6), name
    with_ema = sdengine.load(tmp_path / "wild.ckpt", use_ema=True, config=model.config)
    assert all(torch.equal(with_ema.state_dict()[k], v) for k, v in ema.items())

    for dtype in (torch.float16, torch.bfloat16):
        save_file({k: v.to(dtype) for k, v in sd.items()}, tmp_path / "half.safetensors")  # no metadata
        low = sdengine.load(tmp_path / "half.safetensors", dtype=torch.float32, config=model.config)
        got = _reference_output(low)
        assert (got["unet"] - expected["unet"]).abs().max() < 0.05 * expected["unet"].abs().max()


def test_standalone_vae_replaces_the_checkpoints(single, tmp_path):
    """A separate VAE file in original naming (with its loss entries) or diffusers naming."""
    other = make_components("sd1", seed=7)["vae"]
    diffusers_file = tmp_path / "vae_diffusers.safetensors"
    save_file(other.state_dict(), diffusers_file)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = other.decode(z).sample
    model = sdengine.load(single, vae=diffusers_file)
    original_file = tmp_path / "vae_original.safetensors"
    vae_sd = {k[len(VAE):]: v for k, v in model.state_dict().items() if k.startswith(VAE)}
    save_file({**vae_sd, "loss.logvar": torch.zeros(())}, original_file)
    for path in (diffusers_file, original_file):
        with torch.no_grad():
            got = sdengine.load(single, vae=path).vae.decode(z)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_detect_presets_from_shapes(name):
    """Full-size configs are found from shapes alone (on the meta device: no memory, no time)."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        sd = StableDiffusion(cfg).state_dict()
    found = detect(sd)
    if name != "tiny":  # the head split and eps/v are not in the shapes; SD's families fix them
        assert dataclasses.replace(found, prediction=cfg.prediction) == cfg


@pytest.mark.parametrize("change", [
    dict(in_channels=9),  # inpainting
    dict(num_res_blocks=(1, 1, 1, 1)),  # pruned: fewer blocks per level
    dict(num_res_blocks=(2, 1, 2, 0), attention_resolutions=(1, 4)),
    dict(channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), transformer_depth=2),
])
def test_detect_variants_with_the_sd_layout(change):
    cfg = dataclasses.replace(SD15, unet=dataclasses.replace(SD15.unet, **change))
    with torch.device("meta"):
        sd = StableDiffusion(cfg).state_dict()
    assert detect(sd) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_families():
    assert SD15.family == "sd1" and SD21_BASE.family == "sd2" and PRESETS["sd21"].family == "sd2-v"
    inpaint = dataclasses.replace(SD15, unet=dataclasses.replace(SD15.unet, in_channels=9))
    assert inpaint.family == "sd1-inpaint"
    with pytest.raises(ValueError):
        UNetConfig(num_heads=8, num_head_channels=64)


def test_cli_info_and_init(tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert run_cli("init", "tiny", out).returncode == 0
    r = run_cli("info", out, "--json")
    assert r.returncode == 0, r.stderr
    import json
    info = json.loads(r.stdout)
    assert info["family"] == "custom" and info["prediction"] == "eps"
    assert info["parameters"]["unet"] == sum(p.numel() for p in StableDiffusion(TINY).unet.parameters())
    r = run_cli("info", out)
    assert "family:" in r.stdout and "text_encoder" in r.stdout


def test_written_checkpoints_get_the_usual_permissions(tmp_path):
    """Temporaries are private (mkdtemp 0700, safetensors 0600); what lands is 0644/0755 under umask 022."""
    import os
    import stat

    model = StableDiffusion(TINY)
    old = os.umask(0o022)
    try:
        single = sdengine.save(model, tmp_path / "m.safetensors")
        folder = sdengine.save(model, tmp_path / "m", to="diffusers")
    finally:
        os.umask(old)
    assert stat.S_IMODE(single.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    inside = list(folder.rglob("*"))
    assert inside and {stat.S_IMODE(p.stat().st_mode) for p in inside} <= {0o644, 0o755}
