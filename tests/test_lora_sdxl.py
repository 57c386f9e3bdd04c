"""SDXL LoRAs: PEFT adapters on the tiny SDXL pipeline's UNet, CLIP-L and bigG (bigG's fused q/k/v thirds), saved
by diffusers' StableDiffusionXLPipeline.save_lora_weights and rewritten under kohya-ss' SDXL names (original UNet
block names, lora_te1_/lora_te2_): sdengine's outputs equal the adapted modules', and diffusers' own kohya reader
maps our SDXL names to the same UNet layers."""
from __future__ import annotations

import copy

import pytest
import torch
from lora_helpers import peft_adapted
from reference import assert_close
from safetensors.torch import save_file
from sdxl_helpers import POOLED, sdxl_pipeline

import sdengine
from sdengine.lora import LoraError, LoraPatcher, LoraUse, kohya_names, lora_targets, read_lora
from sdengine.nn.unet import sdxl_vector

UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "fc1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("sdxl-lora")
    pipe = sdxl_pipeline(root / "pipe")
    unet, unet_cfg = peft_adapted(pipe.unet, UNET_MODULES, seed=21)
    te1, te1_cfg = peft_adapted(pipe.text_encoder, TEXT_MODULES, seed=22, alpha=2)
    te2, te2_cfg = peft_adapted(pipe.text_encoder_2, TEXT_MODULES, seed=23, alpha=2)
    StableDiffusionXLPipeline.save_lora_weights(
        root, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te1),
        text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te1_cfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=te2_cfg.to_dict())
    model = sdengine.load(root / "pipe")
    # the same weights under kohya's SDXL names
    names, targets = kohya_names(model), lora_targets(model)
    kohya = {}
    for part, module, alpha in (("unet", unet, 8.0), ("text_encoder", te1, 2.0), ("text_encoder_2", te2, 2.0)):
        for key, value in get_peft_model_state_dict(module).items():
            layer, role = key.rsplit(".lora_", 1)
            name = names[targets[f"{part}.{layer}"].key]
            kohya[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value.contiguous()
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, root / "kohya.safetensors")
    return {"root": root, "pipe": pipe, "model": model, "unet": unet, "te1": te1, "te2": te2}


def _compare(setup, unet_ref):
    model = setup["model"]
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    t = torch.tensor([10, 700])
    ids = model.tokenizer(["a red circle", "two stars"])
    with torch.no_grad():
        expected = unet_ref(x, t, encoder_hidden_states=context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert_close(model.unet(x, t, context, sdxl_vector(pooled, time_ids)), expected)
        assert_close(model.text_encoders[0](ids)[0], setup["te1"](ids, output_hidden_states=True).hidden_states[-2])
        ids_g = model.tokenizer_2(["a red circle", "two stars"])
        out = setup["te2"](ids_g, output_hidden_states=True)
        context_g, pooled_g = model.text_encoders[1](ids_g)
        assert_close(context_g, out.hidden_states[-2])
        assert_close(pooled_g, out.text_embeds)


@pytest.mark.parametrize("file", ["pytorch_lora_weights.safetensors", "kohya.safetensors"])
def test_sdxl_lora_matches_peft_modules(setup, file):
    patcher = LoraPatcher(setup["model"])
    try:
        lora = read_lora(setup["root"] / file)
        if file.startswith("kohya"):
            assert any(n.startswith("lora_unet_input_blocks_") for n in lora.layers)
            assert any(n.startswith("lora_te2_") for n in lora.layers) and any(n.startswith("lora_te1_")
                                                                              for n in lora.layers)
        report = patcher.apply([LoraUse(lora)])
        assert not report.skipped, report.warnings()
        _compare(setup, setup["unet"])
    finally:
        patcher.restore()


def test_diffusers_reads_our_sdxl_kohya_names(setup):
    pipe = copy.deepcopy(setup["pipe"])
    pipe.load_lora_weights(str(setup["root"] / "kohya.safetensors"))
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)
    kwargs = {"text_embeds": torch.randn(1, POOLED, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        assert_close(pipe.unet(x, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=kwargs).sample,
                     setup["unet"](x, torch.tensor([500]), encoder_hidden_states=context,
                                   added_cond_kwargs=kwargs).sample)


def test_sd1_lora_on_sdxl_is_refused_naming_the_family(setup):
    from sdengine.lora import lora_from_tensors

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = lora_from_tensors({f"{name}.lora_down.weight": torch.randn(4, 768),
                              f"{name}.lora_up.weight": torch.randn(320, 4)}, "sd15style")
    with pytest.raises(LoraError, match="made for SD1"):
        LoraPatcher(setup["model"]).apply([LoraUse(lora)])
