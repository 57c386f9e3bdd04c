"""`sdengine train embedding`: textual inversion. Only N new token vectors train; the model stays frozen.

The embedding is named by --token and used exactly as at inference (prompts.py's chunker, A1111's rule): wherever
a caption holds the token's word (its BPE tokens in a row), those tokens give way to N placeholder slots that the
vectors fill before the position embeddings are added. So the captions are used as they are: to teach the shapes
world's "pink", train `--token pink` and every caption and eval prompt saying "pink" reads the embedding. The
vectors start as the init word's token embeddings (repeated to N, as A1111 does; default: the token's own word).
Leaves TOKEN.pt in A1111's layout (`string_to_param`), or TOKEN.safetensors (`emb_params`): the file's stem is
the name prompts use.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...embeddings import MAX_VECTORS
from ...model import StableDiffusion
from ...prompts import PLACEHOLDER
from ...weights.io import atomic_path, write_safetensors
from ..data import Source
from .unet import UNetStage

FORMATS = ("pt", "safetensors")


class EmbeddingVectors(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone().float())


def substitute(ids: torch.Tensor, name_ids: list[int], n: int, bos: int, eos: int, pad: int
               ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Token id rows (start, tokens, end, padding) with each occurrence of `name_ids` replaced by n placeholder
    slots, as the prompt chunker does; (new ids, [(row, position of the slots)]). Tokens pushed past the window
    are cut, the end token kept."""
    length = ids.shape[1]
    rows, fixes = [], []
    for r, row in enumerate(ids.tolist()):
        end = row.index(eos, 1) if eos in row[1:] else length
        tokens, out, i = row[1:end], [], 0
        while i < len(tokens):
            if tokens[i:i + len(name_ids)] == name_ids:
                if 1 + len(out) + n < length:  # an embedding that does not fit whole is left out, not cut
                    fixes.append((r, 1 + len(out)))
                    out += [PLACEHOLDER] * n
                i += len(name_ids)
            else:
                out.append(tokens[i])
                i += 1
        out = [bos] + out[:length - 2] + [eos]
        rows.append(out + [pad] * (length - len(out)))
    return torch.tensor(rows, dtype=ids.dtype, device=ids.device), fixes


class EmbeddingStage(UNetStage):
    """UNetStage's data and loss, the model frozen; the text encoder runs with the vectors in place of the token."""

    name = "embedding"

    def __init__(self, model: StableDiffusion, source: Source | None, token: str, vectors: int,
                 init_word: str | None = None, seed: int = 0, init_name: str = "", fmt: str = "pt",
                 **unet_options):
        # no caption dropout: an empty caption holds no token and gives the vectors no gradient
        super().__init__(model, source, seed=seed, caption_dropout=0.0, **unet_options)
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"--vectors must be 1 to {MAX_VECTORS} (got {vectors})")
        tokenizer = model.tokenizer
        self.name_ids = tokenizer.encode(token)
        if not token.strip() or not self.name_ids:
            raise ValueError(f"--token {token!r}: the tokenizer makes no tokens of it")
        if len(model.text_encoders) != 1:
            raise ValueError("train embedding is for single-text-encoder models (SD1/SD2)")
        word = token if init_word is None else init_word
        init_ids = tokenizer.encode(word)
        if not init_ids:
            raise ValueError(f"--init-word {word!r}: the tokenizer makes no tokens of it")
        table = model.text_encoder.token_embedding().weight.detach()
        init = table[torch.tensor([init_ids[i % len(init_ids)] for i in range(vectors)])]
        model.requires_grad_(False)
        model.unet.eval()
        if fmt not in FORMATS:
            raise ValueError(f"embedding format {fmt!r}: one of {', '.join(FORMATS)}")
        self.token, self.init_word, self.init_name, self.format = token, word, init_name, fmt
        self.embedding = EmbeddingVectors(init)
        self.train_text = True  # batches carry ids; the loss runs the encoder with the vectors in place
        self.trained_steps: int | None = None  # set by the command before export

    def trainable(self) -> dict[str, nn.Module]:
        return {"embedding": self.embedding}

    def _condition(self, ids: torch.Tensor):
        t = self.model.tokenizer
        return substitute(ids, self.name_ids, self.embedding.vectors.shape[0], t.bos_id, t.eos_id, t.pad_id)

    def loss(self, batch, step: int):
        z0, (ids, slots), t, noise = batch
        self.model.to(z0.device)  # the frozen model is not the trainer's to move (a no-op once there)
        vectors = self.embedding.vectors
        context = self.model.text_encoder(ids, fixes=[(r, p, vectors) for r, p in slots] or None)[0].float()
        loss = self._denoise_loss(z0, context, t, noise)
        if not slots:  # a batch whose captions never say the token: a zero gradient, not a backward() error
            loss = loss + 0.0 * vectors.sum()
        return loss, {"with_token": len({r for r, _ in slots}) / max(1, len(ids))}

    def _denoise_loss(self, z0, context, t, noise) -> torch.Tensor:
        # UNetStage.loss with the context given (train_text off for that call: it would encode `cond` again)
        self.train_text = False
        try:
            return UNetStage.loss(self, (z0, context, t, noise), 0)[0]
        finally:
            self.train_text = True

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        before = self.model.embeddings
        self.model.embeddings = {self.token: self.embedding_value()}
        try:
            super().samples({"unet": self.model.unet}, step, out)
        finally:
            self.model.embeddings = before

    def embedding_value(self):
        from ...embeddings import Embedding

        vec = self.embedding.vectors.detach().float().cpu()
        return Embedding(self.token, {vec.shape[1]: vec}, step=self.trained_steps)

    def export(self, modules: dict[str, nn.Module], out: Path) -> Path:
        return write_embedding(self.embedding.vectors, out / f"{self.token}.{self.format}", self.token,
                               self.trained_steps, self.init_name)


def write_embedding(vectors: torch.Tensor, path: Path, name: str, step: int | None, checkpoint_name: str) -> Path:
    """A1111's .pt layout (`string_to_param: {"*": (n, width)}`, `name`, `step`, `sd_checkpoint_name`) or a
    .safetensors with `emb_params`, by the path's suffix; both read by embeddings.load_embedding."""
    vec = vectors.detach().float().cpu().contiguous()
    with atomic_path(path, force=True) as tmp:
        if path.suffix == ".safetensors":
            write_safetensors({"emb_params": vec}, tmp, {"name": name, "step": str(step or 0)})
        else:
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name,
                        "step": step or 0, "sd_checkpoint": None, "sd_checkpoint_name": checkpoint_name}, tmp)
    return path
