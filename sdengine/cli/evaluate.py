"""`sdengine eval`: ShapesEval, prompt adherence of a model judged by the exact checker (sdengine/evaluate.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_runtime_args, non_negative_float, non_negative_int, positive_int


def cmd_eval(args: argparse.Namespace) -> None:
    from .. import runtime
    from ..data.shapes import CONCEPTS
    from ..evaluate import format_table, run_eval, write_report

    if args.concept is not None and args.concept not in CONCEPTS:   # before loading a model
        raise ValueError(f"--concept: unknown concept {args.concept!r}; concepts: {', '.join(CONCEPTS)}")
    if args.control_layout is not None and not args.control_layout.exists():
        raise FileNotFoundError(f"--control-layout: no ControlNet at {args.control_layout}")
    device = runtime.pick_device(args.device)
    model_path = runtime.resolve_model(args.model)
    loras = adapter_files(args)
    model = runtime.load_for_inference(model_path, device, runtime.inference_dtype(args.precision, device),
                                       compile=args.compile)
    pipe, tags = adapted_pipeline(model, loras, args.embedding)
    if args.control_layout is not None:
        return control_eval(args, pipe, tags, model_path)
    scores, records, images = run_eval(pipe, tags=tags, seeds=args.seeds, steps=args.steps, sampler=args.sampler,
                                       cfg_scale=args.cfg, limit=args.limit, size=args.size, quiet=args.quiet,
                                       first_seed=args.first_seed, concept=args.concept)
    meta = {"model": str(model_path), "seeds": args.seeds, "first_seed": args.first_seed, "steps": args.steps,
            "sampler": args.sampler, "cfg_scale": args.cfg, "limit": args.limit}
    if args.concept is not None:   # only then: an ordinary report keeps exactly its fields
        meta["concept"] = args.concept
    if loras or args.embedding:   # likewise: what was applied, when anything was
        meta["loras"] = [f"{path}:{w:g}" for path, w in loras]
        meta["embeddings"] = [str(p) for p in args.embedding]
    out = args.out or Path("shapes-eval" if args.concept is None else f"shapes-eval-{args.concept}")
    write_report(scores, records, images, out, meta)
    print(format_table(scores))
    print(f"wrote {out / 'report.json'} and {out / 'examples.png'}")


def control_eval(args: argparse.Namespace, pipe, tags: str, model_path: Path) -> None:
    """--control-layout: position accuracy with and without a layout ControlNet (sdengine/eval_control.py)."""
    from ..eval_control import format_table, run_control_eval, write_report

    pipe.controlnets.get(str(args.control_layout))  # a missing or unfitting file fails before any image
    scores, records, triples = run_control_eval(
        pipe, args.control_layout, seeds=args.seeds, limit=args.limit, steps=args.steps, sampler=args.sampler,
        cfg_scale=args.cfg, weight=args.control_weight, size=args.size, first_seed=args.first_seed,
        concept=args.concept, tags=tags, quiet=args.quiet)
    meta = {"model": str(model_path), "controlnet": str(args.control_layout), "control_weight": args.control_weight,
            "seeds": args.seeds, "first_seed": args.first_seed, "steps": args.steps, "sampler": args.sampler,
            "cfg_scale": args.cfg, "limit": args.limit, "concept": args.concept}
    out = args.out or Path("shapes-eval-control")
    write_report(scores, records, triples, out, meta)
    print(format_table(scores))
    print(f"wrote {out / 'report.json'} and {out / 'examples.png'}")


def adapter_files(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """--lora FILE[:W] values as (file, weight); every file checked before the model loads."""
    loras = []
    for value in args.lora:
        path, weight = Path(value), 1.0
        if not path.is_file() and ":" in value:
            head, _, tail = value.rpartition(":")
            try:
                path, weight = Path(head), float(tail)
            except ValueError:
                raise ValueError(f"--lora {value}: the weight after ':' must be a number") from None
        if not path.is_file():
            raise FileNotFoundError(f"--lora {value}: no such file {path}")
        loras.append((path, weight))
    for path in args.embedding:
        if not path.is_file():
            raise FileNotFoundError(f"--embedding {path}: no such file")
    return loras


def adapted_pipeline(model, loras: list[tuple[Path, float]], embeddings: list[Path]):
    """A pipeline that knows only these LoRA and embedding files (no folders), and the tags that apply the LoRAs:
    added to every prompt, they go the way a user's <lora:name:w> goes (patched in, recorded in the parameters)."""
    from ..lora import LoraLibrary
    from ..networks import Networks
    from ..pipeline import Pipeline

    library = LoraLibrary()
    tags = []
    for path, weight in loras:
        name = library.add(path)
        library.load(name)  # a broken file fails here, before any image
        tags.append(f"<lora:{name}:{weight:g}>")
    networks = Networks(model, loras=library)
    for path in embeddings:
        networks.add_embedding(path)
    return Pipeline(model, networks=networks), " ".join(tags)


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
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W]",
                   help="evaluate with this LoRA file applied at weight W (default 1), text encoder and UNet alike "
                        "(repeatable)")
    p.add_argument("--embedding", action="append", default=[], type=Path, metavar="FILE",
                   help="make this textual inversion embedding known (its file name is the word prompts use, e.g. "
                        "pink.pt for 'pink'; repeatable)")
    p.add_argument("--control-layout", type=Path, default=None, metavar="CONTROLNET",
                   help="measure position control instead: each prompt's ground-truth layout (silhouettes white on "
                        "black) through this ControlNet, and the same prompts and seeds without it; reports how often "
                        "the objects land where the layout put them (use with --limit and --seeds: 10 and 2 make 240 "
                        "images)")
    p.add_argument("--control-weight", type=non_negative_float, default=1.0, metavar="W",
                   help="with --control-layout: the ControlNet's weight (1)")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--size", type=positive_int, default=64)
    add_runtime_args(p)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for report.json and examples.png (default: shapes-eval, or shapes-eval-CONCEPT)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
