"""`sdengine eval`: ShapesEval, prompt adherence of a model judged by the exact checker (sdengine/evaluate.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_runtime_args, non_negative_int, positive_int


def cmd_eval(args: argparse.Namespace) -> None:
    from .. import runtime
    from ..data.shapes import CONCEPTS
    from ..evaluate import format_table, run_eval, write_report
    from ..pipeline import Pipeline

    if args.concept is not None and args.concept not in CONCEPTS:   # before loading a model
        raise ValueError(f"--concept: unknown concept {args.concept!r}; concepts: {', '.join(CONCEPTS)}")
    device = runtime.pick_device(args.device)
    model_path = runtime.resolve_model(args.model)
    model = runtime.load_for_inference(model_path, device, runtime.inference_dtype(args.precision, device),
                                       compile=args.compile)
    scores, records, images = run_eval(Pipeline(model), seeds=args.seeds, steps=args.steps, sampler=args.sampler,
                                       cfg_scale=args.cfg, limit=args.limit, size=args.size, quiet=args.quiet,
                                       first_seed=args.first_seed, concept=args.concept)
    meta = {"model": str(model_path), "seeds": args.seeds, "first_seed": args.first_seed, "steps": args.steps,
            "sampler": args.sampler, "cfg_scale": args.cfg, "limit": args.limit}
    if args.concept is not None:   # only then: an ordinary report keeps exactly its fields
        meta["concept"] = args.concept
    out = args.out or Path("shapes-eval" if args.concept is None else f"shapes-eval-{args.concept}")
    write_report(scores, records, images, out, meta)
    print(format_table(scores))
    print(f"wrote {out / 'report.json'} and {out / 'examples.png'}")


def configure(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint path or name (default: the shipped model)")
    p.add_argument("--seeds", type=positive_int, default=4, help="seeds per prompt")
    p.add_argument("--first-seed", type=non_negative_int, default=0,
                   help="seeds run from here (e.g. 4: four seeds no earlier choice was made on)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts of each category")
    # checked when the command runs (CONCEPTS is in the shapes world, which imports numpy: options import nothing)
    p.add_argument("--concept", default=None, metavar="CONCEPT",
                   help="evaluate a colour the shipped model never saw instead, 'pink' (120 prompts naming it: colors, "
                        "position, color_attr), e.g. before and after teaching it with a LoRA or an embedding")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--size", type=positive_int, default=64)
    add_runtime_args(p)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for report.json and examples.png (default: shapes-eval, or shapes-eval-CONCEPT)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
