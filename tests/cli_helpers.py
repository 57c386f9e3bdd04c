"""The real `sdengine` command in a subprocess, and the CLI's error contract: one `sdengine: error:` line on stderr,
a non-zero exit, no traceback."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path


def run_cli(*args, limit_bytes: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m sdengine.cli *args` without SDENGINE_DEBUG (errors stay one line); limit_bytes caps file writes
    (EFBIG, as on a full disk)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {k: v for k, v in os.environ.items() if k != "SDENGINE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "sdengine.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120, preexec_fn=preexec if limit_bytes else None)


def assert_cli_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, stderr exactly one 'sdengine: error:' line holding every fragment; returns that line."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdengine: error:"), proc.stderr
    assert "internal error" not in lines[0], lines[0]  # the CLI's last resort for bugs: not a clear error
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]
