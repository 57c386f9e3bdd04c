"""`sdengine train lora` and `sdengine train embedding`: what they write is what they trained.

The LoRA file, read back by sdengine (read_lora + LoraPatcher) and by diffusers' load_lora_weights, changes the
UNet and text encoder exactly as the training-time hooked modules did; the embedding's training path (captions'
token substituted, vectors in place) equals the prompt path that reads the file it writes; runs resume exactly;
bad options are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_close
from train_helpers import make_images, one_error, tiny_model, train

import sdengine
from sdengine.embeddings import load_embedding
from sdengine.lora import LoraPatcher, LoraUse, read_lora
from sdengine.prompts import encode_text
from sdengine.train.stages.embedding import EmbeddingStage, substitute
from sdengine.train.stages.lora import RESULT, LoraStage


@pytest.fixture(scope="module")
def model(reference):
    return sdengine.load(reference["folder"])


def _io(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    ids = model.tokenizer(["a red circle above a blue square", "two stars"])
    return x, torch.tensor([10, 700]), context, ids


def _randomize_lora(stage: LoraStage, seed: int = 5) -> None:
    """Trained-looking weights: up is zero at the start, so the hooks would change nothing yet."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for network in stage.networks().values():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_lora_file_changes_outputs_as_training_did_in_sdengine_and_diffusers(model, reference, tmp_path):
    from diffusers import StableDiffusionPipeline

    text = model.config.text.layout == "clip"  # OpenCLIP's fused q/k/v has no text LoRA (see the error test)
    stage = LoraStage(model, None, rank=4, alpha=2, conv_rank=2, conv_alpha=1, text_lr=1e-4 if text else 0.0)
    _randomize_lora(stage)
    x, t, context, ids = _io(model)
    try:
        with torch.no_grad():
            hooked_unet = model.unet(x, t, context)
            hooked_text = model.text_encoder(ids)[0]
        stage.trained_steps = 3
        stage.export(stage.trainable(), tmp_path)
    finally:
        for network in stage.networks().values():
            network.detach()
    path = tmp_path / RESULT
    lora = read_lora(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora.layers)
    assert any("resnets" in k for k in lora.layers) and any("attn2_to_k" in k for k in lora.layers)
    assert any(k.startswith("lora_te_") for k in lora.layers) == text
    meta = lora.metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "2.0", "3")
    assert meta["ss_base_model_version"] in ("sd_v1", "sd_v2")
    with torch.no_grad():
        plain = model.unet(x, t, context)
    assert not torch.allclose(plain, hooked_unet, atol=1e-3)  # the LoRA matters in the comparison below

    patcher = LoraPatcher(model)
    try:
        report = patcher.apply([LoraUse(lora)])
        assert not report.skipped
        with torch.no_grad():
            assert_close(model.unet(x, t, context), hooked_unet)
            assert_close(model.text_encoder(ids)[0], hooked_text)
    finally:
        patcher.restore()

    pipe = StableDiffusionPipeline.from_pretrained(reference["folder"], safety_checker=None)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample, hooked_unet)
        if text:
            assert_close(pipe.text_encoder(ids).last_hidden_state, hooked_text)


def test_trained_lora_file_gives_diffusers_pipeline_image(model, reference, tmp_path):
    """The whole image: the file `train lora` writes (UNet and convolutions, its default), read by diffusers'
    load_lora_weights, gives the image our pipeline gives with it (Euler, 4 steps, one seed)."""
    from diffusers import StableDiffusionPipeline
    from sampler_harness import use_scheduler

    from sdengine.pipeline import Pipeline

    stage = LoraStage(model, None, rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    _randomize_lora(stage, seed=9)
    stage.trained_steps = 3
    try:
        stage.export(stage.trainable(), tmp_path)
    finally:
        for network in stage.networks().values():
            network.detach()
    ref = StableDiffusionPipeline.from_pretrained(reference["folder"], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "EulerDiscreteScheduler")

    def reference_image():
        return ref("a red circle", num_inference_steps=4, generator=[torch.Generator().manual_seed(3)], height=32,
                   width=32, output_type="np").images[0] * 255

    plain = reference_image()
    ref.load_lora_weights(str(tmp_path / RESULT))
    want = reference_image()
    patcher = LoraPatcher(model)
    try:
        patcher.apply([LoraUse(read_lora(tmp_path / RESULT))])
        got = np.asarray(Pipeline(model).generate("a red circle", steps=4, seed=3, width=32, height=32)[0], float)
    finally:
        patcher.restore()
    assert np.abs(got - want.round()).mean() <= 1.0
    assert np.abs(want - plain).mean() > 2   # the LoRA moves the image well beyond the tolerance


def test_embedding_training_path_is_the_prompt_path_and_the_file_reads_back(model, tmp_path):
    """The stage's id substitution and vectors give the context encode_text gives for the embedding it writes;
    the name here takes several tokens, as "pink" does in the shapes vocabulary."""
    name = "zq-pinkish"
    stage = EmbeddingStage(model, None, token=name, vectors=3, init_word="red circle")
    table = model.text_encoder.token_embedding().weight
    red, circle = model.tokenizer.encode("red circle")
    assert torch.equal(stage.embedding.vectors.detach(), table[[red, circle, red]].detach().float())
    with torch.no_grad():
        stage.embedding.vectors.add_(torch.randn_like(stage.embedding.vectors) * 0.5)
    captions = [f"a {name} star left of a {name} square", "two stars", f"{name}"]
    ids, slots = stage._condition(model.tokenizer(captions))
    assert [r for r, _ in slots] == [0, 0, 2]
    vectors = stage.embedding.vectors
    trained = model.text_encoder(ids, fixes=[(r, p, vectors) for r, p in slots])[0]
    assert trained.requires_grad  # the vectors get a gradient through the frozen encoder
    stage.trained_steps = 7
    path = stage.export({}, tmp_path)
    assert path.name == f"{name}.pt"
    embedding = load_embedding(path)
    assert embedding.name == name and embedding.step == 7
    assert torch.equal(embedding.vectors[model.config.text.width], vectors.detach())
    model.embeddings = {name: embedding}
    try:
        assert_close(encode_text(model, captions)[0], trained.detach().float(), rel=1e-6)
    finally:
        model.embeddings = {}
    stage.format = "safetensors"
    assert torch.equal(load_embedding(stage.export({}, tmp_path)).vectors[model.config.text.width], vectors.detach())


def test_substitute_keeps_the_end_token_and_padding():
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0], [1, 5, 6, 5, 6, 9, 9, 2]])
    out, slots = substitute(ids, [5, 6], 1, bos=1, eos=2, pad=0)
    assert out.tolist() == [[1, 0, 7, 2, 0, 0, 0, 0], [1, 0, 0, 9, 9, 2, 0, 0]]
    assert slots == [(0, 1), (1, 1), (1, 2)]
    out, slots = substitute(ids, [5, 6], 3, bos=1, eos=2, pad=0)  # the window overflows: the tail is cut
    assert out.tolist() == [[1, 0, 0, 0, 7, 2, 0, 0], [1, 0, 0, 0, 0, 0, 0, 2]]
    assert slots == [(0, 1), (1, 1), (1, 4)]


# ---- the commands ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_model(1)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh model's zeroed output layers would pass no gradient back to any adapter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sdengine.save(model, root / "base.safetensors")
    return root / "base.safetensors", make_images(root / "data")


def test_train_lora_learns_resumes_exactly_and_loads(capsys, tmp_path, base):
    init, data = base
    args = ["--init", str(init), "--rank", "2", "--conv-rank", "2", "--steps", "4", "--batch", "4", "--save-every",
            "2", "--sample-every", "0"]
    rc, err = train(capsys, "lora", tmp_path / "straight", data, *args)
    assert rc == 0, err
    rc, err = train(capsys, "lora", tmp_path / "paused", data, *args, "--stop-at", "2")
    assert rc == 0, err
    rc, err = train(capsys, "lora", tmp_path / "paused", data, *args, "--resume")
    assert rc == 0, err
    a, b = (read_lora(tmp_path / run / RESULT) for run in ("straight", "paused"))
    assert set(a.layers) == set(b.layers)
    for name, layer in a.layers.items():
        for role, value in layer.tensors.items():
            assert torch.equal(value, b.layers[name].tensors[role]), (name, role)
    assert any(layer.tensors["up"].abs().max() > 0 for layer in a.layers.values())  # it trained
    model = sdengine.load(init)
    assert not LoraPatcher(model).apply([LoraUse(a)]).skipped
    # train unet's loss options reach the adapter stage: other timesteps and weights, another LoRA
    rc, err = train(capsys, "lora", tmp_path / "shifted", data, *args, "--timestep-shift", "3", "--snr-floor", "0.3")
    assert rc == 0, err
    c = read_lora(tmp_path / "shifted" / RESULT)
    assert any(not torch.equal(layer.tensors["up"], c.layers[name].tensors["up"]) for name, layer in a.layers.items())


def test_train_embedding_writes_a_file_prompts_read(capsys, tmp_path, base):
    init, data = base
    rc, err = train(capsys, "embedding", tmp_path / "ti", data, "--init", str(init), "--token", "red", "--vectors",
                    "2", "--steps", "3", "--batch", "4", "--init-word", "blue")
    assert rc == 0, err
    embedding = load_embedding(tmp_path / "ti" / "red.pt")
    model = sdengine.load(init)
    assert embedding.count(model.config.text.width) == 2 and embedding.step == 3
    start = model.text_encoder.token_embedding().weight[model.tokenizer.encode("blue")[0]].float()
    assert not torch.allclose(embedding.vectors[model.config.text.width][0], start)  # it moved


@pytest.mark.parametrize("stage, extra, words, code", [
    ("lora", ["--conv-alpha", "2"], ["--conv-alpha", "--conv-rank"], 1),
    ("lora", [], ["--init"], 2),
    ("lora", ["--token", "x"], ["--token", "train embedding"], 2),
    ("embedding", ["--token", "pink", "--rank", "4"], ["--rank", "train lora"], 2),
    ("embedding", ["--token", "pink", "--vectors", "0"], ["--vectors"], 2),
    ("embedding", ["--token", "pink", "--vectors", "80"], ["--vectors", "1 to 75"], 1),
    ("embedding", ["--token", " "], ["--token"], 1),
])
def test_bad_adapter_options_are_one_line_errors(capsys, tmp_path, base, stage, extra, words, code):
    init, data = base
    with_init = ["--init", str(init)] if words != ["--init"] else []
    rc, err = train(capsys, stage, tmp_path / "bad", data, *with_init, "--steps", "1", "--batch", "4", *extra)
    assert rc == code
    one_error(err, *words)


def test_text_lora_on_a_fused_qkv_encoder_is_refused(model):
    if model.config.text.layout == "clip":
        pytest.skip("a CLIP-layout encoder takes a text LoRA")
    with pytest.raises(ValueError, match="--text-encoder-lr 0"):
        LoraStage(model, None, rank=2, alpha=2, text_lr=1e-4)


def test_eval_applies_lora_and_embedding_files(capsys, tmp_path, base):
    """`sdengine eval --lora FILE:W --embedding FILE`: the pipeline it builds patches the LoRA in through the prompt
    tag (images change) and knows the embedding by its file name."""
    from sdengine.cli.evaluate import adapted_pipeline

    init, data = base
    rc, err = train(capsys, "lora", tmp_path / "l", data, "--init", str(init), "--rank", "2", "--steps", "2",
                    "--batch", "4", "--lr", "0.05")
    assert rc == 0, err
    rc, err = train(capsys, "embedding", tmp_path / "e", data, "--init", str(init), "--token", "red", "--steps", "1",
                    "--batch", "4")
    assert rc == 0, err
    model = sdengine.load(init)
    pipe, tags = adapted_pipeline(model, [(tmp_path / "l" / RESULT, 1.0)], [tmp_path / "e" / "red.pt"])
    assert tags == "<lora:lora:1>"
    fields = dict(steps=2, seed=0, width=32, height=32)
    with_lora = pipe.generate(f"a red square {tags}", **fields)[0]
    plain = pipe.generate("a red square", **fields)[0]
    assert with_lora.tobytes() != plain.tobytes()
    assert "red" in model.embeddings
    rc = sdengine.cli.run(["eval", "--model", str(init), "--lora", str(tmp_path / "missing.safetensors:0.5"),
                           "--out", str(tmp_path / "ev")])
    assert rc != 0
    one_error(capsys.readouterr().err, "--lora", "missing.safetensors")
