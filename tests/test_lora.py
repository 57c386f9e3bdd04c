"""LoRA files against the libraries that define them: adapters attached with peft / lycoris-lora to the reference
diffusers UNet and transformers text encoder, saved with their own writers (diffusers' save_lora_weights, kohya
names, lycoris' state dict), loaded and applied by sdengine: its outputs equal the reference modules' outputs with
the adapter active, and restoring gives back the loaded weights bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from lora_helpers import kohya_file, peft_adapted, random_kohya, randomize
from reference import assert_close
from safetensors.torch import save_file

import sdengine
from sdengine.lora import LoraError, LoraPatcher, LoraUse, read_lora

UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def model(reference):
    return sdengine.load(reference["folder"])


@pytest.fixture
def patcher(model):
    """A patcher on the shared model, restored after the test whatever happened in it."""
    patcher = LoraPatcher(model)
    yield patcher
    patcher.restore()


def _unet_io(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    return x, torch.tensor([10, 700]), context


def _check(model, reference, unet_ref, text_ref, rel=1e-4):
    x, t, context = _unet_io(model)
    ids = model.tokenizer(["a red circle above a blue square", "two stars"])
    with torch.no_grad():
        if unet_ref is not None:
            assert_close(model.unet(x, t, context), unet_ref(x, t, encoder_hidden_states=context).sample, rel)
        if text_ref is not None:
            assert_close(model.text_encoder(ids)[0], text_ref(ids).last_hidden_state, rel)


@pytest.fixture(scope="module")
def peft_lora(reference, tmp_path_factory):
    """A PEFT LoRA on UNet and text encoder, saved by diffusers' save_lora_weights; the adapted modules."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet, unet_cfg = peft_adapted(reference["parts"]["unet"], UNET_MODULES, seed=3)
    text, text_cfg = peft_adapted(reference["parts"]["text_encoder"], TEXT_MODULES, seed=4, alpha=2)
    folder = tmp_path_factory.mktemp("peft")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    return {"path": folder / "pytorch_lora_weights.safetensors", "unet": unet, "text": text,
            "unet_alpha": 8 / 4, "text_alpha": 2 / 4}


def test_peft_file_matches_peft_modules(model, reference, peft_lora, patcher):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = patcher.apply([LoraUse(read_lora(peft_lora["path"]))])
    assert report.applied and not report.skipped
    _check(model, reference, peft_lora["unet"], peft_lora["text"])
    patcher.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    _check(model, reference, reference["parts"]["unet"], reference["parts"]["text_encoder"])


def test_kohya_file_matches_peft_and_diffusers_reads_it(model, reference, peft_lora, patcher, tmp_path):
    """The same weights in kohya's layout: our output equals the PEFT modules', and diffusers' own kohya reader
    (load_lora_weights) maps our names to the same layers."""
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "kohya.safetensors"
    kohya_file(model, peft_lora, path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in read_lora(path).layers)
    patcher.apply([LoraUse(read_lora(path))])
    _check(model, reference, peft_lora["unet"], peft_lora["text"])
    patcher.restore()

    pipe = StableDiffusionPipeline.from_pretrained(reference["folder"], safety_checker=None)
    pipe.load_lora_weights(str(path))
    x, t, context = _unet_io(model)
    with torch.no_grad():
        assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample,
                     peft_lora["unet"](x, t, encoder_hidden_states=context).sample)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_multipliers_scale_unet_and_text_separately(model, reference, peft_lora, patcher, weights):
    from peft.tuners.lora import LoraLayer

    unet_w, text_w = weights
    patcher.apply([LoraUse(read_lora(peft_lora["path"]), unet=unet_w, text=text_w)])
    refs = []
    for part, w in (("unet", unet_w), ("text", text_w)):
        adapted = copy.deepcopy(peft_lora[part])
        for m in adapted.modules():
            if isinstance(m, LoraLayer):
                m.scale_layer(w)
        refs.append(adapted)
    _check(model, reference, *refs)
    patcher.restore()


def test_two_loras_at_once(model, reference, peft_lora, patcher, tmp_path):
    """Two LoRAs on the same layers add up: a kohya copy of the PEFT LoRA at 0.5 plus the PEFT file at 0.5 is the
    PEFT LoRA at 1.0."""
    path = tmp_path / "kohya.safetensors"
    kohya_file(model, peft_lora, path)
    report = patcher.apply([LoraUse(read_lora(path), 0.5, 0.5), LoraUse(read_lora(peft_lora["path"]), 0.5, 0.5)])
    assert len(report.applied) == 2
    _check(model, reference, peft_lora["unet"], peft_lora["text"])
    patcher.restore()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_restore_is_bitwise_after_many_cycles(dtype):
    from sdengine.config import PRESETS
    from sdengine.lora import lora_from_tensors

    model = sdengine.StableDiffusion(PRESETS["tiny"]).init_weights().to(dtype)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    a = lora_from_tensors(random_kohya(model, seed=1), "a")
    b = lora_from_tensors(random_kohya(model, seed=2, conv=False), "b")
    patcher = LoraPatcher(model)
    for i in range(1000):
        patcher.apply([LoraUse(a, 0.7, 0.3)] if i % 2 else [LoraUse(a), LoraUse(b, -0.5, 1.0)])
        if i % 3 == 0:
            patcher.restore()
    patcher.apply([LoraUse(b)])
    patched = model.unet.input_blocks[1][1].proj_in.weight.clone()
    patcher.restore()
    assert not torch.equal(patched, loaded["model.diffusion_model.input_blocks.1.1.proj_in.weight"])
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


def test_dorapeft_adapted(model, reference, patcher, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet, cfg = peft_adapted(reference["parts"]["unet"], ["to_q", "to_v", "proj_in"], seed=5, use_dora=True)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert any("magnitude" in layer.tensors for layer in lora.layers.values())
    patcher.apply([LoraUse(lora)])
    _check(model, reference, unet, None)
    patcher.restore()


@pytest.mark.parametrize("algo,extra", [("loha", {}), ("lokr", {}), ("lokr", {"decompose_both": True}),
                                        ("lora", {"weight_decompose": True}), ("full", {}), ("ia3", {}),
                                        ("lora", {"use_tucker": True, "conv_dim": 2}),
                                        ("loha", {"use_tucker": True, "conv_dim": 2})])
def test_lycoris_matches_lycoris_modules(model, reference, patcher, algo, extra, tmp_path):
    """LyCORIS modules built by the lycoris-lora package on the reference UNet (kohya names via its preset),
    their state dict saved as a file: our UNet with it applied equals the adapted reference UNet."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = copy.deepcopy(reference["parts"]["unet"])
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet",
                                 "target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    try:
        net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **extra)
        net.apply_to()
        randomize(net, 6, ("hada_", "lokr_", "lora_", "diff", "dora_scale", "weight"))
        path = tmp_path / "lycoris.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        lora = read_lora(path)
        report = patcher.apply([LoraUse(lora)])
        assert not report.skipped, report.warnings()
        _check(model, reference, unet, None)
        patcher.restore()
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})


def test_partial_lora_applies_what_fits_and_names_the_rest(model, patcher):
    tensors = random_kohya(model, conv=False)
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.randn(2, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.randn(8, 2)
    report = patcher.apply([LoraUse(read_lora_from(tensors))])
    assert report.skipped == {"test": ["lora_unet_no_such_block_to_q"]}
    assert "1 of its layers are not in this model" in report.warnings()[0]


@pytest.mark.parametrize("bad,match", [
    ({"x.lora_down.weight": torch.randn(4, 8), "x.lora_up.weight": torch.randn(8, 3)}, "ranks that disagree"),
    ({"x.lora_down.weight": torch.full((2, 8), float("nan")), "x.lora_up.weight": torch.randn(8, 2)}, "NaN"),
    ({"model.diffusion_model.out.2.weight": torch.randn(4, 4)}, "not a LoRA"),
])
def test_bad_lora_files_are_refused(bad, match):
    with pytest.raises(LoraError, match=match):
        read_lora_from(bad)


def test_pickled_lora_with_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x.lora_down.weight": Evil()}))
    with pytest.raises(LoraError, match="refused"):
        read_lora(path)
    assert not marker.exists()


def test_lora_for_another_family_is_refused(model, reference, patcher):
    other = "sd2" if reference["layout"] == "sd1" else "sd1"
    ctx = {"sd1": 768, "sd2": 1024}[other]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = read_lora_from({f"{name}.lora_down.weight": torch.randn(4, ctx), f"{name}.lora_up.weight":
                           torch.randn(32, 4)})
    with pytest.raises(LoraError, match="fits none"):
        patcher.apply([LoraUse(lora)])


def read_lora_from(tensors):
    from sdengine.lora import lora_from_tensors

    return lora_from_tensors(tensors, "test")
