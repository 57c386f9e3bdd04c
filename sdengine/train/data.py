"""Training data: image-caption sources with deterministic, index-addressed items.

`source.item(i)` returns item i of an endless stream, always the same, so a global batch is the items
[step * B, (step + 1) * B) and any process can compute its slice. Sources: the procedural shapes world
(`--data shapes`; `--data shapes:pink[:SHARE]` mixes in scenes featuring a colour the shipped model never saw, for
teaching it a new concept) and a folder of images with captions (`--data DIR`: same-name .txt files, or a metadata.jsonl
with file_name/text as in Hugging Face's imagefolder).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class Source(Protocol):
    size: int

    def item(self, index: int) -> tuple[np.ndarray, str]:
        """(uint8 image (size, size, 3), caption) of item `index`."""
        ...


# SDXL's size conditioning of a training image: its original size (width, height) and the top-left corner
# (left, top) of the crop taken from it, in the pixels of the image scaled to the training size
Geometry = tuple[tuple[int, int], tuple[int, int]]


def item_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for item `index` of a run seeded `seed` (SplitMix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class ShapesSource:
    """The procedural shapes world; held-out attribute combinations never appear (they are for evaluation)."""

    def __init__(self, size: int = 64, seed: int = 0, kinds: tuple[str, ...] | None = None,
                 color_drop: float | None = None, concept: str | None = None, concept_share: float | None = None):
        """kinds, color_drop: SceneSampler's mix (the share of each scene kind, how often colours go unsaid);
        concept, concept_share: a novel colour and the share of scenes featuring it; None keeps the default."""
        from ..data.shapes import COLOR_DROP, CONCEPT_SHARE, SCENE_KINDS, SceneSampler

        if concept_share is not None and concept is None:
            raise ValueError("a concept share needs a concept")
        if concept is not None and concept_share is None:
            concept_share = CONCEPT_SHARE   # spelt out in the key: a concept stream's share is part of what it is
        self.size, self.seed = size, seed
        # the mix where it differs from the defaults: part of a latent cache's key, so that a cache built with the
        # defaults keeps its fingerprint whether or not they are spelt out
        defaults = {"kinds": SCENE_KINDS, "color_drop": COLOR_DROP, "concept": None, "concept_share": None}
        self.mix = {k: v for k, v in (("kinds", kinds), ("color_drop", color_drop), ("concept", concept),
                                      ("concept_share", concept_share))
                    if v is not None and v != defaults[k]}
        self.sampler = SceneSampler(seed=seed, resolution=size, mode="train", **self.mix)

    def item(self, index: int) -> tuple[np.ndarray, str]:
        sample = self.sampler.sample(index)
        return np.asarray(sample.image, dtype=np.uint8), sample.caption

    def captions(self, n: int = 20000) -> list[str]:
        """The captions of items 0..n-1, without drawing their images (a vocabulary is learnt from them)."""
        return [self.sampler.scene(i)[1] for i in range(n)]


def read_caption_text(path: Path) -> str:
    """A caption file (or metadata.jsonl) as UTF-8; anything else is an error naming the file and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save the "
                         "captions as UTF-8") from None


class FolderSource:
    """Images with captions from a folder; unreadable images and images without a caption are skipped and
    counted (stop if none is usable). Images are center-cropped to a square and resized to `size`."""

    def __init__(self, folder: str | Path, size: int = 64, seed: int = 0):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist")
        self.size, self.seed = size, seed
        pairs = self._pairs(folder)
        self.items: list[tuple[Path, str]] = []
        unreadable = 0
        for path, caption in pairs:
            try:  # decoded once, at the scale we need: verify() alone passes truncated JPEGs
                with Image.open(path) as img:
                    img.draft("RGB", (size, size))
                    img.load()
                self.items.append((path, caption))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                unreadable += 1
        skipped = self._missing_captions + unreadable
        if skipped and os.environ.get("RANK", "0") == "0":  # once, not once per process under torchrun
            print(f"sdengine: skipped {self._missing_captions} images without a caption and {unreadable} unreadable "
                  f"images in {folder}", file=sys.stderr)
        if not self.items:
            raise ValueError(f"no usable image-caption pairs in {folder} ({skipped} skipped)")

    def _pairs(self, folder: Path) -> list[tuple[Path, str]]:
        self._missing_captions = 0
        meta = folder / "metadata.jsonl"
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if meta.exists():
            captions: dict[str, str] = {}
            for n, line in enumerate(read_caption_text(meta).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row["file_name"], str) or not isinstance(row["text"], str):
                        raise TypeError
                    captions[row["file_name"].removeprefix("./")] = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{meta}:{n}: expected a JSON object with file_name and text "
                                     f"strings, got {line.strip()[:60]!r}") from None
            names = {p: p.relative_to(folder).as_posix() for p in images}
            pairs = [(p, captions[names[p]]) for p in images if names[p] in captions]
        else:
            pairs = []
            for p in images:
                txt = p.with_suffix(".txt")
                if txt.exists():
                    pairs.append((p, read_caption_text(txt).strip()))
        self._missing_captions = len(images) - len(pairs)
        return pairs

    def _order(self, epoch: int) -> np.ndarray:
        """A fresh order each epoch; kept, so each item costs no O(n) shuffle."""
        if getattr(self, "_epoch", None) != epoch:
            rng = np.random.default_rng(item_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, rng.permutation(len(self.items))
        return self._perm

    def _entry(self, index: int) -> tuple[Path, str]:
        epoch, position = divmod(index, len(self.items))
        return self.items[self._order(epoch)[position]]

    def item(self, index: int) -> tuple[np.ndarray, str]:
        path, caption = self._entry(index)
        with Image.open(path) as img:
            img = img.convert("RGB")
            left, top, side = square_crop(*img.size)
            img = img.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.LANCZOS)
            return np.asarray(img, dtype=np.uint8), caption

    def geometry(self, index: int) -> Geometry:
        """Item `index`'s original size and crop, as SDXL's trainers record them (the image scaled so that its short
        side is `size`, then the centred square taken): only the file's header is read."""
        with Image.open(self._entry(index)[0]) as img:
            width, height = img.size
        left, top, side = square_crop(width, height)
        scale = self.size / side
        return (width, height), (round(left * scale), round(top * scale))


def square_crop(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the centred square FolderSource trains on."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def shapes_spec(data: str) -> dict | None:
    """A `--data` value naming the shapes world, as ShapesSource's concept options: 'shapes' -> {},
    'shapes:pink' -> {'concept': 'pink'}, 'shapes:pink:0.3' -> {'concept': 'pink', 'concept_share': 0.3}; None for
    anything else (a folder). A malformed shapes spec is an error naming what is allowed, not a folder lookup."""
    head, sep, rest = data.partition(":")
    if head != "shapes":
        return None
    if not sep:
        return {}
    from ..data.shapes import CONCEPT_SHARE, CONCEPTS

    concept, sep, share = rest.partition(":")
    usage = (f"--data shapes:CONCEPT[:SHARE] takes a concept of {', '.join(CONCEPTS)} and the share of scenes "
             f"featuring it, in (0, 1] (default {CONCEPT_SHARE}); got {data!r}")
    if concept not in CONCEPTS or ":" in share:
        raise ValueError(usage)
    if not sep:
        return {"concept": concept}
    try:
        value = float(share)
    except ValueError:
        raise ValueError(usage) from None
    if not 0.0 < value <= 1.0:
        raise ValueError(usage)
    return {"concept": concept, "concept_share": value}


def make_source(data: str, size: int, seed: int, kinds: tuple[str, ...] | None = None,
                color_drop: float | None = None) -> Source:
    """The shapes world (kinds, color_drop: its scene mix, None for the default; 'shapes:CONCEPT[:SHARE]' mixes in
    a novel colour, see shapes_spec) or a folder of captioned images."""
    spec = shapes_spec(data)
    if spec is not None:
        return ShapesSource(size, seed, kinds, color_drop, **spec)
    if kinds is not None or color_drop is not None:
        raise ValueError("--scene-kinds and --color-drop are for --data shapes")
    return FolderSource(data, size, seed)


def item_index(step: int, position: int) -> int:
    """The source index of batch position `position` of global step `step`."""
    return step * 1_000_003 + position


def batch_items(source: Source, step: int, indices: range) -> list[tuple[np.ndarray, str]]:
    """The items of global step `step` at batch positions `indices` (every stage reads its data this way)."""
    return [source.item(item_index(step, i)) for i in indices]


def batch_geometry(source: Source, step: int, indices: range) -> list[Geometry]:
    """The SDXL size conditioning of those items: a source without `geometry` (the shapes world) draws its images
    at the training size, uncropped."""
    geometry = getattr(source, "geometry", None)
    if geometry is None:
        return [((source.size, source.size), (0, 0))] * len(indices)
    return [geometry(item_index(step, i)) for i in indices]


_worker_source: Source | None = None


def _init_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source


def _worker_items(step: int, start: int, stop: int) -> list[tuple[np.ndarray, str]]:
    return batch_items(_worker_source, step, range(start, stop))


class Prefetcher:
    """Prepares the items of coming steps in worker processes while the current step trains. One core renders
    ~1,500 shapes images/s, far less than a GPU trains on. Items are the same as without workers (they are
    addressed by index), so results do not depend on the number of workers.

    Workers are forked before any CUDA work and never touch torch, so forking is safe and the source needs no
    pickling."""

    def __init__(self, source: Source, workers: int):
        with warnings.catch_warnings():  # Python 3.12 warns about fork() in a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker,
                                                                 initargs=(source,))
        self.workers = workers
        self.pending: dict[tuple[int, int, int], multiprocessing.pool.AsyncResult] = {}

    def request(self, keys: list[tuple[int, int, int]]) -> None:
        """Start preparing (step, start, stop) slices that are not already under way."""
        for key in keys:
            if key not in self.pending:
                self.pending[key] = self.pool.apply_async(_worker_items, key)

    def take(self, key: tuple[int, int, int]) -> list[tuple[np.ndarray, str]]:
        self.request([key])
        return self.pending.pop(key).get()

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        self.pending.clear()
