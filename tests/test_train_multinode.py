"""Training across machines, on one: two torchrun "nodes" on localhost (--nnodes 2, static rendezvous) train as one
process does, and a run resumes under another world size (2 processes -> 1, 1 -> 2) as if never stopped: the
global batch, its items and the draws depend on the step, not on who computes them. --shard-optimizer (ZeRO-1)
halves each process's optimizer state over two and changes nothing else: its checkpoints hold the whole state."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from server_helpers import free_port
from train_helpers import ENV, TINY, assert_same_training, logged, make_images

from sdengine import cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ARGS = ["train", "vae", *TINY, "--batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


def one_process(data: Path, out: Path, *extra: str) -> None:
    assert cli.run([*ARGS, "--quiet", "--data", str(data), "--out", str(out), *extra]) == 0


def two_ranks(data: Path, out: Path, *extra: str, quiet: bool = True) -> str:
    """`sdengine train` under torchrun, two processes; its stderr."""
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sdengine.cli", *ARGS, "--data",
                           str(data), "--out", str(out), *extra, *(["--quiet"] if quiet else [])], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def weights(run: Path) -> dict:
    return load_file(run / "vae.safetensors")


@pytest.mark.slow  # two torchrun processes
def test_two_nodes_on_localhost_train_as_one_process(tmp_path, data):
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "sdengine.cli", *ARGS,
                               "--quiet", "--data", str(data), "--out", str(tmp_path / "nodes"), "--steps", "3"],
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


@pytest.mark.slow  # torchrun
def test_a_sharded_optimizer_trains_the_same_and_resumes_anywhere(tmp_path, data):
    """Sharded over two processes for steps 1-2, one process (unsharded) for step 3, sharded again for step 4: the
    weights of a straight one-process run, each process holding about half the AdamW state."""
    one_process(data, tmp_path / "straight", "--steps", "4")
    err = two_ranks(data, tmp_path / "run", "--steps", "4", "--stop-at", "2", "--shard-optimizer", quiet=False)
    found = re.search(r"optimizer state sharded over 2 processes: ([\d.]+) MiB at most on one, ([\d.]+) MiB in all",
                      err)
    assert found, err[-3000:]
    most, total = map(float, found.groups())
    assert 0.4 * total < most < 0.6 * total  # ZeRO balances by parameter size
    one_process(data, tmp_path / "run", "--steps", "4", "--stop-at", "3", "--resume")
    two_ranks(data, tmp_path / "run", "--steps", "4", "--resume", "--shard-optimizer")
    assert_same_training(weights(tmp_path / "run"), weights(tmp_path / "straight"))
