"""`sdengine batch`: many generations from a JSON-lines file, resumable, deterministic and shardable over processes
(torchrun) or a Ray cluster (docs/scale-out.md).

Each non-empty line is one item: a JSON object of Request fields (their names as in sdengine/request.py; `hires`
an object of HiresFix fields, `controls` a list of ControlUnit fields with image paths) and optionally
"parameters", an A1111 infotext read as `generate --from-png` reads one (the other keys override it). Item i is
line i + 1 (blank lines make no item), so its images are `i:05d.png`, or `i:05d-k.png` for k = 0, 1, ... when it
makes several. Every line is checked before any model loads; a bad one is an error naming its line.

Deterministic: an item's images depend on its line alone (and the run's model/settings), never on which worker
or how many ran it. A line without a seed (or with -1) gets `derived_seed(seed_base, index)`, a hash of the
index, and the same for a variation seed; the PNGs carry their seeds as `generate` writes them.

Resumable: the manifest (manifest.json in the output folder, written atomically) records each done item with its
line's sha256 and files. A rerun skips done items whose files exist. A line that changed since its item was done
is refused (naming the lines) unless `force`, which redoes those items. Each worker (a torchrun rank) records
what it finishes in its own part file, merged into manifest.json when a run starts and ends, so a killed rank
loses only the item it was running: its other items are in its part, the rest are redone on resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .control import ControlError, ControlUnit
from .errors import first_line
from .hires import HiresFix
from .request import FieldError, Request

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .pipeline import Pipeline

MANIFEST = "manifest.json"
PART_PREFIX = "manifest.part-"  # + worker name + ".json": one writer each
MANIFEST_VERSION = 1
MAX_LINE_BYTES = 1 << 20
REQUEST_FIELDS = frozenset(f.name for f in fields(Request))


class BatchError(ValueError):
    """A prompts file or output folder that cannot be run; the message is the one line the CLI prints."""


def derived_seed(seed_base: int, index: int, kind: str = "seed") -> int:
    """The seed of item `index` when its line gives none: 32 bits of sha256("seed_base/index/kind"), in A1111's
    random-seed range. A hash rather than seed_base + index: a batch_size-4 item uses seeds s..s+3, which must not
    be the next item's."""
    digest = hashlib.sha256(f"{seed_base}/{index}/{kind}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 4294967294


def line_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Item:
    index: int  # line number - 1
    text: str  # the line, stripped
    request: Request

    @property
    def digest(self) -> str:
        return line_digest(self.text)

    def names(self) -> list[str]:
        """Its files' names: one image NNNNN.png, several NNNNN-0.png, NNNNN-1.png, ..."""
        count = self.request.batch_size * self.request.n_iter
        return [f"{self.index:05d}.png"] if count == 1 else [f"{self.index:05d}-{k}.png" for k in range(count)]


def request_fields(data: Any) -> dict[str, Any]:
    """A line's JSON object -> Request keywords (ValueError names the problem)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object of Request fields, got {type(data).__name__}")
    values: dict[str, Any] = {}
    if "parameters" in data:  # an A1111 infotext, read as --from-png reads a PNG's
        from .metadata import parse_parameters
        from .request import fields_from_parameters

        if not isinstance(data["parameters"], str):
            raise ValueError("parameters must be an A1111 parameters text")
        params = parse_parameters(data["parameters"])
        values.update(fields_from_parameters(params))
        values.setdefault("prompt", params.get("Prompt", ""))
    unknown = sorted(set(data) - REQUEST_FIELDS - {"parameters"})
    if unknown:
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (known: "
                         f"{', '.join(sorted(REQUEST_FIELDS))}, parameters)")
    values.update({k: v for k, v in data.items() if k != "parameters"})
    if isinstance(values.get("hires"), dict):
        values["hires"] = HiresFix(**values["hires"])
    if isinstance(values.get("controls"), list):
        values["controls"] = tuple(ControlUnit(**u) if isinstance(u, dict) else u for u in values["controls"])
    for name in ("seed_resize_from", "original_size", "crop", "target_size"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return values


def parse_line(text: str, index: int, seed_base: int, size: int) -> Item:
    """One line -> its Item: seeds derived where the line leaves them to chance, unset sizes the model's."""
    values = request_fields(json.loads(text))
    if values.get("seed", -1) == -1:
        values["seed"] = derived_seed(seed_base, index)
    if values.get("subseed", -1) == -1:
        values["subseed"] = derived_seed(seed_base, index, "variation")
    values.setdefault("width", size)
    values.setdefault("height", size)
    return Item(index, text, Request(**values))


def read_items(path: Path, seed_base: int, size: int) -> list[Item]:
    """Every line of the file checked (BatchError: `file, line N: problem`) before anything runs."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BatchError(f"prompts file {path}: {e.strerror or first_line(e)}") from None
    items = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}, line {number}"
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise BatchError(f"{where}: {len(line)} bytes; at most {MAX_LINE_BYTES} per line")
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").strip()  # an editor's BOM, if any
            items.append(parse_line(text, number - 1, seed_base, size))
        except UnicodeDecodeError:
            raise BatchError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise BatchError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        except FieldError as e:
            raise BatchError(f"{where}: {e.field} {e.problem}") from None
        except (ValueError, TypeError, ControlError, RecursionError) as e:
            raise BatchError(f"{where}: {first_line(e)}") from None
    if not items:
        raise BatchError(f"prompts file {path} holds no items (one JSON object per line)")
    return items


# --- the manifest -------------------------------------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    from .weights.io import atomic_path

    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BatchError(f"manifest {path} is not readable ({first_line(e)}); move it away to start over") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("items"),
                                                                                                 dict):
        raise BatchError(f"{path} is not an sdengine batch manifest (version {MANIFEST_VERSION})")
    return data


def consolidate(out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """manifest.json with every part file folded in (the parts then removed); its items by index. One process
    only (rank 0, the Ray driver). A folder that is not a batch's (files, no manifest) or whose manifest was made
    with other settings (model, seed base) is refused: its images would not match the lines."""
    path = out / MANIFEST
    parts = sorted(out.glob(f"{PART_PREFIX}*.json"))
    if not path.exists() and not parts and out.exists() and any(out.iterdir()):
        raise BatchError(f"output folder {out} holds files but no {MANIFEST}: give a new or empty folder")
    items: dict[str, dict[str, Any]] = {}
    for record in ([path] if path.exists() else []) + parts:
        data = _read_json(record)
        if data.get("settings") != settings:
            raise BatchError(f"{out} was made with other settings ({_describe(data.get('settings'))}; now "
                             f"{_describe(settings)}): use those, or another --out")
        items.update(data["items"])
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"version": MANIFEST_VERSION, "settings": settings, "items": items})
    for part in parts:
        part.unlink()
    return items


def _describe(settings: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) if isinstance(settings, dict) else "unknown"


def pending(items: list[Item], done: dict[str, dict[str, Any]], out: Path, force: bool) -> list[Item]:
    """The items still to make. A done item whose line changed is an error unless `force` (then it is redone);
    one whose files are gone is made again."""
    changed = [it for it in items if str(it.index) in done and done[str(it.index)]["sha256"] != it.digest]
    if changed and not force:
        lines = ", ".join(str(it.index + 1) for it in changed[:10]) + (", ..." if len(changed) > 10 else "")
        raise BatchError(f"line{'s' if len(changed) > 1 else ''} {lines} changed since {out / MANIFEST} recorded "
                         "them done: --force makes them again (replacing their images), or use another --out")
    redo = {it.index for it in changed}
    return [it for it in items if str(it.index) not in done or it.index in redo
            or not all((out / name).exists() for name in done[str(it.index)]["files"])]


class PartWriter:
    """One worker's record of what it finished, rewritten atomically after an item when `interval` seconds have
    passed since the last write (and by `flush`): a rewrite costs O(items), so per item only while it is cheap. A
    worker killed between writes loses the records of at most `interval` seconds of items, which are made again."""

    def __init__(self, out: Path, worker: str, settings: dict[str, Any], interval: float = 2.0):
        self.path, self.settings, self.interval = out / f"{PART_PREFIX}{worker}.json", settings, interval
        self.items: dict[str, dict[str, Any]] = {}
        self.written = 0.0  # time.monotonic() of the last write
        self.dirty = False

    def add(self, item: Item, seeds: list[int]) -> None:
        self.items[str(item.index)] = {"line": item.index + 1, "sha256": item.digest, "files": item.names(),
                                       "seeds": seeds}
        self.dirty = True
        if time.monotonic() - self.written >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.dirty:
            _write_json(self.path, {"version": MANIFEST_VERSION, "settings": self.settings, "items": self.items})
            self.written, self.dirty = time.monotonic(), False


# --- generation -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What decides the images besides the lines (recorded in the manifest), and where the networks run."""

    model: Path
    size: int  # the model's native size: unset widths/heights
    seed_base: int = 0
    vae: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    wildcards_dir: Path | None = None
    controlnet_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool | str = False  # True or "inductor", or "openvino"
    threads: int | None = None

    def recorded(self) -> dict[str, Any]:
        return {"model": str(self.model.resolve()), "vae": str(self.vae.resolve()) if self.vae else None,
                "seed_base": self.seed_base}


def load_pipeline(settings: Settings, device: torch.device) -> Pipeline:
    """The pipeline one worker generates with, on `device`."""
    import torch

    from . import runtime
    from .lora import LoraLibrary
    from .networks import Networks
    from .pipeline import Pipeline

    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = runtime.inference_dtype(settings.precision, device)
    model = runtime.load_for_inference(settings.model, device, dtype, vae=settings.vae, compile=settings.compile)
    networks = Networks(model, embedding_dirs=[settings.embeddings_dir or runtime.embeddings_dir()],
                        loras=LoraLibrary([settings.lora_dir or runtime.loras_dir()]))
    pipe = Pipeline(model, networks=networks)
    pipe.wildcards = settings.wildcards_dir or runtime.wildcards_dir()
    pipe.controlnets.folder = settings.controlnet_dir
    return pipe


def save_item(item: Item, images: list[Image.Image], out: Path) -> list[int]:
    """The item's PNGs (atomic; a file of a pending item is replaced: it belongs to this batch); its seeds."""
    from .metadata import save_image

    for image, name in zip(images, item.names(), strict=True):
        save_image(image, out / name, image.info["parameters"], force=True)
    return [int(image.info["seed"]) for image in images]


def run_items(pipe: Pipeline, todo: Iterable[Item], out: Path, part: PartWriter,
              log: Callable[[str], None]) -> int:
    count = 0
    try:
        for item in todo:
            seeds = save_item(item, pipe.run(item.request), out)
            part.add(item, seeds)
            for warning in pipe.networks.warnings:
                log(f"line {item.index + 1}: warning: {warning}")
            log(f"wrote {', '.join(item.names())} (line {item.index + 1}, seed {seeds[0]})")
            count += 1
    finally:  # an error or Ctrl-C keeps the record of what was made
        part.flush()
    return count


def distributed() -> tuple[int, int] | None:
    """(rank, world size) under torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def run_batch(prompts: Path, out: Path, settings: Settings, force: bool = False,
              log: Callable[[str], None] | None = None) -> int:
    """Make every pending item in this process, or this rank's share under torchrun; the number made here."""
    from . import runtime

    items = read_items(prompts, settings.seed_base, settings.size)  # every rank checks every line: fail alike
    dist = distributed()
    rank, world = dist or (0, 1)
    prefix = f"[rank {rank}/{world}] " if dist else ""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if dist:
        import torch.distributed as td

        td.init_process_group("gloo")  # coordination only (barriers): gloo works whatever device generates
    try:
        recorded = settings.recorded()
        if rank == 0:
            consolidate(out, recorded)
        if dist:
            td.barrier()
        todo = pending(items, _read_json(out / MANIFEST)["items"], out, force)
        mine = todo[rank::world]  # the pending list is the same on every rank: shares balanced after a resume
        log(f"{prefix}{len(items) - len(todo)} of {len(items)} items done already; {len(mine)} to make here")
        if mine:
            device = runtime.pick_device(settings.device)
            pipe = load_pipeline(settings, device)
            count = run_items(pipe, mine, out, PartWriter(out, f"rank{rank}", recorded), lambda m: log(prefix + m))
        else:
            count = 0
        if dist:
            td.barrier()
        if rank == 0:
            consolidate(out, recorded)
        return count
    finally:
        if dist:
            td.destroy_process_group()


# --- Ray --------------------------------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the extra's part this needs
    except ImportError:
        raise BatchError("--ray needs Ray Data: pip install 'sdengine[ray]'") from None
    return ray


class RayGenerator:
    """A Ray Data actor: loads the pipeline once on its device and makes the items it is given, returning pixels
    and parameters to the driver (which writes the files: no shared folder needed)."""

    def __init__(self, settings: Settings):
        from . import runtime

        self.settings = settings
        self.pipe = load_pipeline(settings, runtime.pick_device(settings.device))

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out: dict[str, list] = {"index": [], "pixels": [], "parameters": []}
        for index, text in zip(rows["index"], rows["text"]):
            item = parse_line(str(text), int(index), self.settings.seed_base, self.settings.size)
            images = self.pipe.run(item.request)
            out["index"].append(int(index))
            out["pixels"].append(np.stack([np.asarray(im.convert("RGB")) for im in images]))
            out["parameters"].append(json.dumps([[im.info["parameters"], int(im.info["seed"])] for im in images]))
        return {"index": np.array(out["index"]), "pixels": out["pixels"], "parameters": np.array(out["parameters"])}


def run_batch_ray(prompts: Path, out: Path, settings: Settings, address: str, workers: int | None = None,
                  force: bool = False, log: Callable[[str], None] | None = None) -> int:
    """Make every pending item on a Ray cluster (`address`; "local" starts one here) through Ray Data: one actor
    per GPU (num_gpus=1) where the cluster has GPUs, else `workers` CPU actors. The driver writes files and the
    manifest as results arrive."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    items = read_items(prompts, settings.seed_base, settings.size)
    recorded = settings.recorded()
    todo = pending(items, consolidate(out, recorded), out, force)
    log(f"{len(items) - len(todo)} of {len(items)} items done already; {len(todo)} to make on Ray")
    if not todo:
        return 0
    ray = _import_ray()
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the driver says what it wrote
        gpus = int(ray.cluster_resources().get("GPU", 0)) if settings.device != "cpu" else 0
        actors = workers or gpus or 1
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": settings.threads or 1}
        data = ray.data.from_items([{"index": it.index, "text": it.text} for it in todo])
        results = data.map_batches(RayGenerator, fn_constructor_args=(settings,), batch_size=1,
                                   compute=ray.data.ActorPoolStrategy(size=actors), **per_actor)
        by_index = {it.index: it for it in todo}
        part = PartWriter(out, "ray", recorded)
        try:
            count = sum(1 for _ in _finished(results, by_index, out, part, log))
        finally:
            part.flush()
        consolidate(out, recorded)
        return count
    finally:
        ray.shutdown()


def _finished(results: Any, by_index: dict[int, Item], out: Path, part: PartWriter,
              log: Callable[[str], None]) -> Iterable[int]:
    """Ray's results as they arrive: each item's files written and recorded; yields its index."""
    from PIL import Image

    for row in results.iter_rows():
        item = by_index[int(row["index"])]
        images = []
        for pixels, (parameters, seed) in zip(row["pixels"], json.loads(str(row["parameters"]))):
            image = Image.fromarray(pixels)
            image.info.update(parameters=parameters, seed=seed)
            images.append(image)
        seeds = save_item(item, images, out)
        part.add(item, seeds)
        log(f"wrote {', '.join(item.names())} (line {item.index + 1}, seed {seeds[0]})")
        yield item.index


__all__ = ["BatchError", "Item", "Settings", "derived_seed", "read_items", "run_batch", "run_batch_ray"]
