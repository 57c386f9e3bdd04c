"""Outpainting: the extended canvas and its mask, each fill drawn from the seed, bad amounts refused, and the
command end to end on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdengine.outpaint import FILLS, extend


def picture(w: int = 40, h: int = 32) -> Image.Image:
    rng = np.random.RandomState(0)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 20, 30)
    arr[:, w // 2:] = (20, 60, 220)
    arr[rng.rand(h, w) > 0.9] = (255, 255, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fill", FILLS)
def test_canvas_and_mask(fill):
    src = picture()
    canvas, mask = extend(src, left=16, right=8, up=0, down=24, fill=fill, overlap=8, mask_blur=4, seed=3)
    assert canvas.size == mask.size == (40 + 24, 32 + 24)
    inner = np.asarray(canvas)[0:32, 16:56]
    assert np.array_equal(inner, np.asarray(src))  # the image itself is untouched on the canvas
    m = np.asarray(mask)
    assert (m[:, :16] == 255).all() and (m[:, 56:] == 255).all() and (m[32:, :] == 255).all()  # new border
    assert m[10:14, 34:38].max() == 0  # the image's middle is kept
    assert 0 < m[10, 20] < 255  # the seam inside the image is soft
    again, _ = extend(src, left=16, right=8, up=0, down=24, fill=fill, overlap=8, mask_blur=4, seed=3)
    assert np.array_equal(np.asarray(canvas), np.asarray(again))  # a seed repeats


def test_matched_fill_uses_only_the_images_colours():
    src = picture()
    canvas, _ = extend(src, left=32, fill="matched", seed=1)
    border = np.asarray(canvas)[:, :32].reshape(-1, 3)
    colours = {tuple(c) for c in np.asarray(src).reshape(-1, 3)}
    assert {tuple(c) for c in border} <= colours and len({tuple(c) for c in border}) > 1


@pytest.mark.parametrize("kwargs,fragment", [
    ({}, "changes nothing"), ({"left": 10000}, "from 0 to 4096"), ({"left": 12}, "multiple of 8"),
    ({"left": 8, "fill": "bogus"}, "unknown outpaint fill"), ({"left": -8}, "multiple of 8"),
])
def test_bad_amounts_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        extend(picture(), **kwargs)


def test_outpaint_command(sd1_folder, tmp_path):
    from cli_helpers import assert_cli_error, run_cli

    from sdengine.metadata import parse_parameters, read_parameters

    picture().save(tmp_path / "in.png")
    proc = run_cli("outpaint", tmp_path / "in.png", "a red circle", "--model", sd1_folder, "--left", "16", "--down",
                   "8", "--steps", "2", "--seed", "4", "--out", tmp_path / "out.png", "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = Image.open(tmp_path / "out.png")
    assert out.size == (56, 40)
    params = parse_parameters(read_parameters(tmp_path / "out.png"))
    assert params["Size-1"] == 56 and params["Denoising strength"] == 0.8 and params["Seed"] == 4
    assert_cli_error(run_cli("outpaint", tmp_path / "in.png", "a", "--model", sd1_folder, "--out",
                             tmp_path / "x.png"), "changes nothing")
    assert not (tmp_path / "x.png").exists()
