"""The family /sdapi/v1/loras reports for each LoRA file (sd_version, sdengine_context_dim), read from the
safetensors header alone: the web page offers only the LoRAs made for the loaded model."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdengine.lora import LoraLibrary
from sdengine.lora.library import lora_family

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def shape(*dims: int) -> dict:
    return {"dtype": "F32", "shape": list(dims), "data_offsets": [0, 0]}


@pytest.mark.parametrize("header,expected", [
    ({f"{K}.lora_down.weight": shape(4, 768)}, ("SD1", 768)),
    ({f"{K}.lora_down.weight": shape(4, 1024)}, ("SD2", 1024)),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": shape(8, 2048)},
     ("SDXL", 2048)),  # PEFT/diffusers names
    ({f"{K}.hada_w1_b": shape(4, 768)}, ("SD1", 768)),  # LoHa
    ({f"{K}.lora_down.weight": shape(4, 1280)}, ("Unknown", 1280)),  # the SDXL refiner: no A1111 name
    ({f"{K}.lora_down.weight": shape(4, 64)}, ("Unknown", 64)),  # a custom model's width, still compared
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": shape(4, 768)}, ("SDXL", 2048)),
    ({"x.lokr_w1": shape(4, 4), "__metadata__": {"ss_base_model_version": "sdxl_base_v1-0"}}, ("SDXL", 2048)),
    ({"x.lokr_w1": shape(4, 4), "__metadata__": {"ss_v2": "True"}}, ("SD2", 1024)),
    ({"x.lokr_w1": shape(4, 4), "__metadata__": {"modelspec.architecture": "stable-diffusion-v1/lora"}}, ("SD1", 768)),
    ({"x.lokr_w1": shape(4, 4), "__metadata__": {"ss_network_dim": "4"}}, ("Unknown", None)),
    ({}, ("Unknown", None)),
])
def test_family_from_the_header(header, expected):
    assert lora_family(header) == expected


def test_listing_keeps_a1111_fields(tmp_path):
    save_file({f"{K}.lora_down.weight": torch.zeros(2, 1024), f"{K}.lora_up.weight": torch.zeros(320, 2)},
              tmp_path / "sd2.safetensors", metadata={"ss_output_name": "Two"})
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    entries = {e["name"]: e for e in LoraLibrary([tmp_path]).api_list()}
    assert entries["sd2"] == {"name": "sd2", "alias": "Two", "path": str(tmp_path / "sd2.safetensors"),
                              "metadata": {"ss_output_name": "Two"}, "sd_version": "SD2", "sdengine_context_dim": 1024}
    assert (entries["broken"]["sd_version"], entries["broken"]["sdengine_context_dim"]) == ("Unknown", None)
