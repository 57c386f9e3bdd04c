"""`sdengine generate | img2img | inpaint`: the generation commands.

Options map onto Request fields through one table (REQUEST_OPTIONS); an option left out takes Request's default.
Everything a run needs is checked before the model loads (the Request, the output folder, the input images), so
a mistake costs a second, not a model load and a generation.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..errors import CLIError
from .options import add_runtime_args, positive_float, size_pair

# `--vae-tiny` given without a file: the tiny autoencoder shipped for the shipped model (resolved once the model is)
SHIPPED_TINY = Path("<shipped>")

# CLI option -> (Request field, argparse keywords). Defaults are Request's: an option not given is not passed.
REQUEST_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "--negative": ("negative_prompt", {"help": "negative prompt"}),
    "--steps": ("steps", {"type": int}),
    "--sampler": ("sampler", {"help": "euler, euler_a, heun, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde, ddim, plms, "
                                      "ddpm, unipc, lcm (or an A1111 name)"}),
    "--schedule": ("schedule", {"help": "normal, karras or exponential"}),
    "--spacing": ("spacing", {"help": "timestep spacing: leading, linspace or trailing (default: the sampler's)"}),
    "--cfg": ("cfg_scale", {"type": float, "help": "classifier-free guidance scale"}),
    "--seed": ("seed", {"type": int, "help": "-1 picks one (and reports it)"}),
    "--width": ("width", {"type": int, "help": "multiple of 8 (default: the model's size, or the init image's)"}),
    "--height": ("height", {"type": int}),
    "--batch": ("batch_size", {"type": int, "help": "images per batch"}),
    "--batch-count": ("n_iter", {"type": int, "help": "batches, one after another, seeds continuing"}),
    "--clip-skip": ("clip_skip", {"type": int}),
    "--variation-seed": ("subseed", {"type": int, "help": "A1111's variation seed (-1 picks one)"}),
    "--variation-strength": ("subseed_strength", {"type": float, "help": "0..1: how far the seed's noise moves "
                                                                          "towards the variation seed's"}),
    "--seed-resize-from": ("seed_resize_from", {"type": size_pair, "metavar": "WxH", "help": "keep the composition "
                                                "the seed had at this size (noise drawn there, centred)"}),
    "--tiling": ("tiling", {"action": "store_true", "help": "seamless: the image tiles (its edges wrap around)"}),
    "--vae-tiling": ("vae_tiling", {"action": argparse.BooleanOptionalAction,
                                    "help": "the VAE in overlapping tiles, bounding its memory (default: when the "
                                            "image is large)"}),
    "--original-size": ("original_size", {"type": size_pair, "metavar": "WxH",
                                          "help": "SDXL's original-size conditioning (default: the image size)"}),
    "--crop": ("crop", {"type": size_pair, "metavar": "LEFTxTOP", "help": "SDXL's crop conditioning"}),
    "--target-size": ("target_size", {"type": size_pair, "metavar": "WxH",
                                      "help": "SDXL's target-size conditioning (default: the image size)"}),
    "--refiner": ("refiner", {"metavar": "MODEL", "help": "an SDXL refiner (path or models-folder name) that takes "
                                                          "over the schedule at --refiner-switch-at (txt2img)"}),
    "--refiner-switch-at": ("refiner_switch_at", {"type": float, "help": "share of the steps the base model runs"}),
    "--aesthetic-score": ("aesthetic_score", {"type": float, "help": "the SDXL refiner's aesthetic-score "
                                              "conditioning of the prompt (0..10)"}),
    "--negative-aesthetic-score": ("negative_aesthetic_score", {"type": float, "help": "... of the negative prompt"}),
    "--deepcache": ("deepcache", {"type": int, "metavar": "N", "help": "DeepCache: the full UNet every N steps, "
                                  "the shallow blocks on cached deep features between (0: off; 3 is ~2x)"}),
    "--deepcache-branch": ("deepcache_branch", {"type": int, "help": "DeepCache's skip branch (0: shallowest)"}),
    "--tome": ("tome", {"type": float, "metavar": "R", "help": "token merging ratio at full resolution (0: off; "
                        "0.5 is tomesd's default)"}),
    "--cfg-skip": ("cfg_skip", {"type": int, "metavar": "K", "help": "the last K steps without guidance (0: off)"}),
}
# Options of the second pass -> HiresFix fields (sdengine/hires.py); any of them turns the hires fix on.
HIRES_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "--hires-scale": ("scale", {"type": float, "help": "upscale by this factor (default: 2)"}),
    "--hires-resize": ("resize", {"type": size_pair, "metavar": "WxH",
                                  "help": "upscale to this size instead (0 for a side: keep the aspect ratio)"}),
    "--hires-steps": ("steps", {"type": int, "help": "steps of the second pass (default: --steps)"}),
    "--hires-strength": ("denoising_strength", {"type": float, "help": "denoising strength of the second pass "
                                                                       "(default: 0.7)"}),
    "--hires-upscaler": ("upscaler", {"metavar": "NAME", "help": "Latent (default), Latent (antialiased), "
                                      "Latent (bicubic), Latent (nearest), Lanczos, Nearest, ..."}),
    "--hires-sampler": ("sampler", {"help": "sampler of the second pass (default: --sampler)"}),
}
# Per command: Request fields whose CLI default differs from Request's.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"img2img": {"strength": 0.75}, "inpaint": {"strength": 1.0},
                                               "outpaint": {"strength": 0.8}}


def _add(group: argparse._ActionsContainer, flag: str, dest: str, options: dict[str, Any], default: Any) -> None:
    options = dict(options)
    if default is not None and options.get("action") != "store_true":
        options["help"] = f"{options.get('help', '')} (default: {default})".lstrip()
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)


def add_generation_args(p: argparse.ArgumentParser, command: str) -> None:
    defaults = {f.name: f.default for f in fields(_request_class()) if f.default is not MISSING}
    defaults.update(COMMAND_DEFAULTS.get(command, {}))
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (A1111 syntax: (word:1.2), [from:to:when], [a|b], BREAK, <lora:name:w>, "
                        "__wildcard__, {a|b})")
    p.add_argument("--from-png", type=Path, default=None, metavar="IMAGE", help="start from an image's parameters "
                   "(prompt, seed, sampler, size, ...); options given here override them")
    p.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                   help="one generation per line: a prompt, or A1111's options (--prompt \"...\" --steps 10 ...)")
    p.add_argument("--wildcards-dir", type=Path, default=None,
                   help="__name__ reads a random line of name.txt here (default: $SDENGINE_HOME/wildcards)")
    p.add_argument("--model", default=None, help="checkpoint path or name in the models folder (default: shipped)")
    p.add_argument("--vae", type=Path, default=None, help="a standalone VAE file to use instead of the model's")
    p.add_argument("--vae-tiny", type=Path, nargs="?", const=SHIPPED_TINY, default=None, metavar="FILE",
                   help="decode with this tiny autoencoder (TAESD: taesd_decoder.pth/.safetensors, a diffusers "
                        "AutoencoderTiny folder): much faster, blurrier; with no FILE, the one shipped for the "
                        "shipped model")
    p.add_argument("--style", action="append", default=[], help="apply a named style (repeatable)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:W[:UNET_W]]",
                   help="apply a LoRA (a name in --lora-dir, or a file) at weight W (default 1), the UNet at UNET_W "
                        "if given; the same as <lora:NAME:W> in the prompt (repeatable)")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="where LoRAs are found by name (default: $SDENGINE_LORAS or $SDENGINE_HOME/loras)")
    p.add_argument("--embeddings-dir", type=Path, default=None, help="textual-inversion embeddings, used by file "
                   "name in prompts (default: $SDENGINE_EMBEDDINGS or $SDENGINE_HOME/embeddings)")
    p.add_argument("--styles-file", type=Path, default=None, help="an A1111 styles.csv (default: the bundled one)")
    c = p.add_argument_group("ControlNet", "condition on a control image (A1111's ControlNet units); docs/control.md")
    c.add_argument("--control", action="append", default=[], metavar="MODEL:IMAGE[:W[:START:END]]",
                   help="a ControlNet (a path, or a name in --controlnet-dir) and its control image, at weight W "
                        "(default 1) acting from START to END (shares of the steps; default 0:1) (repeatable)")
    c.add_argument("--control-preprocess", action="append", default=[], metavar="NAME",
                   help="what makes the control map from the image: none (default: the image is the map), canny, "
                        "invert, threshold, scribble, tile; once for every unit, or once per --control")
    c.add_argument("--control-mode", action="append", default=[], metavar="MODE",
                   help="balanced (default), prompt (my prompt is more important) or control (ControlNet is more "
                        "important: guess mode); once for every unit, or once per --control")
    c.add_argument("--control-resize", action="append", default=[], metavar="MODE",
                   help="how the control image fits the output: 'just resize' (default), 'crop and resize', "
                        "'resize and fill'; once for every unit, or once per --control")
    c.add_argument("--controlnet-dir", type=Path, default=None,
                   help="where ControlNets are found by name (default: $SDENGINE_CONTROLNET or "
                        "$SDENGINE_HOME/controlnet)")
    i = p.add_argument_group("IP-Adapter", "image prompts (IP-Adapter); docs/control.md")
    i.add_argument("--ip-adapter", action="append", default=[], metavar="MODEL:IMAGE[:SCALE]",
                   help="an IP-Adapter (a path, or a name in --ip-adapter-dir) and its reference image (several: "
                        "IMAGE,IMAGE,...), at SCALE (default 1) (repeatable)")
    i.add_argument("--ip-adapter-encoder", default=None, metavar="PATH",
                   help="the CLIP image encoder (a transformers folder or file); default: the image_encoder folder "
                        "beside the adapter, or one in --ip-adapter-dir")
    i.add_argument("--ip-adapter-dir", type=Path, default=None,
                   help="where IP-Adapters and image encoders are found (default: $SDENGINE_IPADAPTER or "
                        "$SDENGINE_HOME/ipadapter)")
    for flag, (field, options) in REQUEST_OPTIONS.items():
        _add(p, flag, field, options, defaults.get(field))
    if command != "generate":
        _add(p, "--strength", "strength", {"type": float, "help": "how much to change: 0 < s <= 1"},
             defaults["strength"])
    else:
        g = p.add_argument_group("hires fix", "generate, upscale, then refine at the larger size with img2img "
                                              "(A1111's Hires. fix); on with any --hires option")
        for flag, (field, options) in HIRES_OPTIONS.items():
            _add(g, flag, f"hires_{field}", options, None)
    add_runtime_args(p)
    p.add_argument("--out", default=None, help="output PNG (a batch adds -SEED), or a folder (sdengine-SEED.png "
                                              "in it; a name ending in / must be an existing folder)")
    p.add_argument("--force", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="file type of the names made "
                   "here (parameters in PNG text, else EXIF as A1111 writes them); an --out file's suffix decides")
    p.add_argument("--out-pattern", default=None, metavar="PATTERN", help="A1111 file names in --out's folder (or "
                   "here): NNNNN-PATTERN, numbered on so nothing is overwritten; tags [seed] [prompt_spaces] [steps] "
                   "[sampler] [cfg] [model_name] [date] ...; '/' makes subfolders ([date]/[seed])")
    p.add_argument("--grid", action="store_true", help="also save a grid of each run's images (when more than one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _request_class():
    from ..request import Request

    return Request


def lora_options(args: argparse.Namespace):
    """(the LoRA library --lora-dir and the --lora files make, the tags --lora adds to the prompt); every --lora
    is read here, so a missing or broken file is an error before the model loads."""
    from .. import runtime
    from ..lora import LoraLibrary

    library = LoraLibrary([args.lora_dir or runtime.loras_dir()])
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise CLIError(f"LoRA folder {args.lora_dir} does not exist")
    tags = []
    for value in args.lora:
        name, _, weights = value.partition(":") if not Path(value).is_file() else (value, "", "")
        if Path(name).is_file():
            name = library.add(Path(name))
        elif library.path(name) is None:
            known = ", ".join(library.names()[:10]) or "none"
            raise CLIError(f"--lora {value}: no LoRA named {name!r} in {library.folders[0]} and no such file "
                           f"(found: {known})")
        library.load(name)
        tags.append(f"<lora:{name}{':' + weights if weights else ''}>")
    return library, tags


def _per_unit(values: list[str], units: int, flag: str) -> list[str | None]:
    if not values:
        return [None] * units
    if len(values) == 1:
        return values * units
    if len(values) != units:
        raise CLIError(f"{flag} given {len(values)} times for {units} --control units (give it once, or once per unit)")
    return list(values)


def parse_control(value: str) -> tuple[str, str, list[float]]:
    """MODEL:IMAGE[:W[:START:END]] -> (model, image, numbers); the numbers are the trailing fields that parse."""
    parts = value.split(":")
    numbers: list[float] = []
    while len(parts) > 2 and len(numbers) < 3:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(parts) < 2 or not parts[0] or not parts[1] or len(numbers) == 2:
        raise CLIError(f"--control {value}: expected MODEL:IMAGE, MODEL:IMAGE:WEIGHT or MODEL:IMAGE:WEIGHT:START:END")
    return parts[0], ":".join(parts[1:]), numbers


def control_options(args: argparse.Namespace) -> tuple:
    """The ControlUnits --control asks for, every model found and every image read before the model loads."""
    from ..control import ControlError, ControlUnit, resolve_controlnet

    values = getattr(args, "control", [])
    if not values:
        for flag in ("control_preprocess", "control_mode", "control_resize"):
            if getattr(args, flag, []):
                raise CLIError(f"--{flag.replace('_', '-')} needs a --control")
        return ()
    if args.controlnet_dir is not None and not args.controlnet_dir.is_dir():
        raise CLIError(f"ControlNet folder {args.controlnet_dir} does not exist")
    n = len(values)
    settings = zip(_per_unit(args.control_preprocess, n, "--control-preprocess"),
                   _per_unit(args.control_mode, n, "--control-mode"),
                   _per_unit(args.control_resize, n, "--control-resize"))
    units = []
    for value, (module, mode, resize) in zip(values, settings):
        name, image, numbers = parse_control(value)
        weight, start, end = numbers + [1.0, 0.0, 1.0][len(numbers):]
        try:
            path = resolve_controlnet(name, args.controlnet_dir)
            units.append(ControlUnit(str(path), open_image(Path(image), "control image"), weight=weight, start=start,
                                     end=end, mode=mode or "balanced", preprocess=module or "none",
                                     resize=resize or "just resize"))
        except ControlError as e:
            raise CLIError(f"--control {value}: {e}") from None
    return tuple(units)


def ip_adapter_options(args: argparse.Namespace) -> tuple:
    """The ImagePrompts --ip-adapter asks for: every adapter read, its image encoder found and every image read
    before the model loads."""
    from ..ip_adapter import ImagePrompt, IPAdapterError, adapter_config, find_image_encoder, resolve_ip_adapter

    values = getattr(args, "ip_adapter", [])
    if not values:
        if getattr(args, "ip_adapter_encoder", None):
            raise CLIError("--ip-adapter-encoder needs an --ip-adapter")
        return ()
    if args.ip_adapter_dir is not None and not args.ip_adapter_dir.is_dir():
        raise CLIError(f"IP-Adapter folder {args.ip_adapter_dir} does not exist")
    prompts = []
    for value in values:
        try:
            name, image, numbers = parse_control(value)
            if len(numbers) > 1:
                raise CLIError("")
        except CLIError:
            raise CLIError(f"--ip-adapter {value}: expected MODEL:IMAGE or MODEL:IMAGE:SCALE") from None
        try:
            path = resolve_ip_adapter(name, args.ip_adapter_dir)
            encoder = find_image_encoder(path, adapter_config(path), args.ip_adapter_encoder, args.ip_adapter_dir)
            images = [open_image(Path(i), "reference image") for i in image.split(",")]
            prompts.append(ImagePrompt(str(path), images, scale=numbers[0] if numbers else 1.0, encoder=str(encoder)))
        except IPAdapterError as e:
            raise CLIError(f"--ip-adapter {value}: {e}") from None
    return tuple(prompts)


# A1111's "Prompts from file or textbox" line options -> Request fields
LINE_OPTIONS: dict[str, tuple[str, Any]] = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float), "seed": ("seed", int), "subseed": ("subseed", int),
    "subseed_strength": ("subseed_strength", float), "width": ("width", int), "height": ("height", int),
    "sampler_name": ("sampler", str), "sampler_index": ("sampler", str), "batch_size": ("batch_size", int),
    "n_iter": ("n_iter", int), "clip_skip": ("clip_skip", int), "tiling": ("tiling", lambda v: v == "True"),
}
MAX_LINES = 1000


def prompt_lines(path: Path) -> list[dict[str, Any]]:
    """The prompts file: per non-empty line, the fields it sets (a plain line is the prompt)."""
    import shlex

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"prompts file {path}: {e.__class__.__name__}: cannot read it as UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or len(lines) > MAX_LINES:
        raise CLIError(f"prompts file {path}: {len(lines)} lines (1 to {MAX_LINES})")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.startswith("--"):
            out.append({"prompt": line})
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise CLIError(f"prompts file {path}, line {number}: {e}") from None
        fields: dict[str, Any] = {}
        for key, value in zip(words[::2], words[1::2]):
            name = key.removeprefix("--")
            if not key.startswith("--") or name not in LINE_OPTIONS:
                raise CLIError(f"prompts file {path}, line {number}: unknown option {key!r} (known: "
                               f"{', '.join('--' + k for k in LINE_OPTIONS)})")
            field, kind = LINE_OPTIONS[name]
            try:
                fields[field] = kind(value)
            except ValueError:
                raise CLIError(f"prompts file {path}, line {number}: {key} {value!r} is not valid") from None
        if len(words) % 2:
            raise CLIError(f"prompts file {path}, line {number}: {words[-1]!r} has no value")
        out.append(fields)
    return out


def png_fields(path: Path) -> dict[str, Any]:
    from ..metadata import parse_parameters, read_parameters
    from ..request import fields_from_parameters

    try:
        text = read_parameters(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"--from-png {path}: not a readable PNG ({e.__class__.__name__})") from None
    if text is None:
        raise CLIError(f"--from-png {path}: the image holds no generation parameters")
    params = parse_parameters(text)
    for key in params:  # their images are not in the PNG (nor in A1111's): say so rather than drop them quietly
        if key.startswith(("ControlNet ", "IP-Adapter ")):
            print(f"sdengine: warning: --from-png: {key} is not re-applied (its image is not in the PNG); give "
                  f"--{'control' if key.startswith('ControlNet') else 'ip-adapter'} again", file=sys.stderr)
    return fields_from_parameters(params)


def request_from_args(args: argparse.Namespace, command: str, width: int | None, height: int | None,
                      line: dict[str, Any] | None = None):
    """The Request the options ask for (ValueError names a bad value); width/height fill unset sizes. Layers, each
    over the one before: the command's defaults, --from-png's parameters, the options, a --prompts-file line."""
    from ..hires import HiresFix
    from ..prompts import BUNDLED_STYLES, apply_styles, load_styles

    given = vars(args)
    base = png_fields(args.from_png) if getattr(args, "from_png", None) else {}
    values = {**COMMAND_DEFAULTS.get(command, {}), **base,
              **{field: given[field] for field, _ in REQUEST_OPTIONS.values() if field in given}}
    if "strength" in given:
        values["strength"] = given["strength"]
    values.setdefault("seed", -1)
    values["prompt"] = args.prompt if args.prompt is not None else base.get("prompt")
    values["negative_prompt"] = values.get("negative_prompt", "")
    values.update(line or {})
    if values["prompt"] is None:
        raise CLIError("a prompt is needed (or --from-png IMAGE, or --prompts-file FILE)")
    if args.style:
        styles = load_styles(args.styles_file or BUNDLED_STYLES)
        values["prompt"], values["negative_prompt"] = apply_styles(values["prompt"], values["negative_prompt"],
                                                                   args.style, styles)
    hires = {field: given[f"hires_{field}"] for field, _ in HIRES_OPTIONS.values() if f"hires_{field}" in given}
    if hires:
        resize_x, resize_y = hires.pop("resize", (0, 0))
        values["hires"] = HiresFix(resize_x=resize_x, resize_y=resize_y, **hires)
    if getattr(args, "lora_tags", None):
        values["prompt"] = " ".join([values["prompt"], *args.lora_tags]).strip()
    if getattr(args, "control_units", None):
        values["controls"] = args.control_units
    if getattr(args, "image_prompts", None):
        values["image_prompts"] = args.image_prompts
    values.setdefault("width", width)
    values.setdefault("height", height)
    return _request_class()(**values)


def pattern_paths(args: argparse.Namespace, reqs: list, model_name: str) -> list[Path]:
    """--out-pattern's names: numbered A1111-style in --out's folder (created below it as the pattern asks)."""
    from datetime import datetime

    from ..filenames import check_pattern, expand, numbered_paths, tag_values

    try:
        check_pattern(args.out_pattern)
    except ValueError as e:
        raise CLIError(str(e)) from None
    folder = Path(args.out or ".")
    if not folder.is_dir():
        raise CLIError(f"--out-pattern writes into a folder; {folder} is none")
    now, names = datetime.now(), []
    for req in reqs:
        for n in range(req.n_iter):
            batch = req.iteration(n)
            for i, seed in enumerate(batch.seeds):
                names.append(expand(args.out_pattern, tag_values({
                    "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": seed, "steps": req.steps,
                    "cfg": f"{req.cfg_scale:g}", "sampler": req.sampler_spec.display, "scheduler": req.schedule,
                    "width": req.width, "height": req.height, "model_name": model_name, "batch_number": i,
                    "generation_number": n, "clip_skip": req.clip_skip}, now)))
    return numbered_paths(folder, names, f".{args.format}")


def output_paths(out: str | Path | None, ids: list[int], force: bool = False, suffix: str = ".png") -> list[Path]:
    """One path per image: --out as given for one image, NAME-ID.png for several; default sdengine-ID.png; in
    --out's folder when it is one. `ids`: what tells the images apart (the seeds, or the variation seeds when there
    is a variation). Checked before any work: the folder exists, and no path exists (or is the same as another)
    unless `force`; a folder is never replaced."""
    if out is None:
        paths = [Path(f"sdengine-{s}{suffix}") for s in ids]
    elif Path(out).is_dir():
        paths = [Path(out) / f"sdengine-{s}{suffix}" for s in ids]
    elif str(out).endswith(("/", os.sep)):
        raise CLIError(f"output folder {out} does not exist")
    else:
        out = Path(out)
        if not out.parent.is_dir():
            raise CLIError(f"output folder {out.parent} does not exist")
        paths = [out] if len(ids) == 1 else [out.with_name(f"{out.stem}-{s}{out.suffix or '.png'}") for s in ids]
    for path in paths:
        if path.is_dir():
            raise CLIError(f"output {path} is a folder")
        if os.path.lexists(path) and not force:
            raise CLIError(f"output {path} exists (use --force to replace it)")
    if len(set(paths)) < len(paths):
        raise CLIError(f"two images of this run would be written to the same file ({paths[0]}, ...)")
    return paths


def open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise CLIError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise CLIError(f"{what} {path} is not a readable image ({e.__class__.__name__})") from None


def run_generation(args: argparse.Namespace) -> None:
    from .. import runtime
    from ..metadata import save_image

    command = args.command
    init = mask = note = None
    if command in ("img2img", "inpaint", "outpaint"):
        init = open_image(args.image, "init image")
    if command == "outpaint":  # the extended canvas and its mask, then inpainting (sdengine/outpaint.py)
        from ..outpaint import extend

        init, mask = extend(init, args.left, args.right, args.up, args.down, args.fill, args.overlap,
                            args.mask_blur, seed=args.seed if getattr(args, "seed", -1) >= 0 else 0)
    if command == "inpaint":
        from ..images import empty_mask_note, mask_to_grey

        mask = open_image(args.mask, "mask")
        if (empty := empty_mask_note(mask_to_grey(mask))) is not None:
            note = f"sdengine: note: {empty}"
        if mask.size != init.size:
            note = "\n".join(filter(None, [note, f"sdengine: note: mask {mask.size[0]}x{mask.size[1]} resized to "
                                                  f"the image's {init.size[0]}x{init.size[1]}"]))
            mask = mask.resize(init.size)
    model_path = runtime.resolve_model(args.model)
    sd_upscale = getattr(args, "sd_upscale", None)
    if sd_upscale is not None:  # the tiles are the request's size: by default the model's, as A1111's 512
        width = height = runtime.native_size(model_path)
    elif init is not None:
        width, height = init.width // 8 * 8, init.height // 8 * 8
    else:  # the size the model file records, read from its header: the Request is checked before any load
        width = height = runtime.native_size(model_path)
    loras, args.lora_tags = lora_options(args)
    args.control_units = control_options(args)
    args.image_prompts = ip_adapter_options(args)
    lines = prompt_lines(args.prompts_file) if args.prompts_file else [None]
    reqs = [request_from_args(args, command, width, height, line) for line in lines]
    for req in reqs:
        if req.refiner is not None:  # found before anything loads; txt2img only (Pipeline.latents says why)
            if command != "generate":
                raise CLIError(f"--refiner continues a txt2img schedule; {command} with a refiner is not supported")
            runtime.resolve_model(req.refiner)
    # one name per image: its seed, and with a prompts file its line number first (lines may share seeds)
    ids = [f"{number}-{i}" if len(reqs) > 1 else i for number, req in enumerate(reqs, 1)
           for n in range(req.n_iter)
           for i in ([req.seed + n] if sd_upscale is not None else req.iteration(n).image_ids)]
    if args.out_pattern:
        paths = pattern_paths(args, reqs, model_path.stem)
    else:
        paths = output_paths(args.out, ids, args.force, f".{args.format}")
    if sd_upscale is not None:  # the tiling checked, and a model upscaler found, before any model loads
        from ..sd_upscale import PLAIN_UPSCALERS, check_plan, upscaled_size
        from ..upscalers import resolve_upscaler

        if args.upscaler not in PLAIN_UPSCALERS:
            resolve_upscaler(args.upscaler, args.upscalers_dir or runtime.upscalers_dir())
        for req in reqs:
            check_plan(*upscaled_size(init.width, init.height, args.upscaler, sd_upscale), req.width, req.height,
                       args.sd_upscale_overlap, args.upscaler)
    device = runtime.pick_device(args.device)
    if note:  # only once every check has passed, so an error stays the one line on stderr
        print(note, file=sys.stderr)

    from ..networks import Networks
    from ..pipeline import Pipeline

    dtype = runtime.inference_dtype(args.precision, device)
    tiny = None
    if args.vae_tiny == SHIPPED_TINY:
        args.vae_tiny = runtime.shipped_taesd(model_path)
        if args.vae_tiny is None:
            raise CLIError("--vae-tiny without a file takes the tiny autoencoder shipped for the shipped model; for "
                           f"{model_path.name} give its TAESD file (--vae-tiny FILE)")
    if args.vae_tiny is not None:  # read before the model: a wrong file fails fast
        from ..nn.taesd import load_taesd

        tiny = load_taesd(args.vae_tiny, device, dtype)
    model = runtime.load_for_inference(model_path, device, dtype, vae=args.vae, compile=args.compile)
    if tiny is not None and (tiny.decoder is None or tiny.cfg.latent_channels != model.config.unet.out_channels):
        raise CLIError(f"--vae-tiny {args.vae_tiny}: " + ("holds no decoder" if tiny.decoder is None else
                       f"a tiny autoencoder for {tiny.cfg.latent_channels}-channel latents; this model's have "
                       f"{model.config.unet.out_channels}"))
    networks = Networks(model, embedding_dirs=[args.embeddings_dir or runtime.embeddings_dir()], loras=loras)
    pipe = Pipeline(model, networks=networks)
    pipe.tiny_vae, pipe.tiny_final = tiny, tiny is not None
    pipe.wildcards = args.wildcards_dir or runtime.wildcards_dir()
    pipe.controlnets.folder = args.controlnet_dir
    paths_left = iter(paths)
    for req in reqs:
        callback, bar = progress(args.quiet)
        try:
            if sd_upscale is not None:  # one upscaled image per batch count (sdengine/sd_upscale.py)
                from ..sd_upscale import sd_upscale as run_sd_upscale

                images = run_sd_upscale(pipe, req, init, args.upscaler, sd_upscale, args.sd_upscale_overlap,
                                        callback, args.upscalers_dir or runtime.upscalers_dir())
            else:
                images = pipe.run(req, init=init, mask=mask, callback=callback)
        finally:
            if bar is not None:
                bar.close()
        for warning in networks.warnings:
            print(f"sdengine: warning: {warning}", file=sys.stderr)
        written = []
        for image in images:  # written as each request finishes: a long prompts file keeps what it made
            path = next(paths_left)
            path.parent.mkdir(parents=True, exist_ok=True)  # a pattern's subfolders ([date]/...)
            save_image(image, path, image.info["parameters"], force=args.force)
            written.append(path)
            variation = f", variation seed {image.info['subseed']}" if "subseed" in image.info else ""
            print(f"wrote {path} (seed {image.info['seed']}{variation})")
        if args.grid and len(images) > 1:
            from ..images import image_grid

            grid_path = written[0].with_name(f"{written[0].stem}-grid{written[0].suffix}")
            save_image(image_grid(images), grid_path, images[0].info["parameters"], force=args.force)
            print(f"wrote {grid_path} (a grid of {len(images)})")


def progress(quiet: bool):
    if quiet:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", file=sys.stderr, dynamic_ncols=True, desc="sampling")

    def callback(i: int, n: int, x, denoised) -> None:
        if bar.total != n:
            bar.reset(total=n)
        bar.update(1)

    return callback, bar


def configure(name: str, p: argparse.ArgumentParser) -> None:
    if name in ("img2img", "inpaint", "outpaint"):
        p.add_argument("image", type=Path)
    if name == "outpaint":
        from ..outpaint import FILLS

        g = p.add_argument_group("outpainting", "extend the canvas (multiples of 8 pixels), then inpaint the border")
        for side in ("left", "right", "up", "down"):
            g.add_argument(f"--{side}", type=int, default=0, metavar="PX")
        g.add_argument("--fill", choices=FILLS, default="matched", help="what the border starts as (default: "
                       "matched: noise with the image's spectrum and colours, as A1111's outpainting mk2)")
        g.add_argument("--overlap", type=int, default=8, help="pixels of the image repainted along the seam")
        g.add_argument("--mask-blur", type=int, default=8, help="softness of the seam (pixels)")
    if name == "img2img":
        g = p.add_argument_group("SD upscale", "A1111's script: upscale, then img2img in overlapping tiles of "
                                 "--width x --height (default: the model's size) at --strength")
        g.add_argument("--sd-upscale", type=positive_float, default=None, metavar="SCALE",
                       help="upscale the image by SCALE first")
        g.add_argument("--upscaler", default="Lanczos", metavar="NAME",
                       help="None, Lanczos (default), Nearest, or a model in the upscalers folder")
        g.add_argument("--sd-upscale-overlap", type=int, default=64, metavar="PX",
                       help="pixels neighbouring tiles share, cross-faded (64)")
        g.add_argument("--upscalers-dir", type=Path, default=None,
                       help="the upscalers folder (default: $SDENGINE_UPSCALERS or $SDENGINE_HOME/upscalers)")
    if name == "inpaint":
        p.add_argument("mask", type=Path)
    add_generation_args(p, name)
    p.set_defaults(func=run_generation)
