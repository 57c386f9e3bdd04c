"""The GPU benchmark (benchmarks/gpu_bench.py, gpu.sh) without a GPU: its dry run goes through every case on a CPU
with a tiny model, and sdengine/cuda_graphs.py's per-shape static buffers give the UNet's own outputs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdengine.config import PRESETS
from sdengine.cuda_graphs import GraphedForward, call_key, use_cuda_graphs
from sdengine.model import StableDiffusion
from sdengine.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bench  # noqa: E402 - a script's module, found on the benchmarks folder

CASES = gpu_bench.CASES


def test_dry_run_measures_every_case_and_checks_the_images(capsys):
    rows = gpu_bench.main(["--dry-run", "--batches", "1", "--steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert [r.case for r in rows] == list(CASES)
    assert all(r.its and r.its > 0 and r.seconds and r.warm is not None and not r.note for r in rows), rows
    scale = rows[0].latents.abs().max().item()
    assert scale > 1e-2
    for row in rows[1:]:  # fp32 on a CPU: every variant gives diffusers eager's latents and image
        assert row.max_diff is not None and row.max_diff <= 1e-3 * scale, (row.case, row.max_diff)
        assert row.psnr is not None and row.psnr > 60, (row.case, row.psnr)
    assert "CUDA graphs: 1 shapes captured (dry run: static buffers, not captured)" in out
    assert "torch " in out and "diffusers " in out and "target sdengine >= 2.0x diffusers eager" in out
    assert "| sdengine compiled + CUDA graphs | 1 |" in out  # the markdown table for the README


def test_without_diffusers_sdengine_is_measured_alone(capsys):
    rows = gpu_bench.main(["--dry-run", "--sdengine-only", "--batches", "1", "--steps", "2", "--repeats", "1"])
    assert [r.case for r in rows] == list(CASES[1:4]) and all(r.its and r.its > 0 for r in rows)
    scale = rows[0].latents.abs().max().item()
    assert scale > 1e-2 and all(r.max_diff <= 1e-4 * scale for r in rows[1:])  # against sdengine eager
    out = capsys.readouterr().out
    assert "against sdengine eager" in out and "not judged (no diffusers eager)" in out


def test_a_failing_case_is_reported_and_the_others_go_on(monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(gpu_bench.Forwards, "ours_compiled", broken)  # the graphs case builds on it: fails too
    rows = gpu_bench.main(["--dry-run", "--batches", "1", "--steps", "2", "--repeats", "1", "--cases", "1,3,4"])
    assert [(r.case, r.note) for r in rows] == [(CASES[0], ""), (CASES[2], "failed: RuntimeError: no compiler here"),
                                                (CASES[3], "failed: RuntimeError: no compiler here")]
    assert rows[0].its > 0
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "not judged (no sdengine case at batch 1)" in captured.out


def test_cases_past_the_budget_are_skipped_and_said(capsys):
    """--cases 2,5: only those, batch by batch (all of batch 1 first, the targets' batch)."""
    rows = gpu_bench.main(["--dry-run", "--batches", "1,2", "--steps", "2", "--budget", "0", "--cases", "2,5"])
    assert [(r.case, r.batch, r.note) for r in rows] == [
        (c, b, "skipped: time budget") for b in (1, 2) for c in (CASES[1], CASES[4])]
    assert capsys.readouterr().out.count("skipped: time budget") == 4 + 4  # the table, then its markdown copy


def test_each_case_gets_its_own_forward_whatever_ran_before(tiny):
    model = StableDiffusion(tiny.config)
    ref = SimpleNamespace(unet=torch.nn.Linear(1, 1))  # only its `unet` is swapped
    eager, eager_ref = model.unet.forward, ref.unet
    forwards = gpu_bench.Forwards(ref, Pipeline(model), "eager", graphs=False)
    forwards.ours_graphed()  # compiles first, then wraps the compiled forward
    graphed = model.unet.forward
    assert isinstance(graphed, GraphedForward) and graphed.fn is forwards.compiled_ours is not None
    forwards.ours_eager()
    assert model.unet.forward == eager
    forwards.ours_compiled()
    assert model.unet.forward is forwards.compiled_ours
    forwards.ours_graphed()
    assert model.unet.forward is graphed  # the same wrapper, its captures kept
    forwards.ref_compiled()
    assert ref.unet is not eager_ref and ref.unet._orig_mod is eager_ref
    forwards.ref_eager()
    assert ref.unet is eager_ref


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_fails_clearly():
    with pytest.raises(SystemExit, match="no CUDA device.*--dry-run"):
        gpu_bench.main([])


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--batches", "1,x"], ["--batches", "0"], ["--repeats", "0"],
                                  ["--cases", "6"], ["--cases", "a"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_bench.main(["--dry-run", *argv])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def row(case: str, its: float, batch: int = 1) -> gpu_bench.Row:
    return gpu_bench.Row(case, batch, its=its, seconds=1.0, warm=0.0)


def test_targets_are_judged_on_batch_1_and_the_h100_target_only_on_an_h100():
    rows = [row("diffusers eager", 20.0), row("sdengine compiled + CUDA graphs", 115.0), row("sdengine eager", 500, 8)]
    ratio, h100 = gpu_bench.verdicts(rows, "NVIDIA H100 80GB HBM3")
    assert "5.75x" in ratio and ratio.endswith("-> met") and h100.endswith("115.0 -> met")
    ratio, other = gpu_bench.verdicts([row("diffusers eager", 20.0), row("sdengine eager", 30.0)], "NVIDIA L4")
    assert ratio.endswith("NOT met") and "not judged" in other and "NVIDIA L4" in other
    assert "not judged" in gpu_bench.verdicts([row("sdengine eager", 30.0)], "NVIDIA H100")[0]


def test_step_clock_counts_seconds_between_marks_on_a_cpu():
    clock = gpu_bench.StepClock(torch.device("cpu"))
    clock.marks = [1.0, 1.5, 4.0]
    assert clock.seconds(0, 2) == 3.0 and clock.seconds(1, 2) == 2.5


def test_gpu_sh_finds_a_python_and_runs_the_benchmark():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout and "gpu.sh: " in result.stderr


# ---- sdengine/cuda_graphs.py ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> StableDiffusion:
    return StableDiffusion(PRESETS["tiny"]).init_weights(0).eval()


def unet_inputs(model: StableDiffusion, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = 8
    return (torch.randn(batch, cfg.unet.in_channels, size, size, generator=g), torch.rand(batch, generator=g) * 999,
            torch.randn(batch, 77, cfg.unet.context_dim, generator=g))


@torch.no_grad()
def test_static_buffers_give_the_unets_outputs_one_capture_per_shape(tiny):
    model = StableDiffusion(tiny.config)
    model.load_state_dict(tiny.state_dict())
    model.eval()
    eager = [model.unet(*unet_inputs(model, b, s)) for b, s in [(2, 0), (2, 1), (4, 2), (2, 3)]]
    wrapper = use_cuda_graphs(model, graphs=False)
    assert use_cuda_graphs(model, graphs=False) is wrapper and isinstance(model.unet.forward, GraphedForward)
    outs = [model.unet(*unet_inputs(model, b, s)) for b, s in [(2, 0), (2, 1), (4, 2), (2, 3)]]
    for ours, ref in zip(outs, eager):  # new values in a known shape replace the old ones in the static inputs
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert wrapper.captures == 2 and wrapper.passed_through == 0
    assert outs[0].data_ptr() != outs[1].data_ptr()  # copies: a later call leaves an earlier output alone


def test_calls_a_graph_cannot_take_run_as_they_are(tiny):
    model = StableDiffusion(tiny.config)
    model.load_state_dict(tiny.state_dict())
    wrapper = use_cuda_graphs(model, graphs=False)
    x, t, ctx = unet_inputs(model, 2, 0)
    model.unet(x, t, ctx)  # gradients on (training): no static buffers
    with torch.no_grad():
        with pytest.raises(ValueError, match="control holds 1 residuals"):  # a list argument reaches the UNet
            model.unet(x, t, ctx, control=[x])
    assert wrapper.passed_through == 2 and wrapper.captures == 0


def test_call_key_and_the_cpu_refusal(tiny):
    x = torch.zeros(2, 4, 8, 8)
    assert call_key((x, None), {"y": x.half()}) == (
        (None, (2, 4, 8, 8), torch.float32, x.device), (None, None), ("y", (2, 4, 8, 8), torch.float16, x.device))
    assert call_key((x,), {"control": [x]}) is None
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        use_cuda_graphs(tiny)
