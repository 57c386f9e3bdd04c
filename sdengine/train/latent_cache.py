"""UNet training on cached latents: every image of the training set encoded by the (frozen) VAE once, not once per
step (`sdengine train unet --cache-latents N`).

The cache keeps the VAE posterior's mean and std per item, so each step still draws a fresh latent sample
z = mean + std * noise, as when encoding on the fly; and the captions as token ids. A step then costs no image
decoding, rendering, VAE encoder or tokenizer: on a GPU the training process is no longer the bottleneck, on a
CPU the VAE encoder's share of each step is saved. For the endless shapes stream the cache is a fixed pool of
N items (items 0..N-1 of the stream); for a folder, its first N items (all of them when N is larger).

The cache is written beside the run's checkpoints (latents.safetensors, atomically) and reused by --resume when
it was built from the same data, size, seed, item count, VAE weights and tokenizer; otherwise it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..images import images_to_tensor
from ..tokenizer import CLIPTokenizer
from ..weights.io import atomic_path, read_tensors, write_safetensors
from .data import Prefetcher, Source, batch_items

CACHE_FILE = "latents.safetensors"
_FORMAT = "sdengine-latent-cache-1"


def fingerprint(vae: nn.Module, tokenizer: CLIPTokenizer, source_desc: dict) -> str:
    """What the cache's contents depend on: the data (source_desc), the VAE's weights and the vocabulary."""
    h = hashlib.sha256(json.dumps(source_desc, sort_keys=True).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([tokenizer.vocab, tokenizer.merges, tokenizer.pad_with_eos], sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, 4, h, w) float16: the VAE posterior mean, unscaled
    std: torch.Tensor  # (N, 4, h, w) float16
    ids: torch.Tensor  # (N, L) int32: the captions, tokenized
    key: str  # fingerprint of what it was built from

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device) -> LatentCache:
        return LatentCache(self.mean.to(device), self.std.to(device), self.ids.to(device), self.key)

    # --- building ------------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(cls, source: Source, n: int, vae: nn.Module, tokenizer: CLIPTokenizer, max_length: int,
              device: torch.device, key: str, workers: int = 0, chunk: int = 256, quiet: bool = False) -> LatentCache:
        """Encode items 0..n-1 of `source`; `workers` processes render/decode images while the VAE encodes."""
        pool = Prefetcher(source, workers) if workers > 0 else None  # forked before the VAE touches a GPU
        vae = vae.to(device).eval()
        dtype = next(vae.parameters()).dtype
        means, stds, ids = [], [], []
        slices = [(0, s, min(s + chunk, n)) for s in range(0, n, chunk)]
        start, shown = time.monotonic(), 0.0
        try:
            for i, key_ in enumerate(slices):
                if pool is not None:
                    pool.request(slices[i + 1: i + 1 + 2 * workers])
                items = pool.take(key_) if pool is not None else batch_items(source, 0, range(key_[1], key_[2]))
                post = vae.encode(images_to_tensor([im for im, _ in items], device).to(dtype))
                means.append(post.mean.half().cpu())
                stds.append(post.std.half().cpu())
                ids.append(tokenizer([c for _, c in items], max_length=max_length).int())
                now = time.monotonic()
                if not quiet and (now - shown > 10 or key_[2] == n):
                    shown = now
                    print(f"latent cache: {key_[2]}/{n} items encoded ({key_[2] / (now - start):.0f}/s)",
                          file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
        return cls(torch.cat(means), torch.cat(stds), torch.cat(ids), key)

    # --- the file ------------------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        with atomic_path(path, force=True) as tmp:
            write_safetensors({"mean": self.mean, "std": self.std, "ids": self.ids}, tmp,
                              metadata={"format": _FORMAT, "key": self.key})

    @classmethod
    def load(cls, path: Path, key: str) -> LatentCache | None:
        """The cache in `path` if it is complete and was built from the same inputs, else None."""
        try:
            tensors, meta = read_tensors(path)
        except (OSError, ValueError):  # missing, truncated or not a safetensors file: rebuild
            return None
        if meta.get("format") != _FORMAT or meta.get("key") != key or set(tensors) != {"mean", "std", "ids"}:
            return None
        return cls(tensors["mean"], tensors["std"], tensors["ids"], key)


def prepare_cache(run_dir: Path, source: Source, source_desc: dict, n: int, vae: nn.Module,
                  tokenizer: CLIPTokenizer, max_length: int, device: torch.device, workers: int = 0,
                  quiet: bool = False) -> LatentCache:
    """The run's cache: reused from run_dir when it matches, else built (and written by rank 0 only)."""
    if n < 1:
        raise ValueError(f"--cache-latents must be at least 1 (got {n})")
    if hasattr(source, "items"):  # a folder: all of it at most
        n = min(n, len(source.items))
    key = fingerprint(vae, tokenizer, {**source_desc, "n": n, "max_length": max_length})
    path = run_dir / CACHE_FILE
    cache = LatentCache.load(path, key)
    if cache is None:
        cache = LatentCache.build(source, n, vae, tokenizer, max_length, device, key, workers, quiet=quiet)
        if os.environ.get("RANK", "0") == "0":
            run_dir.mkdir(parents=True, exist_ok=True)
            cache.save(path)
    elif not quiet:
        print(f"latent cache: reusing {path} ({len(cache)} items)", file=sys.stderr)
    return cache.to(device)


__all__ = ["LatentCache", "prepare_cache", "fingerprint", "CACHE_FILE"]
