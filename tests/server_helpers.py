"""The one harness for tests that talk to a real `sdengine serve` process over HTTP (test_server, test_a1111_client,
test_webpage): `serve()` starts it on loopback with a tiny model and yields a `Running` server to call."""
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
from typing import Literal


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
    auth: tuple[str, str] | None = None

    def client(self, auth: tuple[str, str] | None | Literal["server's"] = "server's"):
        """An httpx client on the server; by default with the credentials the server was started with."""
        import httpx

        return httpx.Client(base_url=self.url, auth=self.auth if auth == "server's" else auth, timeout=300)

    def post(self, path: str, body: dict):
        with self.client() as c:
            return c.post(path, json=body)

    def get(self, path: str, **params):
        with self.client() as c:
            return c.get(path, params=params)

    def rss_mb(self) -> float:
        """The server process's resident memory."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


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
    """A server on 127.0.0.1 with one tiny model (root/models/tiny.safetensors, written unless there; other files
    put in root/models first are listed too), CPU, fp32, one thread per job, 256 px at most (`extra` adds or
    overrides options); stopped (SIGTERM, then SIGKILL) on exit."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "tiny.safetensors").exists():
        write_model(models / "tiny.safetensors", 0)
    log = root / "server.log"
    cmd = [sys.executable, "-m", "sdengine.cli", "serve", "--models-dir", str(models), "--model", "tiny",
           "--device", "cpu", "--precision", "fp32",
           # one CPU thread per job: on a small machine shared with other work, 2-thread OpenMP teams stall at
           # their barriers (measured here: 64x64 jobs went from ~0.2 s to 2-20 s each)
           "--threads", "1", "--max-width", "256", "--max-height", "256"]
    if auth:
        cmd += ["--api-auth", ":".join(auth)]
    proc, port = _start(cmd + (extra or []), log, auth, timeout)
    try:
        yield Running(url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, proc=proc, models=models, log=log,
                      auth=auth)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
