"""`sdengine eval --control-layout CONTROLNET`: does a layout ControlNet put the objects where its control image says?

For every ShapesEval prompt and seed, the prompt's ground-truth scene (EvalItem.scene: the objects placed at random
where the prompt holds) is drawn as a layout map (data/layout.py: silhouettes white on black) and given to the
ControlNet as its control image; the image generated is read by the exact checker, and each of the layout's objects
counts as landed when a detected object of its shape (and its colour, where the prompt names one) has its centre
within POSITION_TOLERANCE px of the silhouette's. The same prompts and seeds are generated without the ControlNet as
the baseline: there the layout is only a target the model never saw, so its rate is what chance placement gives.

Reported for both, overall and per category: position accuracy (images whose every object landed), objects landed,
the checker's ordinary pass rate (does the image still show the prompt?) and the median centre error.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from .control import ControlUnit
from .data.checker import check
from .data.layout import POSITION_TOLERANCE, placement, render_layout
from .data.shapes_eval import EVAL_CATEGORIES, EvalItem, shapes_eval
from .evaluate import select
from .pipeline import Pipeline
from .train.plots import image_grid

RUNS = ("without", "with")  # the baseline, then the ControlNet


def _generate(pipe: Pipeline, prompt: str, group: list[EvalItem], unit: ControlUnit | None, layouts: list,
              **sampling) -> list[Image.Image]:
    """The images of one prompt's seeds, one generation per seed with the ControlNet (each seed has its own layout)
    and without it alike, so that a ControlNet whose residuals are zero gives the baseline's images bit for bit."""
    out = []
    for it, layout in zip(group, layouts):
        controls = [] if unit is None else [ControlUnit(unit.model, Image.fromarray(layout), weight=unit.weight)]
        out += pipe.generate(prompt, seed=it.seed, controls=controls, **sampling)
    return out


def run_control_eval(pipe: Pipeline, controlnet: str | Path, seeds: int = 2, limit: int | None = 10,
                     steps: int = 20, sampler: str = "euler", cfg_scale: float = 5.0, weight: float = 1.0,
                     size: int = 64, first_seed: int = 0, concept: str | None = None, tags: str = "",
                     quiet: bool = False) -> tuple[dict, list[dict], list]:
    """({"without": scores, "with": scores}, per-image records, [(layout, without, with) per item])."""
    items = select(shapes_eval(seeds_per_prompt=seeds, first_seed=first_seed, concept=concept), limit)
    by_prompt: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        by_prompt[it.prompt].append(it)
    sampling = {"steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "width": size, "height": size}
    unit = ControlUnit(str(controlnet), Image.new("RGB", (size, size)), weight=weight)
    records: list[dict] = []
    triples = []
    seconds = dict.fromkeys(RUNS, 0.0)
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=2 * len(items), unit="img", file=sys.stderr, desc="control-eval")
    for prompt, group in by_prompt.items():
        group.sort(key=lambda it: it.seed)
        scenes = [it.scene(size) for it in group]
        layouts = [render_layout(scene) for scene in scenes]
        made = {}
        for run in RUNS:
            start = time.perf_counter()
            made[run] = _generate(pipe, f"{prompt} {tags}" if tags else prompt, group,
                                  unit if run == "with" else None, layouts, **sampling)
            seconds[run] += time.perf_counter() - start
            if bar is not None:
                bar.update(len(group))
        for k, (it, scene) in enumerate(zip(group, scenes)):
            for run in RUNS:
                ok, details = check(np.asarray(made[run][k]), it.prompt)
                p = placement(scene, details.objects)
                records.append({"run": run, "category": it.category, "prompt": it.prompt, "seed": it.seed,
                                "passed": ok, "objects": p.objects, "landed": p.landed, "all_landed": p.all_landed,
                                "errors": [round(e, 2) if np.isfinite(e) else None for e in p.errors],
                                "layout": [[o.shape, round(o.cx, 2), round(o.cy, 2)] for o in scene.objects]})
            triples.append((Image.fromarray(layouts[k]), made["without"][k], made["with"][k], it.prompt))
    if bar is not None:
        bar.close()
    scores = {run: summarize([r for r in records if r["run"] == run]) for run in RUNS}
    for run in RUNS:
        scores[run]["seconds_per_image"] = seconds[run] / max(1, len(items))
    return scores, records, triples


def summarize(records: list[dict]) -> dict:
    """Position accuracy, objects landed and the checker's pass rate, per category and over all images; the
    median distance from a layout object to the nearest detected object of its kind (missing ones left out)."""
    out: dict = {"images": len(records)}
    for cat in (*EVAL_CATEGORIES, "overall"):
        rows = records if cat == "overall" else [r for r in records if r["category"] == cat]
        if not rows:
            continue
        errors = [e for r in rows for e in r["errors"] if e is not None]
        out[cat] = {"position": float(np.mean([r["all_landed"] for r in rows])),
                    "objects_landed": sum(r["landed"] for r in rows) / max(1, sum(r["objects"] for r in rows)),
                    "checker": float(np.mean([r["passed"] for r in rows])),
                    "median_error_px": float(np.median(errors)) if errors else None}
    return out


def format_table(scores: dict) -> str:
    rows = [f"{'category':<15}{'position (no CN / CN)':>24}{'objects landed':>20}{'checker pass':>18}"]
    for cat in (*EVAL_CATEGORIES, "overall"):
        if cat not in scores["with"]:
            continue
        a, b = scores["without"][cat], scores["with"][cat]
        rows.append(f"{cat:<15}{a['position']:>12.3f} / {b['position']:.3f}"
                    f"{a['objects_landed']:>11.3f} / {b['objects_landed']:.3f}"
                    f"{a['checker']:>10.3f} / {b['checker']:.3f}")
    rows.append(f"{'images':<15}{scores['with']['images']:>12d} each; tolerance {POSITION_TOLERANCE:g} px at 64")
    return "\n".join(rows)


def write_report(scores: dict, records: list[dict], triples: list, out: Path, meta: dict) -> None:
    """report.json, and examples.png: for the first 24 items, the layout, the image without and with the
    ControlNet."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"scores": scores, **meta, "images": records}, indent=1))
    picks = triples[:: max(1, len(triples) // 24)][:24]
    images, labels = [], []
    for layout, without, with_cn, prompt in picks:
        images += [im.resize((im.width * 2, im.height * 2)) for im in (layout, without, with_cn)]
        labels += [prompt, "no ControlNet", "ControlNet"]
    if images:
        image_grid(images, columns=12, labels=labels).save(out / "examples.png")
