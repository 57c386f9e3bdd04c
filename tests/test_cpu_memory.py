"""The CLI's allocator setting: large tensors reuse freed memory instead of faulting in fresh pages each time."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Run in a fresh process: applies the setting (argv[1] "tuned") or not ("default") and prints whether it was
# applied; with argv[2] = rounds > 0, then allocates and fills a 64 MiB tensor eight times to warm up, and prints
# the minor page faults of each following round of eight (this process's own: RUSAGE_SELF around the round).
# The heap may take a round or two more to settle (an aligned block does not fit quite in the hole the last one
# left), and another process can only add faults, never remove them: the best round is the measure.
PROBE = """
import resource, sys
from sdengine.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
rounds = []
if int(sys.argv[2]):
    import torch
    for _ in range(8):
        torch.empty(16 << 20).fill_(1.0)
    for _ in range(int(sys.argv[2])):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            torch.empty(16 << 20).fill_(1.0)
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *rounds)
"""


def _start(mode: str, rounds: int = 0, **env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("SDENGINE_MALLOC", "GLIBC_TUNABLES")}
    return subprocess.Popen([sys.executable, "-c", PROBE, mode, str(rounds)], env={**clean, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> tuple[bool, list[int]]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    applied, *rounds = out.split()
    return applied == "True", [int(n) for n in rounds]


def _probe(mode: str, rounds: int = 0, **env: str) -> tuple[bool, list[int]]:
    return _result(_start(mode, rounds, **env))


@pytest.mark.slow
def test_freed_memory_is_reused_without_page_faults():
    # Both at once (each counts only its own faults): half the wall time, and another process busy beside each.
    tuned, default = _start("tuned", rounds=3), _start("default", rounds=3)  # the baseline, measured the same way
    (applied, rounds), (_, default_rounds) = _result(tuned), _result(default)
    assert applied
    faults, untuned = min(rounds), min(default_rounds)
    pages_per_tensor = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert untuned > 6 * pages_per_tensor, default_rounds  # glibc's default: a fresh mmap, zeroed page by page
    # at most one of the eight is fresh memory, the rest reuse it: under a quarter of the default's faults
    assert faults < 2 * pages_per_tensor and faults < untuned / 4, (rounds, default_rounds)


def test_user_choice_is_left_alone():
    assert _probe("tuned", SDENGINE_MALLOC="system")[0] is False
    assert _probe("tuned", MALLOC_ARENA_MAX="2")[0] is False
    assert _probe("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] is False
