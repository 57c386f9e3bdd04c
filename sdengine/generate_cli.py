"""`sdengine generate | img2img | inpaint | models`: the generation commands of the CLI.

Everything a run needs is checked before the model loads (sizes, sampler, output folder, input images), so a
mistake costs a second, not a model load and a generation.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import torch

from .compile import check_compiler, compile_unet
from .diffusion.samplers import SAMPLERS
from .diffusion.schedule import SCHEDULES, SPACINGS

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    pass


def models_dir() -> Path:
    return Path(os.environ.get("SDENGINE_HOME", Path.home() / ".cache" / "sdengine")) / "models"


def default_model() -> Path | None:
    """The model shipped with the package, when this install has one."""
    shipped = Path(__file__).parent / "models" / "default" / "model.safetensors"
    return shipped if shipped.exists() else None


def native_size(path: Path) -> int:
    """The image size a model file records (our trained models do), else 512; read from the header only."""
    from .config import ModelConfig
    from .weights.checkpoint import CONFIG_METADATA
    from .weights.io import safetensors_metadata

    try:
        meta = safetensors_metadata(path) if path.is_file() and path.suffix == ".safetensors" else {}
        return ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA])).image_size
    except (KeyError, ValueError, TypeError, OSError, struct.error):
        return 512  # no or unreadable config here: loading the model reports real problems


def list_models(folder: Path | None = None) -> list[Path]:
    folder = folder or models_dir()
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.iterdir())
             if (p.is_file() and p.suffix in MODEL_SUFFIXES) or (p.is_dir() and (p / "model_index.json").exists())]
    return found


def resolve_model(name: str | None) -> Path:
    """A path, or the name of a model in the models folder (with or without its suffix)."""
    if name is None:
        shipped = default_model()
        if shipped is None:
            raise UsageError("no --model given and no default model is installed; pass --model PATH or NAME "
                             f"(models folder: {models_dir()})")
        return shipped
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in list_models():
        if name in (candidate.name, candidate.stem):
            return candidate
    known = ", ".join(p.name for p in list_models()) or "none"
    raise UsageError(f"no model {name!r}: not a path, and not in {models_dir()} (found: {known})")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return PRECISIONS[precision]


def add_runtime_args(p: argparse.ArgumentParser, first: str = "call") -> None:
    """Where and how the networks run: --device, --precision, --compile (generation, eval and serve alike)."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help=f"compile the UNet with TorchInductor: faster steps after a slow first {first}")


def load_for_inference(path: Path, args: argparse.Namespace, device: torch.device, vae: Path | None = None):
    """The model at `path` on `device` in --precision, its UNet compiled with --compile."""
    from .weights import load

    model = load(path, device=device, dtype=pick_dtype(args.precision, device), vae=vae)
    return compile_unet(model) if args.compile else model


def output_paths(out: Path | None, seeds: list[int]) -> list[Path]:
    """One path per image: --out as given for one image, NAME-SEED.png for a batch; default sdengine-SEED.png.
    `seeds`: what tells the images apart (the variation seeds when there is a variation)."""
    if out is None:
        return [Path(f"sdengine-{s}.png") for s in seeds]
    if out.is_dir():
        return [out / f"sdengine-{s}.png" for s in seeds]
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{s}{out.suffix or '.png'}") for s in seeds]


def open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"{what} {path} is not a readable image ({e.__class__.__name__})") from None


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (A1111 weighting: (word:1.2), [word], BREAK)")
    p.add_argument("--model", default=None, help="checkpoint path or name in the models folder (default: shipped)")
    p.add_argument("--vae", type=Path, default=None, help="a standalone VAE file to use instead of the model's")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--style", action="append", default=[], help="apply a named style (repeatable)")
    p.add_argument("--styles-file", type=Path, default=None, help="an A1111 styles.csv (default: the bundled one)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler", help=f"one of: {', '.join(SAMPLERS)}")
    p.add_argument("--schedule", default="normal", choices=SCHEDULES)
    p.add_argument("--spacing", default=None, choices=SPACINGS, help="timestep spacing (default: the sampler's)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one (and reports it)")
    p.add_argument("--width", type=int, default=None, help="multiple of 8 (default: 512, or the init image's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--variation-seed", type=int, default=-1, help="A1111's variation seed (-1 picks one)")
    p.add_argument("--variation-strength", type=float, default=0.0,
                   help="0..1: how far the seed's noise moves towards the variation seed's")
    p.add_argument("--seed-resize-from", type=size_pair, default=None, metavar="WxH",
                   help="keep the composition the seed had at this size (noise drawn there, centred)")
    p.add_argument("--tiling", action="store_true", help="seamless: the image tiles (its edges wrap around)")
    add_runtime_args(p)
    p.add_argument("--out", type=Path, default=None, help="output PNG (a batch adds -SEED), or a folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_hires_args(p: argparse.ArgumentParser) -> None:
    from .hires import UPSCALERS

    g = p.add_argument_group("hires fix", "generate, upscale, then refine at the larger size with img2img "
                                          "(A1111's Hires. fix); on with any --hires option")
    g.add_argument("--hires-scale", type=float, default=None, help="upscale by this factor (A1111 default: 2)")
    g.add_argument("--hires-resize", type=size_pair, default=None, metavar="WxH",
                   help="upscale to this size instead (0 for a side: keep the aspect ratio)")
    g.add_argument("--hires-steps", type=int, default=None, help="steps of the second pass (default: --steps)")
    g.add_argument("--hires-strength", type=float, default=None,
                   help="denoising strength of the second pass (default: 0.7)")
    g.add_argument("--hires-upscaler", default=None, metavar="NAME", help=f"one of: {', '.join(UPSCALERS)} "
                   "(default: Latent)")
    g.add_argument("--hires-sampler", default=None, help="sampler of the second pass (default: --sampler)")


def hires_from_args(args: argparse.Namespace):
    """The HiresFix the --hires-* options ask for, or None."""
    from .hires import HiresFix

    options = ("scale", "resize", "steps", "strength", "upscaler", "sampler")
    if all(getattr(args, f"hires_{name}", None) is None for name in options):
        return None
    resize_x, resize_y = args.hires_resize or (0, 0)
    strength = 0.7 if args.hires_strength is None else args.hires_strength
    try:
        return HiresFix(2.0 if args.hires_scale is None else args.hires_scale, resize_x, resize_y,
                        args.hires_upscaler, args.hires_steps or 0, strength, args.hires_sampler)
    except ValueError as e:
        raise UsageError(str(e)) from None


def size_pair(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}") from None
    return w, h


def run_generation(args: argparse.Namespace, mode: str) -> None:
    from .hires import hires_pass, second_pass_request
    from .metadata import save_png
    from .pipeline import Request
    from .prompts import BUNDLED_STYLES, apply_styles, load_styles

    init = mask = note = None
    if mode in ("img2img", "inpaint"):
        init = open_image(args.image, "init image")
    if mode == "inpaint":
        mask = open_image(args.mask, "mask")
        if mask.size != init.size:
            note = (f"sdengine: note: mask {mask.size[0]}x{mask.size[1]} resized to the image's "
                    f"{init.size[0]}x{init.size[1]}")
            mask = mask.resize(init.size)
    model_path = resolve_model(args.model)
    native = None if init else native_size(model_path)
    # `is None`, not `or`: an explicit --width 0 must be refused by Request, not replaced by the default
    width = args.width if args.width is not None else (init.width // 8 * 8 if init else native)
    height = args.height if args.height is not None else (init.height // 8 * 8 if init else native)
    prompt, negative = args.prompt, args.negative
    if args.style:
        styles = load_styles(args.styles_file or BUNDLED_STYLES)
        prompt, negative = apply_styles(prompt, negative, args.style, styles)
    strength = getattr(args, "strength", 1.0)
    req = Request(prompt, negative, args.steps, args.sampler, args.schedule, args.spacing, args.cfg, args.seed,
                  width, height, args.batch, args.clip_skip, strength, args.variation_seed, args.variation_strength,
                  args.seed_resize_from, args.tiling)
    hires = hires_from_args(args)
    if hires is not None:  # the second pass's size is refused now, not after the first pass
        second_pass_request(req, hires)
    paths = output_paths(args.out, req.subseeds if req.subseed_strength else req.seeds)
    device = pick_device(args.device)
    if args.compile:
        check_compiler(device)
    if note:  # only once every check has passed, so an error stays the one line on stderr
        print(note, file=sys.stderr)

    from .pipeline import Pipeline, image_to_tensor, mask_to_tensor

    pipe = Pipeline(load_for_inference(model_path, args, device, vae=args.vae))
    callback, bar = progress(req.steps, args.quiet, strength)
    init_t = image_to_tensor(init, width, height) if init is not None else None
    mask_t = mask_to_tensor(mask, width, height) if mask is not None else None
    try:
        latents = pipe.sample(req, init=init_t, mask=mask_t, callback=callback)
        if hires is not None:
            latents, _ = hires_pass(pipe, req, latents, hires, callback)
    finally:
        if bar is not None:
            bar.close()
    images = pipe.to_images(latents, req, hires.infotext(req) if hires else None)
    for i, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, image.info["parameters"])
        variation = f", variation seed {req.subseeds[i]}" if req.subseed_strength else ""
        print(f"wrote {path} (seed {image.info['seed']}{variation})")


def progress(steps: int, quiet: bool, strength: float):
    if quiet:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", file=sys.stderr, dynamic_ncols=True, desc="sampling")

    def callback(i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if bar.total != n:
            bar.reset(total=n)
        bar.update(1)

    return callback, bar


def cmd_generate(args: argparse.Namespace) -> None:
    run_generation(args, "txt2img")


def cmd_img2img(args: argparse.Namespace) -> None:
    run_generation(args, "img2img")


def cmd_inpaint(args: argparse.Namespace) -> None:
    run_generation(args, "inpaint")


def cmd_models(args: argparse.Namespace) -> None:
    from .weights import read_checkpoint

    found = list_models()
    if not found:
        print(f"no models in {models_dir()} (set SDENGINE_HOME or copy checkpoints there)")
        return
    for path in found:
        try:
            family = read_checkpoint(path)[1].family
        except (OSError, ValueError, KeyError) as e:
            family = f"unreadable: {str(e).splitlines()[0]}"
        print(f"{path.name:<48} {family}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import format_table, run_eval, write_report
    from .pipeline import Pipeline

    if args.seeds < 1 or args.first_seed < 0:  # a negative seed would mean "random" to the pipeline
        raise ValueError(f"eval needs --seeds >= 1 and --first-seed >= 0, got {args.seeds} and {args.first_seed}")
    device = pick_device(args.device)
    model_path = resolve_model(args.model)
    pipe = Pipeline(load_for_inference(model_path, args, device))
    scores, records, images = run_eval(pipe, seeds=args.seeds, steps=args.steps, sampler=args.sampler,
                                       cfg_scale=args.cfg, limit=args.limit, size=args.size, quiet=args.quiet,
                                       first_seed=args.first_seed)
    meta = {"model": str(model_path), "seeds": args.seeds, "first_seed": args.first_seed, "steps": args.steps,
            "sampler": args.sampler, "cfg_scale": args.cfg, "limit": args.limit}
    write_report(scores, records, images, args.out, meta)
    print(format_table(scores))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'examples.png'}")


def register(sub) -> None:
    p = sub.add_parser("eval", help="ShapesEval: prompt adherence judged by the exact checker")
    p.add_argument("--model", default=None, help="checkpoint path or name (default: the shipped model)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from here (e.g. 4: four seeds no earlier choice was made on)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each category")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--size", type=int, default=64)
    add_runtime_args(p)
    p.add_argument("--out", type=Path, default=Path("shapes-eval"), help="folder for report.json and examples.png")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="text to image")
    add_generation_args(p)
    add_hires_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("img2img", help="image + text to image")
    p.add_argument("image", type=Path)
    add_generation_args(p)
    p.add_argument("--strength", type=float, default=0.75, help="how much to change: 0 < s <= 1")
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    p.add_argument("image", type=Path)
    p.add_argument("mask", type=Path)
    add_generation_args(p)
    p.add_argument("--strength", type=float, default=1.0)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("models", help="list the models folder with each model's detected family")
    p.set_defaults(func=cmd_models)
