"""IP-Adapter against diffusers/transformers: a tiny CLIPVisionModelWithProjection saved with transformers' writer,
IP-Adapter files in the published layout (plain, plus, full face) loaded by diffusers' load_ip_adapter and here;
image encoder and preprocessing, projections, the UNet with decoupled cross-attention, StableDiffusionPipeline's
latents and images with ip_adapter_image (one and two reference images, two adapters); the UNet left exactly as it
was; scale 0 = no adapter; bad files, encoders and prompts."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from ip_adapter_helpers import adapter_state_dict, reference_image, save_image_encoder
from reference import assert_close, save_pipeline
from safetensors.torch import save_file
from sampler_harness import SD15_SCHEDULER_CONFIG, max_rel_error

import sdengine
from sdengine.ip_adapter import ImagePrompt, IPAdapterError, adapter_config, load_image_encoder, load_ip_adapter
from sdengine.nn.clip_vision import preprocess
from sdengine.nn.ip_adapter import cross_attentions
from sdengine.pipeline import Pipeline
from sdengine.request import FieldError, Request

W, H = 40, 32
KINDS = ("plain", "plus", "full")
IMAGE_DIMS = {"plain": 24, "plus": 32, "full": 32}  # the tiny encoder's projection width and hidden width


@pytest.fixture(scope="module")
def ipa(tmp_path_factory):
    """An SD1-layout pipeline folder, an image encoder folder beside the adapters, one adapter file per kind."""
    root = tmp_path_factory.mktemp("ipa")
    parts = save_pipeline("sd1", root / "pipe")
    adapters = root / "adapters"
    encoder = save_image_encoder(adapters / "image_encoder")
    files = {}
    for i, kind in enumerate(KINDS):
        files[kind] = adapters / f"ip-adapter-{kind}.safetensors"
        save_file(adapter_state_dict(kind, parts["unet"], IMAGE_DIMS[kind], 32, seed=i), str(files[kind]))
    files["plain2"] = adapters / "ip-adapter-plain2.safetensors"
    save_file(adapter_state_dict("plain", parts["unet"], 24, 32, seed=9), str(files["plain2"]))
    model = sdengine.load(root / "pipe")
    return {"root": root, "parts": parts, "encoder": encoder, "files": files, "model": model, "pipe": Pipeline(model)}


def reference_pipeline(ipa, adapters: list[str], scales: list[float]):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(
        ipa["root"] / "pipe", safety_checker=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(ipa["root"] / "adapters" / "image_encoder"))
    pipe.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    folder = str(ipa["root"] / "adapters")
    pipe.load_ip_adapter([folder] * len(adapters), subfolder=[""] * len(adapters),
                         weight_name=[ipa["files"][a].name for a in adapters])
    pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_encoder_and_preprocessing_match_transformers(ipa):
    from transformers import CLIPImageProcessor

    ours = load_image_encoder(ipa["root"] / "adapters" / "image_encoder")
    for size in ((45, 33), (20, 70), (28, 28)):  # landscape, portrait (upscaled), already the size
        image = reference_image(1, size)
        expected = CLIPImageProcessor(size=28, crop_size=28)(image, return_tensors="pt").pixel_values
        assert (preprocess(image, 28) - expected).abs().max() < 1e-5
    pixels = preprocess(reference_image(2), 28)
    with torch.no_grad():
        ref = ipa["encoder"](pixels, output_hidden_states=True)
        assert_close(ours(pixels), ref.image_embeds)
        assert_close(ours(pixels, penultimate=True), ref.hidden_states[-2])


def test_openclip_layout_loads(ipa, tmp_path):
    """OpenCLIP's `visual.*` names (the fused attention in_proj, proj transposed) give the same tower."""
    sd = ipa["encoder"].state_dict()
    out = {"visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        out |= {f"visual.{theirs}.{p}": sd[f"vision_model.{ours}.{p}"] for p in ("weight", "bias")}
    for i in range(3):
        a, b = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}attn.in_proj_{p}"] = torch.cat([sd[f"{a}self_attn.{n}_proj.{p}"] for n in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{b}{theirs}.{p}"] = sd[f"{a}{ours}.{p}"]
    # a folder: the tiny tower's head count is in no shape (the published widths' are known), config.json has it
    shutil.copy(ipa["root"] / "adapters" / "image_encoder" / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / "open_clip_model.safetensors"))
    ours = load_image_encoder(tmp_path)
    pixels = preprocess(reference_image(2), 28)
    with torch.no_grad():
        assert_close(ours(pixels), ipa["encoder"](pixels).image_embeds)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_and_unet_match_diffusers(ipa, kind):
    """The image projection (diffusers' converted encoder_hid_proj) and the UNet with the adapter at scale 0.7."""
    ref = reference_pipeline(ipa, [kind], [0.7])
    ours = load_ip_adapter(ipa["files"][kind], ipa["model"].unet)
    g = torch.Generator().manual_seed(3)
    features = torch.randn((2, IMAGE_DIMS[kind]) if kind == "plain" else (2, 17, IMAGE_DIMS[kind]), generator=g)
    layer = ref.unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        expected = layer(features)
        assert_close(ours.image_proj(features), expected)
        x, context = torch.randn(2, 4, H // 2, W // 2, generator=g), torch.randn(2, 77, 32, generator=g)
        embeds = features[None].expand(2, *features.shape)  # (batch, 2 images, ...): the tokens concatenated
        t = torch.tensor([3, 981])
        out = ref.unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": [embeds]}).sample
        tokens = ours.project(features).expand(2, -1, -1)
        with ours.attached(ipa["model"].unet, tokens, 0.7):
            assert_close(ipa["model"].unet(x, t, context), out)
        assert max_rel_error(ipa["model"].unet(x, t, context), out) > 1e-3  # the adapter mattered


CASES = {
    "plain": dict(adapters=["plain"], scales=[0.8], images=1),
    "plus-two-images": dict(adapters=["plus"], scales=[1.0], images=2),
    "full": dict(adapters=["full"], scales=[0.6], images=1),
    "two-adapters": dict(adapters=["plain", "plus"], scales=[0.5, 0.9], images=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(ipa, case):
    """StableDiffusionPipeline with ip_adapter_image (Euler, CFG 7.5, batch 2) and ours, same seeds: latents, and
    the decoded images within 1/255 on average."""
    spec = CASES[case]
    images = [[reference_image(10 * a + i) for i in range(spec["images"])] for a in range(len(spec["adapters"]))]
    ref = reference_pipeline(ipa, spec["adapters"], spec["scales"])
    common = dict(negative_prompt="blue", num_inference_steps=5, guidance_scale=7.5, height=H, width=W,
                  num_images_per_prompt=2, ip_adapter_image=[im if len(im) > 1 else im[0] for im in images])
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    expected = ref("a red circle", generator=gens, output_type="latent", **common).images
    prompts = [ImagePrompt(str(ipa["files"][a]), im, scale=s)
               for a, im, s in zip(spec["adapters"], images, spec["scales"])]
    req = Request(prompt="a red circle", negative_prompt="blue", steps=5, cfg_scale=7.5, seed=7, width=W, height=H,
                  batch_size=2, image_prompts=prompts)
    ours = ipa["pipe"].sample(req)
    error = max_rel_error(ours, expected)
    print(f"parity ip-adapter {case}: latents {error:.2e}")  # the figures docs/control.md quotes (pytest -s)
    assert error < 1e-3
    plain = ipa["pipe"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=5, cfg_scale=7.5, seed=7,
                                       width=W, height=H, batch_size=2))
    assert max_rel_error(plain, expected) > 1e-2  # the image prompt changed the result
    if case == "plain":
        gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
        pixels = ref("a red circle", generator=gens, output_type="np", **common).images
        ours_px = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ipa["pipe"].run(req)])
        mean = np.abs(ours_px - pixels).mean()
        print(f"parity ip-adapter images: mean {mean * 255:.3f}/255")
        assert mean <= 1 / 255


def test_unet_restored_exactly_and_scale_zero(ipa):
    """After a generation the UNet is bitwise as before with no patch left; scale 0 is no adapter at all."""
    unet = ipa["model"].unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = dict(prompt="a red circle", steps=3, seed=5, width=W, height=H)
    plain = ipa["pipe"].sample(Request(**base))
    prompt = ImagePrompt(str(ipa["files"]["plus"]), reference_image(), scale=0.0)
    zero = ipa["pipe"].sample(Request(**base, image_prompts=[prompt]))
    assert torch.equal(zero, plain)
    ipa["pipe"].sample(Request(**base, image_prompts=[ImagePrompt(str(ipa["files"]["plus"]), reference_image())]))
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("extra" not in vars(layer) for layer in cross_attentions(unet))
    assert torch.equal(ipa["pipe"].sample(Request(**base)), plain)


def test_infotext_names_the_adapter(ipa):
    prompt = ImagePrompt(str(ipa["files"]["plain"]), [reference_image(), reference_image(1)], scale=0.5)
    image = ipa["pipe"].generate("a red circle", steps=2, seed=1, width=W, height=H, image_prompts=[prompt])[0]
    assert "IP-Adapter 0: \"Model: ip-adapter-plain [" in image.info["parameters"]
    assert "Scale: 0.5, Images: 2" in image.info["parameters"]


def test_bin_file_and_refused_pickle(ipa, tmp_path):
    """The .bin layout (nested dicts, read with weights_only) loads; a pickle holding code is refused."""
    sd = adapter_state_dict("plain", ipa["parts"]["unet"], 24, 32)
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in sd.items():
        outer, inner = key.split(".", 1)
        nested[outer][inner] = value
    torch.save(nested, tmp_path / "ip-adapter.bin")
    a = load_ip_adapter(tmp_path / "ip-adapter.bin", ipa["model"].unet)
    b = load_ip_adapter(ipa["files"]["plain"], ipa["model"].unet)
    assert a.config == b.config and torch.equal(a.image_proj.proj.weight, sd["image_proj.proj.weight"])
    for kind in KINDS:  # the header alone tells the variant (the CLI finds the encoder before the model loads)
        assert adapter_config(ipa["files"][kind]) == load_ip_adapter(ipa["files"][kind], ipa["model"].unet).config
    assert adapter_config(tmp_path / "ip-adapter.bin") == a.config
    torch.save({"image_proj": {"x": torch.zeros(1)}, "ip_adapter": shutil.rmtree}, tmp_path / "evil.bin")
    with pytest.raises(IPAdapterError, match="refused"):
        load_ip_adapter(tmp_path / "evil.bin", ipa["model"].unet)


def test_bad_inputs(ipa, tmp_path):
    unet = ipa["model"].unet
    # an adapter made for another family: context width 64 (the sd2 reference UNet)
    other = save_pipeline("sd2", tmp_path / "sd2")
    save_file(adapter_state_dict("plain", other["unet"], 24, 64), str(tmp_path / "sd2-adapter.safetensors"))
    with pytest.raises(IPAdapterError, match="made for it"):
        load_ip_adapter(tmp_path / "sd2-adapter.safetensors", unet)
    # not an adapter
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(IPAdapterError, match="not an IP-Adapter"):
        load_ip_adapter(tmp_path / "foo.safetensors", unet)
    # no image encoder anywhere: the error names the encoder it needs
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(ipa["files"]["plain"], lonely / "ipa.safetensors")
    pipe = Pipeline(ipa["model"])
    pipe.ip_adapters.folder = tmp_path / "empty"
    req = Request(prompt="x", steps=2, width=W, height=H, image_prompts=[ImagePrompt(str(lonely / "ipa.safetensors"),
                                                                                     reference_image())])
    with pytest.raises(IPAdapterError, match="needs its image encoder") as e:
        pipe.run(req)
    assert "\n" not in str(e.value) and "--ip-adapter-encoder" in str(e.value)
    # an encoder of the wrong width
    wrong = save_image_encoder(tmp_path / "wrong_encoder", projection_dim=16)
    del wrong
    pipe.ip_adapters.encoder = str(tmp_path / "wrong_encoder")
    with pytest.raises(IPAdapterError, match="needs a CLIP image encoder whose projection is 24"):
        pipe.run(req)
    # bad prompts: one-line field errors
    for kwargs, message in ((dict(scale=float("nan")), "scale must be a number"),
                            (dict(scale=-1.0), "scale must be a number"), (dict(image=3), "must be a PIL image")):
        with pytest.raises(IPAdapterError, match=message) as e:
            ImagePrompt(**{"model": "x", "image": reference_image(), **kwargs})
        assert "\n" not in str(e.value)
    with pytest.raises(FieldError, match="at most 4"):
        Request(image_prompts=[ImagePrompt("x", reference_image())] * 5)
    with pytest.raises(IPAdapterError, match="no IP-Adapter 'nope'"):
        Pipeline(ipa["model"]).run(Request(prompt="x", steps=2, width=W, height=H,
                                           image_prompts=[ImagePrompt("nope", reference_image())]))


def test_cli(ipa, tmp_path, capsys):
    """`generate --ip-adapter NAME:IMAGE,IMAGE:SCALE` with a name in --ip-adapter-dir (the image encoder found there):
    the image records the adapter; the same prompt through Python gives the same pixels; bad values are one-line
    errors before the model loads."""
    from PIL import Image

    from sdengine.cli import run

    folder = tmp_path / "ipadapter"
    folder.mkdir()
    shutil.copy(ipa["files"]["plus"], folder / "face-plus.safetensors")
    shutil.copytree(ipa["root"] / "adapters" / "image_encoder", folder / "clip-vision-tiny")
    reference_image(0).save(tmp_path / "a.png")
    reference_image(1).save(tmp_path / "b.png")
    out = tmp_path / "out.png"
    common = ["generate", "a red circle", "--model", str(ipa["root"] / "pipe"), "--steps", "2", "--seed", "4",
              "--width", str(W), "--height", str(H), "--quiet", "--ip-adapter-dir", str(folder),
              "--precision", "fp32"]  # as the Python call below (auto may be bf16 on this CPU)
    assert run([*common, "--ip-adapter", f"face-plus:{tmp_path / 'a.png'},{tmp_path / 'b.png'}:0.6",
                "--out", str(out)]) == 0
    image = Image.open(out)
    assert 'IP-Adapter 0: "Model: face-plus [' in image.info["parameters"]
    prompt = ImagePrompt(str(ipa["files"]["plus"]), [reference_image(0), reference_image(1)], scale=0.6)
    ours = ipa["pipe"].generate("a red circle", steps=2, seed=4, width=W, height=H, image_prompts=[prompt])[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ours))
    capsys.readouterr()
    for bad, message in (([f"nope:{tmp_path / 'a.png'}"], "no IP-Adapter 'nope'"),
                         (["face-plus:missing.png"], "reference image missing.png does not exist"),
                         ([f"face-plus:{tmp_path / 'a.png'}:nan"], "scale must be a number"),
                         ([f"face-plus:{tmp_path / 'a.png'}:1:2"], "expected MODEL:IMAGE"),
                         ([f"face-plus:{tmp_path / 'a.png'}", "--ip-adapter-encoder", str(tmp_path / "none")],
                          "no image encoder")):
        assert run([*common, "--ip-adapter", *bad, "--out", str(tmp_path / "bad.png")]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# --- HTTP: the ControlNet extension's IP-Adapter units ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server over a tiny model, its ControlNet folder holding an IP-Adapter for it and the image encoder."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sdengine.config import TINY
    from sdengine.model import StableDiffusion
    from sdengine.prompts import BUNDLED_STYLES, load_styles
    from sdengine.server.app import create_app
    from sdengine.server.registry import ModelRegistry
    from sdengine.server.service import Service
    from sdengine.server.validation import Limits
    from sdengine.weights import save

    root = tmp_path_factory.mktemp("ipa-server")
    for name in ("models", "controlnet"):
        (root / name).mkdir()
    model = StableDiffusion(TINY).init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # init_weights zeroes the output layers: every image would be the noise alone
        for p in model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save(model, root / "models" / "tiny.safetensors")
    layers = cross_attentions(model.unet)
    cross = layers[0].to_k.in_features
    sd = {"image_proj.proj.weight": torch.randn(4 * cross, 24, generator=g) * 0.2,
          "image_proj.proj.bias": torch.zeros(4 * cross), "image_proj.norm.weight": torch.ones(cross),
          "image_proj.norm.bias": torch.zeros(cross)}
    for i, layer in enumerate(layers):
        for name in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch.randn(layer.to_k.out_features, cross, generator=g)
    save_file(sd, str(root / "controlnet" / "ip-adapter_tiny.safetensors"))
    save_image_encoder(root / "controlnet" / "image_encoder")
    registry = ModelRegistry(root / "models", None, torch.device("cpu"), torch.float32, lora_dirs=[],
                             embedding_dirs=[], controlnet_dir=root / "controlnet")
    registry.ensure("tiny.safetensors")
    registry.default_name = registry.current.name
    service = Service(registry, Limits(max_width=64, max_height=64, max_steps=3, max_batch=4, queue_size=4),
                      load_styles(BUNDLED_STYLES), threads=1)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


def ip_unit(**fields) -> dict:
    import base64
    import io

    buf = io.BytesIO()
    reference_image(3).save(buf, format="PNG")
    return {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny", "weight": 0.7,
            "image": base64.b64encode(buf.getvalue()).decode(), **fields}


def test_http_ip_adapter_unit(server):
    import json

    small = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7}
    models = server.get("/controlnet/model_list").json()["model_list"]
    assert any(m.startswith("ip-adapter_tiny [") for m in models) and not any("image_encoder" in m for m in models)
    assert "ip-adapter_clip_sd15" in server.get("/controlnet/module_list").json()["module_list"]
    plain = server.post("/sdapi/v1/txt2img", json=small)
    r = server.post("/sdapi/v1/txt2img", json={**small, "alwayson_scripts": {"controlnet": {"args": [ip_unit()]}}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "IP-Adapter 0: \"Model: ip-adapter_tiny [" in info["infotexts"][0] and "Scale: 0.7" in info["infotexts"][0]
    assert r.json()["images"][0] != plain.json()["images"][0]
    for bad, why in (({"module": "canny"}, "an IP-Adapter unit takes one of"), ({"weight": -1}, "scale must be"),
                     ({"weight": "x"}, "weight must be a number"), ({"model": "nope"}, "no ControlNet 'nope'")):
        r = server.post("/sdapi/v1/txt2img", json={**small, "alwayson_scripts": {"controlnet": {"args": [
            ip_unit(**bad)]}}})
        assert r.status_code == 422 and why in r.json()["detail"], r.text
    r = server.post("/sdapi/v1/txt2img", json={**small, "alwayson_scripts": {"controlnet": {"args": [ip_unit()] * 5}}})
    assert r.status_code == 422 and "at most 4 IP-Adapter units" in r.json()["detail"], r.text


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_sdxl_pipeline_matches_diffusers(ipa, tmp_path, kind):
    """StableDiffusionXLPipeline with an IP-Adapter for its UNet (transformer depth 2 and 3: several cross-attention
    layers per block, numbered as diffusers orders them) and ours, same seeds."""
    from diffusers import EulerDiscreteScheduler
    from sdxl_helpers import sdxl_pipeline
    from transformers import CLIPVisionModelWithProjection

    ref = sdxl_pipeline(tmp_path / "pipe")
    folder = ipa["root"] / "adapters"
    name = f"sdxl-{kind}.safetensors"
    save_file(adapter_state_dict(kind, ref.unet, IMAGE_DIMS[kind], 64, seed=4), str(folder / name))
    ref.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder"))
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=name)
    ref.set_ip_adapter_scale(0.8)
    ref.set_progress_bar_config(disable=True)
    image = reference_image(5)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    expected = ref("a red circle", negative_prompt="blue", ip_adapter_image=image, num_inference_steps=5,
                   guidance_scale=7.5, generator=gens, height=H, width=W, num_images_per_prompt=2,
                   output_type="latent").images
    pipe = Pipeline(sdengine.load(tmp_path / "pipe"))
    ours = pipe.sample(Request(prompt="a red circle", negative_prompt="blue", steps=5, cfg_scale=7.5, seed=5,
                               width=W, height=H, batch_size=2,
                               image_prompts=[ImagePrompt(str(folder / name), image, scale=0.8)]))
    error = max_rel_error(ours, expected)
    print(f"parity ip-adapter sdxl {kind}: latents {error:.2e}")
    assert error < 1e-3
    with pytest.raises(IPAdapterError, match="made for it"):  # an SDXL adapter on the SD1 model
        load_ip_adapter(folder / name, ipa["model"].unet)


def test_cuda_graphs_and_compile_step_aside(ipa):
    """A UNet replaying CUDA graphs (cuda_graphs.py; graphs=False runs the same plumbing on a CPU) or compiled runs
    its plain forward while an adapter is attached (a replayed graph would leave the image attention out), and gets
    its wrappers back after."""
    from sdengine.cuda_graphs import use_cuda_graphs

    model = sdengine.load(ipa["root"] / "pipe")
    wrapper = use_cuda_graphs(model, graphs=False)
    req = Request(prompt="a red circle", steps=2, seed=5, width=W, height=H,
                  image_prompts=[ImagePrompt(str(ipa["files"]["plain"]), reference_image())])
    assert torch.equal(Pipeline(model).sample(req), ipa["pipe"].sample(req))
    assert wrapper.captures == 0 and model.unet.forward is wrapper
    # torch.compile's wrapper, under the graphs' (as compile.py and cuda_graphs.py stack them), steps aside too
    compiled = torch.compile(wrapper.fn)
    wrapper.fn = compiled
    assert torch.equal(Pipeline(model).sample(req), ipa["pipe"].sample(req))
    assert model.unet.forward is wrapper and wrapper.fn is compiled and wrapper.captures == 0
