"""Training checkpoints: atomic, the last K kept, resumable from the newest complete one.

A checkpoint is a folder `step-000001234/` holding `state.pt` (model, EMA, optimizer, LR schedule, RNG states,
step, counters) and `COMPLETE`, written last. It is built under a temporary name and renamed into place, so a
kill or a full disk mid-save leaves either the previous checkpoints untouched or a `.partial` folder that
resume ignores (and the next save removes).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"
MARKER = "COMPLETE"


class ResumeError(RuntimeError):
    """--resume cannot go on: no checkpoint, or none that is complete and readable."""


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain values, so checkpoints load with torch.load(weights_only=True)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f".{PREFIX}*.partial*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial", dir=run_dir))
    try:
        torch.save(state, tmp / "state.pt")
        (tmp / MARKER).write_text(f"{step}\n")
        with open(tmp / MARKER) as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint that reads back; skips (and names) ones that are corrupt."""
    found = checkpoints(run_dir)
    if not found:
        raise ResumeError(f"--resume: no complete checkpoint in {run_dir} (nothing to resume; drop --resume "
                          "to start fresh)")
    errors = []
    for path in reversed(found):
        try:
            return path, torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            errors.append(f"{path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise ResumeError(f"--resume: no readable checkpoint in {run_dir} ({'; '.join(errors)})")
