"""SDXL beyond the base cases (issue 29's remainder), each against its reference: the refiner's aesthetic scores as
Request fields (diffusers' StableDiffusionXLImg2ImgPipeline), a diffusers folder's own tokenizers (transformers'
CLIPTokenizer), single files written by diffusers' convert_diffusers_to_original_sdxl.py (its mapping re-expressed
here, test-only), and pruned UNets with uneven transformer depths (SSD-1B, Segmind Vega)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from sdxl_helpers import sdxl_pipeline, sdxl_refiner

W, H = 40, 32  # non-square; the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    return folder, sdxl_pipeline(folder)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory, sdxl_folder):
    folder = tmp_path_factory.mktemp("refiner") / "pipe"
    return folder, sdxl_refiner(folder, sdxl_folder[1])


def _reference(pipe, class_name: str = "EulerDiscreteScheduler"):
    """The reference pipeline with one of diffusers' schedulers on SD's training schedule."""
    import diffusers
    from sampler_harness import SD15_SCHEDULER_CONFIG

    pipe.scheduler = getattr(diffusers, class_name).from_config(SD15_SCHEDULER_CONFIG)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _init_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(H, W, 3) * 255).astype(np.uint8))


# --- the refiner's aesthetic scores ------------------------------------------------------------------------------

def test_aesthetic_scores_match_diffusers(refiner_folder):
    """Request(aesthetic_score=, negative_aesthetic_score=) conditions the refiner as diffusers'
    StableDiffusionXLImg2ImgPipeline(aesthetic_score=, negative_aesthetic_score=) does."""
    from sampler_harness import max_rel_error

    import sdengine
    from sdengine.images import image_to_tensor
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request

    folder, ref = refiner_folder
    ref = _reference(ref)
    pipe = Pipeline(sdengine.load(folder))
    init = image_to_tensor(_init_image(), W, H)
    results = {}
    for scores in ((6.0, 2.5), (8.5, 1.0), (3.0, 9.0)):
        expected = ref("a red circle", negative_prompt="blue", image=_init_image(), strength=0.5,
                       num_inference_steps=8, guidance_scale=5, generator=[torch.Generator().manual_seed(3)],
                       aesthetic_score=scores[0], negative_aesthetic_score=scores[1], output_type="latent").images
        req = Request(prompt="a red circle", negative_prompt="blue", steps=8, cfg_scale=5, seed=3, width=W, height=H,
                      strength=0.5, aesthetic_score=scores[0], negative_aesthetic_score=scores[1])
        results[scores] = ours = pipe.sample(req, init=init)
        assert max_rel_error(ours, expected) < 1e-3, scores
    assert max_rel_error(results[(8.5, 1.0)], results[(6.0, 2.5)]) > 1e-3  # the scores matter


def test_aesthetic_scores_as_fields(sdxl_folder):
    """Validated once, written to the parameters text only when not the defaults (and read back), refused where
    nothing would read them (a model that is not a refiner, without a refiner)."""
    import sdengine
    from sdengine.metadata import parse_parameters
    from sdengine.pipeline import Pipeline
    from sdengine.request import FieldError, Request, fields_from_parameters

    for bad in (-1, 10.5, float("nan"), "7", True):
        with pytest.raises(FieldError, match="aesthetic score must be a number from 0 to 10"):
            Request(aesthetic_score=bad)
    with pytest.raises(FieldError, match="negative aesthetic score"):
        Request(negative_aesthetic_score=11)
    plain = Request(seed=1, width=64, height=64, refiner="r")
    assert "Aesthetic score" not in plain.infotext_fields(0) or plain.infotext_fields(0)["Aesthetic score"] is None
    req = Request(seed=1, width=64, height=64, refiner="r", aesthetic_score=7.0, negative_aesthetic_score=1.5)
    fields = req.infotext_fields(0)
    assert fields["Aesthetic score"] == 7.0 and fields["Negative aesthetic score"] == 1.5
    text = "a\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Aesthetic score: 7.0, Negative aesthetic score: 1.5"
    back = fields_from_parameters(parse_parameters(text))
    assert back["aesthetic_score"] == 7.0 and back["negative_aesthetic_score"] == 1.5
    base = Pipeline(sdengine.load(sdxl_folder[0]))
    with pytest.raises(ValueError, match="aesthetic scores condition SDXL refiners; this is sdxl"):
        base.generate("a", steps=1, width=W, height=H, aesthetic_score=7.0)


def test_aesthetic_score_cli_options():
    from sdengine.cli import build_parser
    from sdengine.cli.generate import request_from_args

    argv = ["generate", "a", "--refiner", "r", "--aesthetic-score", "7.5", "--negative-aesthetic-score", "2"]
    req = request_from_args(build_parser(argv).parse_args(argv), "generate", 64, 64)
    assert (req.aesthetic_score, req.negative_aesthetic_score) == (7.5, 2.0)


def test_aesthetic_scores_are_a1111_options(tmp_path, sdxl_folder, refiner_folder):
    """A1111's sdxl_refiner_high/low_aesthetic_score options, per request (override_settings) or kept (/options),
    reach the refiner named by refiner_checkpoint, or a refiner run as the model itself; bad values are a 422."""
    from fastapi.testclient import TestClient

    import sdengine
    from sdengine.pipeline import Pipeline
    from sdengine.prompts import BUNDLED_STYLES, load_styles
    from sdengine.server.app import create_app
    from sdengine.server.errors import BadInput
    from sdengine.server.registry import ModelRegistry
    from sdengine.server.service import Service
    from sdengine.server.validation import Limits

    models = tmp_path / "models"
    models.mkdir()
    (models / "base").symlink_to(sdxl_folder[0])
    (models / "refiner").symlink_to(refiner_folder[0])
    registry = ModelRegistry(models, None, torch.device("cpu"), torch.float32, lora_dirs=[], embedding_dirs=[])
    service = Service(registry, Limits(max_width=64, max_height=64, max_steps=3), load_styles(BUNDLED_STYLES))
    body = {"prompt": "a", "steps": 2, "width": W, "height": H}
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        assert client.post("/sdapi/v1/options", json={"sdxl_refiner_high_aesthetic_score": 7.5}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sdxl_refiner_high_aesthetic_score"] == 7.5
        r = client.post("/sdapi/v1/options", json={"sdxl_refiner_low_aesthetic_score": 12})
        assert r.status_code == 422 and "sdxl_refiner_low_aesthetic_score must be a number from 0 to 10" in r.text
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
            "sdxl_refiner_high_aesthetic_score": "high"}})
        assert r.status_code == 422 and "sdxl_refiner_high_aesthetic_score" in r.text
    refined = service.read({**body, "refiner_checkpoint": "refiner",
                            "override_settings": {"sdxl_refiner_low_aesthetic_score": 1.0}}, "txt2img").request
    assert (refined.aesthetic_score, refined.negative_aesthetic_score) == (7.5, 1.0)
    plain = service.read(body, "txt2img")  # no refiner: the base model has no aesthetic input
    assert (plain.request.aesthetic_score, plain.request.negative_aesthetic_score) == (6.0, 2.5)
    assert service.for_model(plain, Pipeline(sdengine.load(sdxl_folder[0]))) is plain.request
    as_model = service.for_model(plain, Pipeline(sdengine.load(refiner_folder[0])))
    assert (as_model.aesthetic_score, as_model.negative_aesthetic_score) == (7.5, 2.5)
    with pytest.raises(BadInput, match="sdxl_refiner_low_aesthetic_score"):
        service.read({**body, "override_settings": {"sdxl_refiner_low_aesthetic_score": -1}}, "txt2img")


# --- a diffusers folder's own tokenizers ---------------------------------------------------------------------------

ODD_TEXTS = ["wow!!! a cat!", "!", "<|endoftext|> and <|startoftext|>", "<|ENDOFTEXT|>", "  UPPER\tcase \n lines ",
             "ünïcödé ½ 日本語 café", "emoji 😀👍🏽", "a,b.c;d:e'f's don't", "(word:1.2) [x|y] {a|b}", "",
             " ".join(f"w{i}!" for i in range(60))]


def test_folder_tokenizers_equal_transformers(sdxl_folder):
    """Both of an SDXL folder's tokenizers (tokenizer_2: pad "!" = id 0, and every "!" split off as that id, as
    transformers does) give transformers' CLIPTokenizer ids on odd text, padded and cut to 77."""
    from transformers import CLIPTokenizer as HFTokenizer

    import sdengine

    folder = sdxl_folder[0]
    model = sdengine.load(folder)
    assert model.tokenizer.pad_id == 49407 and model.tokenizer_2.pad_id == 0
    for ours, part in ((model.tokenizer, "tokenizer"), (model.tokenizer_2, "tokenizer_2")):
        ref = HFTokenizer.from_pretrained(folder / part)
        expected = ref(ODD_TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(ours(ODD_TEXTS), expected.input_ids), part


def test_folder_with_its_own_tokenizer_2(sdxl_folder, tmp_path):
    """A folder whose tokenizer_2/ is not CLIP's vocabulary (a tiny learned one) is read and used: ids and prompt
    embeddings equal diffusers' from the same folder, and a single file written from it carries it."""
    import shutil

    from diffusers import StableDiffusionXLPipeline
    from reference import assert_close
    from transformers import CLIPTokenizer as HFTokenizer

    import sdengine
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request
    from sdengine.tokenizer import CLIPTokenizer

    folder = tmp_path / "own"
    shutil.copytree(sdxl_folder[0], folder)
    shutil.rmtree(folder / "tokenizer_2")
    tiny = CLIPTokenizer.train(["a red circle", "two blue squares"], pad_with_eos=False)
    tiny.save(folder / "tokenizer_2")
    assert tiny.vocab_size < 1000
    model = sdengine.load(folder)
    assert model.tokenizer_2.vocab == tiny.vocab and model.tokenizer.vocab_size == 49408
    hf = HFTokenizer.from_pretrained(folder / "tokenizer_2")
    texts = ["a red circle!", "two blue squares", "unknown words"]
    assert torch.equal(model.tokenizer_2(texts), hf(texts, padding="max_length", max_length=77,
                                                     return_tensors="pt").input_ids)
    assert not torch.equal(model.tokenizer_2(texts), CLIPTokenizer.default(pad_with_eos=False)(texts))
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    cond, uncond = Pipeline(model).condition(Request(prompt="a red circle", negative_prompt="two blue squares",
                                                     width=W, height=H))
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = ref.encode_prompt("a red circle", negative_prompt="two blue squares",
                                                                   do_classifier_free_guidance=True)
    assert_close(cond.context, embeds)
    assert_close(uncond.context, neg_embeds)
    assert_close(cond.y[:, :pooled.shape[1]], pooled)
    single = tmp_path / "own.safetensors"
    sdengine.save(model, single)
    again = sdengine.load(single)
    assert again.tokenizer_2.vocab == tiny.vocab and again.tokenizer_2.pad_id == 0
    assert again.tokenizer.vocab_size == 49408


# --- pruned SDXL UNets: SSD-1B and Segmind Vega ------------------------------------------------------------------

# Their layouts at test size, as diffusers writes them: SSD-1B keeps depths 4, 4, 10 / 2, 1, 1 on the way up
# (here 3, 3, 5 / 2, 1, 1) and a middle block of one res block; Vega has depths 1 and 2 per level throughout.
PRUNED = {
    "ssd-1b": dict(transformer_layers_per_block=[1, [2, 2], [3, 3]],
                   reverse_transformer_layers_per_block=[[3, 3, 5], [2, 1, 1], 1], mid_block_type="UNetMidBlock2D"),
    "vega": dict(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D"),
}
OUTPUT_DEPTHS = {"ssd-1b": (3, 3, 5, 2, 1, 1, 0, 0, 0), "vega": None}


@pytest.mark.parametrize("layout", list(PRUNED))
def test_pruned_unet_matches_diffusers(layout):
    """The per-block depths and the one-res-block middle are read from diffusers' config and from the original
    keys alike, the key table maps them both ways, and the UNet's output equals diffusers'."""
    from diffusers import UNet2DConditionModel
    from reference import assert_close
    from sdxl_helpers import POOLED, SDXL_UNET, perturbed

    from sdengine.config import ModelConfig
    from sdengine.nn.unet import UNetModel, sdxl_vector
    from sdengine.weights.detect import detect_unet
    from sdengine.weights.diffusers_folder import unet_config_from_diffusers, unet_config_to_diffusers
    from sdengine.weights.keys import UNET, from_diffusers, to_diffusers

    torch.manual_seed(0)
    ref = perturbed(UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                         **{**SDXL_UNET, **PRUNED[layout]}), 0)
    cfg = unet_config_from_diffusers(dict(ref.config))
    assert cfg.transformer_depth_middle == 0 and cfg.transformer_depth_output == OUTPUT_DEPTHS[layout]
    sd = from_diffusers({"unet": ref.state_dict()}, ModelConfig(unet=cfg))
    assert not any(k.startswith(UNET + "middle_block.1") for k in sd)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict({k[len(UNET):]: v for k, v in sd.items()}, strict=True)
    assert detect_unet(sd) == cfg  # the single-file view finds the same layout
    back = to_diffusers(sd, ModelConfig(unet=cfg))["unet"]
    assert set(back) == set(ref.state_dict()) and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    again = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if k != "_class_name"})
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg
    g = torch.Generator().manual_seed(1)
    x, context, pooled = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 77, 64, generator=g), \
        torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 8, 640, 384]])
    with torch.no_grad():
        expected = ref(x, torch.tensor([3, 981]), encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert_close(ours(x, torch.tensor([3, 981]), context, sdxl_vector(pooled, time_ids)), expected)


def test_pruned_sdxl_folder_and_single_file_generate_as_diffusers(tmp_path):
    """An SSD-1B-layout StableDiffusionXLPipeline saved by diffusers loads as sdxl, generates as diffusers does,
    and its single file (detected from the keys alone, no metadata) loads to the same tensors."""
    from sampler_harness import max_rel_error

    import sdengine
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request
    from sdengine.weights.io import read_tensors, write_safetensors

    folder = tmp_path / "ssd"
    ref = _reference(sdxl_pipeline(folder, **PRUNED["ssd-1b"]))
    model = sdengine.load(folder)
    assert model.config.family == "sdxl" and model.config.unet.transformer_depth_output == OUTPUT_DEPTHS["ssd-1b"]
    expected = ref("a red circle", negative_prompt="blue", num_inference_steps=4, guidance_scale=6, height=H,
                   width=W, generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    req = Request(prompt="a red circle", negative_prompt="blue", steps=4, cfg_scale=6, seed=2, width=W, height=H)
    assert max_rel_error(Pipeline(model).sample(req), expected) < 1e-3
    single = tmp_path / "ssd.safetensors"
    sdengine.save(model, single)
    bare = tmp_path / "bare.safetensors"
    write_safetensors(read_tensors(single)[0], bare)  # as other tools write it: no sdengine metadata
    for path in (single, bare):
        loaded = sdengine.load(path)
        assert loaded.config.unet == model.config.unet
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# --- single files written by diffusers' scripts/convert_diffusers_to_original_sdxl.py ----------------------------

def _script_unet_prefixes() -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) as the script lays SDXL out: 3 levels of 2 res blocks (3 on the way up),
    attention below the first level; its upsamplers land after the attention (output_blocks.2.2, 5.2)."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(3):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i > 0:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * i + 3}.0.op."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i < 2:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2."))
    return pairs


RESNET_PARTS = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
OPENCLIP_PARTS = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
                  ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
                  ("text_model.final_layer_norm.", "ln_final."),
                  ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
                  ("text_model.embeddings.position_embedding.weight", "positional_embedding")]


def _rename(key: str, parts: list[tuple[str, str]]) -> str:
    for old, new in parts:
        key = key.replace(old, new)
    return key


def _script_vae_parts() -> list[tuple[str, str]]:
    """The script's VAE renames (4 levels: down blocks of 2 res blocks, up blocks of 3, numbered in reverse)."""
    parts = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"),
             ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(4):
        parts += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        if i < 3:
            parts += [(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."),
                      (f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample.")]
        parts += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
    return parts + [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]


def diffusers_script_file(folder, position_ids: bool = False) -> dict[str, torch.Tensor]:
    """The state dict diffusers' convert_diffusers_to_original_sdxl.py writes for an SDXL folder, its renaming
    re-expressed here (test-only): the UNet and VAE by its fixed tables, CLIP-L as stored under
    conditioner.embedders.0.transformer., bigG with q/k/v fused into in_proj and text_projection transposed.
    position_ids: the text encoders as older transformers saved them (with their position_ids buffers)."""
    from safetensors.torch import load_file

    def part(name: str, file: str = "diffusion_pytorch_model.safetensors") -> dict[str, torch.Tensor]:
        return load_file(folder / name / file)

    out: dict[str, torch.Tensor] = {}
    pairs = _script_unet_prefixes()
    for key, value in part("unet").items():
        if "resnets" in key:
            key = _rename(key, RESNET_PARTS)
        out["model.diffusion_model." + _rename(key, pairs)] = value
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    for key, value in part("vae").items():
        key = _rename(key, _script_vae_parts())
        if "mid.attn_1." in key:
            key = _rename(key, attn)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    texts = [part("text_encoder", "model.safetensors"), part("text_encoder_2", "model.safetensors")]
    if position_ids:  # older transformers: CLIP-L under text_model. too (transformers 5 writes it without)
        texts[0] = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in texts[0].items()}
        for t in texts:
            t["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out.update({"conditioner.embedders.0.transformer." + k: v for k, v in texts[0].items()})
    qkv: dict[str, list] = {}
    for key, value in texts[1].items():
        name = key.rsplit(".", 2)
        if name[-2] in ("q_proj", "k_proj", "v_proj"):  # ...self_attn.q_proj.weight
            qkv.setdefault((name[0], name[-1]), [None] * 3)["qkv".index(name[-2][0])] = value
            continue
        out["conditioner.embedders.1.model." + _rename(key, OPENCLIP_PARTS)] = value
    for (prefix, kind), tensors in qkv.items():
        out[f"conditioner.embedders.1.model.{_rename(prefix, OPENCLIP_PARTS)}.in_proj_{kind}"] = torch.cat(tensors)
    projection = out.pop("conditioner.embedders.1.model.text_projection.weight")
    out["conditioner.embedders.1.model.text_projection"] = projection.T.contiguous()
    return out


@pytest.fixture(scope="module")
def script_folder(tmp_path_factory, sdxl_folder):
    """The tiny SDXL pipeline with a 4-level VAE (the only one the script's fixed tables convert), saved by
    diffusers."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from sdxl_helpers import perturbed

    torch.manual_seed(7)
    vae = perturbed(AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=2, latent_channels=4,
                                  norm_num_groups=32, scaling_factor=0.13025,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4), 7)
    pipe = StableDiffusionXLPipeline(**{**sdxl_folder[1].components, "vae": vae})
    folder = tmp_path_factory.mktemp("script") / "pipe"
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.mark.parametrize("form", ["safetensors", "half", "ckpt", "position_ids"])
def test_diffusers_script_single_files_load_exactly(script_folder, tmp_path, form):
    """convert_diffusers_to_original_sdxl.py's output (safetensors, --half, a .ckpt with its state_dict wrapper;
    CLIP-L without text_model. as transformers 5 saves it, or with it and position_ids as older versions did) is
    detected as sdxl and loads to exactly the folder's tensors and config (the head split aside, which no tensor
    holds: 64 channels per head, right for SDXL's real widths)."""
    from safetensors.torch import save_file

    import sdengine

    folder, _ = script_folder
    sd = diffusers_script_file(folder, position_ids=form == "position_ids")
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sd
    assert "conditioner.embedders.1.model.logit_scale" not in sd  # the script writes none
    if form == "half":
        sd = {k: v.half() for k, v in sd.items()}
    path = tmp_path / ("model.ckpt" if form == "ckpt" else "model.safetensors")
    if form == "ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        save_file(sd, path)
    reference = sdengine.load(folder, dtype=None)
    model = sdengine.load(path, dtype=None)
    assert model.config.family == "sdxl" and model.config.unet == reference.config.unet
    assert model.config.vae == reference.config.vae
    for found, expected in ((model.config.text, reference.config.text), (model.config.text_2,
                                                                          reference.config.text_2)):
        assert found is not None and expected is not None
        # no tensor holds the head split: a file without metadata gets 64 channels per head (real SDXL's)
        assert dataclasses.replace(found, heads=expected.heads) == expected
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        expected = value.half() if form == "half" else value
        assert torch.equal(ours[key], expected), key


# --- train unet --init SDXL: size and crop conditioning from the data ----------------------------------------------

@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Captioned pictures of other sizes than the training size: landscape, portrait and square."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(((80, 48), (40, 72), (32, 32))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {['red', 'blue', 'green'][i]} square")
    return folder


def test_sdxl_training_conditioning_equals_generations(sdxl_folder, odd_images):
    """Each training image's original size and crop (scaled to the training size, as SDXL's trainers record them)
    reach the UNet as the vector generation builds for Request(original_size=, crop=) at that size, beside the same
    text context."""
    import sdengine
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request
    from sdengine.train.data import FolderSource, item_index
    from sdengine.train.stages.unet import UNetStage

    model = sdengine.load(sdxl_folder[0])
    source = FolderSource(odd_images, size=32)
    stage = UNetStage(model, source, caption_dropout=0.0)
    _, (context, y), _, _ = stage.batch(0, range(3), torch.device("cpu"))
    seen = set()
    for i in range(3):
        (width, height), crop = source.geometry(item_index(0, i))
        seen.add(((width, height), crop))
        caption = source.item(item_index(0, i))[1]
        req = Request(prompt=caption, width=32, height=32, original_size=(width, height), crop=crop, cfg_scale=1.0)
        cond, _ = Pipeline(model).condition(req)
        torch.testing.assert_close(context[i:i + 1], cond.context, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[i:i + 1], cond.y, rtol=1e-5, atol=1e-5)
    # 80x48: the 48-pixel square from x = 16, scaled by 32/48: left 11; 40x72: from y = 16, scaled by 32/40: top 13
    assert seen == {((80, 48), (11, 0)), ((40, 72), (0, 13)), ((32, 32), (0, 0))}


@pytest.mark.slow  # three training runs, a sample grid
def test_train_unet_on_sdxl(capsys, sdxl_folder, odd_images, tmp_path):
    """sdengine train unet --init SDXL_MODEL: a few steps, the model written as SDXL, only the UNet changed; what
    SDXL cannot take here is refused in one line."""
    import sdengine
    from sdengine import cli

    def run(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            rc = cli.run(["train", "unet", "--init", str(sdxl_folder[0]), "--data", str(odd_images), "--size", "32",
                          "--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32", "--quiet", *extra])
        except SystemExit as e:
            rc = e.code
        return rc, capsys.readouterr().err

    rc, err = run("--out", str(tmp_path / "ft"), "--grad-checkpointing")
    assert rc == 0, err
    base, tuned = sdengine.load(sdxl_folder[0]), sdengine.load(tmp_path / "ft" / "model.safetensors")
    assert tuned.config.family == "sdxl"
    assert any(not torch.equal(v, base.unet.state_dict()[k].half().float())
               for k, v in tuned.unet.state_dict().items())
    for encoder, ref in zip(tuned.text_encoders, base.text_encoders):
        assert all(torch.equal(v, ref.state_dict()[k].half().float()) for k, v in encoder.state_dict().items())
    for extra, word in ((("--clip-skip", "2"), "--clip-skip"), (("--train-text-encoder",), "--train-text-encoder"),
                        (("--cache-latents", "3"), "--cache-latents")):
        rc, err = run("--out", str(tmp_path / "bad"), *extra)
        assert rc != 0 and word in err and "Traceback" not in err, err


def test_pruned_layouts_sdengine_cannot_hold_are_refused():
    """Input blocks of one level with different depths (no published model has them) and a UNet without a middle
    block are refused naming what does not fit, from the keys and from diffusers' config alike."""
    from diffusers import UNet2DConditionModel
    from sdxl_helpers import SDXL_UNET

    from sdengine.config import ModelConfig
    from sdengine.weights.detect import UnknownArchitecture, detect_unet
    from sdengine.weights.diffusers_folder import unet_config_from_diffusers
    from sdengine.weights.keys import from_diffusers

    uneven = dict(SDXL_UNET, transformer_layers_per_block=[1, [1, 2], [3, 3]],
                  reverse_transformer_layers_per_block=[[3, 3, 3], [2, 2, 2], 1])
    with pytest.raises(UnknownArchitecture, match="differs within a down block"):
        unet_config_from_diffusers(uneven)
    with torch.device("meta"):
        ref = UNet2DConditionModel(sample_size=16, **uneven)
    even = unet_config_from_diffusers(dict(SDXL_UNET, transformer_layers_per_block=[1, 2, 3]))
    sd = from_diffusers({"unet": {k: v for k, v in ref.state_dict().items()}}, ModelConfig(unet=even))
    with pytest.raises(UnknownArchitecture, match="input blocks of level 1 have different transformer depths"):
        detect_unet(sd)
    with pytest.raises(UnknownArchitecture, match="mid_block_type=None"):
        unet_config_from_diffusers(dict(SDXL_UNET, mid_block_type=None))
