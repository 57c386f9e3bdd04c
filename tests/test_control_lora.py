"""Control-LoRA (Stability's `lora_controlnet` files) against diffusers' ControlNetModel.load_lora_adapter: a tiny
file in SAI's layout (hint encoder, zero convolutions and norms in full; rank-2 up/down factors for the copied UNet's
linear and convolution weights), loaded on the reference UNet by both; the residuals agree. The file's biases of
factored layers are used, as A1111's extension and ComfyUI do (diffusers keeps the UNet's: the test gives them the
UNet's values, where all three agree)."""
from __future__ import annotations

import pytest
import torch
from reference import assert_close

import sdengine
from sdengine.control import ControlError, ControlNets, _rename_all, config_from_diffusers, controlnet_pairs
from sdengine.weights.io import write_safetensors

COPIED = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")


def control_lora(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """SAI's layout from a ControlNet's original-keyed weights `base` (a copy of the UNet): factors for every
    linear/convolution weight of the copy (biases left as the UNet's), everything else in full, perturbed."""
    g = torch.Generator().manual_seed(seed)
    sd = {"lora_controlnet": torch.tensor([])}
    for key, value in base.items():
        if key.startswith(COPIED) and key.endswith(".weight") and value.ndim >= 2:
            stem, rank = key.removesuffix(".weight"), 2
            sd[stem + ".up"] = torch.randn(value.shape[0], rank, *([1] * (value.ndim - 2)), generator=g) * 0.1
            sd[stem + ".down"] = torch.randn(rank, *value.shape[1:], generator=g) * 0.1
        elif key.startswith(COPIED) and key.endswith(".bias") and key.removesuffix(".bias") + ".weight" in base \
                and base[key.removesuffix(".bias") + ".weight"].ndim >= 2:
            sd[key] = value.clone()
        else:
            sd[key] = value + torch.randn(value.shape, generator=g) * 0.05
    return sd


@pytest.fixture(scope="module")
def made(reference, tmp_path_factory):
    from diffusers import ControlNetModel

    if reference["layout"] != "sd1":  # its conversion (convert_sai_sd_control_lora_state_dict_to_peft) assumes two
        pytest.skip("diffusers reads SAI's layout with two res blocks per level only")  # res blocks per level
    unet = reference["parts"]["unet"]
    ref = ControlNetModel.from_unet(unet)  # the published hint encoder (16, 32, 96, 256): SAI's layout needs it
    cfg = config_from_diffusers(dict(ref.config))
    sd = control_lora(_rename_all(ref.state_dict(), controlnet_pairs(cfg), reverse=True, what="diffusers"), 1)
    path = tmp_path_factory.mktemp(f"control-lora-{reference['layout']}") / "control-lora-canny-rank2.safetensors"
    write_safetensors(sd, path)
    ref.load_lora_adapter(dict(sd), prefix=None, controlnet_config=ref.config)
    model = sdengine.load(reference["folder"])
    return {"ref": ref.eval(), "path": path, "sd": sd, "model": model, **reference}


def test_residuals_match_diffusers(made):
    model = made["model"]
    nets = ControlNets(model.config.unet, torch.device("cpu"), torch.float32, latent_factor=2, base=model.unet)
    ours, _ = nets.get(str(made["path"]))
    g = torch.Generator().manual_seed(3)
    x, hint = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, 3, 128, 128, generator=g)  # hint: 8x latents
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    with torch.no_grad():
        t = torch.tensor([10, 800])
        down, mid = made["ref"](x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        res = ours(x, hint, t, context)
        for a, b in zip(res, [*down, mid]):
            assert_close(a, b)
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(res, [*down, mid]))
        print(f"control-lora residuals: {worst:.2e}")  # the figure docs/control.md quotes (pytest -s)
    # a factored layer's weight is the UNet's plus up @ down; a bias the file holds is the file's
    key = "input_blocks.1.0.in_layers.2"
    up, down_f = made["sd"][key + ".up"], made["sd"][key + ".down"]
    expected = model.unet.state_dict()[key + ".weight"] + (up.flatten(1) @ down_f.flatten(1)).reshape(up.shape[0], -1,
                                                                                                      3, 3)
    assert torch.allclose(ours.state_dict()[key + ".weight"], expected, atol=1e-6)


def test_bad_control_loras(made, tmp_path):
    from sdengine.control import load_controlnet

    unet_cfg = made["model"].config.unet
    with pytest.raises(ControlError, match="Control-LoRA .* needs the model"):
        load_controlnet(made["path"], unet_cfg)
    other = sdengine.UNetConfig(**{**unet_cfg.__dict__, "model_channels": 2 * unet_cfg.model_channels})
    with pytest.raises(ControlError, match="Control-LoRA for another model|do not fit"):
        load_controlnet(made["path"], other, base=made["model"].unet.state_dict())
