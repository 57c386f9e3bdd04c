"""$SDENGINE_HOME: the folder of the user's models, add-ons and caches. A module of its own, importing nothing of
sdengine's, so that any layer (the runtime's lookups, the OpenVINO graph cache) can find it without a cycle."""
from __future__ import annotations

import os
from pathlib import Path


def sdengine_home() -> Path:
    return Path(os.environ.get("SDENGINE_HOME", Path.home() / ".cache" / "sdengine"))


__all__ = ["sdengine_home"]
