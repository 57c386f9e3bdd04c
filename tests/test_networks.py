"""LoRAs used from prompts: A1111's `<lora:...>` tags, the LoRA folder, "Lora hashes", warnings, and whole images
against diffusers' pipeline with load_lora_weights (kohya and PEFT files, two LoRAs, weights 0.5 and 1.0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_helpers import kohya_file, peft_adapted
from reference import save_pipeline
from sampler_harness import use_scheduler

import sdengine
from sdengine.lora import addnet_hash
from sdengine.metadata import parse_parameters
from sdengine.networks import MAX_LORAS, LoraTag, Networks, parse_tags
from sdengine.pipeline import Pipeline
from sdengine.request import FieldError

W, H = 40, 32


@pytest.mark.parametrize("prompt,tags", [
    ("a cat <lora:x>", [LoraTag("x", 1.0, 1.0)]),
    ("<lora:x:0.5> a cat", [LoraTag("x", 0.5, 0.5)]),
    ("a <lora:x:0.5:0.8>", [LoraTag("x", 0.5, 0.8)]),  # A1111: text encoder first, then UNet
    ("a <lyco:x:te=0.2:unet=0.9>", [LoraTag("x", 0.2, 0.9)]),
    ("<lora:a:1><lora:b:-1>", [LoraTag("a"), LoraTag("b", -1.0, -1.0)]),
])
def test_tags_are_read_as_a1111_reads_them(prompt, tags):
    text, found, warnings = parse_tags(prompt)
    assert found == tags and "<" not in text and not warnings


def test_other_tags_warn_and_bad_tags_are_errors():
    text, found, warnings = parse_tags("a cat <hypernet:h:1>")
    assert text == "a cat " and not found and "not supported" in warnings[0]
    with pytest.raises(FieldError, match="not a number"):
        parse_tags("<lora:x:abc>")
    with pytest.raises(FieldError, match=f"at most {MAX_LORAS}"):
        parse_tags("<lora:x:0.1>" * 200)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An SD1 reference folder, a kohya LoRA and a PEFT LoRA (diffusers' save_lora_weights) in a LoRA folder."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("networks")
    parts = save_pipeline("sd1", root / "pipe")
    loras = root / "loras"
    (loras / "sub").mkdir(parents=True)
    unet, unet_cfg = peft_adapted(parts["unet"], ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], seed=11, alpha=4)
    text, text_cfg = peft_adapted(parts["text_encoder"], ["q_proj", "v_proj", "fc1"], seed=12, alpha=4)
    StableDiffusionPipeline.save_lora_weights(loras / "sub", unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text),
                                              unet_lora_adapter_metadata=unet_cfg.to_dict(),
                                              text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
                                              weight_name="peftstyle.safetensors")
    unet2, _ = peft_adapted(parts["unet"], ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], seed=13, alpha=4)
    text2, _ = peft_adapted(parts["text_encoder"], ["q_proj", "v_proj", "fc1"], seed=14, alpha=4)
    model = sdengine.load(root / "pipe")
    # UNet only: diffusers 0.42 with transformers 5 drops a kohya file's text-encoder layers ("UNEXPECTED" keys),
    # so its image could not be the oracle for them (tests/test_lora.py checks them against the PEFT modules)
    kohya_file(model, {"unet": unet2, "text": text2}, loras / "kohyastyle.safetensors", unet_only=True)
    return {"folder": root / "pipe", "loras": loras, "model": model}


@pytest.fixture(scope="module")
def ours(setup):
    return Pipeline(setup["model"], networks=Networks(setup["model"], [setup["loras"]]))


def _reference_image(setup, prompt, adapters: dict[str, float]):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(setup["folder"], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "EulerDiscreteScheduler")
    for name in adapters:
        path = setup["loras"] / ("sub/peftstyle.safetensors" if name == "peftstyle" else f"{name}.safetensors")
        ref.load_lora_weights(str(path), adapter_name=name)
    if adapters:
        ref.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return ref(prompt, num_inference_steps=4, generator=[torch.Generator().manual_seed(3)], height=H, width=W,
               output_type="np").images[0]


@pytest.mark.parametrize("adapters", [{"kohyastyle": 1.0}, {"peftstyle": 0.5}, {"kohyastyle": 0.5, "peftstyle": 1.0}])
def test_images_match_diffusers_load_lora_weights(setup, ours, adapters):
    tags = "".join(f"<lora:{name}:{w}>" for name, w in adapters.items())
    ref = _reference_image(setup, "a red circle", adapters)
    plain = _reference_image(setup, "a red circle", {})
    img = np.asarray(ours.generate(f"a red circle {tags}", steps=4, seed=3, width=W, height=H)[0]).astype(float)
    assert np.abs(img - (ref * 255).round()).mean() <= 1.0
    assert np.abs((ref - plain) * 255).mean() > 2  # the LoRA changes the image well beyond the tolerance


def test_prompt_tags_patch_hash_and_restore(setup, ours):
    model = setup["model"]
    ours.generate("a red circle", steps=1, seed=1, width=W, height=H)  # whatever an earlier test left: taken out
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    img = ours.generate("a red circle <lora:kohyastyle:0.7> <lora:sub/peftstyle>", steps=2, seed=1, width=W,
                        height=H)[0]
    params = parse_parameters(img.info["parameters"])
    assert params["Prompt"] == "a red circle <lora:kohyastyle:0.7> <lora:sub/peftstyle>"  # kept as written
    kohya_hash = addnet_hash(setup["loras"] / "kohyastyle.safetensors")[:12]
    assert f"kohyastyle: {kohya_hash}" in params["Lora hashes"] and "sub/peftstyle: " in params["Lora hashes"]
    assert not all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    again = ours.generate("a red circle", steps=2, seed=1, width=W, height=H)[0]
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    assert "Lora hashes" not in parse_parameters(again.info["parameters"])
    # the tag is not prompt text: a prompt whose LoRA is at weight 0 is the plain prompt's image
    zero = ours.generate("a red circle <lora:kohyastyle:0>", steps=2, seed=1, width=W, height=H)[0]
    assert np.array_equal(np.asarray(zero), np.asarray(again))


def test_unknown_lora_warns_in_the_parameters(ours):
    img = ours.generate("a red circle <lora:nosuch:1>", steps=1, seed=1, width=W, height=H)[0]
    assert "LoRA not found: nosuch" in parse_parameters(img.info["parameters"])["Warnings"]
    assert ours.networks.warnings == ["LoRA not found: nosuch"]


def test_embedding_folder_used_from_prompts_with_ti_hashes(setup, tmp_path):
    """An A1111 .pt embedding in the embeddings folder: its file name in the prompt (and negative prompt) uses it,
    "TI hashes" records it, and the image differs from the plain word's."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    width = setup["model"].text_encoder.config.width
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=torch.Generator().manual_seed(0))},
                "name": "shiny"}, folder / "shiny.pt")
    pipe = Pipeline(setup["model"], networks=Networks(setup["model"], [], [folder]))
    img = pipe.generate("a shiny circle", negative_prompt="shiny", steps=2, seed=1, width=W, height=H)[0]
    params = parse_parameters(img.info["parameters"])
    assert params["TI hashes"].startswith("shiny: ") and len(params["TI hashes"]) == len("shiny: ") + 12
    plain = Pipeline(setup["model"], networks=Networks(setup["model"]))
    other = plain.generate("a shiny circle", negative_prompt="shiny", steps=2, seed=1, width=W, height=H)[0]
    assert "TI hashes" not in parse_parameters(other.info["parameters"])
    assert not np.array_equal(np.asarray(img), np.asarray(other))
    assert pipe.networks.embeddings().api()["loaded"]["shiny"]["vectors"] == 2
