"""Wildcards and variants, as the Dynamic Prompts extension reads them: `__name__` is a random line of
`<wildcards folder>/name.txt` (subfolders: `__colors/warm__`), `{a|b|c}` one of the options, chosen by a generator
seeded from the image's seed so a seed always makes the same choice. A chosen line may hold wildcards and variants
itself (up to MAX_DEPTH levels: a file that names itself cannot loop). The prompt written into the image's
parameters is the chosen one, as Dynamic Prompts writes it.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

WILDCARD = re.compile(r"__([\w\-./]+?)__")
VARIANT = re.compile(r"\{([^{}]*)\}")
MAX_DEPTH = 10


def has_wildcards(prompt: str) -> bool:
    return bool(WILDCARD.search(prompt) or VARIANT.search(prompt))


def _lines(folder: Path, name: str) -> list[str]:
    path = (folder / f"{name}.txt").resolve()
    if folder.resolve() not in path.parents:  # names only: never a path out of the folder
        raise ValueError(f"wildcard __{name}__: not a name inside the wildcards folder {folder}")
    if not path.is_file():
        raise ValueError(f"wildcard __{name}__: no file {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"wildcard __{name}__: {path} has no lines to choose from")
    return lines


def expand(prompt: str, seed: int, folder: Path | None) -> str:
    """`prompt` with every wildcard and variant replaced by one choice drawn for `seed`."""
    if not has_wildcards(prompt):
        return prompt
    rng = random.Random(seed)
    for _ in range(MAX_DEPTH):
        def wildcard(m: re.Match) -> str:
            if folder is None:
                raise ValueError(f"wildcard {m.group(0)}: no wildcards folder")
            return rng.choice(_lines(folder, m.group(1)))

        def variant(m: re.Match) -> str:
            return rng.choice(m.group(1).split("|"))

        prompt = VARIANT.sub(variant, WILDCARD.sub(wildcard, prompt))
        if not has_wildcards(prompt):
            return prompt
    raise ValueError(f"wildcards still unresolved after {MAX_DEPTH} levels (a wildcard file that names itself?)")
