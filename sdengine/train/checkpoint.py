"""Training checkpoints: atomic, the last K kept, resumable from the newest complete one.

A checkpoint is a folder `step-000001234/` holding `state.pt` (model, EMA, optimizer, LR schedule, RNG states,
step, counters) and `COMPLETE`, written last. It is built under a temporary name and renamed into place, so a
kill or a full disk mid-save leaves either the previous checkpoints untouched or a `.partial` folder that
resume ignores (and the next save removes).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import first_line
from ..weights.io import atomic_path

PREFIX = "step-"
MARKER = "COMPLETE"
_NAME = re.compile(rf"{PREFIX}(\d+)")


class ResumeError(RuntimeError):
    """--resume cannot go on: no checkpoint, or none that is complete and readable."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the previous ones are left as they were."""


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


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder's name (`step-000001234`), None for any other name."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders without COMPLETE and `.partial` ones are not)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and step_of(p) is not None and (p / MARKER).exists()]
    return sorted(found, key=step_of)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint `step` atomically, then keep only the newest `keep` complete ones.

    Checkpoints of later steps are removed: they belong to a run abandoned by resuming from an older one (a newer
    checkpoint that could not be read), and would otherwise count as the newest when pruning."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f".{PREFIX}*.partial*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"{PREFIX}{step:09d}"
    try:
        with atomic_path(final, force=True, is_dir=True) as tmp:  # a `.step-*.partial-*` folder until complete
            torch.save(state, tmp / "state.pt")
            _fsync(tmp / "state.pt")  # the data on disk before COMPLETE says it is
            (tmp / MARKER).write_text(f"{step}\n")
            _fsync(tmp / MARKER)
        _fsync(run_dir)
    except Exception as e:  # KeyboardInterrupt, SystemExit: as they are (the partial folder is gone either way)
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else first_line(e)
        previous = checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {run_dir}: {reason} "
                              f"({kept})") from e
    for newer in [p for p in checkpoints(run_dir) if step_of(p) > step]:
        shutil.rmtree(newer, ignore_errors=True)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: Path, quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint that reads back; skips (and names) ones that are corrupt."""
    found = checkpoints(run_dir)
    if not found:
        raise ResumeError(f"--resume: no complete checkpoint in {run_dir} (nothing to resume; drop --resume "
                          "to start fresh)")
    errors = []
    for path in reversed(found):
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a training checkpoint")
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            errors.append(f"{path.name}: {first_line(e)}")
            continue
        if errors and not quiet:
            print(f"sdengine: warning: skipped unreadable checkpoints ({'; '.join(errors)}); resuming from the older "
                  f"{path.name}", file=sys.stderr)
        return path, state
    raise ResumeError(f"--resume: no readable checkpoint in {run_dir} ({'; '.join(errors)})")
