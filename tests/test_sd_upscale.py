"""SD upscale (sdengine/sd_upscale.py): A1111's tiling and blending, every tile an img2img of its own seed, the
upscaled image's parameters, the CLI (`img2img --sd-upscale`) and its errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdengine
from sdengine.cli import run
from sdengine.metadata import parse_parameters, read_parameters
from sdengine.pipeline import Pipeline
from sdengine.request import Request
from sdengine.sd_upscale import check_plan, combine_grid, enlarge, sd_upscale, split_grid


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tiles_are_spread_as_a1111_spreads_them() -> None:
    grid = split_grid(noise_image(1000, 700), 512, 512, 64)
    assert [y for y, _, _ in grid.tiles] == [0, 188]                  # ceil((700-64)/448) = 2 rows, dy = 188
    assert [x for x, _, _ in grid.tiles[0][2]] == [0, 244, 488]       # ceil((1000-64)/448) = 3 columns, dx = 244
    one = split_grid(noise_image(512, 512), 512, 512, 64)
    assert len(one.tiles) == 1 and len(one.tiles[0][2]) == 1


@pytest.mark.parametrize("size, tile, overlap", [((200, 150), (64, 48), 16), ((96, 96), (64, 64), 0),
                                                 ((130, 70), (64, 64), 8)])
def test_unchanged_tiles_combine_to_the_image(size, tile, overlap) -> None:
    image = noise_image(*size)
    assert np.array_equal(np.asarray(combine_grid(split_grid(image, *tile, overlap))), np.asarray(image))


def test_overlaps_are_cross_faded_over_the_overlap() -> None:
    grid = split_grid(noise_image(120, 64), 64, 64, 16)               # columns at x = 0, 28, 56
    assert [x for x, _, _ in grid.tiles[0][2]] == [0, 28, 56]
    grid.replace([Image.new("RGB", (64, 64), c) for c in ((0, 0, 0), (255, 255, 255), (0, 0, 0))])
    row = np.asarray(combine_grid(grid))[10, :, 0].astype(int)
    assert (row[:28] == 0).all() and (row[44:56] == 255).all() and (row[72:] == 0).all()
    ramp = np.arange(16) * 255 // 16                                   # A1111's mask: j * 255 / overlap, truncated
    assert np.abs(row[28:44] - ramp).max() <= 1                        # white fading in over black
    assert np.abs(row[56:72] - (255 - ramp)).max() <= 1                # black fading in over white


@pytest.fixture(scope="module")
def pipe(sd1_folder) -> Pipeline:
    return Pipeline(sdengine.load(sd1_folder))


def test_every_tile_is_an_img2img_of_its_own_seed(pipe) -> None:
    image = noise_image(40, 24, seed=3)
    req = Request(prompt="a cat", steps=2, strength=0.5, seed=7, width=32, height=32, batch_size=2, n_iter=2)
    out = sd_upscale(pipe, req, image, "Lanczos", 2.0, overlap=16)
    assert len(out) == 2 and all(im.size == (80, 48) for im in out)
    big = enlarge(image, "Lanczos", 2.0)
    for n, result in enumerate(out):
        grid = split_grid(big, 32, 32, 16)                             # 4 x 2 tiles, batches of two
        tiles = grid.images()
        assert len(tiles) == 8
        done = []
        for i in range(4):   # batch i is seeded seed + n + i, its images seed + n + i, seed + n + i + 1 (A1111)
            done += pipe.run(Request(prompt="a cat", steps=2, strength=0.5, seed=7 + n + i, width=32, height=32,
                                     batch_size=2), init=tiles[2 * i:2 * i + 2])
        grid.replace(done)
        assert np.array_equal(np.asarray(result), np.asarray(combine_grid(grid)))
        assert result.info["seed"] == 7 + n
    params = parse_parameters(out[0].info["parameters"])
    assert params["SD upscale overlap"] == 16 and params["SD upscale upscaler"] == "Lanczos"
    assert params["Size"] == "32x32" and params["Seed"] == 7 and params["Denoising strength"] == 0.5
    assert not np.array_equal(np.asarray(out[0]), np.asarray(big))   # the tiles were repainted


def test_bad_plans_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="smaller than a tile"):
        check_plan(300, 200, 512, 512, 64, "Lanczos")
    with pytest.raises(ValueError, match="overlap"):
        check_plan(1024, 1024, 512, 512, 512, "Lanczos")
    with pytest.raises(ValueError, match="at most 1024"):
        check_plan(16384, 16384, 64, 64, 32, "Lanczos")


def test_cli_img2img_sd_upscale(sd1_folder, tmp_path, capsys) -> None:
    src = tmp_path / "in.png"
    noise_image(40, 24, seed=3).save(src)
    out = tmp_path / "up.png"
    common = ["img2img", str(src), "a cat", "--model", str(sd1_folder), "--steps", "2", "--seed", "7", "--width",
              "32", "--height", "32", "--precision", "fp32", "--quiet"]
    assert run([*common, "--sd-upscale", "2", "--sd-upscale-overlap", "16", "--out", str(out)]) == 0
    pipe = Pipeline(sdengine.load(sd1_folder))
    want = sd_upscale(pipe, Request(prompt="a cat", steps=2, seed=7, width=32, height=32, strength=0.75),
                      Image.open(src), "Lanczos", 2.0, overlap=16)[0]
    with Image.open(out) as got:
        assert got.size == (80, 48)
        assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1
    assert "SD upscale upscaler: Lanczos" in read_parameters(out)
    capsys.readouterr()
    for bad, words in ((["--sd-upscale", "1", "--sd-upscale-overlap", "16"], "smaller than a tile"),
                       (["--sd-upscale", "2"], "overlap (64)")):   # A1111's default overlap, on 32-pixel tiles
        assert run([*common, *bad, "--out", str(tmp_path / "bad.png")]) == 1
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.png").exists()
    assert run([*common, "--sd-upscale", "2", "--upscaler", "nosuch", "--out", str(tmp_path / "x.png")]) == 1
    assert "nosuch" in capsys.readouterr().err
