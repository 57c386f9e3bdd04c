"""`sdengine batch`: every line checked before any work (a bad one named by its line), images named by item index as
`generate` writes them, resumable from the manifest (a killed worker's items redone, nothing else), changed lines
refused, and byte-identical images from one process, two torchrun ranks (gloo, CPU) and a local Ray instance."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_cli_error, run_cli

from sdengine import cli, runtime
from sdengine.batch import MANIFEST, PART_PREFIX, BatchError, Settings, derived_seed, read_items, run_batch

LINES = [
    {"prompt": "a red circle", "steps": 2},
    None,  # a blank line: no item, and the next line is still item 2
    {"prompt": "a blue square", "steps": 2, "seed": 5, "batch_size": 2},
    {"prompt": "a green triangle", "steps": 1, "sampler": "DPM++ 2M", "cfg_scale": 5.0},
    {"parameters": "a yellow circle\nNegative prompt: blurry\nSteps: 1, Sampler: Euler a, CFG scale: 6, Seed: 9, "
                   "Size: 64x64", "steps": 2},
]
NAMES = ["00000.png", "00002-0.png", "00002-1.png", "00003.png", "00004.png"]
RUN = ["--precision", "fp32", "--threads", "1", "--device", "cpu"]  # one thread everywhere: same float sums


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join(("" if line is None else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def settings() -> Settings:
    model = runtime.default_model()
    return Settings(model=model, size=runtime.native_size(model), precision="fp32", device="cpu", threads=1)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One in-process run of LINES: (the prompts file, its output folder)."""
    folder = tmp_path_factory.mktemp("batch")
    prompts = write_lines(folder / "prompts.jsonl", LINES)
    threads = torch.get_num_threads()
    try:
        assert run_batch(prompts, folder / "out", settings(), log=lambda m: None) == 4
    finally:
        torch.set_num_threads(threads)
    return prompts, folder / "out"


def rerun(prompts: Path, out: Path, force: bool = False) -> list[str]:
    log: list[str] = []
    threads = torch.get_num_threads()
    try:
        run_batch(prompts, out, settings(), force=force, log=log.append)
    finally:
        torch.set_num_threads(threads)
    return log


def test_items_are_named_by_index_and_written_as_generate_writes_them(reference, tmp_path):
    prompts, out = reference
    assert sorted(files(out)) == NAMES
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["items"], key=int) == ["0", "2", "3", "4"]
    assert manifest["items"]["2"] == {"line": 3, "files": ["00002-0.png", "00002-1.png"], "seeds": [5, 6],
                                      "sha256": manifest["items"]["2"]["sha256"]}
    assert manifest["items"]["0"]["seeds"] == [derived_seed(0, 0)]  # no seed: derived from the index
    assert manifest["items"]["4"]["seeds"] == [9]  # an infotext's seed, its other keys overriding it
    assert not list(out.glob(f"{PART_PREFIX}*"))  # merged at the end
    # the same request through `generate` (one thread too) gives the same bytes, parameters text included
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cli.run(["generate", "a blue square", "--steps", "2", "--seed", "5", "--batch", "2", "--precision",
                        "fp32", "--device", "cpu", "--quiet", "--out", str(tmp_path / "g.png")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "g-5.png").read_bytes() == (out / "00002-0.png").read_bytes()
    assert (tmp_path / "g-6.png").read_bytes() == (out / "00002-1.png").read_bytes()


def test_a_rerun_makes_only_what_is_missing(reference, tmp_path):
    """A killed run, simulated: item 0 in manifest.json, item 2 in a rank's part file (merged on resume), item 3's
    PNG written but never recorded (killed between the two), item 4 not made. Only 3 and 4 are made again, and
    every image is the reference's."""
    prompts, done = reference
    out = tmp_path / "out"
    out.mkdir()
    manifest = json.loads((done / MANIFEST).read_text())
    items = manifest["items"]
    (out / MANIFEST).write_text(json.dumps({**manifest, "items": {"0": items["0"]}}))
    (out / f"{PART_PREFIX}rank1.json").write_text(json.dumps({**manifest, "items": {"2": items["2"]}}))
    for name in ("00000.png", "00002-0.png", "00002-1.png"):
        shutil.copy(done / name, out / name)
    (out / "00003.png").write_bytes(b"torn")
    log = rerun(prompts, out)
    assert log[0] == "2 of 4 items done already; 2 to make here", log
    assert [m for m in log if m.startswith("wrote")] == [f"wrote 00003.png (line 4, seed {derived_seed(0, 3)})",
                                                         "wrote 00004.png (line 5, seed 9)"]
    assert files(out) == files(done)
    assert json.loads((out / MANIFEST).read_text())["items"] == items
    assert rerun(prompts, out) == ["4 of 4 items done already; 0 to make here"]
    (out / "00002-1.png").unlink()  # a done item whose file is gone is made again
    assert rerun(prompts, out)[1].startswith("wrote 00002-0.png, 00002-1.png (line 3")
    assert files(out) == files(done)


def test_a_changed_line_is_refused_unless_forced(reference, tmp_path):
    prompts, done = reference
    out = tmp_path / "out"
    shutil.copytree(done, out)
    changed = [*LINES[:3], {**LINES[3], "steps": 2}, LINES[4]]
    edited = write_lines(tmp_path / "edited.jsonl", changed)
    with pytest.raises(BatchError, match="line 4 changed since .* --force makes them again"):
        rerun(edited, out)
    log = rerun(edited, out, force=True)
    assert [m.split(" (")[0] for m in log[1:]] == ["wrote 00003.png"]
    assert files(out)["00003.png"] != files(done)["00003.png"]
    assert files(out)["00004.png"] == files(done)["00004.png"]


def test_a_folder_from_other_settings_or_files_is_refused(reference, tmp_path):
    prompts, done = reference
    out = tmp_path / "out"
    shutil.copytree(done, out)
    other = Settings(**{**settings().__dict__, "seed_base": 7})
    with pytest.raises(BatchError, match="made with other settings .*seed_base 0.*seed_base 7"):
        run_batch(prompts, out, other, log=lambda m: None)
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "00000.png").write_bytes(b"mine")
    with pytest.raises(BatchError, match="holds files but no manifest.json"):
        run_batch(prompts, stranger, settings(), log=lambda m: None)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "steps": 0}', "line 3: steps must be a positive integer, got 0"),
    ('{"prompt": "x", "sampler_nam": "euler"}', "line 3: unknown field 'sampler_nam'"),
    ('{"prompt": "x",}', "line 3: not JSON"),
    ('["x"]', "line 3: expected a JSON object"),
    ('{"prompt": "x", "hires": {"scale": 20}}', "line 3: hires scale must be a number from 1 to 8"),
    ('{"prompt": "x", "cfg_scale": NaN}', "line 3: cfg_scale must be a finite number"),
    ('{"prompt": "x", "cfg_scale": 1e400}', "line 3: cfg_scale must be a finite number"),
    ('{"prompt": "x", "width": 65}', "line 3: width must be a positive multiple of 8"),
    ('{"prompt": "\\ud800"}', "line 3: prompt is not valid text: a lone surrogate"),
    ('{"prompt": "x", "sampler": "nope"}', "line 3: unknown sampler"),
])
def test_a_bad_line_is_named(tmp_path, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n' + line + '\n{"prompt": "also fine"}\n')
    with pytest.raises(BatchError, match=f"^{prompts}, {message}"):
        read_items(prompts, 0, 64)


def test_a_bad_line_is_one_cli_error_before_any_model_loads(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": "many"}\n')
    proc = run_cli("batch", prompts, "--out", tmp_path / "out", "--model", tmp_path / "missing.safetensors")
    assert_cli_error(proc, "no model")  # the model is looked up first: its size is what unset sizes become
    proc = run_cli("batch", prompts, "--out", tmp_path / "out", *RUN)
    assert_cli_error(proc, "line 2: steps must be a positive integer, got 'many'")
    assert not (tmp_path / "out").exists()  # nothing made, no folder
    proc = run_cli("batch", tmp_path / "absent.jsonl", "--out", tmp_path / "out", *RUN)
    assert_cli_error(proc, "absent.jsonl")


def test_seeds_are_derived_from_the_index_alone(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "a", "seed": -1},
                                                 {"prompt": "a", "subseed_strength": 0.5}])
    items = read_items(prompts, 3, 64)
    assert [it.request.seed for it in items] == [derived_seed(3, i) for i in range(3)]
    assert items[2].request.subseed == derived_seed(3, 2, "variation") != items[2].request.seed
    assert read_items(prompts, 3, 64) == items  # and again: no randomness
    prompts.write_bytes(b"\xef\xbb\xbf" + prompts.read_bytes())  # an editor's byte-order mark
    assert read_items(prompts, 3, 64) == items


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_same_images(reference, tmp_path):
    prompts, done = reference
    env = {k: v for k, v in os.environ.items() if k != "SDENGINE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sdengine.cli", "batch", str(prompts), "--out", str(tmp_path / "out"), *RUN],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0/2] 0 of 4 items done already; 2 to make here" in proc.stderr
    assert "[rank 1/2] 0 of 4 items done already; 2 to make here" in proc.stderr
    assert files(tmp_path / "out") == files(done)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == json.loads((done / MANIFEST).read_text())


def rank_pids(parent: int) -> dict[int, int]:
    """torchrun's worker processes (its children) by their RANK."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
                found[int(env["RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_a_killed_rank_s_items_are_made_on_resume(tmp_path):
    """Rank 1 killed (SIGKILL) once it has recorded an item: torchrun stops the job; the rerun (one process) makes
    what neither rank recorded, and every image is what one uninterrupted process makes."""
    lines = [{"prompt": f"a red circle number {i}", "steps": 3} for i in range(12)]
    prompts = write_lines(tmp_path / "p.jsonl", lines)
    env = {k: v for k, v in os.environ.items() if k != "SDENGINE_DEBUG"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "sdengine.cli", "batch", str(prompts), "--out", str(tmp_path / "out"), *RUN],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "out" / f"{PART_PREFIX}rank1.json"
    deadline = time.time() + 240
    while not part.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pids = rank_pids(job.pid)
    assert part.exists() and 1 in pids, job.stderr.read() if job.poll() is not None else "no part file in time"
    os.kill(pids[1], signal.SIGKILL)
    assert job.wait(120) != 0
    recorded = json.loads(part.read_text())["items"]
    assert 1 <= len(recorded) < 6 and all(int(i) % 2 == 1 for i in recorded)  # rank 1 takes every other item
    log = rerun(prompts, tmp_path / "out")
    done = int(log[0].split(" of ")[0])
    assert done >= len(recorded) and log[0] == f"{done} of 12 items done already; {12 - done} to make here"
    assert len([m for m in log if m.startswith("wrote")]) == 12 - done
    assert not list((tmp_path / "out").glob(f"{PART_PREFIX}*"))
    rerun(prompts, tmp_path / "straight")
    assert files(tmp_path / "out") == files(tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install "
                    "'sdengine[ray]')")
def test_a_local_ray_instance_gives_the_same_images(reference, tmp_path):
    prompts, done = reference
    proc = run_cli("batch", prompts, "--out", tmp_path / "out", "--ray", "local", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(tmp_path / "out") == files(done)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == json.loads((done / MANIFEST).read_text())
