"""scripts/binding_probe.py: which shape a text encoder's context names, per layer, for held-out colour-shape pairs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from train_helpers import tiny_model

from sdengine.data.shapes import COLORS, HELD_OUT, SHAPES

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("binding_probe", ROOT / "scripts" / "binding_probe.py")
binding_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(binding_probe)


def test_the_shape_token_is_the_last_before_the_end_token_at_each_layer():
    model = tiny_model(2)
    pairs = [("orange", "star"), ("red", "circle")]
    for skip in (1, 2):
        states = binding_probe.shape_token_states(model, pairs, skip)
        context = model.encode_prompt(["an orange star", "a red circle"], clip_skip=skip)
        ids = model.tokenizer(["an orange star"], max_length=context.shape[1])[0]
        end = int((ids == model.tokenizer.eos_id).int().argmax())
        expected = torch.nn.functional.normalize(context[0, end - 1], dim=0)
        assert torch.allclose(states[0], expected, atol=1e-6)
        assert torch.allclose(states.norm(dim=1), torch.ones(2), atol=1e-5)


def test_probe_counts_the_pairs_whose_nearest_caption_shares_the_shape(monkeypatch):
    """An encoder whose states say only the shape keeps every pair's shape; one that says only the colour none."""
    model = tiny_model(2)
    n_held, n_seen = len(HELD_OUT), len(COLORS) * len(SHAPES) - len(HELD_OUT)
    for by, kept in (("shape", True), ("colour", False)):
        def states(model, pairs, skip, by=by):
            axis = [SHAPES.index(s) if by == "shape" else len(SHAPES) + list(COLORS).index(c) for c, s in pairs]
            one_hot = torch.nn.functional.one_hot(torch.tensor(axis), len(SHAPES) + len(COLORS)).float()
            jitter = 1e-3 * torch.arange(len(pairs)).float()[:, None]  # no exact ties
            return torch.nn.functional.normalize(one_hot + jitter, dim=1)
        monkeypatch.setattr(binding_probe, "shape_token_states", states)
        result = binding_probe.probe(model)
        assert sorted(result) == [1, 2]
        for skip in result:
            assert result[skip]["held"] == ((n_held if kept else 0), n_held)
            assert result[skip]["seen"] == ((n_seen if kept else 0), n_seen)
            assert all(near != pair for pair, near in result[skip]["nearest"].items())
