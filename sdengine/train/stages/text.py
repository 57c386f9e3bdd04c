"""`sdengine train text`: CLIP-style contrastive pretraining of the text encoder against a small image encoder, on
its own BPE vocabulary. Leaves text.safetensors, a text encoder part file with the tokenizer inside (and the
tokenizer folder beside it); the image encoder is discarded."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...config import TextConfig
from ...images import images_to_tensor
from ...nn.clip import build_text_encoder
from ...tokenizer import CLIPTokenizer
from ...weights.parts import write_part
from ..data import Source, batch_items

RESULT = "text.safetensors"


def meaning(caption: str) -> str:
    """What a caption says, independent of phrasing: the shapes world's parsed scene when it parses, else the
    text itself."""
    from ...data.shapes import PromptError, parse_prompt

    try:
        return repr(parse_prompt(caption).normalized())
    except (PromptError, ValueError):
        return caption.strip().lower()


class ImageEncoder(nn.Module):
    """A small CNN for contrastive pretraining only: image -> embedding of the text width."""

    def __init__(self, width: int, channels: int = 64):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * c), nn.SiLU(),
            nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.GroupNorm(8, 4 * c), nn.SiLU())
        self.pos = nn.Parameter(torch.zeros(1, 4 * c, 8, 8))  # where things are matters in this world
        self.proj = nn.Linear(4 * c * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        h = h + F.interpolate(self.pos, size=h.shape[-2:], mode="bilinear", align_corners=False)
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.proj(h)


class ContrastiveHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.text_proj = nn.Linear(width, width, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))


class TextStage:
    name = "text"

    def __init__(self, cfg: TextConfig, source: Source, tokenizer: CLIPTokenizer, seed: int = 0,
                 hard_negatives: bool = False):
        """hard_negatives: add, for each caption of the shapes world, captions worded alike that mean another
        scene (data.shapes.hard_negatives) as extra texts that no image of the batch matches."""
        self.cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer.vocab), eos_token_id=tokenizer.eos_id)
        self.source, self.tokenizer, self.seed = source, tokenizer, seed
        self.hard_negatives = hard_negatives
        self.text = build_text_encoder(self.cfg)
        self.image = ImageEncoder(cfg.width)
        self.head = ContrastiveHead(cfg.width)

    def trainable(self) -> dict[str, nn.Module]:
        return {"text": self.text, "image": self.image, "head": self.head}

    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        from ...data.shapes import hard_negatives

        items = items if items is not None else batch_items(self.source, step, indices)
        captions = [c for _, c in items]
        owners = []  # the item each hard negative was made from
        if self.hard_negatives:
            for i, c in enumerate(list(captions)):
                negatives = hard_negatives(c)
                captions += negatives
                owners += [i] * len(negatives)
        ids = self.tokenizer(captions, max_length=self.cfg.max_positions)
        # The pooled output is read at the end token and attention is causal, so positions after the longest
        # caption's end cannot change it: cut them (captions here are far shorter than 77 tokens).
        length = int((ids == self.tokenizer.eos_id).int().argmax(dim=1).max()) + 1
        keys = [meaning(c) for c in captions]
        return images_to_tensor([im for im, _ in items], device), ids[:, :length].to(device), keys, owners

    def loss(self, batch, step: int):
        x, ids, keys, owners = batch
        n = len(x)  # texts 0..n-1 are the images' captions, the rest hard negatives
        text = F.normalize(self.head.text_proj(self.text(ids)[1]).float(), dim=-1)
        image = F.normalize(self.image(x).float(), dim=-1)
        logits = self.head.logit_scale.clamp(max=np.log(100)).exp() * image @ text.T
        # Captions that mean the same scene are positives too (soft targets), not false negatives; a hard negative
        # that happens to mean another item's scene is a positive of that item.
        same = torch.tensor([[a == b for b in keys] for a in keys[:n]], dtype=torch.float32, device=x.device)
        loss = 0.5 * (torch.sum(-same / same.sum(1, keepdim=True) * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-same[:, :n].T / same[:, :n].sum(0)[:, None] * F.log_softmax(logits[:, :n].T, 1),
                                  1).mean())
        parts = {"acc": (logits[:, :n].argmax(1) == torch.arange(n, device=x.device)).float().mean().item()}
        if owners:  # how often an image prefers its caption to the same words meaning another scene
            own = torch.tensor(owners, device=x.device)
            parts["neg_acc"] = (logits[own, own] > logits[own, n + torch.arange(len(owners), device=x.device)]
                                ).float().mean().item()
        return loss, parts

    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        return None  # nothing to look at; the retrieval accuracy is in the log

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        write_part(out / RESULT, "text", modules["text"], self.cfg, self.tokenizer)
        self.tokenizer.save(out / "tokenizer")
