"""Training: every stage end to end, exact resume, refusals, SIGTERM, killed and failed saves, NaN guards, data
parallelism under torchrun, folder data and accumulation. Tiny models on 32x32 images from a folder made here."""
from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import ARCH, ENV, ROOT, TINY, assert_same_training, logged, make_images, one_error, train

from sdengine import cli
from sdengine.tokenizer import CLIPTokenizer
from sdengine.train.checkpoint import checkpoints, load_latest
from sdengine.train.data import FolderSource
from sdengine.train.stages import VAEStage
from sdengine.train.trainer import TrainConfig, Trainer, TrainingAborted

torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting
def ckpt_steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoints(run)]


class FlakyVAE(VAEStage):
    """The tiny VAE stage whose loss is NaN on the steps in `nan`."""

    def __init__(self, *args, nan=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan = nan

    def loss(self, batch, step):
        loss, parts = super().loss(batch, step)
        return (loss * float("nan") if step in self.nan else loss), parts


def trainer(run: Path, data: Path, stage=VAEStage, **cfg) -> Trainer:
    torch.manual_seed(0)
    st = stage(ARCH.vae, FolderSource(data, 32), seed=0)
    cfg = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "precision": "fp32", "save_every": 100,
           "log_every": 1, "quiet": True, **cfg}
    return Trainer(st, TrainConfig(run_dir=run, **cfg), torch.device("cpu"))


def state_diff(a, b, path: str = "") -> float:
    """The largest absolute difference between two nested states (inf where their structure differs)."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.shape == b.shape and a.numel() else \
            (0.0 if a.shape == b.shape else math.inf)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys(), b.keys())
        return max([state_diff(a[k], b[k], f"{path}/{k}") for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return max([state_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))] or [0.0])
    assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (path, a, b)
    return 0.0


def final_state(run: Path) -> dict:
    state = load_latest(run)[1]
    state.pop("config")  # names the run folder
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data) -> Path:
    """A finished 2-step VAE run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("vae") / "run"
    assert cli.run(["train", "vae", "--data", str(data), "--out", str(out), *TINY, "--quiet", "--steps", "2",
                    "--batch", "4", "--save-every", "1"]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. every stage end to end ------------------------------------------------------------------------------------

def test_stages_end_to_end(capsys, tmp_path, data, vae_run):
    import sdengine
    from sdengine.pipeline import Pipeline

    rc, err = train(capsys, "text", tmp_path / "text", data, "--steps", "2", "--batch", "4")
    assert rc == 0, err
    rc, err = train(capsys, "unet", tmp_path / "unet", data, "--steps", "2", "--batch", "4", "--vae",
                    str(vae_run / "vae.safetensors"), "--text", str(tmp_path / "text" / "text.safetensors"))
    assert rc == 0, err
    runs = {"vae": vae_run, "text": tmp_path / "text", "unet": tmp_path / "unet"}
    for stage, artifact in (("vae", "vae.safetensors"), ("text", "text.safetensors"), ("unet", "model.safetensors")):
        run = runs[stage]
        assert (run / artifact).stat().st_size > 0, stage
        assert [r["step"] for r in logged(run)] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged(run))
        assert Image.open(run / "loss.png").size == (640, 360), stage
        if stage != "text":  # the text stage has nothing to picture (its retrieval accuracy is in the log)
            assert Image.open(run / "samples-000000002.png").width >= 32, stage
    assert (runs["text"] / "tokenizer").is_dir() and "acc" in logged(runs["text"])[0]
    model = sdengine.load(runs["unet"] / "model.safetensors")
    images = Pipeline(model).generate("a red square", steps=2, width=32, height=32, seed=1)
    assert images[0].size == (32, 32)
    # scripts/relation_probe.py --state: a text run's checkpoint is read with that run's own vocabulary
    spec = importlib.util.spec_from_file_location("relation_probe", ROOT / "scripts" / "relation_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    own = CLIPTokenizer.from_dir(runs["text"] / "tokenizer")
    model.tokenizer = CLIPTokenizer.default()
    assert model.tokenizer.encode("a red square") != own.encode("a red square")
    probe.overlay(model, checkpoints(runs["text"])[-1], "modules")
    assert model.tokenizer.encode("a red square") == own.encode("a red square")


# ---- 2. exact resume ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # a vocabulary from 20,000 shapes captions: ~20 s
def test_text_hard_negatives(capsys, tmp_path):
    """--hard-negatives adds, per shapes caption, the same words meaning another scene as texts no image matches:
    for the same weights and items that can only raise the image-to-text loss, never lower it; the log then
    reports how often an image prefers its own caption to them (neg_acc)."""
    from sdengine.train.data import ShapesSource
    from sdengine.train.stages import TextStage

    source = ShapesSource(size=32, seed=4)
    tokenizer = CLIPTokenizer.train(source.captions(200))
    losses = {}
    for hard in (False, True):
        torch.manual_seed(0)
        stage = TextStage(ARCH.text, source, tokenizer, seed=0, hard_negatives=hard)
        batch = stage.batch(0, range(16), torch.device("cpu"))
        x, ids, keys, owners = batch
        assert (len(ids) > len(x) and len(owners) == len(ids) - len(x)) if hard else (len(ids) == len(x) and not owners)
        with torch.no_grad():
            loss, parts = stage.loss(batch, 0)
        assert ("neg_acc" in parts) == hard and 0 <= parts.get("neg_acc", 0) <= 1
        losses[hard] = loss.item()
    assert losses[True] > losses[False]
    rc, err = train(capsys, "text", tmp_path / "text", Path("shapes"), "--steps", "2", "--batch", "8",
                    "--hard-negatives")
    assert rc == 0, err
    assert all("neg_acc" in r for r in logged(tmp_path / "text"))


def test_resume_is_exact(tmp_path, data):
    cfg = {"steps": 4, "ema_decay": 0.9, "warmup": 2}
    trainer(tmp_path / "straight", data, **cfg).run()
    paused = trainer(tmp_path / "paused", data, **cfg)
    paused.run(stop_at=2)
    assert paused.step == 2 and ckpt_steps(tmp_path / "paused") == [2]
    resumed = trainer(tmp_path / "paused", data, **cfg)
    resumed.run(resume=True)
    assert resumed.step == 4
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "paused")
    assert a["step"] == b["step"] == 4 and a["ema"] is not None and a["optimizer"]["state"]
    assert state_diff(a, b) <= 1e-6  # model, EMA, optimizer, LR schedule, RNG, step, counters
    assert [r["step"] for r in logged(tmp_path / "paused")] == [1, 2, 3, 4]


# ---- 3. --resume without anything to resume from ------------------------------------------------------------------

def test_resume_without_checkpoint_fails(capsys, tmp_path, data):
    rc, err = train(capsys, "vae", tmp_path / "none", data, "--steps", "2", "--batch", "4", "--resume")
    assert rc != 0
    one_error(err, "--resume", "no complete checkpoint")
    assert not checkpoints(tmp_path / "none")


def test_resume_from_corrupt_checkpoint_fails(capsys, tmp_path, data):
    ckpt = tmp_path / "run" / "step-000000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"garbage" * 100)
    (ckpt / "COMPLETE").write_text("2\n")
    rc, err = train(capsys, "vae", tmp_path / "run", data, "--steps", "3", "--batch", "4", "--resume")
    assert rc != 0
    one_error(err, "no readable checkpoint", "step-000000002")
    assert ckpt_steps(tmp_path / "run") == [2] and not (tmp_path / "run" / "vae.safetensors").exists()


def test_resume_skips_newer_corrupt_checkpoint(capsys, tmp_path, vae_run, data):
    run = copy_run(vae_run, tmp_path / "run")
    (run / "step-000000002" / "state.pt").write_bytes(b"\x80\x02garbage")
    rc, err = train(capsys, "vae", run, data, "--steps", "3", "--batch", "4", "--save-every", "1", "--resume",
                    quiet=False)
    assert rc == 0, err
    assert "skipped unreadable checkpoints (step-000000002" in err and "at step 1" in err
    assert ckpt_steps(run) == [1, 2, 3] and load_latest(run)[1]["step"] == 3
    assert [r["step"] for r in logged(run)] == [1, 2, 3]  # records past step 1 were dropped, then redone


# ---- 4. a fresh start into a folder with checkpoints --------------------------------------------------------------

def test_fresh_start_over_checkpoints_refused(capsys, tmp_path, vae_run, data):
    before = {p.name: p.stat().st_mtime_ns for p in vae_run.iterdir()}
    rc, err = train(capsys, "vae", vae_run, data, "--steps", "2", "--batch", "4")
    assert rc != 0
    one_error(err, "already holds checkpoints", "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in vae_run.iterdir()} == before
    with pytest.raises(RuntimeError, match="already holds checkpoints"):  # the API refuses too
        trainer(vae_run, data).run()


# ---- 5. SIGTERM ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a training process of its own
def test_sigterm_saves_and_resumes(capsys, tmp_path, data):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sdengine.cli", "train", "vae", "--data", str(data), "--out",
                             str(out), *TINY, "--quiet", "--steps", "100000", "--batch", "4", "--save-every",
                             "100000"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and time.monotonic() - t0 < 30, err
    steps = ckpt_steps(out)
    assert len(steps) == 1 and steps[0] >= 1 and steps[0] == logged(out)[-1]["step"]
    assert not (out / "vae.safetensors").exists()  # paused, not finished
    rc, err = train(capsys, "vae", out, data, "--steps", str(steps[0] + 1), "--batch", "4", "--resume")
    assert rc == 0, err
    assert logged(out)[-1]["step"] == steps[0] + 1 and (out / "vae.safetensors").exists()


# ---- 6. killed mid-save -------------------------------------------------------------------------------------------

def test_resume_ignores_partial_and_incomplete_saves(capsys, tmp_path, vae_run, data):
    run = copy_run(vae_run, tmp_path / "run")
    partial = run / ".step-000000003.partial1a2b3c"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half a checkp")
    (run / "step-000000004").mkdir()  # renamed into place without COMPLETE (not what we write, but be safe)
    (run / "step-000000004" / "state.pt").write_bytes(b"half")
    rc, err = train(capsys, "vae", run, data, "--steps", "3", "--batch", "4", "--save-every", "1", "--resume",
                    quiet=False)
    assert rc == 0, err
    assert "step-000000002 at step 2" in err and "skipped unreadable" not in err
    assert not partial.exists() and ckpt_steps(run) == [1, 2, 3]


# ---- 7. a full disk during a save ---------------------------------------------------------------------------------

def test_disk_full_during_save(capsys, tmp_path, data, monkeypatch):
    import sdengine.train.checkpoint as ckpt

    real_save, calls = ckpt.torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"the first few bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    run = tmp_path / "run"
    rc, err = train(capsys, "vae", run, data, "--steps", "4", "--batch", "4", "--save-every", "2")
    assert rc != 0 and len(calls) == 2
    one_error(err, "step 4", "No space left on device", "step-000000002 is intact")
    assert ckpt_steps(run) == [2] and (run / "step-000000002" / "COMPLETE").exists()
    assert load_latest(run)[1]["step"] == 2
    assert not [p for p in run.iterdir() if "partial" in p.name]


# ---- 8. NaN / inf losses ------------------------------------------------------------------------------------------

def test_nan_steps_skipped_and_counted(tmp_path, data):
    t = trainer(tmp_path / "run", data, stage=partial(FlakyVAE, nan={1, 2}), steps=5, max_bad_steps=3)
    modules = t.run()
    assert t.step == 5 and t.skipped == 2
    records = logged(tmp_path / "run")
    assert [r["skipped"] for r in records] == [0, 1, 2, 2, 2]
    assert [r["loss"] is None for r in records] == [False, True, True, False, False]
    assert all(torch.isfinite(p).all() for p in modules["vae"].parameters())


def test_consecutive_nans_abort(tmp_path, data):
    t = trainer(tmp_path / "run", data, stage=partial(FlakyVAE, nan=range(3, 100)), steps=10, save_every=2,
                max_bad_steps=3)
    with pytest.raises(TrainingAborted, match=r"3 non-finite losses in a row.*step-000000002 is intact"):
        t.run()
    assert ckpt_steps(tmp_path / "run") == [2] and (tmp_path / "run" / "step-000000002" / "COMPLETE").exists()
    state = load_latest(tmp_path / "run")[1]
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["modules"]["vae"].values())


# ---- 9. data parallel under torchrun ------------------------------------------------------------------------------

@pytest.mark.slow  # torchrun: two processes per case
@pytest.mark.parametrize("accum", [[], ["--grad-accum", "2"]], ids=["one-micro-step", "accumulated"])
def test_torchrun_matches_one_process(capsys, tmp_path, data, accum):
    """DistributedDataParallel on gloo; with accumulation, the micro-steps before the last skip the gradient
    all-reduce (no_sync) and the result is still one process's."""
    args = ["train", "vae", "--data", str(data), *TINY, "--quiet", "--steps", "3", "--batch", "4", "--device", "cpu",
            *accum]
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "sdengine.cli", *args,
                           "--out", str(tmp_path / "ddp")], env=ENV, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli.run([*args, "--out", str(tmp_path / "one")]) == 0
    ddp, one = load_file(tmp_path / "ddp" / "vae.safetensors"), load_file(tmp_path / "one" / "vae.safetensors")
    assert_same_training(ddp, one)
    assert [r["step"] for r in logged(tmp_path / "ddp")] == [1, 2, 3]  # one log, written by rank 0
    for a, b in zip(logged(tmp_path / "ddp"), logged(tmp_path / "one")):  # averaged over the whole global batch
        assert all(a[k] == pytest.approx(b[k], rel=1e-4) for k in ("loss", "rec", "kl"))


# ---- 10. folder data: bad input -----------------------------------------------------------------------------------

def test_folder_data_bad_input(capsys, tmp_path):
    folder = make_images(tmp_path / "mixed", n=4)
    (folder / "0.txt").unlink()  # an image without a caption
    (folder / "broken.png").write_bytes(b"not a png")  # and unreadable ones, with captions
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:-300])  # truncated: passes Image.verify()
    for name in ("broken", "cut"):
        (folder / f"{name}.txt").write_text("a broken image")
    capsys.readouterr()
    source = FolderSource(folder, 32)
    assert len(source.items) == 3
    assert "skipped 1 images without a caption and 2 unreadable" in capsys.readouterr().err
    image, caption = source.item(5)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and caption.startswith("a ")

    empty = make_images(tmp_path / "uncaptioned", n=2, captions=False)
    rc, err = train(capsys, "vae", tmp_path / "out", empty, "--steps", "1", "--batch", "2")
    assert rc != 0
    one_error(err, "no usable image-caption pairs", str(empty))


def test_folder_metadata_jsonl(tmp_path):
    folder = make_images(tmp_path / "meta", n=3, captions=False)
    rows = [{"file_name": f"{i}.png", "text": f"picture {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = FolderSource(folder, 32)
    assert sorted(source.item(i)[1] for i in range(3)) == ["picture 0", "picture 1", "picture 2"]
    (folder / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: .*file_name and text"):
        FolderSource(folder, 32)


# ---- 11. accumulation and bf16 ------------------------------------------------------------------------------------

def test_grad_accumulation_matches_full_batch(tmp_path, data):
    results, grads, losses = [], [], []
    for accum in (1, 2):  # no clipping: the gradient's scale shows (AdamW's steps would not show it)
        t = trainer(tmp_path / f"accum{accum}", data, steps=2, batch_size=8, grad_accum=accum, grad_clip=0.0)
        step = t.optimizer.step
        t.optimizer.step = lambda *a, step=step, t=t, **k: (grads.append([p.grad.clone() for p in t.modules[
            "vae"].parameters()]), step(*a, **k))[1]
        results.append({k: v.clone() for k, v in t.run()["vae"].state_dict().items()})
        losses.append([r["loss"] for r in t.history])
    for g1, g2 in zip(grads[0], grads[2]):  # the first step's gradients (the same weights before it)
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert_same_training(*results)


def test_bf16_autocast_runs(tmp_path, data):
    t = trainer(tmp_path / "bf16", data, steps=2, precision="bf16")
    start = {k: v.clone() for k, v in t.modules["vae"].state_dict().items()}
    t.run()
    assert t.skipped == 0 and all(math.isfinite(r["loss"]) for r in t.history)
    after = t.modules["vae"].state_dict()
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(start[k], after[k])
                                                                          for k in start)


@pytest.mark.slow
def test_fp16_trains_with_a_loss_scaler_that_resumes(tmp_path, data):
    """fp16 autocast scales the loss (torch.amp.GradScaler, on the CPU too): small gradients do not underflow, an
    overflow skips its step and lowers the scale, and the scale is part of the checkpoint."""
    t = trainer(tmp_path / "fp16", data, steps=3, precision="fp16", save_every=2)
    assert t.scaler.is_enabled() and not trainer(tmp_path / "bf16", data, precision="bf16").scaler.is_enabled()
    start = {k: v.clone() for k, v in t.modules["vae"].state_dict().items()}
    t.run()
    assert any(math.isfinite(r["loss"] or math.nan) for r in t.history)
    after = t.modules["vae"].state_dict()
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(start[k], after[k])
                                                                          for k in start)
    assert load_latest(tmp_path / "fp16")[1]["scaler"]["scale"] == t.scaler.get_scale()
    resumed = trainer(tmp_path / "fp16", data, steps=4, precision="fp16")
    resumed.run(resume=True)
    assert resumed.step == 4


# ---- data workers and the time budget -----------------------------------------------------------------------------

def test_data_workers_train_exactly_as_in_process(tmp_path, data):
    """Batches prepared by worker processes are the same items: the weights come out bit for bit the same."""
    results = []
    for workers in (0, 2):
        t = trainer(tmp_path / f"w{workers}", data, steps=3, batch_size=4, grad_accum=2, workers=workers)
        results.append({k: v.clone() for k, v in t.run()["vae"].state_dict().items()})
        assert t.prefetcher is None  # closed (its processes ended) when the run ends
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_time_budget_fits_the_step_count(tmp_path, data):
    """A budget far too small for --steps: the count is refitted to the measured speed and the run finishes early
    instead of being cut (real clock: whatever this machine's speed, the plan and the count reached agree)."""
    t = trainer(tmp_path / "budget", data, steps=100_000, time_budget=1.0, log_every=2)
    t.run()
    records = logged(tmp_path / "budget")
    assert 6 <= t.step < 100_000 and t.cfg.steps == t.step and records[-1]["step"] == t.step
    assert records[-1]["planned_steps"] == t.step
    assert ckpt_steps(tmp_path / "budget") == [t.step]


def test_time_budget_ends_the_lr_schedule_at_a_steady_speed(tmp_path, data):
    """At a steady speed (a clock that advances 1/16 s per step, exact in binary) a 1 s budget fits exactly 16
    steps, and the LR schedule is refitted with the count: the cosine ends at its minimum on the last step."""
    t = trainer(tmp_path / "steady", data, steps=100_000, time_budget=1.0, log_every=2)
    t.clock = lambda: t.step / 16
    t.run()
    assert t.step == t.cfg.steps == 16
    assert logged(tmp_path / "steady")[-1]["planned_steps"] == 16
    assert t.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * t.cfg.min_lr_ratio, rel=1e-6)  # the cosine's end


def test_workers_and_budget_arguments(capsys, tmp_path, data):
    rc, err = train(capsys, "vae", tmp_path / "a", data, "--workers", "-1")
    assert rc != 0 and one_error(err, "--workers")
    rc, err = train(capsys, "vae", tmp_path / "b", data, "--time-budget", "0")
    assert rc != 0 and one_error(err, "--time-budget")
    rc, err = train(capsys, "vae", tmp_path / "c", data, "--steps", "2", "--batch", "4", "--workers", "1",
                    "--time-budget", "5")
    assert rc == 0, err
    assert [r["step"] for r in logged(tmp_path / "c")] == [1, 2] and (tmp_path / "c" / "vae.safetensors").exists()
