"""Does a model's text encoder still say which shape a held-out colour-shape pair names?

For every one-object caption of the shapes world ("an orange star"), at the shape word's last token and at each
layer of the text encoder (clip skip 1 is the layer the UNet reads), it finds the nearest other caption by cosine
similarity. An encoder that composes keeps the shape: the nearest to "an orange star" is another star ("a red
star"). One that learnt colour-shape pairs as units gives a pair of the same colour ("an orange triangle") for the
pairs it never saw, and then the UNet, reading that, draws an orange something else. It prints the nearest caption
of each held-out pair per layer and, per layer, how many held-out and seen pairs keep their shape. Seconds on a CPU.

    python scripts/binding_probe.py sdengine/models/default/model.safetensors
    python scripts/binding_probe.py MODEL --text runs/textneg/text.safetensors   # a `train text` result instead
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdengine.data.shapes import COLORS, HELD_OUT, SHAPES, Group, SceneSpec, describe
from sdengine.weights import load
from sdengine.weights.parts import read_part, replace_text_encoder


def caption(color: str, shape: str) -> str:
    """The world's own canonical caption of one object ("an orange star")."""
    return describe(SceneSpec((Group(shape, color),)))


@torch.no_grad()
def shape_token_states(model, pairs: list[tuple[str, str]], clip_skip: int) -> torch.Tensor:
    """(pairs, width): each caption's context at its last token before the end token, normalised."""
    prompts = [caption(c, s) for c, s in pairs]
    context = model.encode_prompt(prompts, clip_skip=clip_skip).float()
    ids = model.tokenizer(prompts, max_length=context.shape[1])
    end = (ids == model.tokenizer.eos_id).int().argmax(dim=1)
    states = context[torch.arange(len(pairs)), end - 1]
    return torch.nn.functional.normalize(states, dim=-1)


def nearest(states: torch.Tensor) -> list[int]:
    """For each row, the index of the most similar other row."""
    sim = states @ states.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(dim=1).tolist()


def probe(model, held: frozenset[tuple[str, str]] = HELD_OUT) -> dict[int, dict]:
    """Per clip skip: {pair: its nearest pair} and how many held-out / seen pairs keep their shape."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    out = {}
    for skip in range(1, model.config.text.hidden_layers_used + 1):
        near = [pairs[j] for j in nearest(shape_token_states(model, pairs, skip))]
        kept = [p[1] == n[1] for p, n in zip(pairs, near)]
        out[skip] = {"nearest": dict(zip(pairs, near)),
                     "held": (sum(k for p, k in zip(pairs, kept) if p in held), sum(p in held for p in pairs)),
                     "seen": (sum(k for p, k in zip(pairs, kept) if p not in held),
                              sum(p not in held for p in pairs))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, default=None, help="a `train text` result to probe in place of the model's")
    args = p.parse_args()
    model = load(args.model, dtype=torch.float32).eval()
    if args.text is not None:
        model = replace_text_encoder(model, read_part(args.text, "text")).eval()
    result = probe(model)
    skips = sorted(result)
    print("nearest other caption at the shape token (clip skip K: the K-th layer from the end; the UNet reads 1)")
    print(f"{'held-out pair':<18}" + "".join(f"{'skip ' + str(k):<23}" for k in skips))
    for pair in sorted(HELD_OUT):
        cells = []
        for k in skips:
            near = result[k]["nearest"][pair]
            cells.append(f"{' '.join(near)} {'(shape)' if near[1] == pair[1] else ''}")
        print(f"{' '.join(pair):<18}" + "".join(f"{c:<23}" for c in cells))
    for group in ("held", "seen"):
        print(f"{group + ' shape kept':<18}" + "".join(f"{'{} of {}'.format(*result[k][group]):<23}" for k in skips))


if __name__ == "__main__":
    main()
