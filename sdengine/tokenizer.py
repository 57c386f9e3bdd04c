"""CLIP byte-level BPE tokenizer on the `tokenizers` library.

Gives ids identical to transformers' ``CLIPTokenizer`` (v5, which is itself `tokenizers`-backed) without
importing transformers: the same normalizer, pre-tokenizer, BPE model and special-token handling are rebuilt
here. The default vocabulary is derived from the bundled CLIP merges exactly as OpenAI's SimpleTokenizer does.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
ZERO_PAD_TOKEN = "!"  # id 0: the pad token of SD2 / OpenCLIP tokenizer folders
MERGES_ASSET = Path(__file__).parent / "assets" / "clip_merges.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocab: 256 bytes x2 (plain and "</w>") + merges + 2 specials = 49408

# CLIP's word-split regex, as transformers writes it; specials come first so they are never split.
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

Merges = list[tuple[str, str]] | list[str]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char map; its order fixes the first 256 vocab ids."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Build the vocabulary the way CLIP's SimpleTokenizer does: bytes, bytes+</w>, joined merges, specials."""
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def _parse_merges(lines: Sequence[str], source: str) -> list[tuple[str, str]]:
    """Parse merges.txt lines. Only a leading '#version' line is a comment: real merges such as '# #</w>'
    also start with '#'. The tokenizers Rust reader skips just that header too."""
    out: list[tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{source}: malformed merge on line {n}: {line!r} (expected 'a b')")
        out.append((parts[0], parts[1]))
    return out


@lru_cache(maxsize=1)
def _default_merges() -> tuple[tuple[str, str], ...]:
    with gzip.open(MERGES_ASSET, "rt", encoding="utf-8") as f:
        merges = _parse_merges(f.read().split("\n"), str(MERGES_ASSET))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{MERGES_ASSET}: expected {NUM_MERGES} merges, found {len(merges)}")
    return tuple(merges)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_str(value: object) -> str | None:
    """A special token as stored in HF configs: a plain string or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _json_obj(path: Path) -> dict:
    obj = _read_json(path) if path.is_file() else {}
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


def _dir_specials(path: Path) -> tuple[str | None, dict[str, bool]]:
    """(pad token, {special token: normalized?}) of a HF tokenizer folder, resolved as transformers 5 does:
    special_tokens_map.json overrides tokenizer_config.json unless the config has 'added_tokens_decoder'
    (whose flags then win); the last definition of a token wins. Old SD1.x folders mark bos 'normalized',
    so transformers also matches "<|STARTOFTEXT|>" there: we must too."""
    cfg = _json_obj(path / "tokenizer_config.json")
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        entries = list(decoder.values())
    else:
        cfg.update({k: v for k, v in _json_obj(path / "special_tokens_map.json").items() if k in _SPECIAL_ATTRS})
        entries = _json_obj(path / "tokenizer.json").get("added_tokens") or []
    known = {e["content"]: bool(e.get("normalized", False)) for e in entries if isinstance(e, dict) and "content" in e}
    flags: dict[str, bool] = {}
    for key in _SPECIAL_ATTRS:
        value, content = cfg.get(key), _token_str(cfg.get(key))
        if content is not None:  # a plain string becomes an unnormalized special token in transformers
            flags.pop(content, None)
            own = bool(value.get("normalized", False)) if isinstance(value, dict) else False
            flags[content] = known.get(content, own)
    return _token_str(cfg.get("pad_token")), flags


def _with_clip_pipeline(tok: Tokenizer) -> Tokenizer:
    """CLIP's text pipeline before BPE, for our tokenizers and for training a vocabulary alike."""
    # NFC, whitespace runs -> one space, lowercase: transformers' CLIP normalizer (ftfy is not used).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    # Keep only regex matches (whitespace is dropped), then map bytes to CLIP's unicode alphabet.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return tok


class CLIPTokenizer:
    """CLIP tokenizer: ``encode`` gives raw BPE ids; calling it gives the (B, 77) bos/eos/padded id tensor."""

    def __init__(self, vocab: dict[str, int], merges: Merges, pad_with_eos: bool = True, max_length: int = 77):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for bos and eos), got {max_length}")
        merge_pairs = _parse_merges(merges, "merges") if merges and isinstance(merges[0], str) else list(merges)
        for tok in (BOS_TOKEN, EOS_TOKEN):
            if tok not in vocab:
                raise ValueError(f"vocab lacks the special token {tok!r}")
        if not pad_with_eos and vocab.get(ZERO_PAD_TOKEN) != 0:
            raise ValueError(f"pad_with_eos=False pads with {ZERO_PAD_TOKEN!r}, which must have id 0 in the vocab")
        self.vocab = dict(vocab)
        self.merges: list[tuple[str, str]] = [tuple(m) for m in merge_pairs]  # type: ignore[misc]
        self.pad_with_eos = pad_with_eos
        self.max_length = max_length
        self.bos_id, self.eos_id = self.vocab[BOS_TOKEN], self.vocab[EOS_TOKEN]
        self.pad_id = self.eos_id if pad_with_eos else 0
        try:
            model = BPE(vocab=self.vocab, merges=self.merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN)
        except Exception as e:  # e.g. a merge whose parts are not in the vocab
            raise ValueError(f"invalid vocab/merges: {e}") from None
        tok = _with_clip_pipeline(Tokenizer(model))
        tok.decoder = decoders.ByteLevel()
        # transformers registers bos/eos/pad as special added tokens (unnormalized), so a literal
        # "<|endoftext|>" in a prompt becomes the eos id ("<|ENDOFTEXT|>" does not). With pad "!" this means
        # every "!" is split off as id 0 ("wow!" -> [2781, 0], not [2781, 256] as OpenCLIP gives): a
        # transformers quirk that diffusers' SD2 pipelines inherit, reproduced here for identical ids.
        specials = [BOS_TOKEN, EOS_TOKEN] + ([] if pad_with_eos else [ZERO_PAD_TOKEN])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self._tok = tok

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kw) -> CLIPTokenizer:
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        vocab = _read_json(vocab_json)
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
            raise ValueError(f"{vocab_json}: expected a JSON object mapping token strings to integer ids")
        try:
            text = merges_txt.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{merges_txt}: file not found") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges_txt}: not UTF-8 text ({e})") from None
        merges = _parse_merges(text.split("\n"), str(merges_txt))
        missing = next((m for m in merges if m[0] not in vocab or m[1] not in vocab or "".join(m) not in vocab), None)
        if missing is not None:
            raise ValueError(f"{merges_txt}: merge {' '.join(missing)!r} uses tokens missing from {vocab_json.name}")
        for tok in (BOS_TOKEN, EOS_TOKEN):
            if tok not in vocab:
                raise ValueError(f"{vocab_json}: lacks the special token {tok!r}")
        return cls(vocab, merges, **kw)

    @classmethod
    def from_dir(cls, path: str | Path, **kw) -> CLIPTokenizer:
        """Load a diffusers/HF tokenizer folder (vocab.json + merges.txt [+ tokenizer_config.json ...])."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: tokenizer folder not found")
        pad, flags = _dir_specials(path)
        if "pad_with_eos" not in kw and pad is not None:
            if pad not in (EOS_TOKEN, ZERO_PAD_TOKEN):
                raise ValueError(f"{path}: unsupported pad_token {pad!r} (expected {EOS_TOKEN!r} or "
                                 f"{ZERO_PAD_TOKEN!r}); pass pad_with_eos explicitly")
            kw["pad_with_eos"] = pad == EOS_TOKEN
        if not (path / "vocab.json").exists() and (path / "tokenizer.json").is_file():
            tok = cls._from_tokenizer_json(path / "tokenizer.json", **kw)
        else:
            tok = cls.from_files(path / "vocab.json", path / "merges.txt", **kw)
        ours = {t.content for t in tok._tok.get_added_tokens_decoder().values()}
        tok._tok.add_special_tokens([AddedToken(c, special=True, normalized=n) for c, n in flags.items() if c in ours])
        return tok

    @classmethod
    def _from_tokenizer_json(cls, file: Path, **kw) -> CLIPTokenizer:
        """transformers 5's save_pretrained writes only tokenizer.json: take the BPE vocab and merges from it."""
        data = _read_json(file)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ValueError(f"{file}: expected a BPE tokenizer.json")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ValueError(f"{file}: model.vocab / model.merges missing or malformed")
        pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise ValueError(f"{file}: malformed entry in model.merges")
        try:
            return cls(vocab, [(a, b) for a, b in pairs], **kw)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    @classmethod
    def default(cls, **kw) -> CLIPTokenizer:
        """The standard 49408-token CLIP vocabulary, bundled with the package (works offline)."""
        merges = list(_default_merges())
        return cls(vocab_from_merges(merges), merges, **kw)

    @classmethod
    def train(cls, texts: Sequence[str], extra_words: Sequence[str] = (), **kw) -> CLIPTokenizer:
        """A small byte-level BPE vocabulary in CLIP's format learned from `texts` (`sdengine train text`): every
        word seen becomes a single token; anything else still encodes, byte by byte."""
        tok = _with_clip_pipeline(Tokenizer(BPE(end_of_word_suffix="</w>")))
        words = sorted({w for t in texts for w in t.lower().split()} | set(extra_words))
        trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                      end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(texts) + words * 2, trainer)
        merges = json.loads(tok.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        return cls(vocab_from_merges(merges), merges, **kw)

    # ---- encoding -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no bos/eos, no truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens dropped; word ends ("</w>") become spaces, as in transformers."""
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return text.replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """(B, max_length) LongTensor: bos, ids, eos, then pad; long texts are cut so eos stays last."""
        if isinstance(texts, str):
            texts = [texts]
        n = self.max_length if max_length is None else max_length
        if n < 2:
            raise ValueError(f"max_length must be >= 2 (room for bos and eos), got {n}")
        out = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_id, *enc.ids[: n - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    # ---- saving -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write a folder that transformers' CLIPTokenizer.from_pretrained (and from_dir) can read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (path / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        pad = EOS_TOKEN if self.pad_with_eos else ZERO_PAD_TOKEN
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad}

        # Our special tokens with their flags (a legacy folder's 'normalized' bos survives a from_dir -> save).
        decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                            "single_word": t.single_word, "special": True}
                   for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special,
                  "added_tokens_decoder": decoder,
                  "clean_up_tokenization_spaces": False, "do_lower_case": True, "errors": "replace"}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
