"""Issue 34, finding 6 (the smaller ones): `serve` with a symlink in --models-dir, coloured and transparent masks
read as A1111 reads them, a caption file that is not UTF-8, a safetensors header's size checked before reading it."""
from __future__ import annotations

import dataclasses
import os
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from server_helpers import write_model

from sdengine.images import empty_mask_note, mask_to_grey, mask_to_tensor
from sdengine.weights.io import CheckpointError, read_tensors, safetensors_metadata


def test_serve_starts_with_a_symlink_in_the_models_folder(tmp_path, monkeypatch, capsys):
    """The folder links to the default model: it was listed under the link's name and then looked up under the
    file's own, and `serve` stopped with "no model named 'model.safetensors'"."""
    pytest.importorskip("fastapi")
    from sdengine import runtime
    from sdengine.cli import run
    from sdengine.cli import serve as serve_cli

    write_model(tmp_path / "model.safetensors")
    models = tmp_path / "models"
    models.mkdir()
    (models / "link.safetensors").symlink_to(tmp_path / "model.safetensors")
    (models / "dangling.safetensors").symlink_to(tmp_path / "nothing.safetensors")
    (models / "loop.safetensors").symlink_to("loop.safetensors")
    monkeypatch.setattr(runtime, "default_model", lambda: tmp_path / "model.safetensors")
    started = []

    class NoServer:  # everything up to opening the port, which is not opened
        def __init__(self, config, stop_jobs):
            started.append(config.app)

        def run(self):
            pass

    monkeypatch.setattr(serve_cli, "_server_class", lambda: NoServer)
    assert run(["serve", "--models-dir", str(models), "--device", "cpu"]) == 0, capsys.readouterr().err
    service = started[0].state.service
    assert service.registry.current.name == "link.safetensors"
    assert [e.name for e in service.registry.entries()] == ["link.safetensors"]


def rgb(color, size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_masks_are_read_as_a1111_reads_them():
    """A1111 (processing.create_binary_mask): an RGBA mask with transparency is its alpha, else convert("L"), so a
    pure red mask (luminance 76) repaints nothing there too. Matched, and said: a note instead of a silent no-op."""
    assert mask_to_tensor(rgb((255, 255, 255)), 16, 16).min() == 1
    red = rgb((255, 0, 0))
    assert mask_to_tensor(red, 16, 16).max() == 0 and np.asarray(mask_to_grey(red)).max() == 76
    assert "pure red is 30% grey" in empty_mask_note(mask_to_grey(red))
    assert empty_mask_note(mask_to_grey(rgb((255, 255, 255)))) is None
    rgba = np.zeros((16, 16, 4), np.uint8)  # black, transparent on the left, opaque on the right
    rgba[:, 8:, 3] = 255
    t = mask_to_tensor(Image.fromarray(rgba, "RGBA"), 16, 16)
    assert t[..., 8:].min() == 1 and t[..., :8].max() == 0  # was luminance: all black, nothing repainted


def test_server_mask_reading_is_the_same_and_warns(tmp_path):
    from sdengine.server.images import prepare_mask

    for mask in (rgb((255, 0, 0)), rgb((200, 200, 200)), Image.fromarray(np.full((16, 16, 4), 90, np.uint8))):
        assert list(prepare_mask(mask, False, 0, 0).getdata()) == list(mask_to_grey(mask).getdata())


def test_cli_inpaint_with_a_red_mask_says_it_repaints_nothing(sd1_folder, tmp_path, monkeypatch, capsys):
    from sdengine.cli import run

    rgb((10, 200, 30), (32, 32)).save(tmp_path / "init.png")
    rgb((255, 0, 0), (32, 32)).save(tmp_path / "red.png")
    monkeypatch.delenv("SDENGINE_DEBUG", raising=False)
    code = run(["inpaint", str(tmp_path / "init.png"), str(tmp_path / "red.png"), "a", "--model", str(sd1_folder),
                "--steps", "1", "--quiet", "--out", str(tmp_path / "x.png")])
    assert code == 0 and "the mask repaints nothing" in capsys.readouterr().err


def test_caption_file_not_utf8_names_the_file(tmp_path):
    from sdengine.train.data import FolderSource

    rgb((1, 2, 3), (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"a red \xff\xfe square")
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8 text \(byte 6"):
        FolderSource(tmp_path, 32)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xc3"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl: not UTF-8 text"):
        FolderSource(tmp_path, 32)


def test_a_huge_safetensors_header_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.safetensors"
    n = 1 << 30
    with open(path, "wb") as f:  # sparse: a 1 GiB file that takes no disk
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n + 16)
    for read in (safetensors_metadata, read_tensors):
        tracemalloc.start()
        with pytest.raises(CheckpointError, match="a 1073741824-byte header"):
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 10 << 20, peak  # was: the whole header read (1 GiB, 1.5 GB RSS) before json failed


def _strip(src, dst, change=None) -> None:
    """A copy of a safetensors file without its metadata (as tools that rewrite tensors leave it)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    if change:
        change(tensors)
    save_file(tensors, dst)


def test_the_shipped_model_without_metadata_gives_the_same_pixels(tmp_path):
    """Stripped of its metadata the shipped model was detected with 64-channel heads, SD's latent scale and CLIP's
    vocabulary (its own has 637 tokens): it loaded, and the first prompt failed with an IndexError. Its shapes are
    the shipped file's, so its recorded config and vocabulary apply: the same image, pixel for pixel."""
    import sdengine
    from sdengine import Pipeline, Request
    from sdengine.runtime import default_model

    shipped = default_model()
    assert shipped is not None
    stripped = tmp_path / "stripped.safetensors"
    _strip(shipped, stripped)
    assert safetensors_metadata(stripped) == {}
    request = Request(prompt="a red circle above a blue square", seed=3, steps=2, width=64, height=64)
    images = [Pipeline(sdengine.load(p)).run(request)[0] for p in (shipped, stripped)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_a_stripped_model_with_its_own_vocabulary_is_a_one_line_error(tmp_path):
    """Not the shipped model (its token table cut to 600 rows), no vocabulary in the file: the error comes at load,
    in one line naming what is missing and what to load, not as an IndexError at the first prompt."""
    import sdengine
    from sdengine.runtime import default_model
    from sdengine.weights.detect import UnknownArchitecture

    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    stripped = tmp_path / "custom.safetensors"
    _strip(default_model(), stripped, lambda t: t.update({key: t[key][:600].clone()}))
    with pytest.raises(UnknownArchitecture) as e:
        sdengine.load(stripped)
    assert "\n" not in str(e.value) and "600-token vocabulary, not CLIP's 49408" in str(e.value)
    assert "sdengine_tokenizer" in str(e.value) and "--to diffusers" in str(e.value)


def test_norm_groups_from_the_channel_counts():
    """GroupNorm's group count is in no tensor's shape: SD's 32 where it divides every level, else the largest
    power of two that does (the shipped VAE: 48/96 channels -> 16), for the UNet as for the VAE."""
    from sdengine.config import SHAPES, UNetConfig
    from sdengine.model import StableDiffusion
    from sdengine.weights.detect import detect_unet, detect_vae, norm_groups

    assert norm_groups([64, 128, 192]) == 32 and norm_groups([48, 96]) == 16 and norm_groups([24, 48]) == 8
    unet = UNetConfig(model_channels=48, channel_mult=(1, 2), num_res_blocks=(1, 1), attention_resolutions=(2,),
                      context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
                      norm_groups=16)
    with torch.device("meta"):
        sd = StableDiffusion(dataclasses.replace(SHAPES, unet=unet)).state_dict()
    assert detect_unet(sd).norm_groups == 16 and detect_vae(sd).norm_groups == SHAPES.vae.norm_groups == 16


PEAK_SCRIPT = r"""
import os, sys, torch
from sdengine import Pipeline, Request
from sdengine.memory_estimate import estimate, unet_bytes, vae_decode_bytes, FIXED
torch.set_num_threads(1)
def rss(field):
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith(field))
model, what, size, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if model == "tiny":
    from sdengine.config import TINY
    from sdengine.model import StableDiffusion
    m = StableDiffusion(TINY).init_weights(seed=0).eval().requires_grad_(False)
else:
    import sdengine
    m = sdengine.load(model)
cfg, f = m.config, m.config.vae.downscale
lat = torch.randn(batch, cfg.unet.in_channels, size // f, size // f)
with torch.no_grad():  # the first call's one-time allocations, at a small size
    m.unet(lat[:1, :, :2, :2].repeat(2, 1, 1, 1), torch.full((2,), 500.0), torch.zeros(2, 77, cfg.unet.context_dim))
    m.vae.decode(lat[:1, :, :2, :2])
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = rss("VmRSS:")
with torch.no_grad():
    if what == "unet":
        m.unet(torch.cat([lat, lat]), torch.full((2 * batch,), 500.0), torch.zeros(2 * batch, 77, cfg.unet.context_dim))
        est = unet_bytes(cfg.unet, size // f, size // f, 2 * batch, 4) + FIXED
    elif what == "decode":
        m.vae.decode(lat)
        est = vae_decode_bytes(cfg.vae, size, size, batch, 4) + FIXED
    else:
        Pipeline(m).run(Request(prompt="a red circle", seed=0, steps=1, width=size, height=size, batch_size=batch))
        est = estimate(cfg, size, size, batch).peak
print((rss("VmHWM:") - base) / est)
"""


@pytest.mark.slow
@pytest.mark.parametrize("model, what, size, batch", [
    ("shipped", "unet", 256, 1), ("shipped", "decode", 512, 1), ("shipped", "gen", 256, 2),
    ("tiny", "decode", 512, 1), ("tiny", "gen", 512, 1)])
def test_memory_estimate_against_measured_peaks(model, what, size, batch):
    """memory_estimate against the peak resident memory of the same work in a fresh process (fp32, one thread):
    the measured peak is between 0.4 and 1.6 times the estimate. The same case's peak moves between runs with the
    allocator and the page cache: shipped gen-256-2 measured 1.03, 1.08, 1.27 and (a clean CI clone) 1.47 times
    its estimate, so a tighter bound would fail by chance."""
    import subprocess
    import sys

    from sdengine.runtime import default_model

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    path = str(default_model()) if model == "shipped" else model
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, path, what, str(size), str(batch)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = float(out.stdout.split()[-1])
    assert 0.4 <= ratio <= 1.6, ratio


def test_a_request_that_does_not_fit_is_refused_naming_what_fits(monkeypatch):
    """Issue 34 (1): a 1024x1024 request on the shipped model, allowed by the caps, took the server to 24 GB and
    the kernel killed it. With attention chunked it needs about 1.8 GB (1.4 GB measured); where less is available
    it is refused up front, with a size (or a batch) that fits."""
    from sdengine import memory_estimate
    from sdengine.memory_estimate import estimate, refusal
    from sdengine.runtime import default_model
    from sdengine.weights.checkpoint import read_checkpoint

    _, config, _ = read_checkpoint(default_model())
    cpu = torch.device("cpu")
    need = estimate(config, 1024, 1024).peak
    assert 1 << 30 < need < 4 << 30  # the bound: run within 4 GB or be refused
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: need)
    assert refusal(config, 1024, 1024, 1, torch.float32, cpu) is None
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: 1 << 30)
    why = refusal(config, 1024, 768, 1, torch.float32, cpu, vae_tiling=False)
    assert why is not None and why.startswith("1024x768 needs about 1.4 GB of memory and 1.0 GB is available now; ")
    w, h = map(int, why.split("; ")[1].split()[0].split("x"))
    untiled = {"vae_tiling": False}
    assert estimate(config, w, h, **untiled).peak <= 1 << 30 < estimate(config, w + 64, h + 48, **untiled).peak
    assert abs(w / h - 4 / 3) < 0.1
    # left to decide (the default), the VAE runs in tiles where the whole image would not fit: it then fits
    assert refusal(config, 1024, 768, 1, torch.float32, cpu) is None
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: estimate(config, 512, 512, 2).peak)
    assert refusal(config, 512, 512, 4, torch.float32, cpu).endswith("; batch_size 2 fits")
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: None)  # unknown: not checked
    assert refusal(config, 4096, 4096, 8, torch.float32, cpu) is None


def test_estimate_grows_with_size_batch_and_precision():
    from sdengine.config import SD15
    from sdengine.memory_estimate import estimate

    base = estimate(SD15, 512, 512)
    same = pytest.approx
    untiled = estimate(SD15, 1024, 1024, vae_tiling=False).decode
    assert untiled == same(4 * base.decode)  # the whole-image decode is linear in pixels
    assert estimate(SD15, 1024, 1024).decode < untiled / 3  # left automatic, it may run in tiles
    assert estimate(SD15, 512, 512, 2).unet == same(2 * base.unet)
    assert estimate(SD15, 512, 512, dtype=torch.float16).decode == same(base.decode / 2)
    assert estimate(SD15, 512, 512, guidance=False).unet == same(base.unet / 2)
    assert estimate(SD15, 512, 512, previews=True).peak > base.peak and estimate(SD15, 512, 512, img2img=True).encode
