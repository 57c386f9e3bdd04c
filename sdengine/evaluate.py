"""`sdengine eval`: ShapesEval on a model — generate each prompt with its seeds, judge every image with the exact
checker, and report the pass rate per category, overall, and on held-out colour-shape bindings vs seen ones.

Also the VAE's ceiling: `reconstruction_pass_rate` runs rendered ground truth through encode/decode and judges
the result, so a UNet is never blamed for what the autoencoder cannot represent.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .data.checker import check
from .data.shapes_eval import EVAL_CATEGORIES, EvalItem, shapes_eval, summarize
from .images import images_to_tensor, tensor_to_arrays
from .pipeline import Pipeline
from .train.plots import image_grid


def select(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first `limit` prompts of each category (all their seeds), or everything."""
    if limit is None:
        return items
    kept: dict[str, list[str]] = defaultdict(list)
    out = []
    for it in items:
        prompts = kept[it.category]
        if it.prompt in prompts or len(prompts) < limit:
            if it.prompt not in prompts:
                prompts.append(it.prompt)
            out.append(it)
    return out


def run_eval(pipe: Pipeline, seeds: int = 4, steps: int = 20, sampler: str = "euler", cfg_scale: float = 5.0,
             limit: int | None = None, size: int = 64, quiet: bool = False,
             first_seed: int = 0, concept: str | None = None, tags: str = "") -> tuple[dict, list[dict], list]:
    """(scores, per-image records, the images) for ShapesEval with `seeds` seeds per prompt from `first_seed`;
    concept: the benchmark of that novel colour (shapes_eval(concept=...)) instead of the ordinary one; tags:
    extra-network tags (`<lora:name:w>`) added to every prompt generated (the checker reads the prompt alone)."""
    items = select(shapes_eval(seeds_per_prompt=seeds, first_seed=first_seed, concept=concept), limit)
    by_prompt: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        by_prompt[it.prompt].append(it)
    records, images, passed_all, ordered = [], [], [], []
    start = time.perf_counter()
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(items), unit="img", file=sys.stderr,
                   desc="shapes-eval" if concept is None else f"shapes-eval {concept}")
    for prompt, group in by_prompt.items():
        group.sort(key=lambda it: it.seed)
        # seeds 0..k-1 of a prompt are one batch: image i of a batch uses seed + i
        outs = pipe.generate(f"{prompt} {tags}" if tags else prompt, steps=steps, sampler=sampler,
                             cfg_scale=cfg_scale, seed=group[0].seed, width=size, height=size, batch_size=len(group))
        for it, img in zip(group, outs):
            ok, details = check(np.asarray(img), it.prompt)
            records.append({"category": it.category, "prompt": it.prompt, "seed": it.seed, "held_out": it.held_out,
                            "passed": ok, "failures": list(details.failures)})
            images.append(img)
            passed_all.append(ok)
            ordered.append(it)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    scores = summarize(ordered, passed_all)
    scores["seconds_per_image"] = (time.perf_counter() - start) / max(1, len(items))
    scores["images"] = len(items)
    return scores, records, images


def write_report(scores: dict, records: list[dict], images: list, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"scores": scores, **meta, "images": records}, indent=1))
    # a grid: for each category up to 6 passes then 6 failures, labelled
    chosen, labels = [], []
    for cat in EVAL_CATEGORIES:
        for want in (True, False):
            picks = [i for i, r in enumerate(records) if r["category"] == cat and r["passed"] == want][:6]
            for i in picks:
                chosen.append(images[i])
                labels.append(("ok " if want else "X ") + records[i]["prompt"])
    if chosen:
        scale = 2
        big = [im.resize((im.width * scale, im.height * scale)) for im in chosen]
        image_grid(big, columns=12, labels=labels).save(out / "examples.png")


def format_table(scores: dict) -> str:
    rows = [f"{'category':<16}{'pass rate':>10}"]
    for key in (*EVAL_CATEGORIES, "overall", "held_out", "seen_colored"):
        if key in scores:
            rows.append(f"{key:<16}{scores[key]:>10.3f}")
    rows.append(f"{'images':<16}{scores['images']:>10d}")
    rows.append(f"{'s / image':<16}{scores['seconds_per_image']:>10.3f}")
    return "\n".join(rows)


@torch.no_grad()
def reconstruction_pass_rate(vae, n: int = 200, size: int = 64, seed: int = 0) -> float:
    """Share of ShapesEval ground-truth images that still pass the checker after the VAE's encode/decode."""
    items = shapes_eval(seeds_per_prompt=1)
    picks = [items[i] for i in np.random.default_rng(seed).choice(len(items), size=min(n, len(items)), replace=False)]
    device = next(vae.parameters()).device
    passed = 0
    for k in range(0, len(picks), 32):
        batch = picks[k:k + 32]
        x = images_to_tensor([it.render(size) for it in batch], device)
        arr = tensor_to_arrays(vae.decode(vae.encode(x).mode()).float() / 2 + 0.5)
        passed += sum(check(a, it.prompt)[0] for a, it in zip(arr, batch))
    return passed / len(picks)
