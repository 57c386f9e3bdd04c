"""T2I-Adapter against diffusers: tiny random T2IAdapters (full, light, SDXL's full_xl) saved by diffusers'
save_pretrained and as TencentARC's single files (keys renamed as A1111's extension and diffusers' conversion script
map them), loaded here through the ControlNet unit; features, the UNet with features
(down_intrablock_additional_residuals), and StableDiffusionAdapterPipeline / StableDiffusionXLAdapterPipeline latents
with a weight and a share of the steps; bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import assert_close
from sampler_harness import SD15_SCHEDULER_CONFIG, max_rel_error

import sdengine
from sdengine import control as control_module
from sdengine import t2i_adapter
from sdengine.control import ControlError, ControlUnit, load_control_model
from sdengine.pipeline import Pipeline
from sdengine.request import Request
from sdengine.weights.io import write_safetensors

W, H = 40, 32  # the tiny VAEs downsample by 2: latents 20x16


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Random weights big enough that the features move the tiny UNet's output well past the parity bound."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def control_image(seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(H, W, 3) * 255).astype(np.uint8)).convert(mode)


def original_keys(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """diffusers' T2IAdapter state dict under TencentARC's names, as A1111's extension's prefix table (full) and
    diffusers' convert_original_t2i_adapter.py (light) relate them; written independently of sdengine's table."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        assert parts[0] == "adapter"
        if parts[1] == "conv_in":
            out[key[len("adapter."):]] = value
        elif kind == "light":  # adapter.body.i.resnets.j.* -> body.i.body.j.*
            rest = ".".join(parts[2:]).replace("resnets.", "body.")
            out["body." + rest] = value
        else:  # adapter.body.i.resnets.j.* -> body.{2i+j}.*; adapter.body.i.in_conv -> body.{2i}.in_conv
            level = int(parts[2])
            if parts[3] == "in_conv":
                out[f"body.{2 * level}.in_conv.{parts[-1]}"] = value
            else:
                out[f"body.{2 * level + int(parts[4])}.{'.'.join(parts[5:])}"] = value
    return out


def make_adapter(kind: str, channels: tuple[int, ...], factor: int, seed: int, in_channels: int = 3):
    from diffusers import T2IAdapter

    blocks = 4 if kind == "light_adapter" else 2
    return perturb(T2IAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=blocks,
                              downscale_factor=factor, adapter_type=kind), seed)


def test_injection_points_agree():
    """SD1.5: after input blocks 2, 5, 8, 11 (the original's (i+1) % 3 rule, A1111's); SDXL: 3, 5, 8 and the middle
    block (A1111's extension) — where diffusers' UNet adds down_intrablock_additional_residuals."""
    from sdengine.config import SD15, SDXL
    from sdengine.nn.unet import Encoder

    for cfg, points in ((SD15.unet, [2, 5, 8, 11]), (SDXL.unet, [3, 5, 8])):
        enc = Encoder(cfg)
        with torch.device("meta"):
            enc.input_blocks()
        assert enc.adapter_points == points
    assert t2i_adapter.unet_points(SD15.unet) == [(320, 1), (640, 2), (1280, 4), (1280, 8), (1280, 8)]
    assert t2i_adapter.unet_points(SDXL.unet) == [(320, 2), (640, 2), (1280, 4), (1280, 4)]


@pytest.fixture(scope="module")
def sd(reference, tmp_path_factory):
    """A diffusers full adapter on the reference UNet's widths (unshuffle 2 = the tiny VAE's factor), saved as a
    folder and as a TencentARC single file; our model and pipeline."""
    widths = tuple(reference["parts"]["unet"].config.block_out_channels)
    root = tmp_path_factory.mktemp(f"t2i-{reference['layout']}")
    ref = make_adapter("full_adapter", widths, 2, seed=1)
    ref.save_pretrained(root / "adapter")
    write_safetensors(original_keys(ref.state_dict(), "full"), root / "adapter.safetensors")
    model = sdengine.load(reference["folder"])
    return {"ref": ref, "adapter": root / "adapter", "file": root / "adapter.safetensors", "model": model,
            "pipe": Pipeline(model), "root": root, **reference}


@pytest.mark.parametrize("layout", ["adapter", "file"])
def test_features_and_unet_match_diffusers(sd, layout):
    unet_cfg = sd["model"].config.unet
    ours = load_control_model(sd[layout], unet_cfg, latent_factor=2)
    assert isinstance(ours, sdengine.nn.t2i_adapter.T2IAdapter) and ours.config.kind == "full"
    hint = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = sd["ref"](hint)
        got = ours(hint)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_close(a, b)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(2, 4, H // 2, W // 2, generator=g)
        context = torch.randn(2, 77, unet_cfg.context_dim, generator=g)
        t = torch.tensor([10, 700])
        reference_out = sd["parts"]["unet"](x, t, encoder_hidden_states=context,
                                            down_intrablock_additional_residuals=[f.clone() for f in expected]).sample
        plain = sd["parts"]["unet"](x, t, encoder_hidden_states=context).sample
        assert_close(sd["model"].unet(x, t, context, adapter=got), reference_out)
        assert (reference_out - plain).abs().max() > 1e-2 * plain.abs().max()  # the features changed the output
        # with ControlNet residuals at the same time (diffusers takes both: the features inside the down blocks, the
        # residuals on the skips and the middle block)
        residuals = [torch.randn(2, c, *size, generator=g) for c, size in skip_shapes(unet_cfg, x)]
        both = sd["parts"]["unet"](x, t, encoder_hidden_states=context,
                                   down_intrablock_additional_residuals=[f.clone() for f in expected],
                                   down_block_additional_residuals=residuals[:-1],
                                   mid_block_additional_residual=residuals[-1]).sample
        assert_close(sd["model"].unet(x, t, context, control=residuals, adapter=got), both)


def skip_shapes(cfg, x: torch.Tensor) -> list[tuple[int, tuple[int, int]]]:
    """(channels, size) of each input block's output and of the middle block's, for latents x."""
    from sdengine.nn.unet import Downsample, Encoder

    enc = Encoder(cfg)
    with torch.device("meta"):
        blocks = enc.input_blocks()
    out, (h, w) = [], x.shape[-2:]
    for block, channels in zip(blocks, enc.skip_channels):
        if isinstance(block[0], Downsample):
            h, w = (h + 1) // 2, (w + 1) // 2
        out.append((channels, (h, w)))
    return [*out, (enc.channels, (h, w))]


@pytest.mark.parametrize("kind", ["light_adapter", "full_adapter_xl"])
def test_light_and_xl_features(kind, tmp_path):
    """The light adapter (its single-file names: body.i.body.j) and SDXL's layout (unshuffle twice the VAE's
    factor, one downsampling): features from a diffusers folder and from the single file."""
    widths, factor = ((32, 64), 2) if kind == "light_adapter" else ((32, 64, 64, 64), 4)
    ref = make_adapter(kind, widths, factor, seed=2, in_channels=1 if kind == "light_adapter" else 3)
    ref.save_pretrained(tmp_path / "folder")
    single = "light" if kind == "light_adapter" else "full"
    write_safetensors(original_keys(ref.state_dict(), single), tmp_path / "one.safetensors")
    hint = torch.rand(1, ref.config.in_channels, 32, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(hint)
        for path in (tmp_path / "folder", tmp_path / "one.safetensors"):
            sd, cfg = t2i_adapter.read_adapter(path, latent_factor=2)
            assert cfg.kind == {"light_adapter": "light", "full_adapter_xl": "full_xl"}[kind]
            net = sdengine.nn.t2i_adapter.T2IAdapter(cfg)
            net.load_state_dict(sd, strict=True)
            got = net(hint)
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert_close(a, b)


def test_our_writer_round_trips(sd, tmp_path):
    """Our diffusers folder loads in diffusers to the same features; our single file reads back exactly."""
    from diffusers import T2IAdapter

    net = load_control_model(sd["adapter"], sd["model"].config.unet, latent_factor=2)
    t2i_adapter.save_adapter(net, tmp_path / "ours", layout="diffusers")
    t2i_adapter.save_adapter(net, tmp_path / "ours.safetensors")
    theirs = T2IAdapter.from_pretrained(tmp_path / "ours").eval()
    hint = torch.rand(1, 3, H, W)
    with torch.no_grad():
        for a, b in zip(net(hint), theirs(hint)):
            assert_close(a, b, rel=1e-6)
    again, cfg = t2i_adapter.read_adapter(tmp_path / "ours.safetensors", latent_factor=2)
    assert cfg == net.config and all(torch.equal(again[k], v) for k, v in net.state_dict().items())


class WindowedUNet(torch.nn.Module):
    """diffusers' UNet with A1111's guidance window patched in: the adapter's features on steps [first, stop) only
    (StableDiffusionAdapterPipeline applies them at every step)."""

    def __init__(self, unet, first: int, stop: int):
        super().__init__()
        self.inner, self.first, self.stop, self.calls = unet, first, stop, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, down_intrablock_additional_residuals=None, **kwargs):
        step, self.calls = self.calls, self.calls + 1
        if not self.first <= step < self.stop:
            down_intrablock_additional_residuals = None
        return self.inner(*args, down_intrablock_additional_residuals=down_intrablock_additional_residuals, **kwargs)


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.2, 0.7)])
def test_pipeline_matches_diffusers(sd, window):
    """StableDiffusionAdapterPipeline (Euler, CFG 7.5, batch 2, adapter_conditioning_scale 0.7) and ours through a
    ControlUnit of weight 0.7 and guidance start/end `window`; the features go to both halves of guidance."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline
    from transformers import CLIPTokenizer

    parts = sd["parts"]
    start, end = window
    steps = 6
    unit = ControlUnit(str(sd["file"]), control_image(), weight=0.7, start=start, end=end)
    first, stop = unit.steps(steps)
    unet = parts["unet"] if window == (0.0, 1.0) else WindowedUNet(parts["unet"], first, stop)
    prediction = parts["scheduler"].config.prediction_type
    ref = StableDiffusionAdapterPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], unet=unet, adapter=sd["ref"],
        tokenizer=CLIPTokenizer.from_pretrained(sd["folder"] / "tokenizer"),
        scheduler=EulerDiscreteScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    expected = ref("a red circle", image=control_image(), negative_prompt="blue", num_inference_steps=steps,
                   guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                   adapter_conditioning_scale=0.7, output_type="latent").images
    req = Request(prompt="a red circle", negative_prompt="blue", steps=steps, cfg_scale=7.5, seed=7, width=W,
                  height=H, batch_size=2, controls=[unit])
    ours = sd["pipe"].sample(req)
    error = max_rel_error(ours, expected)
    print(f"parity {sd['layout']} window={window}: {error:.2e}")  # the figures docs/control.md quotes (pytest -s)
    assert error < 1e-3
    if window != (0.0, 1.0):  # the decoded images too
        unet.calls = 0
        gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
        pixels = ref("a red circle", image=control_image(), negative_prompt="blue", num_inference_steps=steps,
                     guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                     adapter_conditioning_scale=0.7, output_type="np").images
        ours_px = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in sd["pipe"].run(req)])
        mean = np.abs(ours_px - pixels).mean()
        print(f"parity {sd['layout']} images: mean {mean * 255:.3f}/255")
        assert mean <= 1 / 255
    plain = sd["pipe"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=steps, cfg_scale=7.5,
                                      seed=7, width=W, height=H, batch_size=2))
    assert max_rel_error(plain, expected) > 1e-2  # the adapter changed the result



def test_bad_files(sd, tmp_path):
    """An adapter for another layout, a file that is neither ControlNet nor adapter, untested variants."""
    unet_cfg = sd["model"].config.unet
    xl = make_adapter("full_adapter_xl", (32, 64, 64, 64), 4, seed=3)
    xl.save_pretrained(tmp_path / "xl")
    with pytest.raises(ControlError, match="a T2I-Adapter for SDXL .* the model is SD1.x/SD2.x"):
        load_control_model(tmp_path / "xl", unet_cfg, latent_factor=2)
    with pytest.raises(ControlError, match="the model is SD1.x/SD2.x"):  # an adapter made for another VAE factor
        load_control_model(sd["adapter"], unet_cfg, latent_factor=8)
    vae = sd["folder"] / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ControlError, match="not a ControlNet: expected .* or a T2I-Adapter"):
        load_control_model(vae, unet_cfg, latent_factor=2)
    sd_orig = original_keys(sd["ref"].state_dict(), "full")
    write_safetensors({**sd_orig, "body.0.skep.weight": torch.zeros(1)}, tmp_path / "skep.safetensors")
    with pytest.raises(ControlError, match="skip convolutions"):
        load_control_model(tmp_path / "skep.safetensors", unet_cfg, latent_factor=2)
    write_safetensors({"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8)}, tmp_path / "style.pth")
    with pytest.raises(ControlError, match="style adapter .* not supported"):
        load_control_model(tmp_path / "style.pth", unet_cfg, latent_factor=2)
    write_safetensors(dict(sd["ref"].state_dict()), tmp_path / "bare.safetensors")  # diffusers names, no config
    with pytest.raises(ControlError, match="without their config.json"):
        load_control_model(tmp_path / "bare.safetensors", unet_cfg, latent_factor=2)


def test_unit_interfaces(sd, tmp_path, capsys):
    """An adapter in the ControlNet folder: listed as the extension lists it, chosen by name in a unit, recorded in
    the infotext; the CLI's --control takes it; modes ramp the features as A1111's extension does."""
    import shutil

    from sdengine.cli import run

    if sd["layout"] != "sd1":
        pytest.skip("one layout suffices for the interface")
    folder = tmp_path / "controlnet"
    folder.mkdir()
    shutil.copy(sd["file"], folder / "t2iadapter_color.safetensors")
    shutil.copytree(sd["adapter"], folder / "t2i-adapter-folder")
    assert control_module.list_controlnets(folder)[:2] == ["t2i-adapter-folder", "t2iadapter_color"]
    from sdengine.server.controlnet import folder_names  # /controlnet/model_list, as the extension lists adapters

    names = folder_names(folder)
    assert names[0] == "t2i-adapter-folder" and names[1].startswith("t2iadapter_color [")
    control_image().save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    assert run(["generate", "a red circle", "--model", str(sd["folder"]), "--steps", "2", "--seed", "4", "--width",
                str(W), "--height", str(H), "--quiet", "--controlnet-dir", str(folder), "--precision", "fp32",
                "--control", f"t2iadapter_color:{tmp_path / 'map.png'}:0.5", "--out", str(out)]) == 0
    image = Image.open(out)
    assert 'ControlNet 0: "Module: none, Model: t2iadapter_color [' in image.info["parameters"]
    unit = ControlUnit(str(folder / "t2iadapter_color.safetensors"), control_image(), weight=0.5)
    ours = sd["pipe"].generate("a red circle", steps=2, seed=4, width=W, height=H, controls=[unit])[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ours))
    xl = make_adapter("full_adapter_xl", (32, 64, 64, 64), 4, seed=3)  # made for SDXL: one line, non-zero exit
    xl.save_pretrained(folder / "xl-adapter")
    capsys.readouterr()
    assert run(["generate", "a red circle", "--model", str(sd["folder"]), "--steps", "2", "--width", str(W),
                "--height", str(H), "--quiet", "--controlnet-dir", str(folder),
                "--control", f"xl-adapter:{tmp_path / 'map.png'}", "--out", str(tmp_path / "bad.png")]) != 0
    err = capsys.readouterr().err
    assert "a T2I-Adapter for SDXL" in err and err.count("\n") == 1, err
    assert t2i_adapter.scales(ControlUnit("m", "x.png", weight=2.0, mode="prompt"), 2) == (2 * 0.825, 2.0)
    assert t2i_adapter.scales(ControlUnit("m", "x.png", weight=0.5), 4) == (0.5,) * 4
    # "control" mode: the features on the conditional half only
    pipe = sd["pipe"]
    controls, uncontrols = pipe.controlnets.controls((ControlUnit(str(sd["file"]), control_image(), mode="control"),),
                                                     W, H, 4, 2, guided=True)
    assert controls[0].adapter and controls[0].rows is None and uncontrols[0].rows == (False, False)
    # a hires fix's second pass re-fits the control image and recomputes the features at its own size
    from sdengine.hires import HiresFix

    out = pipe.generate("a red circle", steps=2, seed=1, width=W, height=H, controls=[unit],
                        hires=HiresFix(2.0, steps=2, denoising_strength=0.5))[0]
    assert out.size == (2 * W, 2 * H) and "ControlNet 0:" in out.info["parameters"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL pipeline (test_sdxl's) and a full_adapter_xl on its UNet's widths (unshuffle 4: twice the tiny
    VAE's factor), saved as TencentARC's single file."""
    from sdxl_helpers import sdxl_pipeline

    root = tmp_path_factory.mktemp("t2i-sdxl")
    ref = sdxl_pipeline(root / "pipe")
    widths = tuple(ref.unet.config.block_out_channels)
    adapter = make_adapter("full_adapter_xl", (*widths, widths[-1]), 4, seed=6)
    write_safetensors(original_keys(adapter.state_dict(), "full"), root / "xl.safetensors")
    return {"ref": ref, "adapter": adapter, "file": root / "xl.safetensors", "root": root,
            "pipe": Pipeline(sdengine.load(root / "pipe"))}


def test_sdxl_pipeline_matches_diffusers(sdxl, sd):
    """StableDiffusionXLAdapterPipeline (Euler, CFG 7.5, batch 2, scale 0.7, adapter_conditioning_factor 0.6: the
    first 60% of the steps) and ours with weight 0.7, end 0.6: four features, the last one after the middle block.
    An SD1 adapter on this SDXL model is a clear error."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLAdapterPipeline

    if sd["layout"] != "sd1":
        pytest.skip("the SD1 adapter suffices for the bad-input check")
    ref = StableDiffusionXLAdapterPipeline(**{k: v for k, v in sdxl["ref"].components.items()
                                              if k not in ("image_encoder", "feature_extractor")},
                                           adapter=sdxl["adapter"])
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    expected = ref("a red circle", image=control_image(), negative_prompt="blue", num_inference_steps=6,
                   guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                   adapter_conditioning_scale=0.7, adapter_conditioning_factor=0.6, output_type="latent").images
    unit = ControlUnit(str(sdxl["file"]), control_image(), weight=0.7, end=0.6)
    pipe = sdxl["pipe"]
    ours = pipe.sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=7.5, seed=5,
                               width=W, height=H, batch_size=2, controls=[unit]))
    error = max_rel_error(ours, expected)
    print(f"parity sdxl: {error:.2e}")
    assert error < 1e-3
    plain = pipe.sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=7.5, seed=5,
                                width=W, height=H, batch_size=2))
    assert max_rel_error(plain, expected) > 1e-2
    with pytest.raises(ControlError, match="a T2I-Adapter for SD1.x/SD2.x .* the model is SDXL"):
        load_control_model(sd["file"], pipe.model.config.unet, latent_factor=2)


def test_sdxl_adapter_at_a_multiple_of_8(sdxl, sd):
    """SDXL's adapter unshuffles by twice the VAE's factor (16; here 4): an image whose latents have an odd side is
    padded at the edge, and the features take the sizes of the UNet's levels (which round up)."""
    if sd["layout"] != "sd1":
        pytest.skip("one run suffices")
    model = sdxl["pipe"].model
    net = load_control_model(sdxl["file"], model.config.unet, latent_factor=2)
    feats = t2i_adapter.features(net, torch.rand(1, 3, 38, 44))
    cfg = model.config.unet
    x, context = torch.randn(1, 4, 19, 22), torch.randn(1, 77, cfg.context_dim)
    with torch.no_grad():
        out = model.unet(x, torch.tensor([500]), context, y=torch.zeros(1, cfg.adm_in_channels), adapter=feats)
    assert out.shape == x.shape and [tuple(f.shape[-2:]) for f in feats] == [(10, 11), (10, 11), (5, 6), (5, 6)]


def test_http_unit(tmp_path):
    """A1111's API: an adapter in the server's ControlNet folder is listed by /controlnet/model_list and used by an
    alwayson_scripts.controlnet unit like a ControlNet (recorded in the infotext, changes the image)."""
    import base64
    import io
    import json

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdengine.config import TINY
    from sdengine.model import StableDiffusion
    from sdengine.nn.t2i_adapter import AdapterConfig, T2IAdapter
    from sdengine.prompts import BUNDLED_STYLES, load_styles
    from sdengine.server.app import create_app
    from sdengine.server.registry import ModelRegistry
    from sdengine.server.service import Service
    from sdengine.server.validation import Limits
    from sdengine.weights import save

    for name in ("models", "controlnet"):
        (tmp_path / name).mkdir()
    save(StableDiffusion(TINY).init_weights(seed=0), tmp_path / "models" / "tiny.safetensors")
    cfg = TINY.unet
    torch.manual_seed(0)
    net = perturb(T2IAdapter(AdapterConfig("full", 3, tuple(cfg.model_channels * m for m in cfg.channel_mult), 2,
                                           TINY.vae.downscale)), 1, scale=0.5)
    t2i_adapter.save_adapter(net, tmp_path / "controlnet" / "t2i_tiny.safetensors")
    registry = ModelRegistry(tmp_path / "models", None, torch.device("cpu"), torch.float32, lora_dirs=[],
                             embedding_dirs=[], controlnet_dir=tmp_path / "controlnet")
    registry.ensure("tiny.safetensors")
    registry.default_name = registry.current.name
    service = Service(registry, Limits(max_width=64, max_height=64, max_steps=3, max_batch=4, queue_size=4),
                      load_styles(BUNDLED_STYLES), threads=1)
    buffer = io.BytesIO()
    control_image().resize((64, 64)).save(buffer, format="PNG")
    unit = {"enabled": True, "module": "none", "model": "t2i_tiny", "weight": 0.8, "guidance_end": 0.5,
            "image": base64.b64encode(buffer.getvalue()).decode()}
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7}
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        listed = client.get("/controlnet/model_list").json()["model_list"]
        assert len(listed) == 1 and listed[0].startswith("t2i_tiny [")
        r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        plain = client.post("/sdapi/v1/txt2img", json=body)
    info = json.loads(r.json()["info"])
    assert "Model: t2i_tiny [" in info["infotexts"][0] and "Guidance End: 0.5" in info["infotexts"][0]
    assert r.json()["images"][0] != plain.json()["images"][0]
