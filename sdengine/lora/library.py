"""The LoRA folder: files found by name, read once, hashed as A1111 hashes them.

Names are file stems (a file in a subfolder also answers to `sub/name`, as A1111's extra-networks page shows
it); a name is only ever looked up in the folders, never opened as a client-supplied path.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from ..weights.io import safetensors_header
from .formats import Lora, read_lora
from .patch import CONTEXT_FAMILIES

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# A1111's SdVersion names (its Lora extension's detect_version) and the cross-attention width each family has
SD_VERSIONS = {"SD1": 768, "SD2": 1024, "SDXL": 2048}
# the tensors of a cross-attention key projection whose second dimension is the layer's input (context) width
_INPUT_SIDE = ("lora_down.weight", "lora_A.weight", "down.weight", "hada_w1_b", "hada_w2_b", "diff")


def lora_family(header: dict) -> tuple[str, int | None]:
    """A LoRA file's family from its safetensors header alone (no tensor read): (A1111's sd_version: "SD1", "SD2",
    "SDXL" or "Unknown", the UNet context width it was made for or None). The cross-attention key projection's
    input width decides, as LoraPatcher's error does; without one, SDXL's key names, then the metadata kohya's
    trainers write (what A1111 reads: ss_base_model_version, ss_v2, modelspec.architecture)."""
    for key, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if ("attn2_to_k" in key or "attn2.to_k" in key or "attn2.processor.to_k" in key) and \
                key.endswith(_INPUT_SIDE) and isinstance(shape, list) and len(shape) == 2:
            width = shape[1]
            family = CONTEXT_FAMILIES.get(width)
            return (family if family in SD_VERSIONS else "Unknown"), width
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_input_blocks_")) for k in header):
        return "SDXL", SD_VERSIONS["SDXL"]
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    base, arch = str(meta.get("ss_base_model_version", "")), str(meta.get("modelspec.architecture", ""))
    if base.startswith("sdxl_") or arch.startswith("stable-diffusion-xl-v1-base"):
        family = "SDXL"
    elif str(meta.get("ss_v2", "")) == "True" or base.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        family = "SD2"
    elif base.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        family = "SD1"
    else:
        return "Unknown", None
    return family, SD_VERSIONS[family]


def addnet_hash(path: Path) -> str:
    """kohya-ss' hash of a .safetensors file: sha256 of everything after the header (metadata edits keep it),
    what A1111 records in "Lora hashes" (first 12 hex digits); other files: sha256 of the whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LoraLibrary:
    """LoRA files from folders (scanned recursively) and single files, by name; each read when first used and
    kept while its file is unchanged."""

    def __init__(self, folders: Iterable[Path] = (), files: Iterable[Path] = ()):
        self.folders = [Path(f) for f in folders]
        self.files = [Path(f) for f in files]
        self._paths: dict[str, Path] | None = None
        self._cache: dict[Path, tuple[tuple[int, int], Lora, str | None]] = {}

    def refresh(self) -> None:
        self._paths = None

    def add(self, path: Path) -> str:
        """One more file, outside the folders (the CLI's `--lora FILE:W`); its name."""
        self.files.append(Path(path))
        self.refresh()
        return Path(path).stem

    @property
    def paths(self) -> dict[str, Path]:
        if self._paths is None:
            found: dict[str, Path] = {}
            for folder in self.folders:
                if not folder.is_dir():
                    continue
                for path in sorted(folder.rglob("*")):
                    if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                        relative = path.relative_to(folder).with_suffix("").as_posix()
                        found.setdefault(path.stem, path)
                        found.setdefault(relative, path)
            for path in self.files:
                found[path.stem] = path
            self._paths = found
        return self._paths

    def names(self) -> list[str]:
        return sorted({p.stem for p in self.paths.values()})

    def path(self, name: str) -> Path | None:
        return self.paths.get(name)

    def _entry(self, path: Path) -> tuple[tuple[int, int], Lora, str | None]:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        entry = self._cache.get(path)
        if entry is None or entry[0] != stamp:
            entry = (stamp, read_lora(path), None)
            self._cache[path] = entry
        return entry

    def load(self, name: str) -> Lora | None:
        """The LoRA called `name`, or None when no file has that name (a broken file raises LoraError)."""
        path = self.path(name)
        if path is not None and not path.is_file():  # deleted since the folder was read
            self.refresh()
            return None
        return None if path is None else self._entry(path)[1]

    def shorthash(self, name: str) -> str | None:
        path = self.path(name)
        if path is None:
            return None
        stamp, lora, digest = self._entry(path)
        if digest is None:
            digest = addnet_hash(path)
            self._cache[path] = (stamp, lora, digest)
        return digest[:12]

    def api_list(self) -> list[dict]:
        """A1111's /sdapi/v1/loras entries: name, alias, path, metadata (the file's safetensors metadata), plus
        sd_version (A1111's family name, as its extra-networks page shows it) and sdengine_context_dim (the
        UNet context width the LoRA was made for: a page offers only LoRAs whose width is the loaded model's)."""
        out = []
        for name in self.names():
            path = self.paths[name]
            try:
                header = safetensors_header(path) if path.suffix == ".safetensors" else {}
            except (ValueError, OSError):  # a broken file is listed (applying it says why); a deleted one too
                header = {}
            metadata = header.get("__metadata__")
            metadata = metadata if isinstance(metadata, dict) else {}
            family, width = lora_family(header)
            alias = metadata.get("ss_output_name") or name
            out.append({"name": name, "alias": alias, "path": str(path), "metadata": metadata, "sd_version": family,
                        "sdengine_context_dim": width})
        return out
