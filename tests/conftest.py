"""Shared fixtures: tiny reference pipelines (diffusers folders) of both layouts, built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads (here and in every subprocess a test starts): idle OpenMP threads sleep instead of spinning,
# which keeps a shared CPU from stalling (see sdengine/cli.py main).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference import save_pipeline  # noqa: E402


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def reference(request, tmp_path_factory) -> dict:
    """{"layout", "folder", "parts"}: a diffusers folder and the live reference components it was saved from."""
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    parts = save_pipeline(request.param, folder)
    return {"layout": request.param, "folder": folder, "parts": parts}


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd1only") / "pipe"
    save_pipeline("sd1", folder)
    return folder
