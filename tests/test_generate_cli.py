"""`sdengine generate | img2img | inpaint | models`: outputs and their parameters text, seeds and batches, the
models folder, and bad input (one stderr line, non-zero exit, nothing written); --compile."""
from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import assert_cli_error, run_cli
from PIL import Image

import sdengine
from sdengine.cli import run
from sdengine.metadata import parse_parameters, read_parameters

FAST = ["--steps", "2", "--width", "24", "--height", "16", "--quiet"]  # the tiny VAE: 12x8 latents


@pytest.fixture
def cli(sd1_folder, tmp_path, monkeypatch, capsys):
    """run(["generate", ...]) in this process against the tiny model, in an empty cwd and models folder;
    returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDENGINE_DEBUG", raising=False)

    def call(*args, model: bool = True):
        argv = [str(a) for a in args] + (["--model", str(sd1_folder)] if model else [])
        code = run(argv)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def params_of(path) -> dict:
    return parse_parameters(read_parameters(path))


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def write_image(path, w=40, h=32, mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    arr = (rng.rand(h, w, 3) * 255).astype(np.uint8) if mode == "RGB" else \
        ((np.arange(w)[None, :].repeat(h, 0) >= w // 2) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_generate_writes_png_with_a1111_parameters(cli, tmp_path):
    out = tmp_path / "cat.png"
    code, stdout, _ = cli("generate", "a red cat, (sharp:1.2)", "--negative", "blurry", "--sampler", "dpmpp_2m",
                          "--schedule", "karras", "--cfg", "6.5", "--seed", "42", "--out", out, *FAST)
    assert code == 0 and f"wrote {out} (seed 42)" in stdout
    with Image.open(out) as img:
        assert img.size == (24, 16) and img.format == "PNG"
    p = params_of(out)
    assert (p["Prompt"], p["Negative prompt"]) == ("a red cat, (sharp:1.2)", "blurry")
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"], p["Size"]) == (
        2, "DPM++ 2M", "Karras", 6.5, 42, "24x16")
    assert "Denoising strength" not in p and "Clip skip" not in p


def test_random_seed_is_picked_and_reported(cli, tmp_path):
    folder = tmp_path / "outs"
    folder.mkdir()
    code, stdout, _ = cli("generate", "a cat", "--seed", "-1", "--out", folder, *FAST)  # --out FOLDER
    assert code == 0
    seed = int(stdout.rsplit("(seed ", 1)[1].split(")")[0])
    assert 0 <= seed < 2 ** 32 and [p.name for p in folder.iterdir()] == [f"sdengine-{seed}.png"]
    assert params_of(folder / f"sdengine-{seed}.png")["Seed"] == seed


def test_batch_seeds_and_image_two_equals_single_run(cli, tmp_path):
    code, stdout, _ = cli("generate", "a cat", "--seed", "10", "--batch", "2", "--out", tmp_path / "b.png", *FAST)
    assert code == 0
    first, second = tmp_path / "b-10.png", tmp_path / "b-11.png"
    assert sorted(p.name for p in tmp_path.glob("b*.png")) == ["b-10.png", "b-11.png"]
    assert [params_of(p)["Seed"] for p in (first, second)] == [10, 11]
    assert cli("generate", "a cat", "--seed", "11", "--out", tmp_path / "s.png", *FAST)[0] == 0
    assert np.abs(pixels(second) - pixels(tmp_path / "s.png")).max() <= 1  # batched math may round differently
    assert np.abs(pixels(first) - pixels(second)).max() > 10


def test_batch_count_runs_batches_one_after_another(cli, tmp_path):
    """--batch-count (A1111's batch count, Request.n_iter): batches of --batch, the seeds continuing."""
    code, stdout, _ = cli("generate", "a cat", "--seed", "10", "--batch", "2", "--batch-count", "2", "--out",
                          tmp_path / "n.png", *FAST)
    assert code == 0 and stdout.count("wrote") == 4
    assert [params_of(tmp_path / f"n-{s}.png")["Seed"] for s in (10, 11, 12, 13)] == [10, 11, 12, 13]
    assert cli("generate", "a cat", "--seed", "12", "--out", tmp_path / "s.png", *FAST)[0] == 0
    assert np.abs(pixels(tmp_path / "n-12.png") - pixels(tmp_path / "s.png")).max() <= 1
    code, _, stderr = cli("generate", "a cat", "--batch-count", "0", *FAST)
    assert code != 0 and "batch count must be" in stderr


def test_img2img_and_inpaint(cli, tmp_path):
    init = write_image(tmp_path / "init.png", 44, 36)  # not a multiple of 8: rounded down to 40x32
    code, _, _ = cli("img2img", init, "a cat", "--strength", "0.5", "--steps", "4", "--seed", "1", "--quiet",
                     "--out", tmp_path / "i2i.png")
    assert code == 0
    p = params_of(tmp_path / "i2i.png")
    assert p["Size"] == "40x32" and p["Denoising strength"] == 0.5
    mask = write_image(tmp_path / "mask.png", 20, 16, mode="L")
    code, _, stderr = cli("inpaint", init, mask, "a dog", "--steps", "2", "--seed", "1", "--quiet",
                          "--out", tmp_path / "inp.png")
    assert code == 0 and (tmp_path / "inp.png").exists()
    assert stderr.startswith("sdengine: note: mask 20x16 resized") and len(stderr.strip().splitlines()) == 1
    inp, src = pixels(tmp_path / "inp.png"), np.asarray(Image.open(init).convert("RGB").resize((40, 32)), np.int16)
    # the left half (mask black) is kept (up to the VAE's round trip); the right half is repainted
    assert np.abs(inp[:, :16] - src[:, :16]).mean() < np.abs(inp[:, 24:] - src[:, 24:]).mean()


def test_progress_bar_unless_quiet(cli, tmp_path):
    args = ["generate", "a cat", "--steps", "2", "--width", "16", "--height", "16", "--seed", "1"]
    code, _, stderr = cli(*args, "--out", tmp_path / "a.png")
    assert code == 0 and "sampling" in stderr and "2/2" in stderr
    code, _, stderr = cli(*args, "--quiet", "--out", tmp_path / "b.png")
    assert code == 0 and stderr == ""


def test_style_and_empty_prompt(cli, tmp_path):
    assert cli("generate", "a cat", "--style", "oil painting", "--style", "quality", "--clip-skip", "2",
               "--out", tmp_path / "s.png", *FAST)[0] == 0
    p = params_of(tmp_path / "s.png")
    assert p["Clip skip"] == 2
    assert p["Prompt"] == "oil painting of a cat, visible brush strokes, rich texture"
    assert p["Negative prompt"].startswith("photo, 3d render, blurry, lowres, worst quality")
    assert cli("generate", "", "--out", tmp_path / "e.png", *FAST)[0] == 0
    assert params_of(tmp_path / "e.png")["Prompt"] == ""


def test_bf16_on_cpu(cli, tmp_path):
    code, _, _ = cli("generate", "a cat", "--precision", "bf16", "--device", "cpu", "--seed", "3",
                     "--out", tmp_path / "h.png", *FAST)
    assert code == 0
    assert cli("generate", "a cat", "--precision", "fp32", "--seed", "3", "--out", tmp_path / "f.png", *FAST)[0] == 0
    assert np.abs(pixels(tmp_path / "h.png") - pixels(tmp_path / "f.png")).mean() < 20  # same image, roughly


@pytest.mark.slow  # a TorchInductor compile: ~20-55 s
def test_compile_gives_the_eager_image(cli, tmp_path):
    """--compile (TorchInductor) changes speed, not the picture: same seed, same pixels up to float noise (fp32:
    bf16's rounding differs between fused and eager kernels by more than that)."""
    args = ("generate", "a cat", "--seed", "4", "--precision", "fp32", *FAST)
    assert cli(*args, "--out", tmp_path / "eager.png")[0] == 0
    code, stdout, stderr = cli(*args, "--compile", "--out", tmp_path / "compiled.png")
    assert code == 0, stderr
    assert np.abs(pixels(tmp_path / "eager.png") - pixels(tmp_path / "compiled.png")).max() <= 2


def test_compile_without_a_compiler_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("sdengine.compile.shutil.which", lambda name: None)
    code, _, stderr = cli("generate", "a cat", "--compile", "--device", "cpu", "--out", tmp_path / "x.png", *FAST)
    assert code == 1 and stderr.strip() == "sdengine: error: --compile on CPU needs a C++ compiler (g++ or clang++) " \
        "on PATH"
    assert not (tmp_path / "x.png").exists()


def test_compile_unet_keeps_the_module_and_its_keys(sd1_folder):
    model = sdengine.load(sd1_folder)
    keys = list(model.state_dict())
    assert sdengine.compile_unet(model) is model
    assert list(model.state_dict()) == keys and type(model.unet).__name__ == "UNetModel"


def test_models_folder_by_name(cli, sd1_folder, tmp_path):
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    sdengine.convert(sd1_folder, models / "tiny.safetensors", to="single")
    (models / "notes.txt").write_text("not a model")
    code, stdout, _ = cli("models", model=False)
    assert code == 0 and stdout.split() == ["tiny.safetensors", "custom"]  # the tiny model is no SD1.x size
    code, _, _ = cli("generate", "a cat", "--model", "tiny", "--seed", "5", "--out", tmp_path / "m.png", *FAST,
                     model=False)
    assert code == 0
    p = params_of(tmp_path / "m.png")
    assert p["Model"] == "tiny" and len(str(p["Model hash"])) == 10
    code, _, stderr = cli("generate", "a cat", "--model", "nosuch", "--out", tmp_path / "x.png", model=False)
    assert code == 1 and "no model 'nosuch'" in stderr and "tiny.safetensors" in stderr


def test_models_folder_empty(cli):
    code, stdout, _ = cli("models", model=False)
    assert code == 0 and stdout.startswith("no models in")

def test_variation_seed(cli, tmp_path, capsys):
    """--variation-seed/--variation-strength/--seed-resize-from reach the image and its parameters; strength 1
    is the variation seed's own image."""
    out, ref = tmp_path / "v.png", tmp_path / "ref.png"
    code, _, _ = cli("generate", "a cat", "--seed", "3", "--variation-seed", "8", "--variation-strength", "1",
                     "--seed-resize-from", "24x16", "--out", out, *FAST)
    assert code == 0 and cli("generate", "a cat", "--seed", "8", "--out", ref, *FAST)[0] == 0
    p = params_of(out)
    assert (p["Variation seed"], p["Variation seed strength"], p["Seed resize from"]) == (8, 1, "24x16")
    assert np.abs(pixels(out) - pixels(ref)).max() <= 1
    code, stdout, _ = cli("generate", "a cat", "--seed", "3", "--variation-seed", "8", "--variation-strength", "0.5",
                          "--batch", "2", "--out", tmp_path / "b.png", *FAST)
    assert code == 0 and "b-9.png (seed 3, variation seed 9)" in stdout  # the seed stays, the variation counts
    with pytest.raises(SystemExit) as exit_:  # a usage mistake: argparse's exit, in the one-line form
        run(["generate", "a", "--seed-resize-from", "512"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("sdengine: error:") and "expected WIDTHxHEIGHT" in err
    assert len(err.splitlines()) == 1


def test_hires_fix_and_tiling(cli, tmp_path):
    out = tmp_path / "hr.png"
    code, _, _ = cli("generate", "a cat", "--seed", "3", "--hires-scale", "2", "--hires-steps", "2",
                     "--hires-strength", "0.5", "--hires-upscaler", "Lanczos", "--tiling", "--out", out, *FAST)
    assert code == 0
    p = params_of(out)
    w, h = (int(v) for v in p["Size"].split("x"))
    from PIL import Image
    assert Image.open(out).size == (2 * w, 2 * h)
    assert (p["Hires upscale"], p["Hires steps"], p["Hires upscaler"], p["Denoising strength"], p["Tiling"]) == (
        2, 2, "Lanczos", 0.5, "True")


BAD = [
    (["generate", "a", "--width", "36"], "width must be a positive multiple of 8"),
    (["generate", "a", "--height", "0"], "height must be a positive multiple of 8"),  # was: 0 became 512
    (["generate", "a", "--height", "-8"], "height must be"),
    (["generate", "a", "--width", "8200"], "up to 8192"),
    (["generate", "a", "--steps", "0"], "steps must be a positive integer"),
    (["generate", "a", "--cfg", "nan"], "cfg scale must be a finite number"),
    (["generate", "a", "--batch", "0"], "batch size"),
    (["generate", "a", "--seed", "-2"], "seed must be -1 or in"),
    (["generate", "a", "--clip-skip", "0"], "clip skip must be >= 1"),
    (["generate", "a", "--variation-strength", "2"], "variation strength must be in [0, 1]"),
    (["generate", "a", "--sampler", "bogus"], "unknown sampler 'bogus'; valid: euler, euler_a, heun"),
    (["generate", "a", "--style", "nope"], "unknown style 'nope'"),
    (["generate", "a", "--hires-upscaler", "ESRGAN"], "unknown hires upscaler 'ESRGAN'"),
    (["generate", "a", "--hires-resize", "8200x0"], "up to 8192"),
    (["generate", "a", "--hires-scale", "0.5"], "hires scale must be"),
    (["img2img", "{notimage}", "a"], "init image {notimage} is not a readable image"),
    (["img2img", "{missing}", "a"], "init image {missing} does not exist"),
    (["img2img", "{init}", "a", "--strength", "0"], "strength must be in (0, 1]"),
    (["inpaint", "{init}", "{missing}", "a"], "mask {missing} does not exist"),
    (["inpaint", "{init}", "{smallmask}", "a", "--width", "12"], "width must be"),  # no resize note either
    (["generate", "a", "--out", "{nofolder}"], "does not exist"),
    (["generate", "a", "--out", "{missingdir}/"], "output folder {missingdir}/ does not exist"),  # was: a file
    (["generate", "a \udcff cat"], "prompt is not valid text: a lone surrogate U+DCFF"),  # invalid UTF-8 in argv
    (["generate", "a", "--negative", "\ud800"], "negative prompt is not valid text"),
    (["generate", "a", "--cfg", "1e308"], "cfg scale must be a finite number from -100 to 100"),
    (["generate", "a", "--model", "nosuchmodel"], "no model 'nosuchmodel'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD])
def test_bad_input_one_line_no_output(cli, sd1_folder, tmp_path, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    paths = {"notimage": tmp_path / "fake.png", "missing": tmp_path / "missing.png",
             "init": write_image(tmp_path / "init.png"), "smallmask": write_image(tmp_path / "m.png", 8, 8, "L"),
             "nofolder": tmp_path / "no" / "such" / "x.png", "missingdir": tmp_path / "missingdir"}
    paths["notimage"].write_text("not an image")
    argv = [a.format(**paths) for a in argv]
    for flag, value in {"--out": out / "x.png", "--steps": 1, "--width": 16, "--height": 16}.items():
        if flag not in argv:  # small and fast, should a check be missing and the run go ahead
            argv += [flag, str(value)]
    code, stdout, stderr = cli(*argv, "--quiet", model="--model" not in argv)
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("sdengine: error:"), stderr
    assert message.format(**paths) in lines[0]
    assert list(out.iterdir()) == [] and not list(tmp_path.glob("sdengine-*.png")) and stdout == ""
    assert not paths["missingdir"].exists()


def test_bad_input_real_process(sd1_folder, tmp_path):
    """The installed entry point: exit status 1, one line, no traceback, nothing written."""
    proc = run_cli("generate", "a cat", "--model", sd1_folder, "--width", "36", "--out", tmp_path / "x.png",
                   cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "sdengine: error: width must be a positive multiple of 8 up to 8192, got 36\n"
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_are_replaced_only_with_force(cli, tmp_path):
    """Issue 34 (2): --out replaced a text file, the img2img input itself and a symlink's target without --force."""
    text = tmp_path / "notes.png"
    text.write_text("keep me")
    init = write_image(tmp_path / "init.png", 16, 16)
    before = init.read_bytes()
    target = tmp_path / "target.png"
    target.write_text("target")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    for argv in (["generate", "a", "--out", text], ["img2img", init, "a", "--out", init],
                 ["generate", "a", "--out", link]):
        code, stdout, stderr = cli(*argv, *FAST)
        assert code == 1 and stdout == "" and "exists (use --force to replace it)" in stderr, stderr
    assert text.read_text() == "keep me" and init.read_bytes() == before and target.read_text() == "target"
    code, stdout, _ = cli("generate", "a", "--seed", "3", "--out", text, "--force", *FAST)
    assert code == 0 and Image.open(text).format == "PNG"
    code, _, stderr = cli("generate", "a", "--seed", "3", "--batch", "2", "--out", tmp_path / "b.png", *FAST)
    assert code == 0 and {p.name for p in tmp_path.glob("b-*.png")} == {"b-3.png", "b-4.png"}
    (tmp_path / "b-3.png").unlink()  # one of a batch's names taken: refused before any work, nothing written
    code, _, stderr = cli("generate", "a", "--seed", "3", "--batch", "2", "--out", tmp_path / "b.png", *FAST)
    assert code == 1 and "b-4.png exists" in stderr and not (tmp_path / "b-3.png").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_folder_out_writes_into_it(tmp_path):
    """A folder --out (with or without the trailing slash) gets sdengine-ID.png files; checked without generating:
    output_paths is what run_generation writes to."""
    from sdengine.cli.generate import output_paths
    from sdengine.errors import CLIError

    folder = tmp_path / "outs"
    folder.mkdir()
    for out in (folder, f"{folder}/", str(folder)):
        assert output_paths(out, [5, 6]) == [folder / "sdengine-5.png", folder / "sdengine-6.png"]
    (folder / "sdengine-6.png").write_bytes(b"")
    with pytest.raises(CLIError, match="sdengine-6.png exists"):
        output_paths(folder, [5, 6])
    assert output_paths(folder, [6], force=True) == [folder / "sdengine-6.png"]
    (folder / "b-1.png").mkdir()  # a batch's name that is a folder is never replaced, --force or not
    with pytest.raises(CLIError, match="b-1.png is a folder"):
        output_paths(folder / "b.png", [1, 2], force=True)


@pytest.mark.slow
def test_full_disk_leaves_the_previous_png_intact(sd1_folder, tmp_path):
    """Issue 34 (2): a full disk left 0-byte PNGs, and truncated an existing PNG into an unreadable file."""
    out = tmp_path / "x.png"
    args = ["generate", "a", "--model", sd1_folder, "--seed", "1", "--out", out, *FAST]
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    before = out.read_bytes()
    proc = run_cli(*args[:-len(FAST)], "--seed", "2", "--force", *FAST, cwd=tmp_path, limit_bytes=200)
    line = assert_cli_error(proc, f"cannot write {out}", "left as it was")
    assert "File too large" in line
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    proc = run_cli(*args[:-len(FAST)], "--out", tmp_path / "new.png", *FAST, cwd=tmp_path, limit_bytes=200)
    assert_cli_error(proc, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no 0-byte PNG, no temporary


def test_refiner_and_sdxl_conditioning_options_are_checked_before_loading(cli, tmp_path):
    code, _, err = cli("generate", "a cat", "--refiner", "nosuch", *FAST)
    assert code != 0 and "no model 'nosuch'" in err and not list(tmp_path.glob("*.png"))
    code, _, err = cli("img2img", write_image(tmp_path / "in.png"), "a cat", "--refiner", "x", *FAST)
    assert code != 0 and "img2img with a refiner is not supported" in err
    code, _, err = cli("generate", "a cat", "--refiner", "x", "--refiner-switch-at", "1.5", *FAST)
    assert code != 0 and "refiner switch point must lie in (0, 1)" in err
    code, _, err = cli("generate", "a cat", "--original-size", "64x64", *FAST)  # an SD1 model
    assert code != 0 and "condition SDXL models" in err


def test_from_png_reruns_an_image_and_options_override(cli, tmp_path):
    first = tmp_path / "first.png"
    code, _, err = cli("generate", "a (red:1.2) circle", "--negative", "blue", "--seed", "5", "--sampler",
                       "dpmpp_2m", "--schedule", "karras", "--cfg", "4", "--clip-skip", "2", "--out", first, *FAST)
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = cli("generate", "--from-png", first, "--out", again, "--quiet")
    assert code == 0, err
    assert np.array_equal(pixels(first), pixels(again))
    p, q = params_of(first), params_of(again)
    assert {k: v for k, v in p.items() if k != "Version"} == {k: v for k, v in q.items() if k != "Version"}
    other = tmp_path / "other.png"
    code, _, err = cli("generate", "a cat", "--from-png", first, "--seed", "6", "--out", other, "--quiet")
    assert code == 0, err
    o = params_of(other)
    assert o["Seed"] == 6 and o["Prompt"] == "a cat" and o["Sampler"] == "DPM++ 2M" and o["Clip skip"] == 2
    code, _, err = cli("generate", "--from-png", write_image(tmp_path / "plain.png"), *FAST)
    assert code != 0 and "holds no generation parameters" in err
    from sdengine.metadata import save_png

    with Image.open(first) as im:   # an image made with a ControlNet unit: the unit is named, not silently dropped
        save_png(im.copy(), tmp_path / "unit.png", read_parameters(first) + ', ControlNet 0: "Module: canny"')
    code, _, err = cli("generate", "--from-png", tmp_path / "unit.png", "--out", tmp_path / "u.png", "--quiet")
    assert code == 0 and "ControlNet 0 is not re-applied" in err, err
    code, _, err = cli("generate", *FAST)
    assert code != 0 and "a prompt is needed" in err


def test_prompts_file_runs_each_line(cli, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text('a red circle\n\n--prompt "a blue square" --negative_prompt "red" --seed 3 --steps 1\n')
    code, out, err = cli("generate", "--prompts-file", lines, "--seed", "7", "--out", tmp_path / "p.png", *FAST)
    assert code == 0, err
    first, second = params_of(tmp_path / "p-1-7.png"), params_of(tmp_path / "p-2-3.png")
    assert first["Prompt"] == "a red circle" and first["Steps"] == 2
    assert second["Prompt"] == "a blue square" and second["Negative prompt"] == "red" and second["Steps"] == 1
    lines.write_text("--prompt x --bogus 1\n")
    code, _, err = cli("generate", "--prompts-file", lines, *FAST)
    assert code != 0 and "unknown option '--bogus'" in err and "line 1" in err


def test_wildcards_and_variants_are_chosen_by_seed(cli, tmp_path):
    folder = tmp_path / "home" / "wildcards"
    folder.mkdir(parents=True)
    (folder / "colors.txt").write_text("# a comment\nred\nblue\ngreen\nyellow\n")
    (folder / "loop.txt").write_text("__loop__\n")
    chosen = set()
    for seed in range(6):
        out = tmp_path / f"w{seed}.png"
        code, _, err = cli("generate", "a __colors__ {big|small} circle", "--seed", str(seed), "--out", out, *FAST)
        assert code == 0, err
        prompt = params_of(out)["Prompt"]
        assert prompt.split()[1] in {"red", "blue", "green", "yellow"} and prompt.split()[2] in {"big", "small"}
        chosen.add(prompt)
    assert len(chosen) > 1  # seeds choose differently
    code, _, _ = cli("generate", "a __colors__ {big|small} circle", "--seed", "0", "--out", tmp_path / "x.png", *FAST)
    assert params_of(tmp_path / "x.png")["Prompt"] == params_of(tmp_path / "w0.png")["Prompt"]  # and repeatably
    code, _, err = cli("generate", "a __nosuch__", *FAST)
    assert code != 0 and "__nosuch__" in err
    code, _, err = cli("generate", "a __loop__", *FAST)
    assert code != 0 and "unresolved after" in err
    code, _, err = cli("generate", "a __../../etc/passwd__", *FAST)
    assert code != 0 and "not a name inside" in err


def test_outputs_as_a1111_names_them(cli, tmp_path):
    """--out-pattern: NNNNN-PATTERN numbered on (never overwriting), subfolders from '/'; --format jpg/webp with the
    parameters in EXIF as A1111 writes them (piexif, A1111's reader, reads them back); --grid."""
    import piexif
    import piexif.helper

    out = tmp_path / "outs"
    out.mkdir()
    code, _, err = cli("generate", "a red circle", "--seed", "3", "--batch", "2", "--out", out, "--out-pattern",
                       "[date]/[seed]-[prompt_spaces]", "--format", "jpg", "--grid", *FAST)
    assert code == 0, err
    day = next(out.iterdir())
    names = sorted(p.name for p in day.iterdir())
    assert names == ["00000-3-a red circle-grid.jpg", "00000-3-a red circle.jpg", "00001-4-a red circle.jpg"]
    code, _, err = cli("generate", "a red circle", "--seed", "3", "--out", out, "--out-pattern",
                       "[date]/[seed]-[prompt_spaces]", "--format", "webp", *FAST)
    assert code == 0, err
    assert (day / "00002-3-a red circle.webp").exists()  # numbered on: the first run's files stay
    exif = piexif.load(Image.open(day / "00001-4-a red circle.jpg").info["exif"])
    text = piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
    assert text == read_parameters(day / "00001-4-a red circle.jpg") and "Seed: 4" in text
    assert Image.open(day / "00000-3-a red circle-grid.jpg").size == (48, 16)
    code, _, err = cli("generate", "a", "--out", out, "--out-pattern", "[bogus]", *FAST)
    assert code != 0 and "unknown file name tag" in err
    code, _, err = cli("generate", "a", "--out", out, "--out-pattern", "../[seed]", *FAST)
    assert code != 0 and "inside the output folder" in err
