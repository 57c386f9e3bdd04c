"""Textual inversion embeddings: the files people have, read by content, and a folder of them scanned for a model.

Layouts (all read into `Embedding.vectors`, one (n, width) float32 tensor per text-encoder width):
- AUTOMATIC1111 `.pt`/`.bin`: a dict with `string_to_param: {"*": (n, width)}` and plain `name`, `step`,
  `sd_checkpoint`, `sd_checkpoint_name` entries (torch.load(weights_only=True) reads those; nothing else runs);
- one tensor alone: diffusers' `learned_embeds.bin/.safetensors` (`{token: (width,) or (n, width)}`) and the
  `emb_params` safetensors (A1111 reads both as a "diffuser concept");
- SDXL `.safetensors`: `clip_l` (n, 768) for CLIP-L and `clip_g` (n, 1280) for OpenCLIP bigG.
The name used in prompts is the file's stem, as in A1111; its `shorthash` (the "TI hashes" infotext) is the first
12 hex digits of the file's sha256, A1111's `Embedding.set_hash`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import first_line
from .runtime import file_sha256
from .weights.io import CheckpointError, read_tensors, sniff

SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75  # an embedding must fit in one 75-token prompt chunk
MAX_FILE_BYTES = 64 << 20  # embeddings are KBs; a bigger file is a checkpoint put in the wrong folder
SHORTHASH = 12  # A1111's Embedding.shorthash = hash[0:12]


@dataclass(eq=False)  # compared by identity: field-wise == would compare tensors
class Embedding:
    name: str
    vectors: dict[int, torch.Tensor]  # text-encoder width -> (n, width) float32
    path: Path | None = None
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    sha256: str = field(default="", repr=False)

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORTHASH]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self.vectors))

    def count(self, width: int) -> int:
        """How many token slots it takes in a prompt read by the encoder of this width."""
        return self.vectors[width].shape[0]

    def fits(self, widths: list[int] | tuple[int, ...]) -> bool:
        """Usable by a model whose text encoders have these widths: one set of vectors for each, no other
        (A1111 compares its summed `shape` with the model's: an SD1 file is skipped on SDXL and the reverse)."""
        return set(self.vectors) == set(widths)

    def check_fits(self, widths: tuple[int, ...]) -> None:
        """A ValueError naming the file unless it fits text encoders of these widths."""
        if not self.fits(widths):
            raise ValueError(f"{self.path or self.name}: an embedding of width {_widths_text(self.widths)} fits "
                             f"none of this model's text encoders (width {_widths_text(widths)})")

    def api_fields(self) -> dict:
        """The fields A1111's /sdapi/v1/embeddings gives each embedding; `shape` is the summed width (SDXL 2048)
        and `vectors` the vector count (SDXL: clip_g's), as A1111's create_embedding_from_data sets them."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": sum(self.vectors),
                "vectors": self.vectors[max(self.vectors)].shape[0]}


def model_widths(model) -> tuple[int, ...]:
    """The widths of a model's text encoders, in order (SDXL: CLIP-L's, then bigG's)."""
    return tuple(encoder.config.width for encoder in model.text_encoders)


def _widths_text(widths) -> str:
    return " + ".join(str(w) for w in widths)


# --- reading one file ---------------------------------------------------------------------------------------------

def _load_pickle(path: Path) -> object:
    """A torch.save file through the restricted unpickler: tensors, numbers, strings and plain containers only;
    a pickle asking for any other global is refused before any of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; each becomes one line naming the file
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            detail = next((line.strip() for line in msg.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(f"{path}: refused: the pickle holds code or objects, not only tensors "
                                  f"({detail or first_line(e)})") from None
        raise CheckpointError(f"{path}: unreadable embedding ({first_line(e)})") from None


def _read_file(path: Path) -> dict:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: not an embedding ({size >> 20} MiB; embeddings are a few KB)")
    kind = sniff(path)
    if kind == "safetensors":
        try:  # the key list first: a checkpoint's thousand tensors are not loaded to be refused
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{path}: corrupt .safetensors file ({first_line(e)})") from None
        if len(keys) > 2:
            raise ValueError(f"{path}: not an embedding ({len(keys)} tensors; expected one, or clip_l and clip_g)")
        return read_tensors(path)[0]
    if kind in ("zip", "pickle"):
        data = _load_pickle(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not an embedding (holds a {type(data).__name__}, not a dict)")
        return data
    raise ValueError(f"{path}: not an embedding (neither .safetensors nor a torch.save file)")


def _vectors(path: Path, what: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
        desc = f"a {tuple(t.shape)} {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{path}: not an embedding ({what} is {desc}; expected (vectors, width) floats)")
    t = t.detach().float().reshape(-1, t.shape[-1])
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: {what} holds NaN or infinite values")
    if t.shape[0] > MAX_VECTORS:
        raise ValueError(f"{path}: {t.shape[0]} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    return t


def embedding_from_data(data: dict, name: str, path: Path) -> Embedding:
    """An embedding from a file's top-level dict, its layout told by its keys (A1111's create_embedding_from_data
    order: string_to_param, then clip_l + clip_g, then a lone tensor)."""
    meta = {}
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            n = len(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{path}: string_to_param holds {n} terms; an embedding file has exactly one")
        vec = _vectors(path, "string_to_param", next(iter(params.values())))
        vectors = {vec.shape[1]: vec}
        meta = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
        meta = {k: v if isinstance(v, (int, str)) and not isinstance(v, bool) else None for k, v in meta.items()}
    elif "clip_l" in data and "clip_g" in data:
        clip_l, clip_g = _vectors(path, "clip_l", data["clip_l"]), _vectors(path, "clip_g", data["clip_g"])
        if clip_l.shape[1] == clip_g.shape[1]:
            raise ValueError(f"{path}: clip_l and clip_g have the same width ({clip_l.shape[1]}); "
                             "cannot tell which encoder each is for")
        vectors = {clip_l.shape[1]: clip_l, clip_g.shape[1]: clip_g}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        key, value = next(iter(data.items()))
        vec = _vectors(path, repr(key), value)
        vectors = {vec.shape[1]: vec}
    else:
        keys = ", ".join(map(str, list(data)[:5])) or "nothing"
        raise ValueError(f"{path}: not an embedding (keys {keys}; expected string_to_param, clip_l + clip_g, "
                         "or one tensor)")
    return Embedding(name, vectors, path, **meta)


def load_embedding(path: str | Path) -> Embedding:
    """Read one embedding file (layout told by content, name = file stem); a ValueError naming the file if it is
    none (CheckpointError, a ValueError, for unreadable or refused files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such embedding file: {path}")
    embedding = embedding_from_data(_read_file(path), path.stem, path)
    embedding.sha256 = file_sha256(path)
    return embedding


# --- a folder of them -------------------------------------------------------------------------------------------

@dataclass
class EmbeddingScan:
    """What a folder holds for one model: `loaded` (usable, by name, sorted as A1111 sorts them), `skipped`
    (readable but for another model, with `reasons`), `errors` (file -> why it is no embedding)."""

    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def api(self) -> dict:
        """The body of A1111's GET /sdapi/v1/embeddings."""
        return {"loaded": {name: e.api_fields() for name, e in self.loaded.items()},
                "skipped": {name: e.api_fields() for name, e in self.skipped.items()}}


def embedding_files(folder: str | Path) -> list[Path]:
    """Every .pt/.bin/.safetensors file under folder (recursively, links followed as A1111 does), sorted;
    empty files are left out as A1111 leaves them."""
    found = []
    for root, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(root) / name
            if path.suffix.lower() in SUFFIXES and path.is_file() and path.stat().st_size > 0:
                found.append(path)
    return sorted(found)


def scan_embeddings(folder: str | Path, widths: tuple[int, ...]) -> EmbeddingScan:
    """Read every embedding under folder for a model with text encoders of these widths (`model_widths(model)`).
    A file that fails goes to `errors` and the scan goes on; of two files with one name the first (by path) is
    kept."""
    scan = EmbeddingScan()
    found: dict[str, Embedding] = {}
    for path in embedding_files(folder):
        try:
            embedding = load_embedding(path)
        except (ValueError, OSError) as e:
            scan.errors[str(path)] = first_line(e)
            continue
        if embedding.name in found:
            scan.errors[str(path)] = f"another embedding named {embedding.name!r} is used: {found[embedding.name].path}"
            continue
        found[embedding.name] = embedding
    for name in sorted(found, key=str.lower):
        embedding = found[name]
        if embedding.fits(widths):
            scan.loaded[name] = embedding
        else:
            scan.skipped[name] = embedding
            scan.reasons[name] = (f"width {_widths_text(embedding.widths)}; this model's text encoders: "
                                  f"{_widths_text(widths)}")
    return scan


def ti_hashes(embeddings: list[Embedding]) -> str:
    """The "TI hashes" infotext value, as A1111 writes it: "name: shorthash, ..." (":" and "," dropped from names),
    each embedding once (a prompt's and its negative prompt's lists may be passed together); "" when none has a
    hash."""
    names = {e.name.replace(":", "").replace(",", ""): e.shorthash for e in embeddings if e.shorthash}
    return ", ".join(f"{name}: {shorthash}" for name, shorthash in names.items())
