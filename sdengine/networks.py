"""Extra networks, as A1111 calls them: LoRAs named by `<lora:name:te:unet>` tags in the prompt, textual-inversion
embeddings named by their words, both looked up in folders by name.

Tag syntax (A1111's extra networks): `<lora:name>`, `<lora:name:w>` (text encoder and UNet at w), `<lora:name:te:
unet>`, named `te=`/`unet=`; `<lyco:...>` is the same thing. The tags are cut out of the prompt before it is
encoded; the prompt kept in the image's parameters is the one written, tags and all, with "Lora hashes" and
"TI hashes" beside it. A tag of another kind (`<hypernet:...>`), a LoRA tag in the negative prompt (A1111 does not
apply those either) or an unknown LoRA is a warning in the result and its parameters, never prompt text.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .embeddings import load_embedding, model_widths, scan_embeddings, ti_hashes
from .lora import LoraLibrary, LoraPatcher, LoraUse
from .model import StableDiffusion
from .prompts import embeddings_in
from .request import FieldError, Request

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag
LORA_KINDS = ("lora", "lyco")
MAX_LORAS = 32  # per prompt: far beyond any real use, and a bound on the patching work one request can ask for


@dataclass(frozen=True)
class LoraTag:
    name: str
    text: float = 1.0
    unet: float = 1.0


def _number(value: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise FieldError("prompt", f"has {tag}, whose weight {value!r} is not a number") from None
    if number != number or abs(number) > 100:
        raise FieldError("prompt", f"has {tag}, whose weight must be a number within ±100")
    return number


def parse_tags(prompt: str) -> tuple[str, list[LoraTag], list[str]]:
    """(the prompt without extra-network tags, its LoRA tags, warnings for tags it cannot apply)."""
    tags: list[LoraTag] = []
    warnings: list[str] = []
    for m in TAG.finditer(prompt):
        kind, params = m.group(1), m.group(2).split(":")
        if kind not in LORA_KINDS:
            warnings.append(f"{m.group(0)}: {kind} networks are not supported; the tag was left out")
            continue
        positional = [p for p in params if "=" not in p]
        named = dict(p.split("=", 1) for p in params if "=" in p)
        if not positional or not positional[0].strip():
            raise FieldError("prompt", f"has {m.group(0)}, which names no LoRA")
        text = _number(positional[1], m.group(0)) if len(positional) > 1 else 1.0
        text = _number(named["te"], m.group(0)) if "te" in named else text
        unet = _number(positional[2], m.group(0)) if len(positional) > 2 else text
        unet = _number(named["unet"], m.group(0)) if "unet" in named else unet
        if len(positional) > 3 or set(named) - {"te", "unet"}:
            warnings.append(f"{m.group(0)}: only the text-encoder and UNet weights are read (no dynamic rank)")
        tags.append(LoraTag(positional[0].strip(), text, unet))
    if len(tags) > MAX_LORAS:
        raise FieldError("prompt", f"names {len(tags)} LoRAs; at most {MAX_LORAS} can be applied at once")
    return TAG.sub("", prompt), tags, warnings


def strip_tags(prompt: str) -> str:
    return TAG.sub("", prompt)


class Networks:
    """A model's LoRAs and embeddings: which files there are, and which the current request applies."""

    def __init__(self, model: StableDiffusion, lora_dirs: Sequence[Path] = (), embedding_dirs: Sequence[Path] = (),
                 loras: LoraLibrary | None = None):
        self.model = model
        self.loras = loras or LoraLibrary(lora_dirs)
        self.patcher = LoraPatcher.of(model)
        self.embedding_dirs = [Path(d) for d in embedding_dirs]
        self._extra_embeddings: dict = {}
        self._scanned = None
        self._warnings: tuple[str, list[str]] = ("", [])

    # --- embeddings -------------------------------------------------------------------------------------------

    def embeddings(self):
        """The embedding folders read for this model (an EmbeddingScan: loaded, skipped, errors), once."""
        if self._scanned is None:
            from .embeddings import EmbeddingScan

            scan = EmbeddingScan()
            widths = model_widths(self.model)
            for folder in self.embedding_dirs:
                found = scan_embeddings(folder, widths)
                for name, e in found.loaded.items():
                    scan.loaded.setdefault(name, e)
                for name, e in found.skipped.items():
                    scan.skipped.setdefault(name, e)
                scan.reasons.update(found.reasons)
                scan.errors.update(found.errors)
            scan.loaded.update(self._extra_embeddings)
            # embeddings set on the model by hand (model.embeddings = {...}) stay, and win over a folder's of the
            # same name; only what an earlier scan put there is replaced
            scanned = self.model.__dict__.get("_embeddings_from_scan", {})  # whichever Networks scanned last
            by_hand = {k: e for k, e in getattr(self.model, "embeddings", {}).items() if scanned.get(k) is not e}
            self.model.__dict__["_embeddings_from_scan"] = dict(scan.loaded)
            self.model.embeddings = {**scan.loaded, **by_hand}
            self._scanned = scan
        return self._scanned

    def add_embedding(self, path: Path) -> str:
        embedding = load_embedding(path)
        embedding.check_fits(model_widths(self.model))
        self._extra_embeddings[embedding.name] = embedding
        self._scanned = None
        return embedding.name

    def refresh(self) -> None:
        self.loras.refresh()
        self._scanned = None

    # --- per request ------------------------------------------------------------------------------------------

    def activate(self, req: Request) -> list[str]:
        """Patch in the LoRAs `req`'s prompt names (taking out the last request's) and make its embeddings
        known; the warnings for this request."""
        self.embeddings()
        _, tags, warnings = parse_tags(req.prompt)
        if TAG.search(req.negative_prompt):
            warnings.append("extra-network tags in the negative prompt are not applied; they were left out")
        uses = []
        for tag in tags:
            lora = self.loras.load(tag.name)
            if lora is None:
                warnings.append(f"LoRA not found: {tag.name}")
            else:
                uses.append(LoraUse(lora, unet=tag.unet, text=tag.text))
        warnings += self.patcher.apply(uses).warnings()
        self._warnings = (req.prompt, warnings)
        return warnings

    @property
    def warnings(self) -> list[str]:
        """The warnings of the request last activated."""
        return list(self._warnings[1])

    def infotext_fields(self, req: Request) -> dict[str, str | None]:
        """"Lora hashes", "TI hashes" and the warnings of the request last activated, for the parameters text."""
        _, tags, _ = parse_tags(req.prompt)
        hashes = {t.name: self.loras.shorthash(t.name) for t in tags}
        lora = ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items() if h)
        used = embeddings_in(self.model, strip_tags(req.prompt)) + embeddings_in(self.model, strip_tags(
            req.negative_prompt))
        warnings = self._warnings[1] if self._warnings[0] == req.prompt else []
        return {"Lora hashes": lora or None, "TI hashes": ti_hashes(used) or None,
                "Warnings": "; ".join(warnings) or None}
