"""Bad checkpoint files and folders (truncated, corrupted, lying headers, pickles that run code, not Stable
Diffusion, parts missing): a clear one-line error from `sdengine.load` (a typed exception) and `sdengine info` (one
stderr line, non-zero exit, no traceback), no code run; and `sdengine convert` leaves nothing half-written when its
destination exists or the disk fills. Bad generation arguments are in test_generate_cli.py."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_cli_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdengine
from sdengine import CheckpointError, UnknownArchitecture
from sdengine.cli import run

# ---- helpers ------------------------------------------------------------------------------------------------------

def write_raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """A .safetensors built by hand: 8-byte little-endian header length, JSON header, data."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


def folder_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Payload:
    """Unpickling this runs a shell command (touches a marker): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(sd1_folder, tmp_path_factory) -> dict[str, Path]:
    """Valid single files (.safetensors and .ckpt) of the tiny SD1 model, to copy and damage."""
    root = tmp_path_factory.mktemp("good")
    model = sdengine.load(sd1_folder)
    return {"safetensors": sdengine.save(model, root / "model.safetensors"),
            "ckpt": sdengine.save(model, root / "model.ckpt"), "folder": sd1_folder}


@pytest.fixture(params=["in-process", pytest.param("process", marks=pytest.mark.slow)])
def assert_refused(request, capsys, monkeypatch) -> Callable[..., None]:
    """assert_refused(path, exc, *fragments): both `sdengine.load` (raises exc, message one line with the fragments)
    and `sdengine info` refuse path. The command runs as `run([...])` in this process, and (slow: each is a fresh
    interpreter importing torch, ~2 s) as the real command in a process of its own."""
    monkeypatch.delenv("SDENGINE_DEBUG", raising=False)

    def info(path: Path) -> subprocess.CompletedProcess:
        if request.param == "process":
            return run_cli("info", path)
        capsys.readouterr()
        code = run(["info", str(path)])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["sdengine", "info", str(path)], code, out.out, out.err)

    def check(path: Path, exc: type[Exception], *fragments: str) -> None:
        with pytest.raises(exc) as raised:
            sdengine.load(path)
        message = str(raised.value)
        assert "\n" not in message.strip(), message
        for fragment in fragments:
            assert fragment.lower() in message.lower(), (fragment, message)
        assert_cli_error(info(path), *fragments)

    return check


@pytest.fixture()
def out(tmp_path) -> Path:
    """An empty folder for a destination, so that anything left over in it is visible."""
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---- 1. truncated / corrupted files -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_truncated_file(good, tmp_path, kind, assert_refused):
    data = good[kind].read_bytes()
    bad = tmp_path / f"truncated.{kind}"
    bad.write_bytes(data[: len(data) // 2])
    assert_refused(bad, CheckpointError, str(bad))


def test_corrupted_safetensors_header(good, tmp_path, assert_refused):
    data = bytearray(good["safetensors"].read_bytes())
    n = header_length(good["safetensors"])
    rng = random.Random(0)
    for i in range(8 + n // 3, 8 + n // 3 + 64):  # random bytes inside the JSON header
        data[i] = rng.randrange(256)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(data))
    assert_refused(bad, CheckpointError, "corrupt")


# ---- 2. headers that lie ------------------------------------------------------------------------------------------

LYING_HEADERS = {
    "offsets beyond the file": ({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, 16, None),
    "shape/dtype vs byte length": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8, None),
    "header length beyond the file": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, 10**9),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_safetensors_header_lies(tmp_path, case, assert_refused):
    header, n_data, header_len = LYING_HEADERS[case]
    bad = write_raw_safetensors(tmp_path / "lies.safetensors", header, bytes(n_data), header_len)
    assert_refused(bad, CheckpointError, str(bad))


def test_invalid_config_metadata(good, tmp_path, assert_refused):
    tensors, metadata = tensors_and_metadata(good["safetensors"])
    bad = tmp_path / "badmeta.safetensors"
    save_file(tensors, str(bad), metadata=dict(metadata, sdengine_config="[1, 2]"))
    assert_refused(bad, CheckpointError, "invalid sdengine_config")


# ---- 3. pickles that would run code -------------------------------------------------------------------------------

def write_malicious(path: Path, variant: str, marker: Path) -> None:
    obj = {"state_dict": {"x": Payload(marker), "w": torch.zeros(2)}}  # the payload is met first
    if variant == "zip":
        torch.save(obj, path)
    elif variant == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, no torch framing at all
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("variant", ["zip", "legacy", "plain"])
def test_pickle_that_runs_code_is_refused(tmp_path, variant, assert_refused):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    write_malicious(bad, variant, marker)
    assert_refused(bad, CheckpointError, "refused", "posix.system")
    assert not marker.exists(), "the pickle's code ran"
    # Control: the payload is live; an unrestricted load would have run it.
    try:
        torch.load(bad, weights_only=False)
    except Exception:  # noqa: BLE001 - the plain pickle has no torch framing; the code still runs first
        pass
    assert marker.exists()


# ---- 4. not Stable Diffusion / wrong key set ----------------------------------------------------------------------

def test_unrelated_tensors(tmp_path, assert_refused):
    bad = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layer.0.weight": torch.randn(4, 4), "classifier.bias": torch.randn(4)}, str(bad))
    assert_refused(bad, UnknownArchitecture, str(bad), "not a Stable Diffusion checkpoint")


@pytest.mark.parametrize("with_config", [True, False], ids=["sdengine_config", "detected"])
def test_keys_missing_and_unexpected(good, tmp_path, with_config, assert_refused):
    tensors, metadata = tensors_and_metadata(good["safetensors"])
    assert "sdengine_config" in metadata
    removed = ["first_stage_model.decoder.conv_out.bias", "model.diffusion_model.input_blocks.1.0.out_layers.3.weight"]
    for key in removed:
        del tensors[key]
    tensors["model.diffusion_model.surprise.weight"] = torch.zeros(3)
    bad = tmp_path / "edited.safetensors"
    save_file(tensors, str(bad), metadata=metadata if with_config else None)
    if with_config:  # the architecture is known: the strict load names every difference
        assert_refused(bad, UnknownArchitecture, "2 missing", *removed, "1 unexpected",
                       "model.diffusion_model.surprise.weight")
    else:  # detection needs the key it lacks
        assert_refused(bad, UnknownArchitecture, "not a Stable Diffusion checkpoint", removed[1])


# ---- 5. diffusers folders -----------------------------------------------------------------------------------------

def test_diffusers_folder_missing_part(good, tmp_path, assert_refused):
    folder = tmp_path / "pipe"
    shutil.copytree(good["folder"], folder)
    shutil.rmtree(folder / "vae")
    assert_refused(folder, CheckpointError, "vae/")


def test_folder_that_is_not_a_model(tmp_path, assert_refused):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    assert_refused(folder, CheckpointError, "not a diffusers model")


# ---- 6. missing path ----------------------------------------------------------------------------------------------

def test_path_does_not_exist(tmp_path, assert_refused):
    assert_refused(tmp_path / "nope.safetensors", FileNotFoundError, "nope.safetensors")


# ---- 7. existing destination --------------------------------------------------------------------------------------

@pytest.mark.slow  # two `sdengine convert` processes, one a full conversion: ~6-12 s
def test_convert_refuses_existing_destination_without_force(good, out):
    dst = out / "model.safetensors"
    dst.write_bytes(b"precious bytes")
    assert_cli_error(run_cli("convert", good["folder"], dst, "--to", "single"), "exists", "--force")
    assert dst.read_bytes() == b"precious bytes"
    proc = run_cli("convert", good["folder"], dst, "--to", "single", "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(tensors_and_metadata(dst)[0]) == sorted(tensors_and_metadata(good["safetensors"])[0])
    assert folder_entries(out) == ["model.safetensors"]


# ---- 8. disk full during convert ----------------------------------------------------------------------------------

LIMIT = 1 << 20  # 1 MiB: the tiny model's files are several MiB


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path (or path itself), with its bytes."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f.relative_to(path.parent)): f.read_bytes() for f in files if f.is_file()}


@pytest.mark.slow  # four real processes (~4 s each): the write limit needs its own process
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-over-existing"])
@pytest.mark.parametrize("to", ["single", "diffusers"])
def test_convert_disk_full_leaves_nothing_half_written(good, out, to, existing):
    assert good["safetensors"].stat().st_size > 2 * LIMIT
    dst = out / ("model.safetensors" if to == "single" else "model")
    args = ["convert", good["ckpt"], dst, "--to", to]
    if existing:  # a valid old destination of the same kind, which a failed --force write must not destroy
        src = good["folder"] if to == "diffusers" else good["safetensors"]
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        args.append("--force")
    before = snapshot(dst) if existing else {}
    assert_cli_error(run_cli(*args, limit_bytes=LIMIT), str(dst), "too large")
    assert folder_entries(out) == ([dst.name] if existing else [])  # no .partial- leftovers either
    if existing:
        assert snapshot(dst) == before


# ---- 9. pickles that hold no state dict ---------------------------------------------------------------------------

@pytest.mark.parametrize("obj, fragment", [([torch.zeros(2), torch.ones(2)], "holds a list"),
                                           ({"epoch": 3, "note": "no weights"}, "holds no tensors")])
def test_ckpt_without_state_dict(tmp_path, obj, fragment, assert_refused):
    bad = tmp_path / "odd.ckpt"
    torch.save(obj, bad)
    assert_refused(bad, CheckpointError, fragment)
