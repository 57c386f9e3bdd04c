"""Prompt editing and alternation (A1111's `[from:to:when]`, `[a|b]`): the schedule of texts, and the text that
conditions each step of real sampling runs, observed from outside (the sampler's per-step callback marks the
steps, a spy on the UNet call sees the context)."""
from __future__ import annotations

import pytest
import torch

import sdengine
from sdengine.diffusion.denoiser import Denoiser
from sdengine.pipeline import Pipeline
from sdengine.prompt_schedule import has_schedule, schedule
from sdengine.prompts import encode_text
from sdengine.request import Request

# (prompt, steps) -> [(last step, text)], as A1111's get_learned_conditioning_prompt_schedules gives them
CASES = [
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 4, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
    ("[cat::2] x", 4, [(2, "cat x"), (4, " x")]),
    ("[a|b|]", 3, [(1, "a"), (2, "b"), (3, "")]),
    ("x [a:b] y", 10, [(10, "x [a:b] y")]),  # no number: literal text
    ("[a:b:2.5]", 10, [(10, "a")]),  # a share past the end: the first text throughout
    ("[a:b:1e400]", 10, [(10, "a")]),
    ("[a:b:-3]", 10, [(10, "b")]),
    ("(red:1.2) [cat:dog:0.5] BREAK z", 4, [(2, "(red:1.2) cat BREAK z"), (4, "(red:1.2) dog BREAK z")]),
    ("a \\[b:3\\]", 10, [(10, "a \\[b:3\\]")]),  # escaped brackets are text
]


@pytest.mark.parametrize("prompt,steps,expected", CASES)
def test_schedules_are_a1111s(prompt, steps, expected):
    assert schedule(prompt, steps) == expected
    assert has_schedule(prompt) or len(expected) == 1  # (a construct may collapse to one text: "[a:b:2.5]")


def test_second_pass_counts_on_from_the_first():
    """A1111's hires-fix rule: integers continue the first pass's count, shares are of both passes (1.5 = half way
    through the second)."""
    assert schedule("[a:b:25]", 10, first_pass_steps=20) == [(5, "a"), (10, "b")]
    assert schedule("[a:b:1.5]", 10, first_pass_steps=20) == [(5, "a"), (10, "b")]
    assert schedule("[a:b:0.5]", 10, first_pass_steps=20) == [(10, "b")]  # switched during the first pass


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline(sdengine.load(sd1_folder))


# prompt, steps, the text each step 0..steps-1 must see (hand-built; A1111 counts steps from 0 and a step uses the
# first entry whose last step it does not pass, so "[a:b:2]" gives a for steps 0-2)
STEP_TEXTS = [
    ("a [cat:dog:2] house", 5, ["a cat house"] * 3 + ["a dog house"] * 2),
    ("[red|blue] circle", 5, ["red circle", "red circle", "blue circle", "red circle", "blue circle"]),
    ("a [cat:dog:0.5]", 4, ["a cat"] * 3 + ["a dog"]),
    ("[x:[y:z:3]:1]", 5, ["x", "x", "y", "y", "z"]),
]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("prompt,steps,texts", STEP_TEXTS)
def test_each_step_sees_its_text(pipe, monkeypatch, sampler, prompt, steps, texts):
    """Every UNet evaluation made during step i (second-order samplers evaluate twice) is conditioned on step i's
    text, and the negative prompt's schedule is followed the same way."""
    contexts, step_of_call, done = [], [], [0]
    original = Denoiser.__call__

    def spy(self, x, sigma, cond):
        contexts.append(cond.context[1:2].clone())  # batch [uncond, cond]: the prompt's half
        step_of_call.append(done[0])
        return original(self, x, sigma, cond)

    monkeypatch.setattr(Denoiser, "__call__", spy)
    req = Request(prompt=prompt, negative_prompt="blurry", steps=steps, sampler=sampler, seed=1, width=16,
                  height=16, cfg_scale=5)
    pipe.sample(req, callback=lambda i, n, x, d: done.__setitem__(0, i + 1))
    expected = {t: encode_text(pipe.model, [t])[0] for t in set(texts)}
    assert len(contexts) >= steps
    for context, step in zip(contexts, step_of_call):
        assert torch.equal(context, expected[texts[step]]), (step, texts[step])


def test_plain_prompts_take_the_plain_path(pipe):
    """No schedule, no change: a prompt without editing gives exactly what it gave before."""
    req = Request(prompt="a red circle", negative_prompt="blue", steps=3, seed=2, width=16, height=16)
    cond, uncond = pipe.condition(req)
    assert type(cond).__name__ == "Conditioning" and type(uncond).__name__ == "Conditioning"
    edited = Request(prompt="a [red:red:1] circle", negative_prompt="blue", steps=3, seed=2, width=16, height=16)
    assert torch.equal(pipe.sample(req), pipe.sample(edited))  # the same text at every step: the same image
    image = pipe.generate("a [cat:dog:2]", steps=3, seed=2, width=16, height=16)[0]
    assert image.info["parameters"].startswith("a [cat:dog:2]\n")  # the prompt as written
