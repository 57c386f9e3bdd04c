"""Textual inversion embeddings against diffusers' load_textual_inversion: the A1111 `.pt` layout, diffusers'
learned_embeds and the `emb_params` safetensors on a tiny SD1 pipeline, SDXL's clip_l/clip_g on a tiny SDXL one;
prompt use (weights, chunk boundaries, negative prompts); folder scans as A1111 lists them; bad files."""
from __future__ import annotations

import hashlib

import pytest
import torch
from reference import assert_close
from safetensors.torch import save_file
from sampler_harness import SD15_SCHEDULER_CONFIG, max_rel_error

import sdengine
from sdengine.embeddings import (
    Embedding,
    EmbeddingScan,
    load_embedding,
    model_widths,
    scan_embeddings,
    ti_hashes,
)
from sdengine.prompts import CHUNK, chunk_prompt, embedding_lookup, embeddings_in, encode_text

W, H = 40, 32
WIDTH = 32  # the tiny SD1 text encoder's


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.1


def write_a1111(path, vec: torch.Tensor, **extra) -> None:
    """The layout A1111's Embedding.save writes."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": path.stem, "step": 120,
                "sd_checkpoint": "4c86efd062", "sd_checkpoint_name": "tiny", **extra}, path)


@pytest.fixture(scope="module")
def sd1(sd1_folder, tmp_path_factory):
    """Our model and diffusers' pipeline, each with the same three embeddings: myemb (.pt, 1 vector), trivec
    (.pt, 3 vectors), dfemb (diffusers learned_embeds.safetensors, one (width,) vector) and params (emb_params,
    2 vectors)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("embeddings")
    write_a1111(folder / "myemb.pt", vectors(1, seed=1))
    write_a1111(folder / "trivec.pt", vectors(3, seed=2))
    save_file({"<cat-toy>": vectors(1, seed=3)[0]}, folder / "dfemb.safetensors")
    save_file({"emb_params": vectors(2, seed=4)}, folder / "params.safetensors")
    ref = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_progress_bar_config(disable=True)
    for name in ("myemb", "trivec"):
        ref.load_textual_inversion(str(folder / f"{name}.pt"), token=name)
    for name in ("dfemb", "params"):
        ref.load_textual_inversion(str(folder / f"{name}.safetensors"), token=name)
    model = sdengine.load(sd1_folder)
    scan = scan_embeddings(folder, model_widths(model))
    model.embeddings = scan.loaded
    return {"model": model, "ref": ref, "folder": folder, "scan": scan}


def ref_encode(ref, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ref.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)


@pytest.mark.parametrize("prompt, negative", [
    ("a photo of myemb, red", "blurry"),
    ("trivec in the style of dfemb", "params, ugly trivec"),  # multi-vector; embeddings in the negative prompt
    ("a red circle", "myemb"),
])
def test_prompt_embeddings_match_diffusers(sd1, prompt, negative):
    pos, neg = ref_encode(sd1["ref"], prompt, negative)
    assert_close(encode_text(sd1["model"], [prompt])[0], pos)
    assert_close(encode_text(sd1["model"], [negative])[0], neg)


def test_embedding_changes_the_encoding(sd1):
    """The name's own tokens are not what is encoded: without the embedding the prompt reads differently."""
    model = sd1["model"]
    with_emb = encode_text(model, ["a photo of myemb"])[0]
    saved, model.embeddings = model.embeddings, {}
    try:
        plain = encode_text(model, ["a photo of myemb"])[0]
    finally:
        model.embeddings = saved
    assert (with_emb - plain).abs().max() > 1e-3


def test_two_step_image_matches_diffusers(sd1):
    from sdengine.pipeline import Pipeline
    from sdengine.request import Request

    prompt, negative = "trivec, a photo of myemb", "params"
    expected = sd1["ref"](prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.5,
                          generator=[torch.Generator().manual_seed(3)], height=H, width=W,
                          output_type="latent").images
    ours = Pipeline(sd1["model"]).sample(Request(prompt=prompt, negative_prompt=negative, steps=2, sampler="euler",
                                                 cfg_scale=7.5, seed=3, width=W, height=H))
    assert max_rel_error(ours, expected) < 1e-3


@pytest.mark.parametrize("name", ["myemb", "trivec"])
def test_weight_applies_to_every_vector(sd1, name):
    """`(name:1.2)`: each of the embedding's slots weighed 1.2, then the chunk's mean restored (A1111's
    "Original" emphasis), exactly as the same weights on the unweighted encoding."""
    model = sd1["model"]
    plain = encode_text(model, [f"a photo of {name}"])[0]
    weighted = encode_text(model, [f"a photo of ({name}:1.2)"])[0]
    n = model.embeddings[name].count(WIDTH)
    w = torch.ones(plain.shape[1])
    w[4:4 + n] = 1.2  # start token, "a photo of", then the slots
    expected = plain * w[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    assert_close(weighted, expected, rel=1e-5)
    assert (weighted - plain).abs().max() > 1e-4


def test_embedding_moves_whole_to_the_next_chunk(sd1):
    model, tok = sd1["model"], sd1["model"].tokenizer
    lookup = embedding_lookup(tok, model.embeddings.values(), WIDTH)
    filler = " ".join(["red"] * (CHUNK - 2))  # 73 tokens: the 3-vector embedding would straddle the boundary
    chunks = chunk_prompt(tok, f"{filler} trivec blue", lookup, WIDTH)
    assert [len(c.tokens) for c in chunks] == [CHUNK - 2, 4]
    assert [(p, e.name) for p, e in chunks[1].fixes] == [(0, "trivec")] and chunks[1].tokens[:3] == [0, 0, 0]
    # the single-vector one fits and stays
    chunks = chunk_prompt(tok, f"{filler} myemb blue", lookup, WIDTH)
    assert [len(c.tokens) for c in chunks] == [CHUNK] and chunks[0].fixes[0][0] == CHUNK - 2
    assert encode_text(model, [f"{filler} trivec blue"])[0].shape == (1, 154, WIDTH)
    # moved after the last comma with the words around it (A1111's comma backtrack), its position re-based
    chunks = chunk_prompt(tok, " ".join(["red"] * 70) + ", green trivec blue yellow", lookup, WIDTH)
    assert [len(c.tokens) for c in chunks] == [71, 6] and chunks[1].fixes[0][0] == 1


def test_used_embeddings_and_ti_hashes(sd1):
    model, folder = sd1["model"], sd1["folder"]
    used = embeddings_in(model, "(trivec:1.1), myemb and myemb, not myembx")
    assert [e.name for e in used] == ["trivec", "myemb"]
    sha = hashlib.sha256((folder / "trivec.pt").read_bytes()).hexdigest()
    assert used[0].shorthash == sha[:12]  # A1111's Embedding.shorthash
    assert ti_hashes(used) == f"trivec: {sha[:12]}, myemb: {used[1].shorthash}"
    assert ti_hashes(used + embeddings_in(model, "trivec, ugly")) == ti_hashes(used)  # prompt + negative, once each
    assert embeddings_in(model, "a red circle") == []


def test_a1111_fields_and_scan(sd1, tmp_path):
    scan: EmbeddingScan = sd1["scan"]
    assert list(scan.loaded) == ["dfemb", "myemb", "params", "trivec"] and not scan.errors
    assert scan.api()["loaded"]["trivec"] == {"step": 120, "sd_checkpoint": "4c86efd062",
                                             "sd_checkpoint_name": "tiny", "shape": WIDTH, "vectors": 3}
    assert scan.api()["loaded"]["params"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                              "shape": WIDTH, "vectors": 2}
    # a folder of sub-folders: another width is skipped (with why), a broken file is an error, empty files ignored
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    write_a1111(tmp_path / "sub" / "deeper" / "Good.PT", vectors(2))
    write_a1111(tmp_path / "sub" / "wide.bin", vectors(1, width=48))
    save_file({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)}, tmp_path / "xl.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not scanned")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    scan = scan_embeddings(tmp_path, (WIDTH,))
    assert list(scan.loaded) == ["Good"] and list(scan.skipped) == ["wide", "xl"]
    assert "width 48" in scan.reasons["wide"] and scan.api()["skipped"]["xl"]["shape"] == 2048
    assert list(scan.errors) == [str(tmp_path / "broken.safetensors")]


def test_other_pickled_layouts(tmp_path):
    """diffusers' learned_embeds.bin ({token: (width,)}), a Parameter as A1111's trainer leaves it, and torch's
    legacy (non-zip) pickle format, all through the restricted unpickler."""
    vec = vectors(2)
    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vec)}, "step": 7}, tmp_path / "param.pt")
    torch.save({"string_to_param": {"*": vec.requires_grad_()}, "name": "x"}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    learned = load_embedding(tmp_path / "learned_embeds.bin")
    assert learned.name == "learned_embeds" and torch.equal(learned.vectors[WIDTH], vec[:1])
    assert load_embedding(tmp_path / "param.pt").step == 7
    assert torch.equal(load_embedding(tmp_path / "legacy.pt").vectors[WIDTH], vec)


def test_code_pickle_is_refused_and_nothing_runs(tmp_path):
    import pickle

    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)

    marker = tmp_path / "ran.txt"
    write_a1111(tmp_path / "evil.pt", vectors(1), name=Payload(marker))
    with pytest.raises(ValueError, match="refused"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    scan = scan_embeddings(tmp_path, (WIDTH,))
    assert "refused" in scan.errors[str(tmp_path / "evil.pt")] and not marker.exists()
    # the payload is live: an unrestricted unpickler runs it
    live = tmp_path / "live.txt"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.read_text() == "ran"


def test_bad_files_fail_naming_the_file(tmp_path):
    bad = {
        "nan.pt": lambda p: write_a1111(p, torch.tensor([[0.1, float("nan")]])),
        "inf.safetensors": lambda p: save_file({"emb_params": torch.tensor([[float("inf"), 0.0]])}, p),
        "model.safetensors": lambda p: save_file({f"w{i}": torch.zeros(2) for i in range(5)}, p),
        "ints.pt": lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, 4, dtype=torch.long)}}, p),
        "two.pt": lambda p: torch.save({"string_to_param": {"*": vectors(1), "+": vectors(1)}}, p),
        "list.pt": lambda p: torch.save([vectors(1)], p),
        "same.safetensors": lambda p: save_file({"clip_l": vectors(1), "clip_g": vectors(1)}, p),
        "long.pt": lambda p: write_a1111(p, vectors(76)),
        "text.bin": lambda p: p.write_text("hello"),
    }
    for name, write in bad.items():
        write(tmp_path / name)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_embedding(tmp_path / name)


def test_wrong_width_is_refused_at_encode(sd1, tmp_path):
    write_a1111(tmp_path / "wide.pt", vectors(1, width=48))
    wide = load_embedding(tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt.*width 48.*width 32"):
        wide.check_fits(model_widths(sd1["model"]))
    model = sd1["model"]
    saved, model.embeddings = model.embeddings, {"wide": wide}
    try:
        with pytest.raises(ValueError, match="width 48"):
            encode_text(model, ["wide"])
    finally:
        model.embeddings = saved


def test_prompts_without_embeddings_are_unchanged(sd1):
    """An embedding table present but unused: the encoding is the plain one, bit for bit."""
    model = sd1["model"]
    with_table = encode_text(model, ["a (red:1.3) circle, BREAK blue"])
    saved, model.embeddings = model.embeddings, {}
    try:
        plain = encode_text(model, ["a (red:1.3) circle, BREAK blue"])
    finally:
        model.embeddings = saved
    assert all(torch.equal(a, b) for a, b in zip(with_table, plain))


# --- SDXL: clip_l for CLIP-L, clip_g for bigG -----------------------------------------------------------------

def test_sdxl_clip_l_and_clip_g_match_diffusers(tmp_path):
    """A tiny SDXL pipeline whose encoders differ in width (32 and 48; a file's tensors are told apart by width),
    the file loaded in diffusers once per encoder as its docs show."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from sdxl_helpers import SDXL_UNET, TEXT, perturbed
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFTokenizer

    from sdengine.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                **dict(SDXL_UNET, block_out_channels=(32, 32, 32), attention_head_dim=(1, 1, 1),
                                       layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                                       cross_attention_dim=80, addition_time_embed_dim=256,
                                       projection_class_embeddings_input_dim=48 + 6 * 256))
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32)
    clip_l = perturbed(CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, hidden_act="quick_gelu",
                                                    **TEXT)), 1)
    big_g = perturbed(CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=48, num_attention_heads=2, hidden_act="gelu", projection_dim=48, **TEXT)), 2)
    tokenizers = []
    for pad_with_eos in (True, False):
        CLIPTokenizer.default(pad_with_eos=pad_with_eos).save(tmp_path / f"tok-{pad_with_eos}")
        tokenizers.append(HFTokenizer.from_pretrained(tmp_path / f"tok-{pad_with_eos}"))
    ref = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tokenizers[0],
                                    tokenizer_2=tokenizers[1], unet=unet, scheduler=EulerDiscreteScheduler())
    ref.save_pretrained(tmp_path / "pipe")
    model = sdengine.load(tmp_path / "pipe")
    assert model_widths(model) == (32, 48)

    file = tmp_path / "xlemb.safetensors"
    save_file({"clip_l": vectors(2, 32, seed=5), "clip_g": vectors(2, 48, seed=6)}, file)
    emb = load_embedding(file)
    assert emb.widths == (32, 48) and emb.api_fields()["shape"] == 80 and emb.api_fields()["vectors"] == 2
    ref.load_textual_inversion(vectors(2, 32, seed=5), token="xlemb", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(vectors(2, 48, seed=6), token="xlemb", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    model.embeddings = {"xlemb": emb}
    prompt, negative = "a photo of xlemb, red", "(xlemb:0.9) blurry"
    with torch.no_grad():
        pos, neg, pooled, _ = ref.encode_prompt(prompt, negative_prompt="xlemb blurry",
                                                do_classifier_free_guidance=True)
    context, ours_pooled = encode_text(model, [prompt])
    assert_close(context, pos)
    assert_close(ours_pooled, pooled)
    assert_close(encode_text(model, ["xlemb blurry"])[0], neg)
    assert encode_text(model, [negative])[0].shape == neg.shape
    model.embeddings = {}
    plain, plain_pooled = encode_text(model, [prompt])
    assert (plain - context).abs().max() > 1e-3 and (plain_pooled - ours_pooled).abs().max() > 1e-4
    # an SD1 embedding does not fit SDXL
    assert not Embedding("sd1", {32: vectors(1)}).fits(model_widths(model))
