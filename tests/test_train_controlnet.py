"""`sdengine train controlnet`: the ControlNet starts as the UNet's encoder with zero convolutions (the first
generation is the base model's, bit for bit), training changes it and nothing else, runs resume exactly, the file it
writes loads in sdengine and (through our diffusers-layout writer) in diffusers' ControlNetModel with the residuals
training computed; the shapes world's layout maps, the position check and the control eval; bad data is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference import assert_close
from train_helpers import make_images, one_error, tiny_model, train

import sdengine
from sdengine.control import ControlUnit, load_controlnet, save_controlnet
from sdengine.data.checker import detect
from sdengine.data.layout import POSITION_TOLERANCE, placement, render_layout
from sdengine.data.shapes import COLORS, SceneSampler, render
from sdengine.pipeline import Pipeline
from sdengine.train.stages.controlnet import (
    RESULT,
    ControlFolderSource,
    ControlNetStage,
    controlnet_from_unet,
    make_control_source,
)
from sdengine.train.trainer import TrainConfig, Trainer
from sdengine.weights.io import read_tensors


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model (weights perturbed: a fresh model's zeroed output layers predict nothing) saved as a file."""
    root = tmp_path_factory.mktemp("controlnet")
    model = tiny_model(1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sdengine.save(model, root / "base.safetensors")
    return root / "base.safetensors"


def _perturb(net: torch.nn.Module, seed: int = 4) -> None:
    """Trained-looking weights: zero convolutions at zero would make every residual zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _state(path) -> dict[str, torch.Tensor]:
    return read_tensors(path)[0]


def test_starts_as_the_unet_encoder_with_zero_convolutions(base):
    model = sdengine.load(base)
    net = controlnet_from_unet(model)
    unet = model.unet.state_dict()
    last = f"input_hint_block.{2 + 4 * (len(net.config.hint_block_channels) - 1)}."  # conv, then 2 per stage x 2
    for key, value in net.state_dict().items():
        if key.startswith(("zero_convs.", "middle_block_out.", last)):
            assert not value.any(), key  # the zero convolutions and the hint encoder's last convolution
        elif not key.startswith("input_hint_block."):
            assert torch.equal(value, unet[key]), key
    assert net.config.hint_block_channels == (16, 32)  # one stride-2 stage: the tiny VAE halves the image


def test_zero_init_generates_the_base_models_images_bitwise(base, tmp_path):
    model = sdengine.load(base)
    stage = ControlNetStage(model, None)
    stage.export(stage.trainable(), tmp_path)
    pipe = Pipeline(model)
    hint = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    kwargs = dict(steps=3, cfg_scale=5.0, seed=3, width=32, height=32, batch_size=2)
    plain = pipe.generate("a red circle", **kwargs)
    controlled = pipe.generate("a red circle", controls=[ControlUnit(str(tmp_path / RESULT), hint)], **kwargs)
    for a, b in zip(plain, controlled):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _trainer(model, run, steps: int, source=None) -> tuple[ControlNetStage, Trainer]:
    stage = ControlNetStage(model, source or make_control_source("shapes", 32, 0))
    cfg = TrainConfig(run_dir=run, steps=steps, batch_size=4, lr=1e-3, warmup=1, precision="fp32", save_every=0,
                      quiet=True, log_every=1)
    return stage, Trainer(stage, cfg, torch.device("cpu"))


def test_training_changes_the_controlnet_and_nothing_else(base, tmp_path, monkeypatch):
    monkeypatch.setattr(ControlNetStage, "samples", lambda *a, **k: None)  # pictures are not under test
    model = sdengine.load(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage, trainer = _trainer(model, tmp_path / "run", 3)
    start = {k: v.clone() for k, v in stage.controlnet.state_dict().items()}
    trainer.run()
    after = stage.controlnet.state_dict()
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("zero_convs."))
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("input_blocks."))  # past the zeros
    frozen = model.state_dict()
    assert all(torch.equal(before[k], frozen[k]) for k in before), "the base model changed"
    assert not any(p.requires_grad for p in model.parameters())


def test_resume_is_exact(base, tmp_path, capsys):
    common = ("--init", str(base), "--steps", "4", "--batch", "4", "--save-every", "0")
    rc, err = train(capsys, "controlnet", tmp_path / "straight", "shapes", *common)
    assert rc == 0, err
    rc, err = train(capsys, "controlnet", tmp_path / "paused", "shapes", *common, "--stop-at", "2")
    assert rc == 0, err
    rc, err = train(capsys, "controlnet", tmp_path / "paused", "shapes", *common, "--resume")
    assert rc == 0, err
    a, b = _state(tmp_path / "straight" / RESULT), _state(tmp_path / "paused" / RESULT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("control_model.") for k in a)  # lllyasviel's single-file layout


def test_written_file_gives_the_trained_residuals_in_sdengine_and_diffusers(reference, tmp_path):
    from diffusers import ControlNetModel

    model = sdengine.load(reference["folder"])
    stage = ControlNetStage(model, None)
    _perturb(stage.controlnet)
    net = stage.controlnet.eval()
    g = torch.Generator().manual_seed(2)
    x, hint = torch.randn(2, 4, 16, 20, generator=g), torch.rand(2, 3, 32, 40, generator=g)
    context, t = torch.randn(2, 77, model.config.unet.context_dim, generator=g), torch.tensor([7, 640])
    with torch.no_grad():
        trained = net(x, hint, t, context)
    stage.export(stage.trainable(), tmp_path)
    loaded = load_controlnet(tmp_path / RESULT, model.config.unet)
    with torch.no_grad():
        for a, b in zip(loaded(x, hint, t, context), trained):
            assert torch.equal(a, b)
    save_controlnet(loaded, tmp_path / "diffusers", layout="diffusers")
    ref = ControlNetModel.from_pretrained(tmp_path / "diffusers").eval()
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(down) + 1 == len(trained)
    for a, b in zip([*down, mid], trained):
        assert_close(a, b)


def test_trained_file_drives_sdengine_generate(base, tmp_path, capsys):
    from sdengine import cli

    rc, err = train(capsys, "controlnet", tmp_path / "run", "shapes", "--init", str(base), "--steps", "2",
                    "--batch", "2")
    assert rc == 0, err
    control = tmp_path / "layout.png"
    Image.fromarray(make_control_source("shapes", 32, 0).item(0)[2]).save(control)
    out = tmp_path / "out.png"
    rc = cli.run(["generate", "a red circle", "--model", str(base), "--control",
                  f"{tmp_path / 'run' / RESULT}:{control}", "--steps", "2", "--width", "32", "--height", "32",
                  "--out", str(out), "--precision", "fp32"])
    assert rc == 0 and out.exists()


# --- data ----------------------------------------------------------------------------------------------------------

def test_layout_map_covers_exactly_the_rendered_objects():
    for i in range(12):
        sample = SceneSampler(seed=5).sample(i)
        layout, image = render_layout(sample.scene), sample.image.astype(int)
        assert layout.shape == image.shape and layout.dtype == np.uint8
        background = np.array(COLORS[sample.scene.background])
        inside, outside = layout[..., 0] == 255, layout[..., 0] == 0
        assert (np.abs(image[outside] - background).sum(-1) == 0).all()
        assert (np.abs(image[inside] - background).sum(-1) > 0).all()
        assert inside.sum() > 0


def test_placement_finds_the_layouts_objects_and_misses_moved_ones():
    import dataclasses

    for i in range(8):
        scene = SceneSampler(seed=7).sample(i).scene
        _, objects = detect(render(scene))
        assert placement(scene, objects).all_landed
        moved = dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, cx=o.cx + 8) for o in scene.objects))
        _, objects = detect(render(moved))
        p = placement(scene, objects)
        assert p.landed == 0 and all(e > POSITION_TOLERANCE for e in p.errors)  # (objects at the edge are cut)


def _pairs(folder, n: int = 4):
    make_images(folder, n)
    for i in range(n):  # a control image unlike its picture, so a mix-up shows
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(folder / f"{i}.control.png")
    return folder


def test_folder_pairs_and_metadata(tmp_path):
    folder = _pairs(tmp_path / "pairs")
    source = ControlFolderSource(folder, size=32)
    assert len(source.items) == 4  # the control images are not training images
    for k in range(8):
        image, caption, control = source.item(k)
        i = int([p for p, c in source.items if c == caption and np.array_equal(
            np.asarray(Image.open(p).convert("RGB")), image)][0].stem)
        assert (control == 20 * i).all()
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "conditioning").mkdir()
    rows = []
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(meta / f"{i}.png")
        Image.fromarray(np.full((32, 32, 3), 7 * i, np.uint8)).save(meta / "conditioning" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}", "conditioning_image": f"conditioning/{i}.png"})
    (meta / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = ControlFolderSource(meta, size=32)
    for k in range(3):
        _, caption, control = source.item(k)
        assert (control == 7 * int(caption.split()[1])).all()


def test_bad_data_is_one_line(base, tmp_path, capsys):
    bare = make_images(tmp_path / "bare")  # captions, no control images
    rc, err = train(capsys, "controlnet", tmp_path / "a", str(bare), "--init", str(base))
    assert rc == 1
    one_error(err, "no control image", "NAME.control.png")
    rc, err = train(capsys, "controlnet", tmp_path / "b", "shapes", "--init", str(base), "--hint", "file")
    assert rc == 1
    one_error(err, "--hint file", "layout or canny")
    rc, err = train(capsys, "controlnet", tmp_path / "c", str(_pairs(tmp_path / "p")), "--init", str(base),
                    "--hint", "layout")
    assert rc == 1
    one_error(err, "--hint layout", "--data shapes")
    meta = make_images(tmp_path / "m", 2, captions=False)
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a square"}) + "\n")
    rc, err = train(capsys, "controlnet", tmp_path / "d", str(meta), "--init", str(base))
    assert rc == 1
    one_error(err, "metadata.jsonl:1", "conditioning_image")
    rc, err = train(capsys, "controlnet", tmp_path / "e", "shapes", "--init", str(base), "--cache-latents", "8")
    assert rc == 2  # argparse: an option of other stages
    assert "--cache-latents is for" in err


def test_canny_hint_on_a_folder_needs_no_control_images(tmp_path):
    source = make_control_source(str(make_images(tmp_path / "imgs")), 32, 0, "canny")
    image, _, control = source.item(0)
    assert control.shape == image.shape and set(np.unique(control)) <= {0, 255} and control.any()


# --- the control eval ----------------------------------------------------------------------------------------------

def test_control_eval_with_a_zero_controlnet_equals_the_baseline(base, tmp_path):
    from sdengine.eval_control import format_table, run_control_eval, write_report

    model = sdengine.load(base)
    stage = ControlNetStage(model, None)
    stage.export(stage.trainable(), tmp_path)
    scores, records, triples = run_control_eval(Pipeline(model), tmp_path / RESULT, seeds=2, limit=1, steps=2,
                                                size=32, quiet=True)
    runs = {run: [r for r in records if r["run"] == run] for run in ("without", "with")}
    assert len(runs["with"]) == len(runs["without"]) == 12 and len(triples) == 12
    for a, b in zip(runs["without"], runs["with"]):  # zero residuals: the same images, so the same judgments
        assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}
    for _, without, with_cn, _ in triples:
        assert np.array_equal(np.asarray(without), np.asarray(with_cn))
    assert scores["with"]["overall"] == scores["without"]["overall"]
    write_report(scores, records, triples, tmp_path / "report", {})
    assert "position" in format_table(scores) and (tmp_path / "report" / "examples.png").exists()


def test_eval_control_layout_refuses_a_missing_file(capsys):
    from sdengine import cli

    rc = cli.run(["eval", "--control-layout", "/nonexistent/cn.safetensors", "--limit", "1", "--seeds", "1"])
    assert rc != 0
    one_error(capsys.readouterr().err, "/nonexistent/cn.safetensors")
