"""No silent NaN (issue 34, finding 4): emphasis weights are bounded, and non-finite latents or pixels are an error
(a non-zero exit on the CLI, a 500 with a message on the server), never a black image reported as success."""
from __future__ import annotations

import math

import pytest
import torch

from sdengine.config import TINY
from sdengine.model import StableDiffusion
from sdengine.pipeline import NonFiniteError, Pipeline
from sdengine.prompts import MAX_WEIGHT, parse_weights
from sdengine.request import Request

SMALL = {"steps": 2, "width": 32, "height": 32, "seed": 1}


def tiny(broken: str | None = None, value: float = math.nan) -> StableDiffusion:
    """The tiny model; `broken`: the prefix of the parameters set to `value`."""
    model = StableDiffusion(TINY).init_weights(seed=0)
    if broken is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(broken):
                    p.fill_(value)
    return model


@pytest.mark.parametrize("prompt, expected", [
    ("(" * 3000 + "cat" + ")" * 3000, MAX_WEIGHT),  # was 1.1**3000: inf in float32
    ("(cat:1" + "9" * 400 + ")", MAX_WEIGHT),  # was inf
    ("((cat:1" + "9" * 400 + "):0)", 0.0),  # was inf * 0 = NaN
    ("((cat:-1" + "9" * 400 + "):2)", -MAX_WEIGHT),
    ("((((cat))))", 1.1 ** 4),  # what people write is untouched
])
def test_emphasis_weights_are_bounded(prompt, expected):
    (text, weight), = parse_weights(prompt)
    assert text == "cat" and math.isfinite(weight) and weight == pytest.approx(expected)


def test_deeply_nested_emphasis_gives_finite_latents():
    pipe = Pipeline(tiny())
    req = Request(prompt="(" * 3000 + "a cat" + ")" * 3000, **SMALL)
    assert torch.isfinite(pipe.latents(req)).all()


def test_non_finite_latents_and_pixels_are_errors():
    with pytest.raises(NonFiniteError, match="the sampled latents hold NaN or Inf"):
        Pipeline(tiny("model.diffusion_model.out")).generate("a cat", **SMALL)
    with pytest.raises(NonFiniteError, match="the decoded pixels hold NaN or Inf"):
        Pipeline(tiny("first_stage_model.decoder.conv_out", math.inf)).generate("a cat", **SMALL)
    assert Pipeline(tiny()).generate("a cat", **SMALL)[0].size == (32, 32)


def test_cli_exits_non_zero_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from sdengine.cli import run
    from sdengine.weights import save

    save(tiny("model.diffusion_model.out"), tmp_path / "nan.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDENGINE_DEBUG", raising=False)
    code = run(["generate", "a cat", "--model", str(tmp_path / "nan.safetensors"), "--steps", "2", "--width", "32",
                "--height", "32", "--quiet", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "sampled latents hold NaN or Inf" in err, err
    assert not (tmp_path / "x.png").exists()


def test_cfg_1e308_is_refused():
    with pytest.raises(ValueError, match="cfg scale must be a finite number from -100 to 100"):
        Request(prompt="a", cfg_scale=1e308)
