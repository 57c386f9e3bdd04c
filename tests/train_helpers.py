"""What the training tests share: the tiny shapes layout, a folder of captioned pictures, `sdengine train` run
in-process, and readers for its logs and errors."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdengine import cli
from sdengine.config import PRESETS
from sdengine.model import StableDiffusion

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ARCH = PRESETS["shapes-tiny"]  # the shapes model's layout at test size
TINY = ["--arch", "shapes-tiny", "--size", "32", "--warmup", "1", "--precision", "fp32", "--log-every", "1", "--lr",
        "1e-3"]


def make_images(folder: Path, n: int = 8, captions: bool = True) -> Path:
    """n 32x32 pictures of a coloured square on a plain background, with same-name .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.empty((32, 32, 3), np.uint8)
        a[:] = rng.integers(0, 256, 3)
        x, y = rng.integers(2, 20, 2)
        a[y:y + 10, x:x + 10] = rng.integers(0, 256, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"a {['red', 'blue', 'green'][i % 3]} square")
    return folder


def train(capsys, stage: str, out: Path, data: Path, *extra: str, quiet: bool = True) -> tuple[int, str]:
    """`sdengine train STAGE` in this process: (exit status, stderr); a usage error is argparse's exit 2."""
    capsys.readouterr()
    try:
        rc = cli.run(["train", stage, "--data", str(data), "--out", str(out), *TINY, *(["--quiet"] if quiet else []),
                      *extra])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def tiny_model(text_layers: int) -> StableDiffusion:
    """A fresh model of the tiny architecture with `text_layers` text-encoder layers (for clip skip)."""
    cfg = dataclasses.replace(ARCH, text=dataclasses.replace(ARCH.text, layers=text_layers))
    return StableDiffusion(cfg).init_weights().eval()


def one_error(err: str, *words: str) -> str:
    """The single `sdengine: error:` line of stderr, which must contain all of `words`; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("sdengine: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Weights trained (AdamW, lr 1e-3) on the same data, summed in another order, agree up to rounding.

    Not by their max difference: a few biases have a true gradient of exactly 0 (a conv bias right before a
    one-channel-per-group GroupNorm, attention key biases) and AdamW turns their rounding noise (|g| ~ 1e-9, near
    its eps) into steps of up to lr. All else agrees to ~1e-7; weights trained on other data (half the batch, say)
    differ by ~lr almost everywhere."""
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert diff.mean() < 2e-6 and diff.quantile(0.99) < 1e-5, (diff.mean(), diff.quantile(0.99), diff.max())
