"""How much does a model's UNet use the relation word, and the colour-to-shape binding, of a caption?

For N two-object scenes of the shapes world it measures the eps loss at fixed timesteps under the true caption,
the caption with its relation turned round ("left" <-> "right", "above" <-> "below"), the caption with the two
objects' colours exchanged, and the empty caption. (wrong - true) / (empty - true) is the share of what the
caption is worth to the UNet that it loses when that one thing is wrong: 0 means the UNet ignores it. A cheap
signal (a few minutes on the CPU) that moves long before ShapesEval's pass rates do.

First it prints how much the text context itself changes under those edits, at the edited word, the words after
it and the end token with the padding (where the UNet's cross-attention mostly looks): a UNet cannot use what its
frozen text encoder does not pass on. --text-only stops there, and --state also takes `train text` checkpoints.

    python scripts/relation_probe.py sdengine/models/default/model.safetensors
    python scripts/relation_probe.py base.safetensors --state runs/ft/step-000000750   # a training checkpoint
    python scripts/relation_probe.py base.safetensors --state runs/text/step-000001500 --text-only
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sdengine.data.shapes import exchange_colors, parse_prompt, turn_relation
from sdengine.diffusion.schedule import SD_SCHEDULE
from sdengine.images import images_to_tensor
from sdengine.tokenizer import CLIPTokenizer
from sdengine.train.data import ShapesSource
from sdengine.weights import load


def scenes(n: int, seed: int, size: int) -> list[tuple[np.ndarray, str, str, str]]:
    """(image, caption, relation turned, colours exchanged) of the first n single-object-per-side relation
    scenes whose colours can be exchanged."""
    source, out, i = ShapesSource(size=size, seed=seed), [], 0
    while len(out) < n:
        image, caption = source.item(i)
        i += 1
        turned, exchanged = turn_relation(caption), exchange_colors(caption)
        if turned and exchanged and all(g.count == 1 for g in parse_prompt(caption).groups):
            out.append((image, caption, turned, exchanged))
    return out


def context_change(model, captions: list[str], others: list[str], a: torch.Tensor, b: torch.Tensor
                   ) -> tuple[float, float, float]:
    """Mean relative change of the text context (a -> b) at the first word that differs, at the tokens after it
    up to the end token, and at the end token with the padding after it (what the UNet mostly attends to).
    Pairs whose token counts differ are skipped (their positions would not line up)."""
    ids_a = model.tokenizer(captions, max_length=a.shape[1])
    ids_b = model.tokenizer(others, max_length=a.shape[1])
    eos = model.tokenizer.eos_id
    change = ((a - b).norm(dim=-1) / a.norm(dim=-1)).cpu()
    parts: list[list[float]] = [[], [], []]
    for row in range(len(captions)):
        end_a, end_b = (int((ids[row] == eos).int().argmax()) for ids in (ids_a, ids_b))
        if end_a != end_b:
            continue
        first = int((ids_a[row] != ids_b[row]).int().argmax())
        parts[0].append(float(change[row, first]))
        if end_a > first + 1:
            parts[1].append(float(change[row, first + 1:end_a].mean()))
        parts[2].append(float(change[row, end_a:].mean()))
    return tuple(float(np.mean(v)) if v else float("nan") for v in parts)


def overlay(model, state_path: Path, weights: str) -> None:
    """Load a training checkpoint's UNet and/or text encoder into `model`. A `train text` run learns its own BPE
    vocabulary (its run folder's tokenizer/), which usually differs from the model's: its ids must come from it,
    or the probe measures the encoder on the wrong words."""
    path = state_path / "state.pt" if state_path.is_dir() else state_path
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state[weights] is None:
        raise SystemExit(f"{path}: this run kept no {weights!r} weights")
    for name, module in (("unet", model.unet), ("text", model.text_encoder)):
        if name in state[weights]:
            module.load_state_dict(state[weights][name])
    vocab = path.parent.parent / "tokenizer"
    if "text" in state[weights] and vocab.is_dir():
        model.tokenizer = CLIPTokenizer.from_dir(vocab, pad_with_eos=model.config.text.pad_with_eos)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--state", type=Path, default=None, help="a training checkpoint to load over the model")
    p.add_argument("--weights", default="modules", choices=["modules", "ema"], help="which weights of --state")
    p.add_argument("--n", type=int, default=48, help="scenes")
    p.add_argument("--repeats", type=int, default=4, help="noise draws per scene and timestep")
    p.add_argument("--seed", type=int, default=12345, help="the scenes' stream (not a training seed)")
    p.add_argument("--timesteps", default="999,900,800,700,600,500,300,100")
    p.add_argument("--text-only", action="store_true", help="measure only the text context change (seconds)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, dtype=torch.float32).eval()
    if args.state is not None:
        overlay(model, args.state, args.weights)
    size = model.config.sample_size or 64
    data = scenes(args.n, args.seed, size)
    contexts = {name: model.encode_prompt([d[k] for d in data]) if k else model.encode_prompt([""] * len(data))
                for name, k in (("true", 1), ("relation", 2), ("colours", 3), ("empty", 0))}
    print("text context change when one part is wrong (relative; the UNet reads mostly the end and padding)")
    print(f"{'':>9} {'word':>7} {'after':>7} {'end+pad':>7}")
    for name, k in (("relation", 2), ("colours", 3)):
        word, after, end = context_change(model, [d[1] for d in data], [d[k] for d in data], contexts["true"],
                                          contexts[name])
        print(f"{name:>9} {word:>7.3f} {after:>7.3f} {end:>7.3f}")
    if args.text_only:
        return
    z0 = model.vae.encode(images_to_tensor([d[0] for d in data])).mean * model.config.vae.scaling_factor
    g = torch.Generator().manual_seed(0)
    print(f"{len(data)} scenes; share of the caption's worth lost when one part is wrong (0: ignored)")
    print(f"{'t':>5} {'true':>9} {'empty':>9} {'relation':>9} {'colours':>9}")
    for t in (int(v) for v in args.timesteps.split(",")):
        tt = torch.full((len(data),), t)
        loss = dict.fromkeys(contexts, 0.0)
        for _ in range(args.repeats):
            noise = torch.randn(z0.shape, generator=g)
            x_t = SD_SCHEDULE.q_sample(z0, tt, noise)
            for name, context in contexts.items():
                loss[name] += (model.unet(x_t, tt, context) - noise).pow(2).mean().item() / args.repeats
        worth = loss["empty"] - loss["true"]
        print(f"{t:>5} {loss['true']:>9.5f} {loss['empty']:>9.5f} {(loss['relation'] - loss['true']) / worth:>9.3f} "
              f"{(loss['colours'] - loss['true']) / worth:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
