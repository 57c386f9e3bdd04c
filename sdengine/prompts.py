"""Prompts as AUTOMATIC1111 reads them: emphasis weights, 75-token chunks, BREAK, and named styles.

Weights: `(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` x1.3, `\\(` a literal bracket.
Long prompts are cut into chunks of 75 tokens (at the last comma within 20 tokens of the boundary when there is
one), each encoded as its own 77-token window and concatenated along the sequence, so nothing past 75 tokens is
lost. A prompt of at most 75 tokens with no weights encodes exactly as diffusers' pipeline encodes it.
Textual inversion embeddings (`model.embeddings`, sdengine/embeddings.py) are named in prompts by their name; their
vectors take the place of the name's tokens, as A1111's EmbeddingDatabase and EmbeddingsWithFixes do.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .tokenizer import CLIPTokenizer

if TYPE_CHECKING:  # only the type: embeddings.py reads files through weights/, which leads back here
    from .embeddings import Embedding

CHUNK = 75  # tokens per window, between the start and end tokens
COMMA_BACKTRACK = 20  # how far back a chunk boundary may move to land after a comma
# A1111 has no bound: "BREAK" x 1000 made 1,001 windows, 27 s of text encoding and a 77k-token context (2 GB). 64
# windows (4,800 tokens) is far past any prompt that works, and fails before anything is encoded.
MAX_CHUNKS = 64
ROUND, SQUARE = 1.1, 1 / 1.1
# Emphasis weights are clamped to +-MAX_WEIGHT at every product: 3000 nested brackets, or "(a:1" and 400
# nines, overflowed the weights to inf (NaN after A1111's mean restoring) and gave a black image. A1111 leaves
# them unbounded; no weight near this bound makes a useful image, so nothing that works changes.
MAX_WEIGHT = 100.0

_TOKENS = re.compile(r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\   # escapes
  | \( | \[                                 # openers
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)     # ":1.3)" closes with an explicit weight (a valid number:
                                            # A1111's [.\d]+ lets "(a:1.2.3)" reach float() and fail)
  | \) | \]                                 # closers
  | [^\\()\[\]:]+ | :                       # text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; BREAK becomes the run ("BREAK", -1)."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    breaks: set[int] = set()  # indices of BREAK runs: brackets around a BREAK must not weigh it

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(runs)):
            if i not in breaks:
                runs[i][1] = min(max(runs[i][1] * factor, -MAX_WEIGHT), MAX_WEIGHT)

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            runs.append([tok[1:] if len(tok) > 1 else tok, 1.0])
        elif tok == "(":
            round_open.append(len(runs))
        elif tok == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), min(float(weight), MAX_WEIGHT))  # a 400-digit weight is inf: inf * 0 is NaN
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, a stray closer or a ":" outside a weight
            pieces = _BREAK.split(tok)
            for i, piece in enumerate(pieces):
                if i:
                    breaks.add(len(runs))
                    runs.append(["BREAK", -1.0])
                if piece:
                    runs.append([piece, 1.0])
    for start in round_open:  # unclosed brackets weigh to the end, as in A1111
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    merged: list[list] = []
    for i, (text_, w) in enumerate(runs):
        if merged and merged[-1][1] == w and i not in breaks and i - 1 not in breaks:
            merged[-1][0] += text_
        else:
            merged.append([text_, w])
    return [(t, w) for t, w in merged] or [("", 1.0)]


@dataclass
class Chunk:
    tokens: list[int]
    weights: list[float]
    # textual inversion: (index in tokens, embedding); its vectors fill the placeholder slots from there on
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


# first token of a name -> [(the name's tokens, embedding)], longest names first, for one tokenizer and width
EmbeddingLookup = dict[int, list[tuple[list[int], "Embedding"]]]
PLACEHOLDER = 0  # the id an embedding's slots hold until its vectors replace them (A1111 uses 0 too)


def embedding_lookup(tokenizer: CLIPTokenizer, embeddings: Iterable[Embedding], width: int) -> EmbeddingLookup:
    """Index embeddings by their names' tokens, as A1111's EmbeddingDatabase.register_embedding does; only those
    with vectors for this encoder width."""
    lookup: EmbeddingLookup = {}
    for embedding in embeddings:
        ids = tokenizer.encode(embedding.name)
        if ids and width in embedding.vectors:
            lookup.setdefault(ids[0], []).append((ids, embedding))
    for matches in lookup.values():
        matches.sort(key=lambda m: len(m[0]), reverse=True)
    return lookup


def _find_embedding(lookup: EmbeddingLookup, tokens: list[int], i: int) -> tuple[Embedding | None, int]:
    for ids, embedding in lookup.get(tokens[i], ()):
        if tokens[i:i + len(ids)] == ids:
            return embedding, len(ids)
    return None, 1


def chunk_prompt(tokenizer: CLIPTokenizer, text: str, embeddings: EmbeddingLookup | None = None,
                 width: int = 0) -> list[Chunk]:
    """Weighted prompt -> 75-token chunks (at least one, possibly empty). With an embedding lookup (for the
    encoder of this width), an embedding's name in the prompt takes its n vectors' slots, all with the run's
    weight; one that would straddle a chunk boundary starts the next chunk (A1111's tokenize_line)."""
    chunks: list[Chunk] = []
    cur = Chunk([], [])
    last_comma = -1
    comma = tokenizer.encode(",")[0] if tokenizer.encode(",") else -1

    def close() -> None:
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = Chunk([], []), -1
        if len(chunks) > MAX_CHUNKS:
            raise ValueError(f"the prompt is more than {MAX_CHUNKS} chunks of {CHUNK} tokens long (each BREAK starts "
                             f"a new one): shorten it")

    for piece, weight in parse_weights(text):
        if piece == "BREAK" and weight == -1.0:  # BREAK (not a run weighted -1, as "(cat:-1)" is): new chunk
            close()
            continue
        tokens = tokenizer.encode(piece)
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            embedding, span = _find_embedding(embeddings, tokens, i) if embeddings else (None, 1)
            if tok == comma:
                last_comma = len(cur.tokens)
            elif len(cur.tokens) == CHUNK and last_comma != -1 and len(cur.tokens) - last_comma <= COMMA_BACKTRACK:
                # move the words (and embeddings) after the last comma into the next chunk
                cut = last_comma + 1
                tail = Chunk(cur.tokens[cut:], cur.weights[cut:], [(p - cut, e) for p, e in cur.fixes if p >= cut])
                cur = Chunk(cur.tokens[:cut], cur.weights[:cut], [(p, e) for p, e in cur.fixes if p < cut])
                close()
                cur = tail
            if len(cur.tokens) == CHUNK:
                close()
            i += span
            if embedding is None:
                cur.tokens.append(tok)
                cur.weights.append(weight)
                continue
            n = embedding.count(width)
            if len(cur.tokens) + n > CHUNK:
                close()
            cur.fixes.append((len(cur.tokens), embedding))
            cur.tokens += [PLACEHOLDER] * n
            cur.weights += [weight] * n
    if cur.tokens or not chunks:
        close()
    return chunks


def chunk_ids(tokenizer: CLIPTokenizer, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk as a 77-token window: start, tokens, end, padding; weights 1 outside the tokens."""
    pad = CHUNK - len(chunk.tokens)
    ids = [tokenizer.bos_id] + chunk.tokens + [tokenizer.eos_id] + [tokenizer.pad_id] * pad
    weights = [1.0] + chunk.weights + [1.0] * (pad + 1)
    return torch.tensor(ids), torch.tensor(weights)


@torch.no_grad()
def encode_prompts(model, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1) -> torch.Tensor:
    """Prompts -> context (b, 77 * chunks, width); the batch is padded with empty chunks to one length.

    Emphasis scales each token's hidden state by its weight, then restores the chunk's mean (A1111's
    "Original" emphasis), so weights move attention between words without changing the overall scale.
    """
    return encode_text(model, prompts, clip_skip, min_chunks)[0]


@torch.no_grad()
def encode_text(model, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (context (b, 77 * chunks, width), pooled (b, pooled width)), as encode_prompts reads them, through
    every text encoder of the model with its own tokenizer: SDXL's CLIP-L and bigG each chunk, weigh and encode
    the prompt (A1111 wraps each embedder so), their contexts concatenated along the features as generative-models'
    conditioner does. pooled: the last encoder's, from each prompt's first chunk (SDXL's vector input)."""
    embeddings = _model_embeddings(model)
    contexts, pooled = [], []
    for encoder, tokenizer in zip(model.text_encoders, model.tokenizers):
        width = encoder.config.width
        lookup = embedding_lookup(tokenizer, embeddings, width) if embeddings else None
        per_prompt = [chunk_prompt(tokenizer, p, lookup, width) for p in prompts]
        n = max(min_chunks, max(len(c) for c in per_prompt))
        rows, pooled = [], []
        for chunks in per_prompt:
            chunks = chunks + [Chunk([], [])] * (n - len(chunks))
            ids, weights = zip(*(chunk_ids(tokenizer, c) for c in chunks))
            ids_t = torch.stack(ids).to(model.device)
            w = torch.stack(weights).to(model.device)
            # +1: the start token precedes the chunk's tokens in its window
            fixes = [(row, pos + 1, e.vectors[width]) for row, c in enumerate(chunks) for pos, e in c.fixes]
            z, pool = encoder(ids_t, clip_skip=clip_skip, fixes=fixes or None)
            z = z.float()
            if not torch.all(w == 1.0):  # per chunk, as A1111 does
                mean = z.mean(dim=(1, 2), keepdim=True)
                z = z * w[..., None]
                z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
            rows.append(z.reshape(1, -1, z.shape[-1]))
            pooled.append(pool[:1].float())
        contexts.append(torch.cat(rows))
    return torch.cat(contexts, dim=-1), torch.cat(pooled)


def _model_embeddings(model) -> list[Embedding]:
    """The model's embeddings (`model.embeddings`), each checked to fit its text encoders."""
    embeddings = list(getattr(model, "embeddings", {}).values())
    widths = tuple(encoder.config.width for encoder in model.text_encoders)  # = embeddings.model_widths(model)
    for embedding in embeddings:
        embedding.check_fits(widths)
    return embeddings


def embeddings_in(model, text: str) -> list[Embedding]:
    """The model's embeddings a prompt uses (each once, in order of first use), as the chunker finds them: for
    the "TI hashes" infotext (embeddings.ti_hashes)."""
    embeddings = _model_embeddings(model)
    used: dict[str, Embedding] = {}
    if embeddings:
        for encoder, tokenizer in zip(model.text_encoders, model.tokenizers):
            width = encoder.config.width
            for chunk in chunk_prompt(tokenizer, text, embedding_lookup(tokenizer, embeddings, width), width):
                for _, embedding in chunk.fixes:
                    used.setdefault(embedding.name, embedding)
    return list(used.values())


# --- styles ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def merge_style(style_text: str, text: str) -> str:
    """A style's text around the prompt: at its `{prompt}` placeholder, else appended after a comma."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    return ", ".join(p for p in (text.strip(), style_text.strip()) if p)


def load_styles(path: str | Path) -> dict[str, Style]:
    """Read an A1111 styles.csv (columns name, prompt, negative_prompt)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise ValueError(f"{path}: not a styles file (needs a 'name' column)")
        return {row["name"]: Style(row["name"], row.get("prompt") or "", row.get("negative_prompt") or "")
                for row in reader if row.get("name")}


BUNDLED_STYLES = Path(__file__).parent / "assets" / "styles.csv"


def apply_styles(prompt: str, negative: str, names: list[str], styles: dict[str, Style]) -> tuple[str, str]:
    for name in names:
        if name not in styles:
            raise ValueError(f"unknown style {name!r}; known: {', '.join(sorted(styles)) or 'none'}")
        prompt = merge_style(styles[name].prompt, prompt)
        negative = merge_style(styles[name].negative_prompt, negative)
    return prompt, negative
