"""Our networks against the reference (diffusers / transformers) with the same random weights, both layouts,
loaded from a diffusers folder and from a single file we wrote; and the reverse direction: files we write load
in diffusers and give the same outputs."""
from __future__ import annotations

import pytest
import torch
from reference import assert_close

import sdengine


@pytest.fixture(scope="module")
def loaded(reference, tmp_path_factory):
    """The reference folder loaded by sdengine, directly and through a single file we wrote."""
    model = sdengine.load(reference["folder"])
    single = tmp_path_factory.mktemp("single") / "model.safetensors"
    sdengine.save(model, single)
    return {"folder": model, "single": sdengine.load(single)}


@pytest.mark.parametrize("source", ["folder", "single"])
def test_unet_matches_reference(reference, loaded, source):
    model, unet_ref = loaded[source], reference["parts"]["unet"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 24, generator=g)  # non-square
    t = torch.tensor([3, 981])
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    with torch.no_grad():
        ref = unet_ref(x, t, encoder_hidden_states=context).sample
        assert_close(model.unet(x, t, context), ref)
        # fractional timesteps (k-diffusion samplers pass them) and a scalar timestep
        ref = unet_ref(x, torch.tensor(421.5), encoder_hidden_states=context).sample
        assert_close(model.unet(x, torch.tensor(421.5), context), ref)


def test_unet_odd_latent_size(reference, loaded):
    """Widths that are multiples of 8 but not of 8 x 2^levels give odd latents; diffusers upsamples to the
    skip's size, and so do we."""
    model, unet_ref = loaded["folder"], reference["parts"]["unet"]
    x = torch.randn(1, 4, 13, 9)
    context = torch.randn(1, 77, model.config.unet.context_dim)
    with torch.no_grad():
        ref = unet_ref(x, torch.tensor([500]), encoder_hidden_states=context).sample
        assert_close(model.unet(x, torch.tensor([500]), context), ref)


@pytest.mark.parametrize("source", ["folder", "single"])
def test_vae_matches_reference(reference, loaded, source):
    model, vae_ref = loaded[source], reference["parts"]["vae"]
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 32, 40, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 8, 10, generator=g)
    with torch.no_grad():
        post_ref = vae_ref.encode(pixels).latent_dist
        post = model.vae.encode(pixels)
        assert_close(post.mean, post_ref.mean)
        assert_close(post.logvar, post_ref.logvar)
        assert_close(model.vae.decode(latents), vae_ref.decode(latents).sample)
    assert model.config.vae.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("source", ["folder", "single"])
def test_text_encoder_matches_reference(reference, loaded, source):
    model, text_ref = loaded[source], reference["parts"]["text_encoder"]
    ids = model.tokenizer(["a red circle above a blue square", "", "(emoji) \U0001F600 and 漢字"])
    with torch.no_grad():
        out = text_ref(ids, output_hidden_states=True)
        last, pooled = model.text_encoder(ids)
        penultimate, _ = model.text_encoder(ids, clip_skip=2)
        assert_close(last, out.last_hidden_state)
        assert_close(pooled, out.pooler_output)
        # A1111's clip skip 2 and diffusers' clip_skip=1: the final layer norm over the penultimate layer.
        assert_close(penultimate, text_ref.final_layer_norm(out.hidden_states[-2]))
        # Layer by layer; a single file of the sd2 layout has one more (unused) layer, the identity block.
        raw = model.text_encoder.hidden_states(ids)
        assert len(raw) == len(out.hidden_states) + model.config.text.skip_last_layers
        for ours, ref in zip(raw, out.hidden_states):
            assert_close(ours, ref)


def test_detected_family_and_prediction(reference, loaded):
    expected = {"sd1": ("eps", "clip", True), "sd2": ("v", "openclip", False)}[reference["layout"]]
    for model in loaded.values():
        assert (model.config.prediction, model.config.text.layout, model.config.text.pad_with_eos) == expected


def test_our_diffusers_folder_loads_in_diffusers(reference, loaded, tmp_path):
    """A folder we write is a working StableDiffusionPipeline with the same outputs."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "out"
    sdengine.save(loaded["single"], folder, to="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([700])
    context = torch.randn(1, 77, loaded["single"].config.unet.context_dim)
    ids = loaded["single"].tokenizer("a prompt")
    hf_ids = pipe.tokenizer("a prompt", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, hf_ids)
    with torch.no_grad():
        parts = reference["parts"]
        assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample,
                     parts["unet"](x, t, encoder_hidden_states=context).sample)
        assert_close(pipe.text_encoder(ids).last_hidden_state, parts["text_encoder"](ids).last_hidden_state)
    assert pipe.scheduler.config.prediction_type == reference["parts"]["scheduler"].config.prediction_type


def test_our_single_file_loads_in_diffusers(reference, loaded, tmp_path):
    """diffusers' own single-file reader (its independent original-key table) reads what we write."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    single = tmp_path / "model.safetensors"
    sdengine.save(loaded["folder"], single)
    unet = UNet2DConditionModel.from_single_file(single, config=str(reference["folder"]), subfolder="unet")
    vae = AutoencoderKL.from_single_file(single, config=str(reference["folder"]), subfolder="vae")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([250])
    context = torch.randn(1, 77, loaded["folder"].config.unet.context_dim)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert_close(unet(x, t, encoder_hidden_states=context).sample,
                     reference["parts"]["unet"](x, t, encoder_hidden_states=context).sample)
        assert_close(vae.decode(z).sample, reference["parts"]["vae"].decode(z).sample)


def test_inpainting_unet(tmp_path):
    """9 input channels (latents, mask, masked-image latents), as SD's inpainting checkpoints."""
    from reference import save_pipeline

    parts = save_pipeline("sd1", tmp_path / "inpaint", in_channels=9)
    single = tmp_path / "inpaint.safetensors"
    sdengine.convert(tmp_path / "inpaint", single, to="single")
    model = sdengine.load(single)
    assert model.config.unet.in_channels == 9 and model.config.family.endswith("-inpaint")
    x, context = torch.randn(1, 9, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = parts["unet"](x, torch.tensor([100]), encoder_hidden_states=context).sample
        assert_close(model.unet(x, torch.tensor([100]), context), ref)
