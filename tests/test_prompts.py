"""Prompts as AUTOMATIC1111 reads them: emphasis parsing, 75-token chunks, BREAK, styles, and the conditioning
they produce (checked against the text encoder itself and transformers' CLIPTextModel, diffusers' encoder)."""
from __future__ import annotations

import pytest
import torch

import sdengine
from sdengine.pipeline import Pipeline, Request
from sdengine.prompts import (
    BUNDLED_STYLES,
    CHUNK,
    apply_styles,
    chunk_ids,
    chunk_prompt,
    encode_prompts,
    load_styles,
    parse_weights,
)


@pytest.fixture(scope="module")
def model(sd1_folder):
    return sdengine.load(sd1_folder)


def approx_runs(runs):
    return [(t, pytest.approx(w)) for t, w in runs]


# ---- parse_weights: A1111's documented examples (modules/prompt_parser.py) ---------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    # nesting multiplies, [] divides by 1.1, explicit weights replace the 1.1 of their own bracket
    ("((a))", [("a", 1.21)]),
    ("(((a)))", [("a", 1.331)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.21)]),
    ("([a])", [("a", 1.0)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("((a:1.3))", [("a", 1.43)]),
    ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
    # escapes stay literal, also inside weighted groups
    (r"\(a\) (b\)c)", [("(a) ", 1.0), ("b)c", 1.1)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    # unbalanced: an unclosed opener weighs to the end, a stray closer is text
    ("a (b c", [("a ", 1.0), ("b c", 1.1)]),
    ("a [b c", [("a ", 1.0), ("b c", 1 / 1.1)]),
    ("a b) c]", [("a b) c]", 1.0)]),
    # a ':' in normal text (and one not followed by a number inside brackets) is just text
    ("time: noon, ratio 16:9", [("time: noon, ratio 16:9", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:1.2.3) b", [("a:1.2.3", 1.1), (" b", 1.0)]),  # not a number: text, not a float() crash
    ("(a:.)", [("a:.", 1.1)]),
    ("(a:.5) (b:+2.) (c:-0.5)", [("a", 0.5), (" ", 1.0), ("b", 2.0), (" ", 1.0), ("c", -0.5)]),
    # BREAK (upper case, a whole word) splits; other spellings are text
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("(red BREAK blue)", [("red", 1.1), ("BREAK", -1.0), ("blue", 1.1)]),
    ("break BREAKFAST", [("break BREAKFAST", 1.0)]),
    ("a (cat:-1) dog", [("a ", 1.0), ("cat", -1.0), (" dog", 1.0)]),  # a weight of -1 is no BREAK
    ("", [("", 1.0)]),
])
def test_parse_weights(text, expected):
    assert parse_weights(text) == approx_runs(expected)


# ---- conditioning ---------------------------------------------------------------------------------------------

def reference_encoder(folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTextModel.from_pretrained(folder / "text_encoder")


@pytest.mark.parametrize("n_words", [12, 75])
def test_plain_prompt_equals_text_encoder_and_diffusers(reference, n_words):
    """SD1 pads with the end token, SD2 with "!" (id 0): both as diffusers' tokenizer does."""
    model = sdengine.load(reference["folder"])
    prompt = "a photo of an astronaut, " + " ".join(words(n_words - 6))
    assert len(model.tokenizer.encode(prompt)) == n_words  # 75: the most that fits one chunk
    ours = encode_prompts(model, [prompt])
    ids = model.tokenizer([prompt], max_length=77)
    assert ours.shape == (1, 77, model.config.text.width)
    assert torch.equal(ours, model.text_encoder(ids)[0].float())
    # what diffusers' encode_prompt does: the tokenizer padded/truncated to 77, last_hidden_state
    tok, text_model = reference_encoder(reference["folder"])
    ref_ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ref_ids, ids)
    with torch.no_grad():
        ref = text_model(ref_ids)[0]
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_weight_one_is_plain_and_weights_follow_a1111_emphasis(model):
    assert torch.equal(encode_prompts(model, ["(a:1.0)"]), encode_prompts(model, ["a"]))
    assert torch.equal(encode_prompts(model, ["a (cat:1.0) on a mat"]), encode_prompts(model, ["a cat on a mat"]))
    plain = encode_prompts(model, ["a cat on a mat"])
    weighted = encode_prompts(model, ["a (cat:1.5) on a mat"])
    assert not torch.allclose(weighted, plain)
    # A1111 "Original" emphasis: scale each token's state by its weight, then restore the chunk's mean
    w = torch.ones(77)
    w[1 + len(model.tokenizer.encode("a "))] = 1.5  # bos, "a", then "cat"
    scaled = plain * w[None, :, None]
    assert torch.allclose(weighted, scaled * plain.mean() / scaled.mean(), atol=1e-6)


def test_clip_skip_changes_the_conditioning(model):
    ids = model.tokenizer(["a cat"], max_length=77)
    skip2 = encode_prompts(model, ["a cat"], clip_skip=2)
    assert not torch.allclose(skip2, encode_prompts(model, ["a cat"]))
    assert torch.equal(skip2, model.text_encoder(ids, clip_skip=2)[0].float())


def words(n: int, start: int = 0) -> list[str]:
    """n distinct words that are one token each."""
    vocab = ["cat", "dog", "tree", "house", "red", "blue", "green", "sky", "sun", "moon", "star", "road", "car",
             "boat", "fish", "bird", "hill", "lake", "rock", "snow"]
    return [vocab[(start + i) % len(vocab)] for i in range(n)]


def test_long_prompt_two_chunks_nothing_lost(model):
    tok = model.tokenizer
    prompt = " ".join(words(90))
    assert len(tok.encode(prompt)) == 90
    chunks = chunk_prompt(tok, prompt)
    assert [len(c.tokens) for c in chunks] == [75, 15]  # no comma: a hard cut at 75
    assert sum((c.tokens for c in chunks), []) == tok.encode(prompt)
    cond = encode_prompts(model, [prompt])
    assert cond.shape == (1, 2 * 77, model.config.text.width)
    # each half is that chunk's own 77-token window through the encoder
    for i, chunk in enumerate(chunks):
        ids, _ = chunk_ids(tok, chunk)
        assert torch.equal(cond[0, 77 * i: 77 * (i + 1)], model.text_encoder(ids[None])[0][0].float())


@pytest.mark.parametrize("comma_at, first", [(70, 71), (55, 56), (54, 75), (40, 75)])
def test_chunk_breaks_after_last_comma_within_20_tokens(model, comma_at, first):
    tok = model.tokenizer
    prompt = " ".join(words(comma_at)) + ", " + " ".join(words(90 - comma_at, start=3))
    ids = tok.encode(prompt)
    assert len(ids) == 91 and ids[comma_at] == tok.encode(",")[0]
    chunks = chunk_prompt(tok, prompt)
    assert len(chunks[0].tokens) == first
    assert sum((c.tokens for c in chunks), []) == ids
    assert all(len(c.tokens) <= CHUNK for c in chunks)


def test_break_forces_a_new_chunk(model):
    tok = model.tokenizer
    chunks = chunk_prompt(tok, "a red cat BREAK a (blue:1.2) dog")
    assert [c.tokens for c in chunks] == [tok.encode("a red cat"), tok.encode("a blue dog")]
    assert chunks[1].weights == [1.0, 1.2, 1.0]
    # a BREAK inside brackets still breaks (A1111 weighs it to -1.1 and encodes the word); weight -1 does not
    chunks = chunk_prompt(tok, "(a red cat BREAK a dog)")
    assert [c.tokens for c in chunks] == [tok.encode("a red cat"), tok.encode("a dog")]
    assert chunks[1].weights == pytest.approx([1.1, 1.1])
    assert [c.weights for c in chunk_prompt(tok, "a (cat:-1) dog")] == [[1.0, -1.0, 1.0]]
    cond = encode_prompts(model, ["a red cat BREAK a dog"])
    assert cond.shape[1] == 154
    assert torch.equal(cond[:, :77], encode_prompts(model, ["a red cat"]))
    assert torch.equal(cond[:, 77:], encode_prompts(model, ["a dog"]))


def test_batch_padded_with_empty_chunks(model):
    long = " ".join(words(100))
    both = encode_prompts(model, ["a cat", long])
    assert both.shape[:2] == (2, 154)
    assert torch.equal(both[0, :77], encode_prompts(model, ["a cat"])[0])
    assert torch.equal(both[0, 77:], encode_prompts(model, [""])[0])
    assert encode_prompts(model, ["a cat"], min_chunks=3).shape[1] == 231


@pytest.mark.parametrize("prompt, negative", [("a cat", " ".join(words(100))), (" ".join(words(100)), "blurry")])
def test_pipeline_pads_prompt_and_negative_to_one_length(model, prompt, negative):
    pipe = Pipeline(model)
    req = Request(prompt=prompt, negative_prompt=negative, steps=2, width=32, height=32, seed=1)
    latents = pipe.sample(req)
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
    # the longer text matters: it is not truncated to the other's length
    cut = lambda text: " ".join(text.split()[:75])  # noqa: E731
    short = pipe.sample(Request(prompt=cut(prompt), negative_prompt=cut(negative), steps=2, width=32, height=32,
                                seed=1))
    assert not torch.allclose(latents, short)


# ---- styles ---------------------------------------------------------------------------------------------------

def test_bundled_styles_load():
    styles = load_styles(BUNDLED_STYLES)
    assert {"photo", "anime", "oil painting", "quality"} <= set(styles)
    assert styles["quality"].prompt == "" and "lowres" in styles["quality"].negative_prompt


def test_style_placeholder_append_and_order(tmp_path):
    styles = load_styles(BUNDLED_STYLES)
    p, n = apply_styles("a cat", "", ["oil painting"], styles)
    assert p == "oil painting of a cat, visible brush strokes, rich texture"
    assert n == "photo, 3d render, blurry"
    p, n = apply_styles("a cat", "ugly", ["quality"], styles)  # empty style prompt: prompt unchanged
    assert p == "a cat" and n == "ugly, " + styles["quality"].negative_prompt
    # several styles apply in the order given, each around the result of the last
    p, _ = apply_styles("a cat", "", ["photo", "cinematic"], styles)
    assert p.startswith("cinematic still of a cat, photograph, 50mm lens")
    assert p.endswith("film grain")
    # no placeholder: appended after a comma
    csv = tmp_path / "styles.csv"
    csv.write_text('name,prompt,negative_prompt\nsharp,"highly detailed, 8k",\n', encoding="utf-8")
    assert apply_styles(" a cat ", "", ["sharp"], load_styles(csv)) == ("a cat, highly detailed, 8k", "")
    assert apply_styles("", "", ["sharp"], load_styles(csv)) == ("highly detailed, 8k", "")


def test_unknown_style_lists_known_ones():
    with pytest.raises(ValueError, match="unknown style 'nope'.*anime.*photo"):
        apply_styles("a cat", "", ["nope"], load_styles(BUNDLED_STYLES))


def test_not_a_styles_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("title,text\nx,y\n")
    with pytest.raises(ValueError, match="not a styles file"):
        load_styles(bad)


def test_prompts_of_too_many_chunks_fail_before_encoding(sd1_folder, monkeypatch):
    """BREAK x 1000 made 1,001 windows (27 s, 2 GB) before the bound; now it is refused before any encoding."""
    import sdengine
    from sdengine.nn.clip import TextEncoderBase
    from sdengine.pipeline import Pipeline
    from sdengine.prompts import MAX_CHUNKS

    pipe = Pipeline(sdengine.load(sd1_folder))
    calls = []
    original = TextEncoderBase.forward
    monkeypatch.setattr(TextEncoderBase, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with pytest.raises(ValueError, match=f"more than {MAX_CHUNKS} chunks"):
        pipe.generate("a BREAK " * 1000, steps=1, width=16, height=16)
    assert not calls
    assert pipe.generate("a " + "BREAK b " * (MAX_CHUNKS - 1), steps=1, width=16, height=16)
