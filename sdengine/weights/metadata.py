"""sdengine's safetensors metadata: what tensor shapes cannot tell, in one scheme for whole models and parts.

    sdengine_config     a whole model's ModelConfig (JSON): head split, eps/v, training size
    sdengine_part       a partial-model file (weights/parts.py): {"kind": "vae" | "text" | "unet", "config": {...}}
    sdengine_tokenizer  a model's or text encoder's own (non-CLIP) vocabulary, so one file is the whole thing
    sdengine_tokenizer_2  the same for SDXL's second text encoder (bigG)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..tokenizer import CLIPTokenizer
from .io import CheckpointError

CONFIG_METADATA = "sdengine_config"
PART_METADATA = "sdengine_part"
TOKENIZER_METADATA = "sdengine_tokenizer"
TOKENIZER_2_METADATA = "sdengine_tokenizer_2"
CLIP_VOCAB_SIZE = 49408


def tokenizer_metadata(tokenizer: CLIPTokenizer, key: str = TOKENIZER_METADATA) -> dict[str, str]:
    """Metadata entry carrying a custom vocabulary (the standard CLIP one ships with the package)."""
    if len(tokenizer.vocab) == CLIP_VOCAB_SIZE:
        return {}
    merges = [" ".join(m) for m in tokenizer.merges]
    return {key: json.dumps({"vocab": tokenizer.vocab, "merges": merges})}


def tokenizer_from_metadata(metadata: dict[str, str], pad_with_eos: bool, path: str | Path,
                            key: str = TOKENIZER_METADATA) -> CLIPTokenizer | None:
    """The vocabulary a file carries; None when it carries none (the default CLIP one applies)."""
    if key not in metadata:
        return None
    try:
        spec = json.loads(metadata[key])
        return CLIPTokenizer(spec["vocab"], spec["merges"], pad_with_eos=pad_with_eos)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid {key} metadata ({e})") from None
