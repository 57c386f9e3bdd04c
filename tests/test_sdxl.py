"""SDXL against the reference: a tiny diffusers UNet2DConditionModel in SDXL's layout (no attention at the first
level, transformer depth per level, the "text_time" vector input), random weights, converted through our key
table; the vector y built by our code against what diffusers builds from add_time_ids."""
from __future__ import annotations

import pytest
import torch
from reference import assert_close
from sdxl_helpers import POOLED, SDXL_UNET, TEXT, perturbed, sdxl_pipeline

from sdengine.config import PRESETS, ModelConfig
from sdengine.nn.unet import UNetModel, sdxl_vector
from sdengine.weights.detect import detect_unet
from sdengine.weights.diffusers_folder import unet_config_from_diffusers, unet_config_to_diffusers
from sdengine.weights.keys import UNET, from_diffusers, to_diffusers

# The fast loop (-m "not slow") keeps Euler's runs of each kind of generation; the full run does the other samplers.
SLOW = lambda value: pytest.param(value, marks=pytest.mark.slow)  # noqa: E731


@pytest.fixture(scope="module")
def sdxl_unet():
    """(reference diffusers UNet, our UNet with its weights through the key table)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = perturbed(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **SDXL_UNET), 0)
    cfg = unet_config_from_diffusers(dict(ref.config))
    sd = from_diffusers({"unet": ref.state_dict()}, ModelConfig(unet=cfg))
    ours = UNetModel(cfg)
    ours.load_state_dict({k[len(UNET):]: v for k, v in sd.items()}, strict=True)
    return ref, ours.eval(), sd


def test_config_from_diffusers(sdxl_unet):
    _, ours, sd = sdxl_unet
    cfg = ours.config
    assert cfg.transformer_depth == (0, 2, 3) and cfg.transformer_depth_middle == 3
    assert cfg.adm_in_channels == POOLED + 6 * 256 and cfg.attention_resolutions == (2, 4)
    assert "model.diffusion_model.label_emb.0.0.weight" in sd and "model.diffusion_model.label_emb.0.2.bias" in sd
    assert detect_unet(sd) == cfg  # the single-file view (shapes, key set) finds the same layout
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


def test_vector_matches_diffusers_time_ids(sdxl_unet):
    ref, _, _ = sdxl_unet
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(2, POOLED, generator=g)
    original, crop, target = torch.tensor([[1024, 768], [512, 512]]), torch.tensor([[0, 0], [16, 8]]), \
        torch.tensor([[1024, 768], [640, 384]])
    time_ids = torch.cat([original, crop, target], dim=1).float()
    with torch.no_grad():
        expected = torch.cat([pooled, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    y = sdxl_vector(pooled, original, crop, target)
    assert y.shape == (2, POOLED + 6 * 256)
    assert_close(y, expected, rel=1e-6)


def test_unet_matches_diffusers(sdxl_unet):
    ref, ours, _ = sdxl_unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 24, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 8, 640, 384]])
    y = sdxl_vector(pooled, time_ids)
    with torch.no_grad():
        for t in (torch.tensor([3, 981]), torch.tensor(421.5)):
            expected = ref(x, t, encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            assert_close(ours(x, t, context, y), expected)
        with pytest.raises(ValueError, match="y must be given"):
            ours(x, t, context)


def test_diffusers_table_round_trip(sdxl_unet):
    ref, ours, sd = sdxl_unet
    back = to_diffusers(sd, ModelConfig(unet=ours.config))["unet"]
    expected = ref.state_dict()
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


# diffusers' published configs of the two UNets (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0)
DIFFUSERS_SDXL = {
    "sdxl": dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "sdxl-refiner": dict(block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
                         cross_attention_dim=1280, transformer_layers_per_block=4,
                         projection_class_embeddings_input_dim=2560,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("preset", ["sdxl", "sdxl-refiner"])
def test_presets_match_diffusers_configs(preset):
    from diffusers import UNet2DConditionModel

    config = dict(DIFFUSERS_SDXL[preset], sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256)
    assert unet_config_from_diffusers(config) == PRESETS[preset].unet
    with torch.device("meta"):
        ours, ref = UNetModel(PRESETS[preset].unet), UNet2DConditionModel(**config)
    ours_sd = {UNET + k: v for k, v in ours.state_dict().items()}
    mapped = to_diffusers(ours_sd, ModelConfig(unet=PRESETS[preset].unet))["unet"]
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert detect_unet(ours_sd) == PRESETS[preset].unet


# --- text encoders: CLIP-L and OpenCLIP bigG as diffusers' SDXL pipeline runs them --------------------------------

@pytest.fixture(scope="module")
def sdxl_text():
    """(reference CLIP-L, reference bigG, our config, original-keyed tensors) with the same random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdengine.weights.diffusers_folder import text_config_from_diffusers

    torch.manual_seed(0)
    clip_l = perturbed(CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, hidden_act="quick_gelu",
                                                    **TEXT)), 1)
    big_g = perturbed(CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, num_attention_heads=2, hidden_act="gelu", projection_dim=32, **TEXT)), 2)
    texts = [text_config_from_diffusers(m.config.to_dict(), 0, m is big_g, sdxl=True) for m in (clip_l, big_g)]
    unet = unet_config_from_diffusers(dict(SDXL_UNET, in_channels=4, out_channels=4))
    cfg = ModelConfig(unet=unet, text=texts[0], text_2=texts[1])
    sd = from_diffusers({"text_encoder": clip_l.state_dict(), "text_encoder_2": big_g.state_dict()}, cfg)
    return clip_l, big_g, cfg, sd


def test_text_configs_from_diffusers(sdxl_text):
    _, _, cfg, sd = sdxl_text
    assert cfg.text.layout == "clip" and not cfg.text.pooled_projection and not cfg.text.final_norm
    assert cfg.text_2.layout == "openclip" and cfg.text_2.pooled_projection and not cfg.text_2.pad_with_eos
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    assert "conditioner.embedders.1.model.text_projection" in sd and "conditioner.embedders.1.model.ln_final.bias" in sd
    assert not any(k.startswith("cond_stage_model.") for k in sd)


def test_text_encoders_match_transformers(sdxl_text):
    from sdengine.nn.clip import build_text_encoder

    clip_l, big_g, cfg, sd = sdxl_text
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72,  # CLIP-L pads with the end token
                        [49406, 1929, 49407] + [49407] * 74])
    ids_g = torch.where(torch.arange(77) > torch.tensor([[4], [2]]), 0, ids)  # bigG pads with 0 ("!")
    for index, (ref, tokens) in enumerate(((clip_l, ids), (big_g, ids_g))):
        prefix = f"conditioner.embedders.{index}."
        ours = build_text_encoder(cfg.text_encoders[index])
        ours.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        with torch.no_grad():
            out = ref(tokens, output_hidden_states=True)
            context, pooled = ours.eval()(tokens)
        assert_close(context, out.hidden_states[-2])  # penultimate layer, no final norm (diffusers' SDXL pipeline)
        if index == 1:
            assert_close(pooled, out.text_embeds)  # last layer, final-normed end token through text_projection


def test_text_table_round_trip(sdxl_text):
    clip_l, big_g, cfg, sd = sdxl_text
    back = to_diffusers(sd, cfg)
    assert not back["openclip_extras"]
    for part, ref in (("text_encoder", clip_l), ("text_encoder_2", big_g)):
        expected = {k if k.startswith("text_") else "text_model." + k: v for k, v in ref.state_dict().items()
                    if not k.endswith("position_ids")}
        assert set(back[part]) == set(expected)
        assert all(torch.equal(back[part][k], expected[k]) for k in expected)


# --- the whole model: a StableDiffusionXLPipeline folder written by diffusers, loaded, converted both ways -------

@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    return folder, sdxl_pipeline(folder)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_sdxl_folder_loads_and_converts_both_ways(sdxl_folder, tmp_path):
    import dataclasses as dc

    import safetensors.torch

    import sdengine
    from sdengine.weights.io import read_tensors

    folder, _ = sdxl_folder
    model = sdengine.load(folder)
    assert model.config.family == "sdxl" and model.config.vae.scaling_factor == 0.13025
    assert model.tokenizer.pad_id == 49407 and model.tokenizer_2.pad_id == 0
    assert any(k.startswith("conditioner.embedders.1.model.") for k in model.state_dict())
    sd = model.state_dict()

    single = tmp_path / "sdxl.safetensors"
    sdengine.save(model, single)
    _equal(sdengine.load(single).state_dict(), sd)
    # a file without our metadata (as Stability and diffusers' conversion script write them): found from shapes
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, bare)
    found = sdengine.weights.read_checkpoint(bare)[1]
    # the head split is in no shape (SDXL's own sizes fix it: 64 channels per head); the tiny model's, given
    heads = {"text": dc.replace(found.text, heads=4), "text_2": dc.replace(found.text_2, heads=2)}
    assert dc.replace(found, **heads) == model.config
    _equal(sdengine.load(bare, config=model.config).state_dict(), sd)

    back = tmp_path / "back"
    sdengine.convert(single, back, to="diffusers")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        name = "model" if part.startswith("text") else "diffusion_pytorch_model"
        ours = read_tensors(back / part / f"{name}.safetensors")[0]
        ref = {k if part == "unet" or part == "vae" or k.startswith("text_") else "text_model." + k: v
               for k, v in read_tensors(folder / part / f"{name}.safetensors")[0].items()
               if not k.endswith("position_ids")}
        _equal(ours, ref)
    assert sdengine.load(back).config == model.config


@pytest.mark.slow
def test_sdxl_folder_we_write_loads_in_diffusers(sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    import sdengine

    folder, ref = sdxl_folder
    sdengine.save(sdengine.load(folder), tmp_path / "ours", to="diffusers")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "ours")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _equal(getattr(pipe, name).state_dict(), getattr(ref, name).state_dict())
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407


def test_sdxl_families():
    import dataclasses as dc

    assert PRESETS["sdxl"].family == "sdxl" and PRESETS["sdxl-refiner"].family == "sdxl-refiner"
    inpaint = dc.replace(PRESETS["sdxl"], unet=dc.replace(PRESETS["sdxl"].unet, in_channels=9))
    assert inpaint.family == "sdxl-inpaint"


def test_info_names_the_family(sdxl_folder, capsys):
    from sdengine.cli import run

    assert run(["info", str(sdxl_folder[0])]) == 0
    out = capsys.readouterr().out
    assert "family:     sdxl" in out and "text_encoder_2:" in out


# --- generation: our pipeline against StableDiffusionXLPipeline, same weights and seeds ------------------------

W, H = 40, 32  # non-square; the tiny VAE downsamples by 2


def _sdxl_reference(pipe, class_name: str, **options):
    """The reference pipeline with one of diffusers' schedulers on SD's training schedule."""
    import diffusers
    from sampler_harness import SD15_SCHEDULER_CONFIG

    pipe.scheduler = getattr(diffusers, class_name).from_config({**SD15_SCHEDULER_CONFIG, **options})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipes(sdxl_folder):
    import sdengine
    from sdengine.pipeline import Pipeline

    return {"ours": Pipeline(sdengine.load(sdxl_folder[0])), "ref": sdxl_folder[1]}


@pytest.mark.parametrize("negative", ["blue", ""])  # "": zeros, as diffusers' force_zeros_for_empty_prompt
@pytest.mark.parametrize("sampler", ["euler", SLOW("dpmpp_2m"), SLOW("ddim")])
def test_txt2img_matches_diffusers(sdxl_pipes, sampler, negative):
    from sampler_harness import max_rel_error

    from sdengine.diffusion.samplers import SAMPLERS
    from sdengine.request import Request

    spec = SAMPLERS[sampler]
    ref = _sdxl_reference(sdxl_pipes["ref"], spec.diffusers_class, **spec.diffusers_options)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    expected = ref("a red circle", negative_prompt=negative or None, num_inference_steps=6, guidance_scale=7.5,
                   generator=gens, height=H, width=W, num_images_per_prompt=2, output_type="latent").images
    ours = sdxl_pipes["ours"].sample(Request(prompt="a red circle", negative_prompt=negative, steps=6,
                                             sampler=sampler, cfg_scale=7.5, seed=5, width=W, height=H,
                                             batch_size=2))
    assert max_rel_error(ours, expected) < 1e-3


def test_condition_matches_diffusers_encode_prompt(sdxl_pipes):
    from sdengine.request import Request

    ref = sdxl_pipes["ref"]
    cond, uncond = sdxl_pipes["ours"].condition(Request(prompt="a red circle", negative_prompt="blue", width=W,
                                                        height=H))
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = ref.encode_prompt("a red circle", negative_prompt="blue",
                                                                   do_classifier_free_guidance=True)
    assert_close(cond.context, embeds)
    assert_close(uncond.context, neg_embeds)
    assert_close(cond.y[:, :POOLED], pooled)
    assert_close(uncond.y[:, :POOLED], neg_pooled)


def _init_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(H, W, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("strength", [SLOW(1.0), 0.6])
@pytest.mark.parametrize("sampler", ["euler", SLOW("dpmpp_2m")])
def test_img2img_matches_diffusers(sdxl_pipes, sampler, strength):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from sampler_harness import max_rel_error

    from sdengine.diffusion.samplers import SAMPLERS
    from sdengine.images import image_to_tensor
    from sdengine.request import Request

    spec = SAMPLERS[sampler]
    ref = _sdxl_reference(StableDiffusionXLImg2ImgPipeline(**sdxl_pipes["ref"].components), spec.diffusers_class,
                          **spec.diffusers_options)
    expected = ref("a red circle", image=_init_image(), strength=strength, num_inference_steps=10,
                   guidance_scale=5, generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    req = Request(prompt="a red circle", steps=10, sampler=sampler, cfg_scale=5, seed=3, width=W, height=H,
                  strength=strength)
    ours = sdxl_pipes["ours"].sample(req, init=image_to_tensor(_init_image(), W, H))
    assert max_rel_error(ours, expected) < 1e-3


# --- the refiner: bigG alone (conditioner.embedders.0), aesthetic-score conditioning -----------------------------

@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory, sdxl_folder):
    """A tiny StableDiffusionXLImg2ImgPipeline in the refiner's layout (4 levels, no text_encoder, aesthetic score),
    saved by diffusers."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = sdxl_folder[1]
    unet = dict(SDXL_UNET, block_out_channels=(64, 128, 128, 128), attention_head_dim=(1, 2, 2, 2),
                cross_attention_dim=32, transformer_layers_per_block=2,
                projection_class_embeddings_input_dim=POOLED + 5 * 256,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(4)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, scheduler=base.scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        unet=perturbed(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **unet), 4))
    folder = tmp_path_factory.mktemp("refiner") / "pipe"
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.mark.slow
def test_refiner_loads_converts_and_refines_as_diffusers(refiner_folder, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from sampler_harness import max_rel_error

    import sdengine
    from sdengine.images import image_to_tensor
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request

    folder, _ = refiner_folder
    model = sdengine.load(folder)
    assert model.config.family == "sdxl-refiner" and model.config.text_2 is None
    assert model.tokenizer.pad_id == 0 and model.config.unet.transformer_depth == (0, 2, 2, 0)
    assert all(k.startswith(("model.", "first_stage_model.", "conditioner.embedders.0.model."))
               for k in model.state_dict())
    single = tmp_path / "refiner.safetensors"
    sdengine.save(model, single)
    _equal(sdengine.load(single).state_dict(), model.state_dict())
    sdengine.save(model, tmp_path / "back", to="diffusers")
    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "back")  # diffusers reads what we wrote
    ref = _sdxl_reference(ref, "EulerDiscreteScheduler")
    for negative in ("blue", ""):  # the refiner encodes an empty negative (no force_zeros)
        expected = ref("a red circle", negative_prompt=negative, image=_init_image(), strength=0.3,
                       num_inference_steps=10, guidance_scale=5, generator=[torch.Generator().manual_seed(3)],
                       output_type="latent").images
        req = Request(prompt="a red circle", negative_prompt=negative, steps=10, cfg_scale=5, seed=3, width=W,
                      height=H, strength=0.3)
        ours = Pipeline(model).sample(req, init=image_to_tensor(_init_image(), W, H))
        assert max_rel_error(ours, expected) < 1e-3


@pytest.mark.slow
def test_merge_covers_both_text_encoders(sdxl_folder):
    import sdengine
    from sdengine.weights.merge import merge_models

    a, b = sdengine.load(sdxl_folder[0]), sdengine.load(sdxl_folder[0])
    original = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    merge_models(a, b, 0.5, parts=["text"])
    for key, value in a.state_dict().items():
        shift = 0.5 if key.startswith("conditioner.embedders.") else 0.0
        assert torch.allclose(value, original[key] + shift, atol=1e-6), key
    assert a.config.image_size == 1024  # SDXL generates at its training size by default


def _right_half_mask():
    import numpy as np
    from PIL import Image

    return Image.fromarray(((np.arange(W)[None, :].repeat(H, 0) >= W // 2) * 255).astype(np.uint8))


def _inpaint_parity(ours_pipe, ref, strength: float, seed: int = 3) -> float:
    from sampler_harness import max_rel_error

    from sdengine.images import image_to_tensor, mask_to_tensor
    from sdengine.request import Request

    expected = ref("a red circle", image=_init_image(), mask_image=_right_half_mask(), strength=strength,
                   num_inference_steps=8, guidance_scale=5, generator=[torch.Generator().manual_seed(seed)],
                   output_type="latent", height=H, width=W).images
    req = Request(prompt="a red circle", steps=8, sampler="euler", cfg_scale=5, seed=seed, width=W, height=H,
                  strength=strength)
    ours = ours_pipe.sample(req, init=image_to_tensor(_init_image(), W, H),
                            mask=mask_to_tensor(_right_half_mask(), W, H))
    return max_rel_error(ours, expected)


@pytest.mark.parametrize("strength", [1.0, SLOW(0.7)])
def test_inpaint_matches_diffusers(sdxl_pipes, strength):
    """The base UNet: the known region blended back at every step, as StableDiffusionXLInpaintPipeline does."""
    from diffusers import StableDiffusionXLInpaintPipeline

    ref = _sdxl_reference(StableDiffusionXLInpaintPipeline(**sdxl_pipes["ref"].components), "EulerDiscreteScheduler")
    assert _inpaint_parity(sdxl_pipes["ours"], ref, strength) < 1e-3


@pytest.mark.slow
def test_inpainting_unet_matches_diffusers(sdxl_folder, tmp_path):
    """A 9-channel SDXL inpainting UNet (sdxl-inpaint) sees the mask and the masked image's latents."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    import sdengine
    from sdengine.pipeline import Pipeline

    base = sdxl_folder[1]
    unet = perturbed(UNet2DConditionModel(sample_size=16, in_channels=9, out_channels=4, **SDXL_UNET), 7)
    ref = StableDiffusionXLInpaintPipeline(**{**base.components, "unet": unet})
    ref.save_pretrained(tmp_path / "inpaint")
    model = sdengine.load(tmp_path / "inpaint")
    assert model.config.family == "sdxl-inpaint"
    ref = _sdxl_reference(ref, "EulerDiscreteScheduler")
    for strength in (1.0, 0.5):
        assert _inpaint_parity(Pipeline(model), ref, strength, seed=9) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", SLOW("dpmpp_2m")])
def test_base_and_refiner_match_diffusers_ensemble(sdxl_pipes, refiner_folder, sampler):
    """The base runs the schedule to the switch point, the refiner continues it: diffusers' denoising_end /
    denoising_start pair."""
    from sampler_harness import max_rel_error

    import sdengine
    from sdengine.diffusion.samplers import SAMPLERS
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request

    spec = SAMPLERS[sampler]
    base = _sdxl_reference(sdxl_pipes["ref"], spec.diffusers_class, **spec.diffusers_options)
    refiner = _sdxl_reference(refiner_folder[1], spec.diffusers_class, **spec.diffusers_options)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    latents = base("a red circle", negative_prompt="blue", num_inference_steps=10, guidance_scale=6,
                   denoising_end=0.8, generator=gens, height=H, width=W, num_images_per_prompt=2,
                   output_type="latent").images
    expected = refiner(["a red circle"] * 2, negative_prompt=["blue"] * 2, image=latents, num_inference_steps=10,
                       guidance_scale=6, denoising_start=0.8, generator=gens, output_type="latent").images
    req = Request(prompt="a red circle", negative_prompt="blue", steps=10, sampler=sampler, cfg_scale=6, seed=5,
                  width=W, height=H, batch_size=2)
    ours = sdxl_pipes["ours"].sample_with_refiner(req, Pipeline(sdengine.load(refiner_folder[0])), 0.8)
    assert max_rel_error(ours, expected) < 1e-3
    with pytest.raises(ValueError, match="switch point"):
        sdxl_pipes["ours"].sample_with_refiner(req, Pipeline(sdengine.load(refiner_folder[0])), 1.0)
    sd1 = Pipeline(sdengine.StableDiffusion(PRESETS["tiny"]))  # SD's VAE scale: another latent space
    with pytest.raises(ValueError, match="another latent space"):
        sdxl_pipes["ours"].sample_with_refiner(req, sd1, 0.8)


def test_generation_features_run_on_sdxl(sdxl_pipes):
    """What the pipeline does around sampling (hires fix at a new size, seamless tiling, variation seeds, a long
    weighted prompt in two chunks, infotext) holds for SDXL: the vector follows each pass's size."""
    from sdengine.hires import HiresFix
    from sdengine.request import Request

    pipe = sdxl_pipes["ours"]
    long = "(a red circle:1.3), " + ", ".join(["a small blue square"] * 20)
    images = pipe.generate(long, steps=3, seed=1, width=W, height=H, tiling=True, subseed=7, subseed_strength=0.3,
                           hires=HiresFix(scale=1.5, steps=2))
    assert images[0].size == (56, 48) and "Seed: 1" in images[0].info["parameters"]
    cond, _ = pipe.condition(Request(prompt=long, width=W, height=H))
    assert cond.context.shape[1] == 154 and cond.y.shape == (1, POOLED + 6 * 256)


@pytest.mark.slow
def test_sdxl_files_in_other_forms(sdxl_folder, tmp_path):
    """A .ckpt (read with weights_only), an fp16 file, and a standalone diffusers-named VAE (the fp16-fix VAE's
    layout) given with --vae: SDXL keeps its latent scale, and every tensor arrives as written."""
    import safetensors.torch

    import sdengine

    folder, ref = sdxl_folder
    model = sdengine.load(folder)
    sd = model.state_dict()
    sdengine.save(model, tmp_path / "sdxl.ckpt")
    _equal(sdengine.load(tmp_path / "sdxl.ckpt").state_dict(), sd)
    sdengine.save(model, tmp_path / "half.safetensors", dtype=torch.float16)
    half = sdengine.load(tmp_path / "half.safetensors", dtype=None)
    assert half.dtype == torch.float16 and half.config == model.config
    _equal(half.state_dict(), {k: v.half() for k, v in sd.items()})

    vae_file = tmp_path / "sdxl-vae-fp16-fix.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.vae.state_dict().items()}, vae_file)
    with_vae = sdengine.load(folder, vae=vae_file)
    assert with_vae.config.vae.scaling_factor == 0.13025
    _equal(with_vae.vae.state_dict(), model.vae.state_dict())


def test_txt2img_images_match(sdxl_pipes):
    """Decoded with SDXL's scale (0.13025): the image is diffusers' to within 1/255 on average."""
    import numpy as np

    ref = _sdxl_reference(sdxl_pipes["ref"], "EulerDiscreteScheduler")
    expected = ref("a photo", num_inference_steps=4, guidance_scale=7.5, generator=[torch.Generator().manual_seed(1)],
                   height=H, width=W, output_type="np").images[0]
    img = sdxl_pipes["ours"].generate("a photo", steps=4, seed=1, width=W, height=H)[0]
    assert np.abs(np.asarray(img).astype(float) - (expected * 255).round()).mean() <= 1.0 and img.size == (W, H)


def test_size_and_crop_conditioning_match_diffusers(sdxl_pipes):
    """original_size / crop / target_size from the Request ((width, height) and (left, top), as A1111 writes them)
    condition as diffusers' original_size / crops_coords_top_left / target_size ((height, width), (top, left))."""
    from sampler_harness import max_rel_error

    from sdengine.request import Request

    ref = _sdxl_reference(sdxl_pipes["ref"], "EulerDiscreteScheduler")
    expected = ref("a red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=5, height=H, width=W,
                   original_size=(512, 768), crops_coords_top_left=(16, 48), target_size=(1024, 640),
                   generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    req = Request(prompt="a red circle", negative_prompt="blue", steps=3, cfg_scale=5, seed=2, width=W, height=H,
                  original_size=(768, 512), crop=(48, 16), target_size=(640, 1024))
    assert max_rel_error(sdxl_pipes["ours"].sample(req), expected) < 1e-3
    plain = sdxl_pipes["ours"].sample(Request(prompt="a red circle", negative_prompt="blue", steps=3, cfg_scale=5,
                                              seed=2, width=W, height=H))
    assert max_rel_error(plain, expected) > 1e-2  # the conditioning changes the result


@pytest.mark.slow
def test_refiner_from_the_request(sdxl_pipes, refiner_folder):
    """Request(refiner=..., refiner_switch_at=...) runs the same ensemble as sample_with_refiner, records it in the
    parameters as A1111 does, and refuses what it cannot do."""
    import sdengine
    from sdengine.pipeline import Pipeline
    from sdengine.request import FieldError, Request

    pipe = sdxl_pipes["ours"]
    req = Request(prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=6, seed=5, width=W, height=H,
                  refiner=str(refiner_folder[0]), refiner_switch_at=0.7)
    expected = pipe.sample_with_refiner(req, Pipeline(sdengine.load(refiner_folder[0])), 0.7)
    assert torch.allclose(pipe.latents(req), expected, atol=1e-6)
    image = pipe.run(req)[0]
    assert f"Refiner: {refiner_folder[0]}" in image.info["parameters"]
    assert "Refiner switch at: 0.7" in image.info["parameters"]
    with pytest.raises(ValueError, match="not supported"):
        pipe.run(req, init=_init_image())
    with pytest.raises(FieldError, match="refiner switch point"):
        Request(refiner="x", refiner_switch_at=1.0)
    with pytest.raises(ValueError, match="SDXL"):
        Pipeline(sdengine.StableDiffusion(PRESETS["tiny"])).generate("a", steps=1, width=16, height=16,
                                                                     original_size=(64, 64))


def test_sdxl_takes_align_your_steps_sdxl_table(sdxl_pipes):
    from sdengine.diffusion.schedule import SD_SCHEDULE
    from sdengine.pipeline import Pipeline

    assert sdxl_pipes["ours"].schedule.ays_table == "sdxl"
    assert Pipeline(sdengine_tiny()).schedule is SD_SCHEDULE
    sdxl = sdxl_pipes["ours"].schedule.sampling_sigmas(10, "align_your_steps", "leading", "zero")[0]
    sd15 = SD_SCHEDULE.sampling_sigmas(10, "align_your_steps", "leading", "zero")[0]
    assert not (sdxl == sd15).all()  # the tables differ


def sdengine_tiny():
    from sdengine.model import StableDiffusion

    return StableDiffusion(PRESETS["tiny"])
