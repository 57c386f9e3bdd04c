"""Start a real `sdengine serve` process on loopback with a tiny model, for tests that talk to it over HTTP."""
from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(path: Path, seed: int = 0) -> None:
    from sdengine.config import TINY
    from sdengine.model import StableDiffusion
    from sdengine.weights import save

    save(StableDiffusion(TINY).init_weights(seed=seed), path)


@dataclass
class Running:
    url: str
    host: str
    port: int
    proc: subprocess.Popen
    models: Path
    log: Path


def _ready(url: str, auth: tuple[str, str] | None) -> bool:
    request = urllib.request.Request(url + "/sdapi/v1/samplers")
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(cmd: list[str], log: Path, auth: tuple[str, str] | None, timeout: float) -> tuple[subprocess.Popen, int]:
    """Start on a free port and wait until it answers; a port taken between choosing and binding (another
    process's outgoing connection can hold it) is retried on another one."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for attempt in range(3):
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while not _ready(f"http://127.0.0.1:{port}", auth):
            if proc.poll() is not None:
                if "address already in use" in log.read_text().lower() and attempt < 2:
                    break
                raise RuntimeError(f"server exited: {log.read_text()}")
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"server not ready: {log.read_text()}")
            time.sleep(0.2)
        else:
            return proc, port
    raise AssertionError("unreachable")


@contextlib.contextmanager
def serve(root: Path, auth: tuple[str, str] | None = None, extra: list[str] | None = None,
          timeout: float = 120) -> Iterator[Running]:
    """A server on 127.0.0.1 with one tiny model (root/models/tiny.safetensors), CPU, fp32, one thread per job;
    stopped (SIGTERM, then SIGKILL) on exit."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "tiny.safetensors").exists():
        write_model(models / "tiny.safetensors", 0)
    log = root / "server.log"
    cmd = [sys.executable, "-m", "sdengine.cli", "serve", "--models-dir", str(models), "--model", "tiny",
           "--device", "cpu", "--precision", "fp32",
           # one CPU thread per job: on a small machine shared with other work, OpenMP teams stall at barriers
           "--threads", "1", "--max-width", "256", "--max-height", "256"]
    if auth:
        cmd += ["--api-auth", ":".join(auth)]
    proc, port = _start(cmd + (extra or []), log, auth, timeout)
    try:
        yield Running(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc, models, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
