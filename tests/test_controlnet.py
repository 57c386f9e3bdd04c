"""ControlNet against diffusers: a tiny ControlNetModel.from_unet on each reference UNet (weights perturbed: the
zero convolutions start at zero), saved with diffusers' own writer and loaded here; residuals, the UNet with
residuals, and StableDiffusionControlNetPipeline's latents (one and two units, weights, guidance end, guess mode);
our single-file writer round trips; bad files and units; the preprocessors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import assert_close
from sampler_harness import SD15_SCHEDULER_CONFIG, max_rel_error

import sdengine
from sdengine import control as control_module
from sdengine.control import ControlError, ControlUnit, load_controlnet, preprocess, read_controlnet, save_controlnet
from sdengine.pipeline import Pipeline
from sdengine.request import Request
from sdengine.weights.io import write_safetensors

W, H = 40, 32  # the tiny VAE downsamples by 2: latents 20x16
HINT_WIDTHS = (16, 32)  # one stride-2 stage: the hint encoder halves the image as the tiny VAE does


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def control_image(seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(H, W, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def cn(reference, tmp_path_factory):
    """Two diffusers ControlNets on the reference UNet, saved as folders; our model and pipeline."""
    from diffusers import ControlNetModel

    folders, refs = [], []
    for seed in (1, 2):
        ref = perturb(ControlNetModel.from_unet(reference["parts"]["unet"],
                                                conditioning_embedding_out_channels=HINT_WIDTHS), seed)
        folder = tmp_path_factory.mktemp(f"cn-{reference['layout']}") / f"cn{seed}"
        ref.save_pretrained(folder)
        folders.append(folder)
        refs.append(ref)
    model = sdengine.load(reference["folder"])
    return {"refs": refs, "folders": folders, "model": model, "pipe": Pipeline(model), **reference}


def test_residuals_match_diffusers(cn):
    ref, ours = cn["refs"][0], load_controlnet(cn["folders"][0], cn["model"].config.unet)
    width = cn["model"].config.unet.context_dim
    g = torch.Generator().manual_seed(3)
    x, hint = torch.randn(2, 4, H // 2, W // 2, generator=g), torch.rand(2, 3, H, W, generator=g)
    context = torch.randn(2, 77, width, generator=g)
    with torch.no_grad():
        for t in (torch.tensor([3, 981]), torch.tensor(421.5)):
            down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
            res = ours(x, hint, t, context)
            assert len(res) == len(down) + 1
            for a, b in zip(res, [*down, mid]):
                assert_close(a, b)
            worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(res, [*down, mid]))
            print(f"residuals {cn['layout']} t={t.tolist()}: {worst:.2e}")
            # the UNet with those residuals, against diffusers' additional residuals
            expected = cn["parts"]["unet"](x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                           mid_block_additional_residual=mid).sample
            assert_close(cn["model"].unet(x, t, context, control=res), expected)


def reference_pipeline(cn, nets):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
    from transformers import CLIPTokenizer

    parts = cn["parts"]
    prediction = parts["scheduler"].config.prediction_type
    pipe = StableDiffusionControlNetPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(cn["folder"] / "tokenizer"), unet=parts["unet"],
        controlnet=nets if len(nets) > 1 else nets[0],
        scheduler=EulerDiscreteScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "one": dict(weights=[1.0], ends=[1.0]),
    "two-weights-end": dict(weights=[0.5, 1.0], ends=[1.0, 0.5]),
    "guess-mode": dict(weights=[1.0], ends=[1.0], guess=True),
    "two-guess-mode": dict(weights=[0.5, 1.0], ends=[0.5, 1.0], guess=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(cn, case, monkeypatch):
    """Latents of StableDiffusionControlNetPipeline (Euler, CFG 7.5, batch 2) and ours with the same seeds."""
    spec = CASES[case]
    n = len(spec["weights"])
    images = [control_image(i) for i in range(n)]
    guess = spec.get("guess", False)
    ref = reference_pipeline(cn, cn["refs"][:n])
    kwargs = dict(controlnet_conditioning_scale=spec["weights"] if n > 1 else spec["weights"][0],
                  control_guidance_end=spec["ends"] if n > 1 else spec["ends"][0])
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    expected = ref("a red circle", image=images if n > 1 else images[0], negative_prompt="blue", num_inference_steps=6,
                   guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                   output_type="latent", guess_mode=guess, **kwargs).images
    if guess:
        # diffusers' guess mode ramps the residuals as logspace(-1, 0, n): 10**(-1/(n-1)) per residual where the
        # original (and A1111) uses 0.825; the mechanics are checked with diffusers' base (n = this UNet's count)
        residuals = len(cn["model"].unet.input_blocks) + 1
        monkeypatch.setattr(control_module, "SOFT_INJECTION_BASE", 10 ** (-1 / (residuals - 1)))
    units = [ControlUnit(str(folder), image, weight=w, end=e, mode="control" if guess else "balanced")
             for folder, image, w, e in zip(cn["folders"], images, spec["weights"], spec["ends"])]
    ours = cn["pipe"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=7.5, seed=7,
                                     width=W, height=H, batch_size=2, controls=units))
    error = max_rel_error(ours, expected)
    print(f"parity {cn['layout']} {case}: {error:.2e}")  # the figures docs/control.md quotes (pytest -s)
    assert error < 1e-3
    plain = cn["pipe"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=7.5, seed=7,
                                      width=W, height=H, batch_size=2))
    assert max_rel_error(plain, expected) > 1e-2  # the control changed the result


def test_soft_injection_scales():
    unit = ControlUnit("m", "x.png", weight=0.5, mode="ControlNet is more important")
    scales = unit.scales(13)
    assert unit.mode == "control" and scales[-1] == 0.5
    assert scales[0] == pytest.approx(0.5 * 0.825 ** 12)
    assert ControlUnit("m", "x.png", mode="My prompt is more important").scales(13) == \
        tuple(0.825 ** (12 - i) for i in range(13))
    assert ControlUnit("m", "x.png", weight=0.7).scales(3) == (0.7, 0.7, 0.7)
    # diffusers' rule: step i acts unless i/n < start or (i+1)/n > end
    assert ControlUnit("m", "x.png", start=0.2, end=0.5).steps(10) == (2, 5)
    assert ControlUnit("m", "x.png", start=0.0, end=0.05).steps(10) is None


def test_single_file_round_trip(cn, tmp_path):
    """Our writer: lllyasviel's layout (control_model.* keys), .safetensors and .pth, with and without the prefix;
    and a diffusers folder that diffusers' ControlNetModel loads to the same residuals."""
    from diffusers import ControlNetModel

    unet_cfg = cn["model"].config.unet
    net = load_controlnet(cn["folders"][0], unet_cfg)
    save_controlnet(net, tmp_path / "cn.safetensors")
    sd, cfg = read_controlnet(tmp_path / "cn.safetensors", unet_cfg)
    assert cfg == net.config and all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.",
                                                   "input_blocks.", "middle_block.", "time_embed.")) for k in sd)
    expected = net.state_dict()
    assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    torch.save({k: v for k, v in expected.items()}, tmp_path / "bare.pth")  # no prefix, a pickle
    again = load_controlnet(tmp_path / "bare.pth", unet_cfg).state_dict()
    assert all(torch.equal(again[k], expected[k]) for k in expected)

    save_controlnet(net, tmp_path / "folder", layout="diffusers")
    theirs = ControlNetModel.from_pretrained(tmp_path / "folder").eval()
    x, hint = torch.randn(1, 4, H // 2, W // 2), torch.rand(1, 3, H, W)
    context, t = torch.randn(1, 77, unet_cfg.context_dim), torch.tensor([500])
    with torch.no_grad():
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        for a, b in zip(net(x, hint, t, context), [*down, mid]):
            assert_close(a, b, rel=1e-6)


def test_diffusers_single_file_loader_reads_our_files(cn, tmp_path):
    """diffusers' own reader of the original layout (ControlNetModel.from_single_file: the conversion of its
    scripts/convert_original_controlnet_to_diffusers.py) takes a file we wrote to the source's tensors exactly. Its
    conversion knows only the published hint encoder (three stride-2 stages), hence this ControlNet's own."""
    from diffusers import ControlNetModel

    ref = perturb(ControlNetModel.from_unet(cn["parts"]["unet"], conditioning_embedding_out_channels=(8, 8, 8, 8)), 4)
    ref.save_pretrained(tmp_path / "folder")
    save_controlnet(load_controlnet(tmp_path / "folder", cn["model"].config.unet), tmp_path / "cn.safetensors")
    theirs = ControlNetModel.from_single_file(str(tmp_path / "cn.safetensors"), config=str(tmp_path / "folder"),
                                              local_files_only=True).state_dict()
    expected = ref.state_dict()
    assert set(theirs) == set(expected) and all(torch.equal(theirs[k], expected[k]) for k in expected)


def test_bad_files(cn, tmp_path):
    unet_cfg = cn["model"].config.unet
    with pytest.raises(ControlError, match="not a ControlNet"):
        load_controlnet(cn["folder"] / "unet" / "diffusion_pytorch_model.safetensors", unet_cfg)
    with pytest.raises(ControlError, match="no ControlNet"):
        load_controlnet(tmp_path / "missing.safetensors", unet_cfg)
    other = sdengine.UNetConfig(**{**cn["model"].config.unet.__dict__, "context_dim": 1024})
    with pytest.raises(ControlError, match="context width"):
        load_controlnet(cn["folders"][0], other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ControlError, match="config.json"):
        load_controlnet(tmp_path / "empty", unet_cfg)
    with pytest.raises(ControlError, match="no ControlNet 'nope'"):
        control_module.resolve_controlnet("nope", tmp_path)


def test_bad_units():
    with pytest.raises(ControlError, match="weight"):
        ControlUnit("m", "x.png", weight=float("nan"))
    with pytest.raises(ControlError, match="start and end"):
        ControlUnit("m", "x.png", start=0.7, end=0.3)
    with pytest.raises(ControlError, match="control mode"):
        ControlUnit("m", "x.png", mode="loud")
    with pytest.raises(ControlError, match="preprocessor"):
        ControlUnit("m", "x.png", preprocess="openpose")
    with pytest.raises(ValueError, match="at most 10"):
        Request(controls=[ControlUnit("m", "x.png")] * 20)


def test_infotext_records_units(cn):
    unit = ControlUnit(str(cn["folders"][0]), control_image(), weight=0.5, end=0.8)
    image = cn["pipe"].generate("a red circle", steps=2, seed=1, width=W, height=H, controls=[unit])[0]
    text = image.info["parameters"]
    assert ('ControlNet 0: "Module: none, Model: cn1, Weight: 0.5, Resize Mode: Just Resize, Guidance Start: 0, '
            'Guidance End: 0.8, Control Mode: Balanced"') in text


def test_canny_equals_opencv():
    import cv2

    image = control_image(5).resize((64, 48))
    ours = np.asarray(preprocess(image, "canny"))
    expected = cv2.Canny(np.asarray(image), 100, 200)
    assert ours.shape == (48, 64, 3) and all(np.array_equal(ours[..., c], expected) for c in range(3))
    ours = np.asarray(preprocess(image, "canny", 50, 120))
    assert np.array_equal(ours[..., 0], cv2.Canny(np.asarray(image), 50, 120))


def test_other_preprocessors_and_fit():
    image = control_image(6)
    assert np.array_equal(np.asarray(preprocess(image, "invert")), 255 - np.asarray(image))
    binary = np.asarray(preprocess(image, "threshold"))
    assert set(np.unique(binary)) <= {0, 255}
    assert preprocess(image, "tile", 2.0).size == (W // 2, H // 2)
    assert set(np.unique(np.asarray(preprocess(image, "scribble")))) <= {0, 255}
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(((np.arange(W)[None, :].repeat(H, 0) < W // 2) * 255).astype(np.uint8)))
    hint = control_module.hint_tensor(ControlUnit("m", rgba), W, H)  # transparent pixels count as black
    assert hint[..., W // 2:].max() == 0 and torch.equal(hint[..., :W // 2] * 255,
                                                          control_module.hint_tensor(ControlUnit("m", image), W, H)
                                                          [..., :W // 2] * 255)
    grey = image.convert("L")  # a greyscale control image is used as RGB
    assert control_module.hint_tensor(ControlUnit("m", grey), 24, 16).shape == (1, 3, 16, 24)
    for mode in ("just resize", "crop and resize", "resize and fill"):
        assert control_module.fit(image, 24, 40, mode).size == (24, 40)
    filled = np.asarray(control_module.fit(Image.new("RGB", (10, 10), "white"), 20, 10, "resize and fill"))
    assert filled[:, :5].max() == 0 and filled[:, 5:15].min() == 255


def test_cli(cn, tmp_path, capsys, monkeypatch):
    """`generate --control NAME:IMAGE:W:START:END` with a name in --controlnet-dir: the image records the unit; the
    same unit through Python gives the same pixels; bad values are one-line errors before the model loads."""
    import shutil

    from sdengine.cli import run

    if cn["layout"] != "sd1":
        pytest.skip("one layout suffices for the interface")
    folder = tmp_path / "controlnets"
    shutil.copytree(cn["folders"][0], folder / "edges")
    control_image().save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    common = ["generate", "a red circle", "--model", str(cn["folder"]), "--steps", "2", "--seed", "4", "--width",
              str(W), "--height", str(H), "--quiet", "--controlnet-dir", str(folder),
              "--precision", "fp32"]  # as the Python call below (auto may be bf16 on this CPU)
    assert run([*common, "--control", f"edges:{tmp_path / 'map.png'}:0.5:0:0.5", "--control-mode", "control",
                "--out", str(out)]) == 0
    image = Image.open(out)
    assert 'ControlNet 0: "Module: none, Model: edges, Weight: 0.5' in image.info["parameters"]
    assert "Control Mode: ControlNet is more important" in image.info["parameters"]
    unit = ControlUnit(str(folder / "edges"), control_image(), weight=0.5, end=0.5, mode="control")
    ours = cn["pipe"].generate("a red circle", steps=2, seed=4, width=W, height=H, controls=[unit])[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ours))
    capsys.readouterr()
    for bad, message in (([f"nope:{tmp_path / 'map.png'}"], "no ControlNet 'nope'"),
                         (["edges:missing.png"], "control image missing.png does not exist"),
                         ([f"edges:{tmp_path / 'map.png'}:nan"], "weight must be a finite number"),
                         ([f"edges:{tmp_path / 'map.png'}:1:0.8:0.2"], "start and end"),
                         ([f"edges:{tmp_path / 'map.png'}:1:0.5"], "expected MODEL:IMAGE")):
        assert run([*common, "--control", *bad, "--out", str(tmp_path / "bad.png")]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert run([*common, "--control-mode", "control", "--out", str(tmp_path / "bad.png")]) != 0
    assert "needs a --control" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sdxl_cn(tmp_path_factory):
    """A tiny SDXL pipeline (test_sdxl's) and a ControlNetModel.from_unet on its UNet (label_emb / y)."""
    from diffusers import ControlNetModel
    from sdxl_helpers import sdxl_pipeline

    root = tmp_path_factory.mktemp("sdxl-cn")
    ref = sdxl_pipeline(root / "pipe")
    net = perturb(ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=HINT_WIDTHS), 5)
    net.save_pretrained(root / "cn")
    return {"ref": ref, "net": net, "folder": root / "cn", "pipe": Pipeline(sdengine.load(root / "pipe"))}


@pytest.mark.parametrize("guess", [False, True])
def test_sdxl_pipeline_matches_diffusers(sdxl_cn, guess, monkeypatch):
    """StableDiffusionXLControlNetPipeline's latents (Euler, CFG 7.5, batch 2, guidance end 0.6) and ours."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    ref = StableDiffusionXLControlNetPipeline(**{k: v for k, v in sdxl_cn["ref"].components.items()
                                                 if k not in ("image_encoder", "feature_extractor")},
                                              controlnet=sdxl_cn["net"])
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    expected = ref("a red circle", image=control_image(), negative_prompt="blue", num_inference_steps=6,
                   guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                   controlnet_conditioning_scale=0.8, control_guidance_end=0.6, guess_mode=guess,
                   output_type="latent").images
    ours_pipe = sdxl_cn["pipe"]
    if guess:
        residuals = len(ours_pipe.model.unet.input_blocks) + 1
        monkeypatch.setattr(control_module, "SOFT_INJECTION_BASE", 10 ** (-1 / (residuals - 1)))
    unit = ControlUnit(str(sdxl_cn["folder"]), control_image(), weight=0.8, end=0.6,
                       mode="control" if guess else "balanced")
    ours = ours_pipe.sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=7.5, seed=5,
                                    width=W, height=H, batch_size=2, controls=[unit]))
    error = max_rel_error(ours, expected)
    print(f"parity sdxl guess={guess}: {error:.2e}")
    assert error < 1e-3
    with pytest.raises(ControlError, match="context width"):  # an SDXL ControlNet on an SD1-sized text width
        other = sdengine.UNetConfig(**{**ours_pipe.model.config.unet.__dict__, "context_dim": 768,
                                       "adm_in_channels": None})
        load_controlnet(sdxl_cn["folder"], other)


def test_img2img_matches_diffusers(cn):
    """StableDiffusionControlNetImg2ImgPipeline (strength 0.6: the unit's steps count the steps run)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from sdengine.images import image_to_tensor

    txt = reference_pipeline(cn, cn["refs"][:1])
    ref = StableDiffusionControlNetImg2ImgPipeline(**txt.components)
    ref.set_progress_bar_config(disable=True)
    init = control_image(9)
    expected = ref("a red circle", image=init, control_image=control_image(), strength=0.6, num_inference_steps=10,
                   guidance_scale=5, generator=[torch.Generator().manual_seed(3)], control_guidance_start=0.2,
                   controlnet_conditioning_scale=0.7, output_type="latent").images
    unit = ControlUnit(str(cn["folders"][0]), control_image(), weight=0.7, start=0.2)
    ours = cn["pipe"].sample(Request(prompt="a red circle", steps=10, cfg_scale=5, seed=3, width=W, height=H,
                                     strength=0.6, controls=[unit]), init=image_to_tensor(init, W, H))
    assert max_rel_error(ours, expected) < 1e-3


def test_inpaint_hint_and_hires(cn):
    """The inpaint preprocessor marks the pixels to repaint -1 (the unit's mask, else the request's); a hires fix
    re-fits the control image to the second pass's size."""
    from sdengine.hires import HiresFix

    image = control_image(2)
    mask = Image.fromarray(((np.arange(W)[None, :].repeat(H, 0) >= W // 2) * 255).astype(np.uint8))
    hint = control_module.hint_tensor(ControlUnit("m", image, preprocess="inpaint", mask=mask), W, H)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    expected[..., W // 2:] = -1.0
    assert torch.equal(hint, expected)
    with pytest.raises(ControlError, match="needs a mask"):
        control_module.hint_tensor(ControlUnit("m", image, preprocess="inpaint"), W, H)
    unit = ControlUnit(str(cn["folders"][0]), image, preprocess="inpaint")
    out = cn["pipe"].inpaint(image, mask, "a red circle", steps=2, seed=1, controls=[unit])[0]
    assert out.size == (W, H)
    unit = ControlUnit(str(cn["folders"][0]), image, resize="crop and resize")
    out = cn["pipe"].generate("a red circle", steps=2, seed=1, width=W, height=H, controls=[unit],
                              hires=HiresFix(2.0, steps=2, denoising_strength=0.5))[0]
    assert out.size == (2 * W, 2 * H) and "ControlNet 0:" in out.info["parameters"]


def test_a1111_spellings(tmp_path):
    """What A1111's API sends: labels or indices for the modes, a model named "name [hash]"."""
    unit = ControlUnit("m", "x.png", mode=2, resize=1)
    assert (unit.mode, unit.resize) == ("control", "crop and resize")
    assert ControlUnit("m", "x.png", mode="Balanced", resize="Resize and Fill").resize == "resize and fill"
    (tmp_path / "control_v11p_sd15_canny.safetensors").write_bytes(b"")
    found = control_module.resolve_controlnet("control_v11p_sd15_canny [d14c016b]", tmp_path)
    assert found.name == "control_v11p_sd15_canny.safetensors"
    assert control_module.list_controlnets(tmp_path) == ["control_v11p_sd15_canny"]


def test_tiling_wraps_the_controlnet_too(cn):
    unit = ControlUnit(str(cn["folders"][0]), control_image())
    pipe = cn["pipe"]
    net = pipe.controlnets.get(unit.model)[0]
    with pipe.tiling(Request(controls=[unit], tiling=True)):
        assert net.input_hint_block[0].padding_mode == "circular"
    assert net.input_hint_block[0].padding_mode == "zeros"
    image = pipe.generate("a red circle", steps=2, seed=1, width=W, height=H, tiling=True, controls=[unit])[0]
    assert "Tiling: True" in image.info["parameters"]


def test_shuffle_preprocessor():
    """A1111's content shuffle: a smooth random warp of the image, the same for the same seed (threshold A)."""
    image = control_image(3).resize((64, 48))
    a, b = preprocess(image, "shuffle"), preprocess(image, "shuffle")
    assert a.size == image.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(preprocess(image, "shuffle", 1)))
    assert not np.array_equal(np.asarray(a), np.asarray(image))
    flat = Image.new("RGB", (64, 48), (10, 200, 30))  # a warp moves pixels, it makes no new colours
    assert set(map(tuple, np.asarray(preprocess(flat, "shuffle")).reshape(-1, 3))) == {(10, 200, 30)}
    assert ControlUnit("m", "x.png", preprocess="shuffle").threshold_a == 0


def test_global_pool_matches_diffusers(cn, tmp_path):
    """The shuffle ControlNet's global pooling: a ControlNetModel with global_pool_conditions (diffusers forces guess
    mode for it: residuals mean-pooled over space, on the conditional half only, at the uniform weight) against
    StableDiffusionControlNetPipeline; the same net as lllyasviel's single file with its .yaml beside."""
    from diffusers import ControlNetModel

    ref = perturb(ControlNetModel.from_unet(cn["parts"]["unet"], conditioning_embedding_out_channels=HINT_WIDTHS), 4)
    ref.register_to_config(global_pool_conditions=True)
    ref.save_pretrained(tmp_path / "pooled")
    pipe = reference_pipeline(cn, [ref])
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    expected = pipe("a red circle", image=control_image(), negative_prompt="blue", num_inference_steps=6,
                    guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                    controlnet_conditioning_scale=0.8, output_type="latent").images
    net = load_controlnet(tmp_path / "pooled", cn["model"].config.unet)
    assert net.config.global_pool
    save_controlnet(net, tmp_path / "shuffle.safetensors")
    assert read_controlnet(tmp_path / "shuffle.safetensors")[1].global_pool
    for model in (tmp_path / "pooled", tmp_path / "shuffle.safetensors"):
        unit = ControlUnit(str(model), control_image(), weight=0.8)
        ours = cn["pipe"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=7.5, seed=3,
                                         width=W, height=H, batch_size=2, controls=[unit]))
        error = max_rel_error(ours, expected)
        print(f"parity {cn['layout']} global pool ({model.name}): {error:.2e}")
        assert error < 1e-3
    (tmp_path / "shuffle.yaml").unlink()  # without its .yaml a shuffle-named file is warned about, not pooled
    with pytest.warns(UserWarning, match="global_average_pooling"):
        assert not read_controlnet(tmp_path / "shuffle.safetensors")[1].global_pool


def test_diff_controlnet(cn, tmp_path):
    """A "diff" ControlNet (a `difference` key; the copied-UNet tensors are differences to the model's UNet, as
    A1111's extension reads them): loaded through a pipeline it equals the full ControlNet; alone it is an error."""
    net = load_controlnet(cn["folders"][0], cn["model"].config.unet)
    unet_sd = cn["model"].unet.state_dict()
    diff = {control_module.PREFIX + k: v - unet_sd[k] if k in unet_sd else v for k, v in net.state_dict().items()}
    assert sum(k[len(control_module.PREFIX):] in unet_sd for k in diff) > 10
    save = {**diff, "control_model.difference": torch.tensor([])}
    write_safetensors(save, tmp_path / "diff_canny.safetensors")
    loaded, _ = cn["pipe"].controlnets.get(str(tmp_path / "diff_canny.safetensors"))
    for key, value in net.state_dict().items():
        assert torch.allclose(loaded.state_dict()[key], value, atol=1e-6), key
    with pytest.raises(ControlError, match="'diff' ControlNet .* needs the model"):
        load_controlnet(tmp_path / "diff_canny.safetensors", cn["model"].config.unet)
