"""sdengine.tokenizer vs transformers' CLIPTokenizer (the oracle), on the bundled CLIP vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sdengine.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer

transformers = pytest.importorskip("transformers")

LONG = ", ".join(f"masterpiece number {i} with intricate detail" for i in range(20))  # ~140 tokens
TEXTS = [
    "a photo of a cat",
    "A PHOTO of a Cat, HDR; 4K!!!",
    "Hello, World! What's up?? ... --- ***",
    "café naïve Ångström résumé",
    "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",  # decomposed: NFC must compose them
    "🙂🐱 emoji 👨‍👩‍👧 family ❤️",
    "日本語のテキスト 中文 한국어 Ελληνικά русский العربية",
    "  lots   of\twhitespace\n\nnew\r\nlines \u00a0nbsp\u2003em\u200bzero-width  ",
    "",
    "   \t\n ",
    "1234 3.14 1,000,000 2nd 10x",
    "don't it's we're I'M they'll she'd you've DON'T",
    "&amp; &lt;b&gt; &#39; &quot;",
    "##hashtag #1 # … #…",  # CLIP merges that start with '#' (not comments!)
    "hi!! wow! !",
    "<|startoftext|> literal <|endoftext|> tokens <|ENDOFTEXT|> <|STARTOFTEXT|>",
    "(masterpiece:1.2), [bad hands], {x|y}, a_b-c/d\\e~g`h^",
    "ﬁ ligature ½ ² ß ẞ İstanbul ǅ",
    "\x00\x07 control \u0301 lone combining",
    LONG,
]


def _hf(folder: Path, cls: type | None = None):
    return (cls or transformers.CLIPTokenizer).from_pretrained(str(folder))


@pytest.fixture(scope="module")
def ours() -> dict[bool, CLIPTokenizer]:
    return {pad: CLIPTokenizer.default(pad_with_eos=pad) for pad in (True, False)}


@pytest.fixture(scope="module")
def saved(ours, tmp_path_factory) -> dict[bool, Path]:
    out = {}
    for pad, tok in ours.items():
        out[pad] = tmp_path_factory.mktemp(f"tok_pad_eos_{pad}")
        tok.save(out[pad])
    return out


@pytest.fixture(scope="module")
def theirs(saved) -> dict[bool, object]:
    return {pad: _hf(folder) for pad, folder in saved.items()}


def test_default_vocab_is_standard_clip(ours):
    tok = ours[True]
    assert len(tok.vocab) == 49408 and len(tok.merges) == 48894
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, ours[False].pad_id) == (49406, 49407, 49407, 0)
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256 and tok.vocab["jekyll</w>"] == 49405


def test_transformers_has_one_clip_tokenizer():
    # transformers 5 dropped the slow (Python, ftfy) CLIPTokenizer: the Fast name is an alias.
    assert getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer) is transformers.CLIPTokenizer


@pytest.mark.parametrize("pad", [True, False], ids=["pad_eos", "pad_0"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_transformers(ours, theirs, pad, text):
    assert ours[pad].encode(text) == theirs[pad](text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("pad", [True, False], ids=["pad_eos", "pad_0"])
@pytest.mark.parametrize("max_length", [77, 8])
def test_call_matches_transformers(ours, theirs, pad, max_length):
    got = ours[pad](TEXTS, max_length=None if max_length == 77 else max_length)
    want = theirs[pad](TEXTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    assert got.dtype == torch.long and got.shape == (len(TEXTS), max_length)
    assert torch.equal(got, want["input_ids"])


@pytest.mark.parametrize("pad", [True, False], ids=["pad_eos", "pad_0"])
def test_random_text_matches_transformers(ours, theirs, pad):
    rng = random.Random(pad)
    pools = ["abcXYZ", " \t\n\r\u00a0\u3000", "0123456789", "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éÅİßﬁ½\u0301",
             "日本語한국어", "🙂👨‍👩‍👧❤️\ufe0f", "'s 't <|endoftext|> <|startoftext|>"]

    def char() -> str:
        c = chr(rng.randrange(1, 0x2FFFF))  # any code point but surrogates, which no tokenizer accepts
        return rng.choice(rng.choice(pools)) if rng.random() < 0.8 or 0xD800 <= ord(c) < 0xE000 else c

    texts = ["".join(char() for _ in range(rng.randrange(40))) for _ in range(300)]
    assert [ours[pad].encode(t) for t in texts] == theirs[pad](texts, add_special_tokens=False)["input_ids"]


def test_call_layout(ours):
    tok = ours[True]
    long = tok(LONG)
    assert long.shape == (1, 77) and len(tok.encode(LONG)) > 77
    assert long[0, 0] == tok.bos_id and long[0, -1] == tok.eos_id and long[0, 1:-1].tolist() == tok.encode(LONG)[:75]
    empty = ours[False]("")
    assert empty[0, :2].tolist() == [49406, 49407] and (empty[0, 2:] == 0).all()
    assert tok([]).shape == (0, 77)
    with pytest.raises(ValueError, match="max_length"):
        tok("x", max_length=1)


def test_autotokenizer_and_decode(ours, saved):
    auto = transformers.AutoTokenizer.from_pretrained(str(saved[True]))
    for text in TEXTS:
        ids = ours[True].encode(text)
        assert ids == auto(text, add_special_tokens=False)["input_ids"]
        assert ours[True].decode(ids) == auto.decode(ids, skip_special_tokens=True)
    assert ours[True].decode(ours[True]("a photo of a CAT!")[0].tolist()) == "a photo of a cat !"


@pytest.mark.parametrize("pad", [True, False], ids=["pad_eos", "pad_0"])
def test_from_dir_round_trip(ours, saved, pad):
    tok = CLIPTokenizer.from_dir(saved[pad])
    assert tok.pad_with_eos is pad and tok.vocab == ours[pad].vocab and tok.merges == ours[pad].merges
    assert torch.equal(tok(TEXTS), ours[pad](TEXTS))
    assert CLIPTokenizer.from_dir(saved[pad], pad_with_eos=not pad).pad_with_eos is (not pad)  # explicit wins
    again = CLIPTokenizer.from_files(saved[pad] / "vocab.json", saved[pad] / "merges.txt")
    assert again.pad_with_eos is True and again.encode(LONG) == ours[pad].encode(LONG)


def test_from_dir_transformers5_folder(saved, tmp_path):
    # transformers 5 save_pretrained writes only tokenizer.json (+ tokenizer_config.json).
    _hf(saved[False]).save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    tok, ref = CLIPTokenizer.from_dir(tmp_path), _hf(tmp_path)
    assert tok.pad_with_eos is False
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_from_dir_legacy_sd15_folder(saved, tmp_path):
    # The SD1.x diffusers tokenizer folder: AddedToken dicts marked normalized, pad only as a string.
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((saved[True] / name).read_bytes())

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    special = {"bos_token": added(BOS_TOKEN), "eos_token": added(EOS_TOKEN), "unk_token": added(EOS_TOKEN),
               "pad_token": "<|endoftext|>"}
    cfg = {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
           "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    tok, ref = CLIPTokenizer.from_dir(tmp_path), _hf(tmp_path)
    assert tok.pad_with_eos is True
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    # bos is 'normalized' there, so transformers matches it case-insensitively; eos is not (pad string wins).
    assert tok.encode("<|STARTOFTEXT|> <|ENDOFTEXT|>")[0] == 49406
    tok.save(tmp_path / "resaved")  # keeps that flag
    assert _hf(tmp_path / "resaved")("<|STARTOFTEXT|> x", add_special_tokens=False)["input_ids"] == [49406, 343]


def test_pad_token_from_special_tokens_map(saved, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((saved[True] / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    assert CLIPTokenizer.from_dir(tmp_path).pad_with_eos is False
    expected = _hf(tmp_path)("wow!", add_special_tokens=False)["input_ids"]
    assert CLIPTokenizer.from_dir(tmp_path).encode("wow!") == expected


def _copy(src: Path, dst: Path) -> Path:
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    "case, exc, file",
    [
        ("no_dir", FileNotFoundError, "nowhere"),
        ("no_vocab", FileNotFoundError, "vocab.json"),
        ("no_merges", FileNotFoundError, "merges.txt"),
        ("vocab_not_json", ValueError, "vocab.json"),
        ("vocab_is_list", ValueError, "vocab.json"),
        ("vocab_no_specials", ValueError, "vocab.json"),
        ("merge_three_parts", ValueError, "merges.txt"),
        ("merge_unknown_token", ValueError, "merges.txt"),
        ("config_not_json", ValueError, "tokenizer_config.json"),
        ("odd_pad_token", ValueError, "pad_token"),
    ],
)
def test_bad_input(saved, tmp_path, case, exc, file):
    d = _copy(saved[True], tmp_path)
    vocab, merges = d / "vocab.json", d / "merges.txt"
    if case == "no_dir":
        d = tmp_path / "nowhere"
    elif case == "no_vocab":
        vocab.unlink()
    elif case == "no_merges":
        merges.unlink()
    elif case == "vocab_not_json":
        vocab.write_text("{not json")
    elif case == "vocab_is_list":
        vocab.write_text("[1, 2]")
    elif case == "vocab_no_specials":
        vocab.write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
        merges.write_text("#version: 0.2\na b\n")
    elif case == "merge_three_parts":
        merges.write_text("#version: 0.2\ni n\na b c\n")
    elif case == "merge_unknown_token":
        merges.write_text("#version: 0.2\ni n\nzzqx yy\n")
    elif case == "config_not_json":
        (d / "tokenizer_config.json").write_text("{")
    elif case == "odd_pad_token":
        (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(exc) as info:
        CLIPTokenizer.from_dir(d)
    msg = str(info.value)
    assert file in msg and "\n" not in msg


def test_trained_vocabulary_makes_each_seen_word_one_token(tmp_path):
    """CLIPTokenizer.train (what `sdengine train text` uses): CLIP's format and pipeline, every caption word a single
    token, unseen text still encoded byte by byte, and the folder it saves reads back the same."""
    captions = ["a red circle above a blue square", "two  GREEN stars", "a big purple square on a black background"]
    tok = CLIPTokenizer.train(captions, extra_words=["yellow"])
    for word in {w for c in captions for w in c.lower().split()} | {"yellow"}:
        assert len(tok.encode(word)) == 1, word
    assert tok.encode("two green stars") == tok.encode("Two   green STARS")  # CLIP's normalizer
    assert len(tok.encode("zebra")) > 1 and tok.decode(tok.encode("zebra")) == "zebra"
    tok.save(tmp_path / "tok")
    again = CLIPTokenizer.from_dir(tmp_path / "tok")
    assert again.vocab == tok.vocab and again(captions).tolist() == tok(captions).tolist()
