"""Checkpoint merging (`sdengine merge`, sdengine.merge): the arithmetic, the parts kept, bad input."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

import sdengine
from sdengine.config import TINY
from sdengine.model import StableDiffusion
from sdengine.weights.merge import PART_PREFIXES


def random_model(seed: int, cfg=TINY) -> StableDiffusion:
    """Every tensor random (init_weights zeroes some layers, which would hide a part left unmerged)."""
    model = StableDiffusion(cfg).init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    paths = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        paths[name] = sdengine.save(random_model(seed), root / f"{name}.safetensors")
    paths["a16"] = sdengine.save(random_model(1), root / "a16.safetensors", dtype=torch.float16)
    return paths


def state(path: Path) -> dict[str, torch.Tensor]:
    return sdengine.load(path, dtype=None).state_dict()



def test_weighted_sum_is_a_lerp_of_every_floating_tensor(files):
    a, b = state(files["a"]), state(files["b"])
    merged = sdengine.merge(files["a"], files["b"], alpha=0.25).state_dict()
    floats = [k for k in a if a[k].is_floating_point()]
    assert len(floats) > 100
    for k in floats:
        expected = a[k].double() * 0.75 + b[k].double() * 0.25
        torch.testing.assert_close(merged[k].double(), expected, rtol=1e-6, atol=1e-6, msg=k)
    # the ends are the models themselves, exactly
    for alpha, ref in ((0.0, a), (1.0, b)):
        ends = sdengine.merge(files["a"], files["b"], alpha=alpha).state_dict()
        assert all(torch.equal(ends[k], ref[k]) for k in floats), alpha


def test_add_difference(files):
    a, b, c = state(files["a"]), state(files["b"]), state(files["c"])
    merged = sdengine.merge(files["a"], files["b"], alpha=0.7, tertiary=files["c"]).state_dict()
    for k in a:
        if a[k].is_floating_point():
            expected = a[k].double() + (b[k].double() - c[k].double()) * 0.7
            torch.testing.assert_close(merged[k].double(), expected, rtol=1e-5, atol=1e-5, msg=k)
    # A + (B - A) = B: the difference of a fine-tune from its base, added back to that base
    same = sdengine.merge(files["a"], files["b"], alpha=1.0, tertiary=files["a"]).state_dict()
    for k in a:
        torch.testing.assert_close(same[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_only_the_parts_named_are_merged(files):
    a = state(files["a"])
    merged = sdengine.merge(files["a"], files["b"], alpha=0.5, parts=["unet"]).state_dict()
    for k in a:
        changed = not torch.equal(merged[k], a[k])
        assert changed == k.startswith(PART_PREFIXES["unet"]), k
    with pytest.raises(ValueError, match="parts to merge"):
        sdengine.merge(files["a"], files["b"], parts=["clip"])


def test_result_keeps_the_primarys_precision(files):
    merged = sdengine.merge(files["a16"], files["b"], alpha=0.5)
    assert {p.dtype for p in merged.parameters()} == {torch.float16}


def test_another_architecture_is_an_error_naming_the_tensor(files, tmp_path):
    wider = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, model_channels=64))
    other = sdengine.save(random_model(4, wider), tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match="another architecture.*model\\."):
        sdengine.merge(files["a"], other)
    with pytest.raises(ValueError, match="alpha"):
        sdengine.merge(files["a"], files["b"], alpha=5.0)


@pytest.mark.slow  # CLI processes
def test_cli_merge_writes_a_loadable_checkpoint_and_errors_are_one_line(files, tmp_path):
    out = tmp_path / "soup.safetensors"
    r = run_cli("merge", files["a"], files["b"], "--out", out, "--alpha", "0.5", "--parts", "unet,text")
    assert r.returncode == 0, r.stderr
    merged, a, b = state(out), state(files["a"]), state(files["b"])
    key = next(k for k in merged if k.startswith(PART_PREFIXES["text"]) and merged[k].is_floating_point())
    torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2)
    vae_key = next(k for k in merged if k.startswith(PART_PREFIXES["vae"]))
    assert torch.equal(merged[vae_key], a[vae_key])

    for args, message in (
        ((files["a"], files["b"], "--out", out), "exists"),
        ((files["a"], files["b"], files["c"], "--out", tmp_path / "x.safetensors"), "weighted-sum takes two"),
        ((files["a"], files["b"], "--out", tmp_path / "x.safetensors", "--mode", "add-difference"), "three models"),
        ((files["a"], tmp_path / "missing.safetensors", "--out", tmp_path / "x.safetensors"), "missing"),
    ):
        r = run_cli("merge", *args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.safetensors").exists()
