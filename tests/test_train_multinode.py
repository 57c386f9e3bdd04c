"""Training across machines, on one: two torchrun "nodes" on localhost (--nnodes 2, static rendezvous) train as one
process does, and a run resumes under another world size (2 processes -> 1, 1 -> 2) as if never stopped: the
global batch, its items and the draws depend on the step, not on who computes them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from server_helpers import free_port
from train_helpers import ENV, TINY, assert_same_training, logged, make_images

from sdengine import cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ARGS = ["train", "vae", *TINY, "--quiet", "--batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


def one_process(data: Path, out: Path, *extra: str) -> None:
    assert cli.run([*ARGS, "--data", str(data), "--out", str(out), *extra]) == 0


def two_ranks(data: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sdengine.cli", *ARGS, "--data",
                           str(data), "--out", str(out), *extra], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(run: Path) -> dict:
    return load_file(run / "vae.safetensors")


@pytest.mark.slow  # two torchrun processes
def test_two_nodes_on_localhost_train_as_one_process(tmp_path, data):
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "sdengine.cli", *ARGS,
                               "--data", str(data), "--out", str(tmp_path / "nodes"), "--steps", "3"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    one_process(data, tmp_path / "one", "--steps", "3")
    assert_same_training(weights(tmp_path / "nodes"), weights(tmp_path / "one"))
    assert [r["step"] for r in logged(tmp_path / "nodes")] == [1, 2, 3]  # one log, written by global rank 0


@pytest.mark.slow  # torchrun
def test_a_run_resumes_under_another_world_size(tmp_path, data):
    one_process(data, tmp_path / "straight", "--steps", "4")
    two_ranks(data, tmp_path / "shrunk", "--steps", "4", "--stop-at", "2")  # 2 processes, then 1
    one_process(data, tmp_path / "shrunk", "--steps", "4", "--resume")
    one_process(data, tmp_path / "grown", "--steps", "4", "--stop-at", "2")  # 1 process, then 2
    two_ranks(data, tmp_path / "grown", "--steps", "4", "--resume")
    for run in ("shrunk", "grown"):
        assert_same_training(weights(tmp_path / run), weights(tmp_path / "straight"))
        assert [r["step"] for r in logged(tmp_path / run)] == [1, 2, 3, 4]
