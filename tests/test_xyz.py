"""X/Y/Z plots: A1111's axis value syntax, every cell equal to the single run it stands for, the grid's labels and
size, and bad axes refused before any work."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdengine
from sdengine.metadata import parse_parameters, read_parameters
from sdengine.pipeline import Pipeline
from sdengine.request import Request
from sdengine.xyz import MAX_VALUES, cells, grid_size, parse_axis, run_grid


@pytest.mark.parametrize("spec,field,values", [
    ("seed:1-4", "seed", (1, 2, 3, 4)),
    ("seed: 1-10 [3]", "seed", (1, 5, 10)),  # A1111: linspace, then int
    ("steps:1-10 (+3)", "steps", (1, 4, 7, 10)),
    ("cfg:0.5-1.5 [3]", "cfg_scale", (0.5, 1.0, 1.5)),
    ("CFG scale:7, 9.5", "cfg_scale", (7.0, 9.5)),
    ("sampler:euler, DPM++ 2M", "sampler", ("euler", "DPM++ 2M")),
    ("prompt_sr:red,blue,green", "prompt_sr", ("red", "blue", "green")),
    ("seed:5-3", "seed", (5, 4, 3)),
])
def test_axis_values_read_as_a1111_reads_them(spec, field, values):
    axis = parse_axis(spec)
    assert axis.field == field and axis.values == values


@pytest.mark.parametrize("spec,fragment", [
    ("seed:1-10000", f"at most {MAX_VALUES}"), ("bogus:1,2", "unknown field"), ("steps", "expected FIELD"),
    ("steps:a,b", "not a number"), ("steps:1-5 (-1)", "never reaches"), ("prompt_sr:red", "at least one"),
])
def test_bad_axes_are_refused(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_axis(spec)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline(sdengine.load(sd1_folder))


def test_cells_equal_the_single_runs_and_the_grid_is_labelled(pipe):
    base = Request(prompt="a red circle", seed=3, width=16, height=16, steps=2)
    axes = [parse_axis("steps:1,2"), parse_axis("sampler:euler,dpmpp_2m"), parse_axis("prompt_sr:red,blue")]
    made = {}
    grid = run_grid(base, axes, lambda checkpoint: pipe, lambda cell, images: made.__setitem__(cell.index, images))
    assert len(made) == 8 and grid.size == grid_size(axes, 16, 16)
    for (i, j, k), images in made.items():
        alone = pipe.generate("a red circle" if k == 0 else "a blue circle", seed=3, width=16, height=16,
                              steps=(1, 2)[i], sampler=("euler", "dpmpp_2m")[j])[0]
        assert np.array_equal(np.asarray(images[0]), np.asarray(alone))
        assert images[0].info["parameters"] == alone.info["parameters"]
    # the labels are drawn: the margins are not blank
    pixels = np.asarray(grid.convert("L"))
    assert pixels[:, :20].min() < 128 or pixels[:20, :].min() < 128


def test_legend_margin_and_sub_grids_as_a1111_options(pipe):
    """draw_legend off: the cells alone; margin_size: pixels between cells and between the z sub-grids; sub-grids:
    one x/y grid per z value, each equal to the matching part of the grid."""
    base = Request(prompt="a red circle", seed=3, width=16, height=16, steps=1)
    axes = [parse_axis("seed:1,2"), parse_axis("cfg:1,7"), parse_axis("prompt_sr:red,blue")]
    made = {}
    grid, *subs = run_grid(base, axes, lambda checkpoint: pipe, lambda cell, images: made.__setitem__(cell.index,
                           images), legend=False, margin=4, with_sub_grids=True)
    assert grid.size == grid_size(axes, 16, 16, legend=False, margin=4) == (2 * (2 * 16 + 4) + 4, 2 * 16 + 4)
    top_right = np.asarray(grid)[:16, 16 + 4:32 + 4]
    assert np.array_equal(top_right, np.asarray(made[(1, 0, 0)][0]))   # the cell after a 4-pixel margin
    assert (np.asarray(grid)[:, 16:20] == 255).all()                     # the margin itself is blank
    assert len(subs) == 2 and all(sub.size == (36, 36) for sub in subs)
    assert np.array_equal(np.asarray(subs[1]), np.asarray(grid)[:, 40:])
    labelled = run_grid(base, axes[:2], lambda checkpoint: pipe, legend=True, margin=0, with_sub_grids=True)
    assert len(labelled) == 1 and labelled[0].size == grid_size(axes[:2], 16, 16)   # no z: no sub-grids


def test_cells_are_checked_before_any_work():
    base = Request(prompt="a red circle", seed=1, width=16, height=16)
    with pytest.raises(ValueError, match="did not find 'green'"):
        cells(base, [parse_axis("prompt_sr:green,blue")])
    with pytest.raises(ValueError, match="cell"):
        cells(base, [parse_axis("steps:0,1")])
    assert grid_size([parse_axis("seed:1-100")], 512, 512)[0] > 16384


def test_grid_command_writes_cells_and_grid(sd1_folder, tmp_path):
    from cli_helpers import assert_cli_error, run_cli

    out = tmp_path / "plot"
    proc = run_cli("grid", "a red circle", "--model", sd1_folder, "--x", "seed:1-2", "--y", "cfg:1,7", "--steps",
                   "1", "--width", "16", "--height", "16", "--out", out, "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cell-0-0-0.png", "cell-0-1-0.png", "cell-1-0-0.png",
                                                     "cell-1-1-0.png", "grid.png"]
    assert parse_parameters(read_parameters(out / "cell-1-1-0.png"))["Seed"] == 2
    assert parse_parameters(read_parameters(out / "grid.png"))["X Values"] == "1, 2"
    assert Image.open(out / "grid.png").size == grid_size([parse_axis("seed:1-2"), parse_axis("cfg:1,7")], 16, 16)
    proc = run_cli("grid", "a red circle", "--model", sd1_folder, "--x", "seed:1-2", "--z", "cfg:1,7", "--steps",
                   "1", "--width", "16", "--height", "16", "--out", tmp_path / "z", "--quiet", "--device", "cpu",
                   "--no-legend", "--margin", "2", "--sub-grids")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "z" / "grid.png").size == (2 * 34 + 2, 16)
    assert [Image.open(tmp_path / "z" / f"grid-z{k}.png").size for k in (0, 1)] == [(34, 16)] * 2
    assert_cli_error(run_cli("grid", "a", "--model", sd1_folder, "--x", "seed:1-40", "--y", "steps:1-20",
                             "--width", "512", "--height", "512", "--out", tmp_path / "big"), "at most 16384")
    assert not (tmp_path / "big").exists()
