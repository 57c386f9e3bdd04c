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

# The sampler sweeps run every sampler on both layouts. The fast loop (-m "not slow") keeps SD1's whole sweep and
# SD2's Euler ones (the SD2 layout under each kind of generation); the full run does every pair.
SAMPLER_SWEEPS = {"test_txt2img_matches_diffusers", "test_img2img_matches_diffusers",
                  "test_stochastic_samplers_are_deterministic_per_seed"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        sampler = item.name.partition("[sd2-")[2]
        if getattr(item, "originalname", None) in SAMPLER_SWEEPS and sampler and not sampler.startswith("euler"):
            item.add_marker(pytest.mark.slow)


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
