"""The LoRA folder: files found by name, read once, hashed as A1111 hashes them.

Names are file stems (a file in a subfolder also answers to `sub/name`, as A1111's extra-networks page shows
it); a name is only ever looked up in the folders, never opened as a client-supplied path.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from ..weights.io import safetensors_metadata
from .formats import Lora, read_lora

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


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
        """A1111's /sdapi/v1/loras entries: name, alias, path, metadata (the file's safetensors metadata)."""
        out = []
        for name in self.names():
            path = self.paths[name]
            try:
                metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
            except (ValueError, OSError):  # a broken file is listed (applying it says why); a deleted one too
                metadata = {}
            alias = metadata.get("ss_output_name") or name
            out.append({"name": name, "alias": alias, "path": str(path), "metadata": metadata})
        return out
