"""Checkpoint I/O: exact round trips, the key variants found in the wild, standalone VAEs, detection from shapes."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from reference import make_components
from safetensors.torch import load_file, save_file

import sdengine
from sdengine.config import PRESETS, SD15, SD21_BASE, TINY, ModelConfig, UNetConfig
from sdengine.model import StableDiffusion
from sdengine.nn.vae import AutoencoderKL
from sdengine.weights import detect
from sdengine.weights.keys import TEXT, UNET, VAE
from sdengine.weights.parts import read_part, write_part

SHIPPED = Path(sdengine.__file__).parent / "models" / "default" / "model.safetensors"


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{p.name}/{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(p).items()}



@pytest.fixture(scope="module")
def single(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "model.safetensors"
    sdengine.save(sdengine.load(reference["folder"]), path)
    return path


@pytest.mark.slow  # CLI processes
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


@pytest.mark.slow
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
    if cfg.family.startswith("custom"):  # the head split is in no shape: SD's families fix it, custom files record it
        found = dataclasses.replace(found, text=dataclasses.replace(found.text, heads=cfg.text.heads),
                                    unet=dataclasses.replace(found.unet, num_heads=cfg.unet.num_heads,
                                                             num_head_channels=cfg.unet.num_head_channels))
    # eps/v and the training size are not in the shapes either
    assert dataclasses.replace(found, prediction=cfg.prediction, sample_size=cfg.sample_size) == cfg


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


@pytest.mark.slow  # CLI processes
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


# ---- load(..., vae=): every VAE sdengine writes, diffusers' and SD's; one that does not fit is refused ---------------

def _decode(model: StableDiffusion, side: int) -> torch.Tensor:
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.vae.decode(z)


def test_load_keeps_the_recorded_sample_size(tmp_path):
    """load(..., vae=) and load(..., prediction=) once rebuilt the config by hand, dropping sample_size (64 -> 512)."""
    model = sdengine.load(SHIPPED)
    write_part(tmp_path / "vae.safetensors", "vae", model.vae, model.config.vae)
    for kwargs in ({"vae": tmp_path / "vae.safetensors"}, {"prediction": "eps"}, {"prediction": "v"}):
        loaded = sdengine.load(SHIPPED, **kwargs)
        assert loaded.config.sample_size == 64 and loaded.config.image_size == 64, kwargs
        assert loaded.config == dataclasses.replace(model.config, **{k: v for k, v in kwargs.items() if k != "vae"})


def test_sdengine_vaes_load_as_the_vae(tmp_path):
    """The shipped model's VAE (48 channels: 16 norm groups, scaling factor 0.68956) as a bare state dict, as the
    model itself, and a VAE part as `train vae` writes it (its own config and scaling factor)."""
    model = sdengine.load(SHIPPED)
    expected = _decode(model, 16)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.vae.state_dict().items()}, bare)  # no metadata: shapes only
    for path in (bare, SHIPPED):
        loaded = sdengine.load(SHIPPED, vae=path)
        assert loaded.config == model.config, path  # groups found from shapes, the model's scaling factor kept
        assert torch.equal(_decode(loaded, 16), expected)
    cfg = dataclasses.replace(PRESETS["shapes"].vae, scaling_factor=0.5)
    torch.manual_seed(1)
    fresh = AutoencoderKL(cfg).eval()
    write_part(tmp_path / "part.safetensors", "vae", fresh, cfg)
    loaded = sdengine.load(SHIPPED, vae=tmp_path / "part.safetensors")
    assert loaded.config.vae == cfg and loaded.config.sample_size == 64
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.vae.decode(z), fresh.decode(z))


def test_diffusers_vae_loads_as_the_vae(single, tmp_path):
    """A diffusers AutoencoderKL (16 norm groups) from its own save_pretrained folder (its config: scaling factor
    0.5) and as a bare state dict (the model's scaling factor kept): both decode as diffusers does."""
    from diffusers import AutoencoderKL as DiffusersVAE

    torch.manual_seed(2)
    vae = DiffusersVAE(block_out_channels=(48, 96), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       scaling_factor=0.5).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(tmp_path / "folder")
    save_file(vae.state_dict(), tmp_path / "bare.safetensors")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(z).sample
    own_scale = sdengine.load(single).config.vae.scaling_factor
    for path, scale in ((tmp_path / "folder", 0.5), (tmp_path / "bare.safetensors", own_scale)):
        model = sdengine.load(single, vae=path)
        assert model.config.vae.norm_groups == 16 and model.config.vae.scaling_factor == scale, path
        with torch.no_grad():
            got = model.vae.decode(z)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), path


def test_a_vae_of_another_latent_layout_is_refused(tmp_path):
    tiny = PRESETS["shapes-tiny"].vae  # f=2: latents twice the shipped model's size
    write_part(tmp_path / "f2.safetensors", "vae", AutoencoderKL(tiny), tiny)
    with pytest.raises(ValueError, match=r"4 channels at 1/2 of the image size.* 4 channels at 1/4"):
        sdengine.load(SHIPPED, vae=tmp_path / "f2.safetensors")
    wide = dataclasses.replace(PRESETS["shapes"].vae, z_channels=8, embed_dim=8)
    write_part(tmp_path / "z8.safetensors", "vae", AutoencoderKL(wide), wide)
    with pytest.raises(ValueError, match=r"8 channels at 1/4 .* 4 channels at 1/4"):
        sdengine.load(SHIPPED, vae=tmp_path / "z8.safetensors")


def test_part_files_round_trip_and_older_ones_still_load(tmp_path):
    """write_part/read_part keep config, weights and a text encoder's own vocabulary; files from before the one
    metadata scheme (sdengine_vae_config / sdengine_text_config) still read."""
    from sdengine.nn.clip import build_text_encoder
    from sdengine.tokenizer import CLIPTokenizer
    from sdengine.weights.metadata import tokenizer_metadata

    arch = PRESETS["shapes-tiny"]
    tokenizer = CLIPTokenizer.train(["a red circle", "two blue squares"])
    text_cfg = dataclasses.replace(arch.text, vocab_size=len(tokenizer.vocab), eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    modules = {"vae": (AutoencoderKL(arch.vae), arch.vae), "text": (build_text_encoder(text_cfg), text_cfg)}
    for kind, (module, cfg) in modules.items():
        prefix = {"vae": VAE, "text": TEXT}[kind]
        tensors = {prefix + k: v.contiguous() for k, v in module.state_dict().items()}
        extra = tokenizer_metadata(tokenizer) if kind == "text" else {}
        write_part(tmp_path / f"{kind}.safetensors", kind, module, cfg, tokenizer if kind == "text" else None)
        save_file(tensors, tmp_path / f"old_{kind}.safetensors",
                  metadata={f"sdengine_{kind}_config": json.dumps(dataclasses.asdict(cfg)), **extra})
        for name in (kind, f"old_{kind}"):
            part = read_part(tmp_path / f"{name}.safetensors", kind)
            assert part.kind == kind and part.config == cfg and part.recorded
            tensors_equal(part.module().state_dict(), module.state_dict())
            if kind == "text":
                assert part.tokenizer.vocab == tokenizer.vocab and part.tokenizer.merges == tokenizer.merges
    with pytest.raises(ValueError, match="holds a VAE, not a text encoder"):
        read_part(tmp_path / "vae.safetensors", "text")


@pytest.mark.slow  # a real process (~3 s)
def test_init_writes_the_shipped_architecture(tmp_path):
    """config.PRESETS holds the shipped model's architecture: `sdengine init shapes` writes a model shaped like it."""
    r = run_cli("init", "shapes", tmp_path / "shapes.safetensors")
    assert r.returncode == 0, r.stderr
    shipped, fresh = load_file(SHIPPED), load_file(tmp_path / "shapes.safetensors")
    vocab = TEXT + "transformer.text_model.embeddings.token_embedding.weight"  # the shipped model has its own
    assert sorted(shipped) == sorted(fresh)
    assert all(shipped[k].shape == fresh[k].shape for k in shipped if k != vocab)
    assert sdengine.load(tmp_path / "shapes.safetensors").config.sample_size == 64
