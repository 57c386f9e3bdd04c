"""The models a client may choose (the models folder, plus the --model file) and the one loaded now.

Clients name models; paths stay on the server. Every model's pipeline gets the server's LoRA and embedding
folders (sdengine serve --lora-dir/--embeddings-dir), LoRAs looked up by name only.
"""
from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import runtime
from ..errors import first_line
from ..lora import LoraLibrary
from ..networks import Networks
from ..nn.taesd import TinyAutoencoder
from ..pipeline import Pipeline
from .errors import BadInput, ModelLoadError


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the file or folder name: all a client ever sees
    path: Path

    @property
    def stem(self) -> str:
        return Path(self.name).stem if self.path.is_file() else self.name


class ModelRegistry:
    def __init__(self, folder: Path | None, pinned: Path | None, device: torch.device, dtype: torch.dtype,
                 compile: bool | str = False, lora_dirs: Sequence[Path] | None = None,
                 embedding_dirs: Sequence[Path] | None = None, controlnet_dir: Path | None = None,
                 tiny_vae: TinyAutoencoder | None = None):
        """lora_dirs/embedding_dirs: default $SDENGINE_LORAS / $SDENGINE_EMBEDDINGS (see runtime.loras_dir);
        controlnet_dir: where clients' ControlNet names are looked up (None: no ControlNets); tiny_vae: decodes
        the live previews of every model whose latents it fits (serve --vae-tiny); without it the shipped model's
        previews use the tiny autoencoder shipped beside it (runtime.shipped_taesd)."""
        self.controlnet_dir = controlnet_dir
        self.tiny_vae = tiny_vae
        self.folder, self.pinned, self.device, self.dtype = folder, pinned, device, dtype
        self.compile = compile  # compile each loaded model's UNet (sdengine serve --compile)
        self.embedding_dirs = [Path(d) for d in (embedding_dirs if embedding_dirs is not None
                                                 else [runtime.embeddings_dir()])]
        # one library for every model: its listing, parsed files and hashes survive a model switch
        self.loras = LoraLibrary(lora_dirs if lora_dirs is not None else [runtime.loras_dir()])
        self.default_name: str | None = None  # sd_model_checkpoint
        self.current: ModelEntry | None = None
        self.pipeline: Pipeline | None = None
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}

    def entries(self) -> list[ModelEntry]:
        found = [ModelEntry(p.name, p) for p in runtime.list_models(self.folder)] if self.folder else []
        if self.pinned is not None and all(e.path.resolve() != self.pinned.resolve() for e in found):
            found.insert(0, ModelEntry(self.pinned.name, self.pinned))
        return found

    def find(self, name: object) -> ModelEntry:
        """By file name, stem or A1111 title ("name.safetensors [hash]"); never by path."""
        if not isinstance(name, str) or not name.strip():
            raise BadInput("a model is chosen by a non-empty name (see /sdapi/v1/sd-models)")
        key = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", name.strip())
        if "/" in key or "\\" in key or key.startswith(".") or ":" in key:
            raise BadInput("models are chosen by name (see /sdapi/v1/sd-models); paths are not accepted")
        entries = self.entries()
        for e in entries:
            if key in (e.name, e.stem):
                return e
        raise BadInput(f"no model named {name!r}; available: {', '.join(e.name for e in entries) or 'none'}")

    def sha256(self, entry: ModelEntry, compute: bool = False) -> str | None:
        """Cached by size and mtime; computed only when a model loads (as A1111 does), since files are GBs."""
        if not entry.path.is_file():
            return None
        st = entry.path.stat()
        key = (st.st_size, st.st_mtime_ns)
        cached = self._hashes.get(entry.path)
        if cached and cached[0] == key:
            return cached[1]
        if not compute:
            return None
        digest = runtime.file_sha256(entry.path)
        self._hashes[entry.path] = (key, digest)
        return digest

    def describe(self, entry: ModelEntry) -> dict[str, Any]:
        sha = self.sha256(entry)
        short = sha[:10] if sha else None
        return {"title": f"{entry.name} [{short}]" if short else entry.name, "model_name": entry.stem,
                "hash": short, "sha256": sha, "filename": entry.name, "config": None}

    def _load_refiner(self, name: str):
        entry = self.find(name)
        try:
            return runtime.load_for_inference(entry.path, self.device, self.dtype)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported as the model's
            raise ModelLoadError(f"refiner {entry.name} could not be loaded: {first_line(e)}") from None

    def ensure(self, name: str | None) -> tuple[Pipeline, ModelEntry]:
        """The pipeline for `name` (None: the default), loading it if needed. Worker thread only."""
        if name is None and self.default_name is None:
            raise BadInput("no model is loaded; choose one with sd_model_checkpoint (see /sdapi/v1/sd-models)")
        entry = self.find(name if name is not None else self.default_name)
        if self.current is not None and self.pipeline is not None and self.current.path == entry.path:
            return self.pipeline, entry
        # Drop the old model first: two checkpoints need not fit in memory together.
        self.pipeline = self.current = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            model = runtime.load_for_inference(entry.path, self.device, self.dtype, compile=self.compile)
            sha = self.sha256(entry, compute=True)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported as the model's
            raise ModelLoadError(f"model {entry.name} could not be loaded: {first_line(e)}") from None
        pipe = Pipeline(model, networks=Networks(model, embedding_dirs=self.embedding_dirs, loras=self.loras))
        pipe.refiner_loader = self._load_refiner  # refiner_checkpoint: chosen by name, as models are
        if self.tiny_vae is not None and self.tiny_vae.cfg.latent_channels == model.config.unet.out_channels:
            pipe.tiny_vae = self.tiny_vae
        elif (shipped_tiny := runtime.shipped_taesd(entry.path)) is not None:
            # the shipped model's own tiny autoencoder: a live preview at every step for the cost of a few ms
            from ..nn.taesd import load_taesd

            pipe.tiny_vae = load_taesd(shipped_tiny, self.device, self.dtype)
        pipe.controlnets.folder = self.controlnet_dir  # units arrive resolved to its files (server/controlnet.py)
        # the embeddings scanned here, in the worker: /sdapi/v1/embeddings then only reads a finished scan
        pipe.networks.embeddings()
        pipe._model_hash = sha[:10] if sha else None  # already read the file once; don't read it again
        self.pipeline, self.current = pipe, entry
        return pipe, entry
