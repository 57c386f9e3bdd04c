"""`--compile openvino` (sdengine/openvino_unet.py): the UNet through OpenVINO's CPU plugin gives PyTorch's output,
converts once per input shape and again after the weights change, and leaves every call it cannot hold (ControlNet
residuals, patched or hooked modules, IP-Adapter terms, gradients) to PyTorch's forward unchanged."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

import sdengine
from sdengine.accel import DeepCacheUNet, token_merging
from sdengine.config import TINY
from sdengine.nn.attention import CrossAttention
from sdengine.nn.unet import UNetModel

pytest.importorskip("openvino")
from sdengine.openvino_unet import OpenVINOForward  # noqa: E402  (after the skip: it imports openvino lazily)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Each test's own $SDENGINE_HOME: the converted-graph cache starts empty."""
    monkeypatch.setenv("SDENGINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_unet(dtype: torch.dtype = torch.float32, **changes) -> UNetModel:
    torch.manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as a loaded model's are
        unet = UNetModel(dataclasses.replace(TINY.unet, **changes)).eval().to(dtype)
        for p in unet.parameters():  # fresh zero-initialised output layers would make every output 0
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def inputs(batch: int = 2, size: int = 8, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    return x, torch.tensor([500.0, 20.0][:batch]), torch.randn(batch, 7, 64, generator=g).to(dtype)


def wrapped(unet: UNetModel) -> OpenVINOForward:
    unet.forward = OpenVINOForward(unet, unet.forward)
    return unet.forward


@torch.inference_mode()
def test_the_openvino_unet_gives_pytorchs_output_and_converts_once_per_shape():
    unet = tiny_unet()
    x, t, ctx = inputs()
    eager = unet(x, t, ctx)
    ov = wrapped(unet)
    out = unet(x, t, ctx)
    print(f"\nOpenVINO vs PyTorch, fp32 tiny UNet: max |diff| {(out - eager).abs().max():.2e}")
    assert torch.allclose(out, eager, atol=1e-4, rtol=1e-4) and out.dtype == eager.dtype
    unet(x + 1, t, ctx)
    assert ov.conversions == 1 and ov.fallbacks == 0
    x2, t2, ctx2 = inputs(batch=1, size=12)  # another shape: its own graph, the first one kept
    assert torch.allclose(unet(x2, t2, ctx2), ov.fn(x2, t2, ctx2), atol=1e-4, rtol=1e-4)
    assert ov.conversions == 2 and len(ov.graphs) == 2
    unet(x, torch.tensor(500.0), ctx)  # a scalar timestep is one per item, as in PyTorch's forward
    assert ov.conversions == 2


@torch.inference_mode()
def test_bf16_runs_in_bf16_near_pytorchs_bf16_rounding():
    """Against the fp32 output, OpenVINO's bf16 errs by a few times PyTorch's bf16 (it rounds the softmax and the
    norms too), far below the output's scale."""
    unet = tiny_unet()
    x, t, ctx = inputs()
    exact = unet(x, t, ctx)
    unet = unet.to(torch.bfloat16)
    x, ctx = x.bfloat16(), ctx.bfloat16()
    eager = unet(x, t, ctx).float()
    wrapped(unet)
    out = unet(x, t, ctx)
    assert out.dtype == torch.bfloat16

    def rel(a: torch.Tensor) -> float:
        return ((a.float() - exact).norm() / exact.norm()).item()

    print(f"\nbf16 vs fp32, relative error: PyTorch {rel(eager):.2e}, OpenVINO {rel(out):.2e}")
    assert rel(eager) < 0.05 and rel(out) < 3 * rel(eager)


@torch.inference_mode()
def test_a_vector_input_unet_sdxls_y():
    unet = tiny_unet(adm_in_channels=16)
    x, t, ctx = inputs()
    y = torch.randn(2, 16)
    eager = unet(x, t, ctx, y)
    wrapped(unet)
    assert torch.allclose(unet(x, t, ctx, y), eager, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_changed_weights_are_converted_again():
    """A LoRA merged in place (or weights loaded) changes the parameters' version: the old graphs go."""
    unet = tiny_unet()
    x, t, ctx = inputs()
    ov = wrapped(unet)
    before = unet(x, t, ctx)
    unet.out[2].weight.add_(0.05)
    after = unet(x, t, ctx)
    assert ov.conversions == 2 and not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, ov.fn(x, t, ctx), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_weights_made_under_inference_mode_are_watched_too():
    unet = UNetModel(TINY.unet).eval()  # inference tensors: no version counter
    x, t, ctx = inputs()
    ov = wrapped(unet)
    unet(x, t, ctx)
    unet.out[2].weight.add_(0.05)
    assert torch.allclose(unet(x, t, ctx), ov.fn(x, t, ctx), atol=1e-4, rtol=1e-4) and ov.conversions == 2


@torch.inference_mode()
def test_a_later_process_reads_the_converted_graph_from_disk(home, monkeypatch):
    x, t, ctx = inputs()
    first = wrapped(unet := tiny_unet())
    out = unet(x, t, ctx)
    assert first.conversions == 1 and len(list((home / "cache" / "openvino").glob("*.xml"))) == 1
    again = wrapped(unet := tiny_unet())  # the same weights in a new wrapper, as in a new process
    assert torch.equal(unet(x, t, ctx), out) and again.reads == 1 and again.conversions == 0
    other = wrapped(unet := tiny_unet())
    with torch.inference_mode(False), torch.no_grad():
        unet.out[2].bias.add_(0.01)  # other weights: another entry
    unet(x, t, ctx)
    assert other.conversions == 1 and other.reads == 0
    monkeypatch.setattr("sdengine.openvino_unet.CACHE_ENTRIES", 1)
    unet(*inputs(batch=1))  # a new shape's entry pushes the older ones out
    assert len(list((home / "cache" / "openvino").glob("*"))) == 2  # one .xml and its .bin


@torch.inference_mode()
def test_an_unwritable_cache_costs_a_warning_not_the_image(home):
    home.parent.mkdir(parents=True, exist_ok=True)
    home.write_text("a file where the cache folder would go")
    unet = tiny_unet()
    x, t, ctx = inputs()
    wrapped(unet)
    with pytest.warns(UserWarning, match="could not keep the OpenVINO graph"):
        out = unet(x, t, ctx)
    assert torch.allclose(out, unet.forward.fn(x, t, ctx), atol=1e-4, rtol=1e-4)


def test_calls_the_graph_cannot_hold_run_pytorchs_forward():
    unet = tiny_unet()
    x, t, ctx = inputs()
    ov = wrapped(unet)
    with torch.inference_mode():
        # one residual per input block (stem, res+attention, downsample, res+attention) and the middle block's
        control = [torch.full((2, c, s, s), 0.1) for c, s in ((32, 8), (32, 8), (32, 4), (64, 4), (64, 4))]
        assert torch.equal(unet(x, t, ctx, control=control), ov.fn(x, t, ctx, control=control))
        with token_merging(unet, 0.5, use_rand=False):  # blocks patched for one pass (no random draws)
            assert torch.equal(unet(x, t, ctx), ov.fn(x, t, ctx))
        attn = next(m for m in unet.modules() if isinstance(m, CrossAttention))
        attn.extra = (lambda q: torch.zeros_like(q),)  # an IP-Adapter term, for one call
        try:
            unet(x, t, ctx)
        finally:
            del attn.extra
        cached = DeepCacheUNet(unet, interval=2)  # its full calls hook an output block
        assert torch.equal(cached(x, t, ctx), ov.fn(x, t, ctx))
        cached.set_step(1)
        cached(x, t, ctx)  # a partial call runs the blocks themselves, not the forward
    with torch.enable_grad():
        unet(x, t, ctx)
    assert ov.conversions == 0 and ov.fallbacks == 5
    with torch.inference_mode():
        unet(x, t, ctx)
    assert ov.conversions == 1


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_cli_compile_openvino_gives_the_eager_image(sd1_folder, tmp_path):
    args = ["generate", "a cat", "--seed", "4", "--precision", "fp32", "--steps", "2", "--width", "24", "--height",
            "16", "--model", str(sd1_folder), "--quiet"]
    assert run_cli(*args, "--out", tmp_path / "eager.png").returncode == 0
    result = run_cli(*args, "--compile", "openvino", "--out", tmp_path / "ov.png")
    assert result.returncode == 0, result.stderr
    assert np.abs(pixels(tmp_path / "eager.png") - pixels(tmp_path / "ov.png")).max() <= 2


def test_compile_openvino_without_the_package_is_one_line(sd1_folder, monkeypatch):
    monkeypatch.setattr("sdengine.openvino_unet.openvino_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install openvino"):
        sdengine.compile_unet(sdengine.load(sd1_folder), "openvino")
    with pytest.raises(ValueError, match="unknown compile backend"):
        sdengine.compile.check_compiler(torch.device("cpu"), "tvm")
