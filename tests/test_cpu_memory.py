"""The CLI's allocator setting: large tensors reuse freed memory instead of faulting in fresh pages each time."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Allocates and fills a 64 MiB tensor eight times after eight to warm up (the heap settles after a few: an aligned
# block does not fit quite in the hole the last one left), and prints how many page faults the second eight took.
PROBE = """
import resource, sys, torch
from sdengine.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
for _ in range(8):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("SDENGINE_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _probe("tuned")
    assert applied
    pages_per_tensor = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults < 2 * pages_per_tensor, faults  # at most one of the eight is fresh memory; the rest reuse it
    _, untuned = _probe("default")
    assert untuned > 6 * pages_per_tensor, untuned  # glibc's default: a fresh mmap, zeroed page by page, each time


def test_user_choice_is_left_alone():
    assert _probe("tuned", SDENGINE_MALLOC="system")[0] is False
    assert _probe("tuned", MALLOC_ARENA_MAX="2")[0] is False
    assert _probe("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] is False
